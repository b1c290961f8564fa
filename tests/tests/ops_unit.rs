//! The shipped systemd unit and sysusers entry, checked by systemd's own
//! tools: what an administrator installs must load without a complaint.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tarpit::config::Config;
use tarpit_tests::env::repo_root;
use tarpit_tests::{TempDir, tarpit_bin};

fn shipped_unit() -> String {
    std::fs::read_to_string(repo_root().join("config/tarpit.service"))
        .expect("config/tarpit.service")
}

/// systemd's tools are installed by scripts/install-test-deps.sh; without
/// them this test cannot say anything, so it fails rather than pass.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is missing: install the `systemd` Debian package (scripts/install-test-deps.sh)"
    );
}

/// Runs `systemd-analyze verify --man=no` on `unit` saved as
/// tarpit.service; returns (success, every line it printed).
fn verify(unit: &str) -> (bool, String) {
    let dir = TempDir::new("unit");
    let path = dir.path.join("tarpit.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Warnings about our file (unknown keys, bad values) leave the exit
    // code 0: they count as failures here.
    let clean = out.status.success() && !text.contains("tarpit.service");
    (clean, text)
}

fn with_binary(unit: &str, bin: &Path) -> String {
    unit.replace("/usr/local/bin/tarpit", &bin.display().to_string())
}

#[test]
fn unit_passes_systemd_analyze_verify_with_the_built_binary() {
    let bin = tarpit_bin();
    let (clean, text) = verify(&with_binary(&shipped_unit(), &bin));
    assert!(clean, "systemd-analyze verify complained:\n{text}");
}

#[test]
fn verify_catches_what_it_should() {
    // The check above is only worth something if it can fail: a missing
    // binary and a misspelt value must both be caught.
    let (clean, text) =
        verify(&shipped_unit().replace("/usr/local/bin/tarpit", "/nonexistent/tarpit"));
    assert!(!clean, "a missing ExecStart binary passed:\n{text}");
    let unit = with_binary(&shipped_unit(), &tarpit_bin()).replace("Type=notify", "Type=notifyy");
    let (clean, text) = verify(&unit);
    assert!(!clean, "a bad Type= passed:\n{text}");
}

/// A `Key=value` line of the unit (the last one wins, as in systemd).
fn directive<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[test]
fn unit_matches_what_the_agent_does() {
    let unit = shipped_unit();
    assert_eq!(directive(&unit, "Type"), Some("notify"));
    assert_eq!(directive(&unit, "NotifyAccess"), Some("main"));
    assert!(directive(&unit, "WatchdogSec").is_some());
    assert_eq!(
        directive(&unit, "ExecReload"),
        Some("/usr/bin/kill -HUP $MAINPID")
    );
    assert_eq!(
        directive(&unit, "ExecStart"),
        Some("/usr/local/bin/tarpit run -c /etc/tarpit/tarpit.toml")
    );
    // systemd must give the drain its full time before it kills.
    let stop = directive(&unit, "TimeoutStopSec").expect("TimeoutStopSec");
    let stop = Duration::from_secs(
        stop.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("TimeoutStopSec={stop}: write it as <seconds>s")),
    );
    let drain = Config::default().daemon.shutdown_timeout;
    assert!(
        stop > drain + Duration::from_secs(5),
        "TimeoutStopSec {stop:?} must exceed shutdown_timeout {drain:?}"
    );
    // Start-up needs these; the agent drops to CAP_BPF afterwards.
    let bounding = directive(&unit, "CapabilityBoundingSet").expect("CapabilityBoundingSet");
    for cap in [
        "CAP_BPF",
        "CAP_NET_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
    ] {
        assert!(
            bounding.split_whitespace().any(|c| c == cap),
            "{cap} missing from {bounding}"
        );
    }
    // The pins live under /sys/fs/bpf: it must stay writable.
    assert_eq!(directive(&unit, "ReadWritePaths"), Some("-/sys/fs/bpf"));
    assert_eq!(directive(&unit, "ProtectKernelTunables"), None);
}

#[test]
fn sysusers_entry_creates_the_tarpit_user() {
    let root = TempDir::new("sysusers");
    std::fs::create_dir_all(root.path.join("etc")).expect("etc");
    let out = Command::new(tool("systemd-sysusers"))
        .arg(format!("--root={}", root.path.display()))
        .arg(repo_root().join("config/tarpit.sysusers"))
        .output()
        .expect("run systemd-sysusers");
    assert!(
        out.status.success(),
        "systemd-sysusers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path.join("etc/passwd")).expect("passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("tarpit:"))
        .unwrap_or_else(|| panic!("no tarpit user in\n{passwd}"));
    let fields: Vec<&str> = line.split(':').collect();
    let uid: u32 = fields[2].parse().expect("uid");
    assert!(uid > 0 && uid < 1000, "a system uid, got {uid}");
    assert_eq!(fields[6], "/usr/sbin/nologin");
}
