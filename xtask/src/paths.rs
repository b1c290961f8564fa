//! Where things are in the repository.
use std::path::PathBuf;

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Project-local tools (bpf-linker), kept out of git.
pub fn tools() -> PathBuf {
    root().join(".tools")
}

/// Target directory of the nested eBPF build.
pub fn ebpf_target() -> PathBuf {
    root().join("target/ebpf")
}

/// The built eBPF object, where tarpit-user's build.rs looks for it.
pub fn ebpf_object() -> PathBuf {
    ebpf_target().join("bpfel-unknown-none/release/tarpit")
}

/// Cargo's target directory for the host crates: `CARGO_TARGET_DIR` when
/// set (relative to the workspace root), else `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}
