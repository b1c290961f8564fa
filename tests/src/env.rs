//! Facts about the test environment: root, ids, the binary under test.
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// True when the test can run (root). When it cannot: under `CI=true` the
/// test fails loudly (CI must never pass by skipping); elsewhere it prints
/// why and the caller returns early.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (CAP_BPF, CAP_NET_ADMIN) and CI=true forbids skipping it");
    }
    eprintln!("skipped: this test needs root (CAP_BPF, CAP_NET_ADMIN)");
    false
}

/// A short id, unique across the tests of all running test processes:
/// the pid (hex) and a per-process counter, `<pid>-<n>`. Short because
/// interface names are limited to 15 bytes; the pid lets the suite's leak
/// check tell a leftover of a finished test from one still in use.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{:x}", std::process::id(), n)
}

/// The `tarpit` binary under test: `TARPIT_BIN`, else target/debug/tarpit
/// next to this test executable.
pub fn tarpit_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TARPIT_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test> -> target/debug/tarpit
    let exe = std::env::current_exe().expect("current_exe");
    let debug = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = debug.join("tarpit");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p tarpit-user`) or set TARPIT_BIN",
        bin.display()
    );
    bin
}

/// The repository root (for ../shared and config files).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The shared peers directory (Postfix config templates, DNSBL zone). The
/// project keeps its own copy under tests/peers so it does not depend on
/// ../shared being present.
pub fn peers_dir() -> PathBuf {
    repo_root().join("tests/peers")
}
