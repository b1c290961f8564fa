//! Embeds the kernel programs built by `cargo xtask build-ebpf`, when they
//! exist. Without them the crate still builds (unit tests, fuzzing and
//! clippy never trigger the eBPF build) and `tarpit run` says how to get
//! them instead of attaching anything.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tarpit_ebpf)");
    println!("cargo::rerun-if-env-changed=TARPIT_EBPF_OBJECT");
    let object = match std::env::var_os("TARPIT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("../target/ebpf/bpfel-unknown-none/release/tarpit")
        }
    };
    println!("cargo::rerun-if-changed={}", object.display());
    if object.is_file() {
        println!("cargo::rustc-cfg=tarpit_ebpf");
        println!("cargo::rustc-env=TARPIT_EBPF_OBJECT={}", object.display());
    }
}
