//! `cargo xtask build-ebpf`: the kernel programs, in release, for
//! bpfel-unknown-none (debug builds link but the verifier refuses them).
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{paths, shell, toolchain};

pub fn build() -> Result<PathBuf> {
    toolchain::ensure()?;
    let linker = toolchain::bpf_linker();
    let mut cmd = toolchain::nightly("cargo");
    cmd.current_dir(paths::root().join("tarpit-ebpf"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_TARGET_DIR", paths::ebpf_target())
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // BTF for every map and program: names in bpftool, CO-RE relocations.
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        );
    shell::run(&mut cmd).context("the eBPF build failed (compiler output above)")?;
    let object = paths::ebpf_object();
    anyhow::ensure!(
        object.is_file(),
        "the eBPF build produced no {}",
        object.display()
    );
    Ok(object)
}
