//! Facts about the test environment: root, ids, the binary under test.
use std::path::PathBuf;

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

/// A short id, unique across the tests of all running test processes
/// (`<pid>-<n>`, see [`testkit::unique_id`]): the pid lets the suite's leak
/// check tell a leftover of a finished test from one still in use.
pub use testkit::unique_id;

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

/// The shared peers directory (Postfix config templates, DNSBL zone).
pub use testkit::postfix::peers_dir;
