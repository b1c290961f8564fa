//! After the tests: did any test leave something of ours behind?
//!
//! Every harness object is named `<prefix><pid>-<n>` with the pid of the
//! test process that made it. Once the suite is over, anything whose test
//! process is gone is a leak: a namespace, a pin directory, a cgroup, or an
//! agent process still running.
use std::path::Path;
use std::process::Command;

/// Names of leftovers, empty when clean.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            for prefix in ["tps-", "tpc-"] {
                if let Some(id) = name.strip_prefix(prefix)
                    && owner_gone(id)
                {
                    found.push(format!("network namespace {name}"));
                }
            }
        }
    }
    for (dir, prefix, what) in [
        ("/sys/fs/bpf", "tarpit-test-", "pin directory"),
        ("/sys/fs/bpf", "tarpit-demo-", "demo pin directory"),
        ("/sys/fs/cgroup/unified", "tarpit-test-", "cgroup"),
    ] {
        for name in entries(Path::new(dir)) {
            if let Some(id) = name.strip_prefix(prefix)
                && owner_gone(id)
            {
                found.push(format!("{what} {dir}/{name}"));
            }
        }
    }
    if let Ok(out) = Command::new("pgrep")
        .args(["-af", "tarpit-agent-"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // ".../tarpit-agent-<pid>-<n>/tarpit.toml": the test's pid.
            let owner = line
                .split("tarpit-agent-")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default();
            if line.contains(" run ") && owner_gone(owner) {
                found.push(format!("agent process {line}"));
            }
        }
    }
    found
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// True when the test process that made `<pid>-<n>` has exited (or the
/// name holds no pid: nothing of ours is named so).
fn owner_gone(id: &str) -> bool {
    testkit::owner_alive(id) != Some(true)
}
