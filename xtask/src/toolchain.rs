//! Bootstrapping the eBPF toolchain: the nightly's `rust-src` and a
//! project-local `bpf-linker` built against the nightly's own libLLVM.
//!
//! Idempotent: each step checks first and says what it does only when it
//! does something. Recipe and pitfalls: ../shared/TOOLCHAIN.md.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};

use crate::{paths, shell};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// A `rustup run nightly <tool>` command with the outer cargo's toolchain
/// choice removed from the environment, so the nightly really is used.
pub fn nightly(tool: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", tool]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// What the nightly toolchain says about itself.
struct Nightly {
    sysroot: PathBuf,
    llvm_version: String,
    llvm_major: String,
}

fn nightly_info() -> Result<Nightly> {
    let vv = shell::output(nightly("rustc").arg("-vV")).map_err(|_| {
        anyhow!(
            "the Rust nightly toolchain is missing or broken; install it with \
             `rustup toolchain install nightly --profile minimal`"
        )
    })?;
    let llvm_version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` does not report an LLVM version"))?
        .trim()
        .to_string();
    let llvm_major = llvm_version
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let sysroot = shell::output(nightly("rustc").args(["--print", "sysroot"]))?;
    Ok(Nightly {
        sysroot: PathBuf::from(sysroot.trim()),
        llvm_version,
        llvm_major,
    })
}

/// Makes sure `rust-src` is installed for nightly.
fn ensure_rust_src() -> Result<()> {
    let installed = shell::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    shell::say(
        "Installing",
        "rust-src for the nightly toolchain (build-std needs it)",
    );
    shell::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("cannot install rust-src; run `rustup component add rust-src --toolchain nightly`")
}

fn linker_dir() -> PathBuf {
    paths::tools().join("bpf-linker")
}

/// The project-local bpf-linker binary.
pub fn bpf_linker() -> PathBuf {
    linker_dir().join("bin/bpf-linker")
}

/// What the installed linker was built for; a mismatch means a rebuild.
fn stamp(n: &Nightly, libllvm: &Path) -> String {
    format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm {} {}\n",
        n.llvm_version,
        libllvm.display()
    )
}

fn libllvm(n: &Nightly) -> Result<PathBuf> {
    let lib = n.sysroot.join("lib");
    std::fs::read_dir(&lib)
        .with_context(|| format!("cannot read {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with("libLLVM.so."))
        })
        .ok_or_else(|| {
            anyhow!(
                "the nightly toolchain has no libLLVM.so.* in {}; reinstall it with \
                 `rustup toolchain install nightly --force` (the llvm-tools come with it)",
                lib.display()
            )
        })
}

/// Builds bpf-linker into `.tools/bpf-linker` unless a working one built
/// for this nightly's LLVM is already there.
fn ensure_bpf_linker(n: &Nightly) -> Result<()> {
    let lib = libllvm(n)?;
    let dir = linker_dir();
    let stamp_file = dir.join("stamp");
    let want = stamp(n, &lib);
    let have = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    if have == want && shell::succeeds(Command::new(bpf_linker()).arg("--version")) {
        return Ok(());
    }
    if bpf_linker().exists() {
        shell::say(
            "Rebuilding",
            "bpf-linker: it was built for another LLVM or no longer runs",
        );
    } else {
        shell::say(
            "Building",
            &format!(
                "bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} into {} (about a minute, once)",
                n.llvm_version,
                dir.display()
            ),
        );
    }
    // bpf-linker links -lLLVM from LLVM_PREFIX/lib; the nightly ships the
    // real library under a versioned name only.
    let prefix = dir.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let file_name = lib.file_name().ok_or_else(|| anyhow!("bad libLLVM path"))?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(file_name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    let _ = std::fs::remove_file(&stamp_file);
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "--locked",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        &format!("llvm-{}", n.llvm_major),
        "--force",
        "--root",
    ])
    .arg(&dir)
    .env("LLVM_PREFIX", &prefix)
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO_TARGET_DIR");
    let log = dir.join("build.log");
    let log_file = std::fs::File::create(&log)?;
    let status = cmd
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed (log: {}); check that the crate registry is \
             reachable and that `rustc +nightly -vV` reports LLVM {}",
            log.display(),
            n.llvm_major
        );
    }
    if !shell::succeeds(Command::new(bpf_linker()).arg("--version")) {
        bail!(
            "the freshly built bpf-linker does not run (log: {}); delete {} and retry",
            log.display(),
            dir.display()
        );
    }
    std::fs::write(&stamp_file, want)?;
    shell::say("Built", &bpf_linker().display().to_string());
    Ok(())
}

/// Everything the eBPF build needs, installed if missing.
pub fn ensure() -> Result<()> {
    let n = nightly_info()?;
    ensure_rust_src()?;
    ensure_bpf_linker(&n)
}
