//! Per-test bpffs pin directories and cgroups.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::env::unique_id;

/// A pin directory of the test's own under /sys/fs/bpf.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Result<PinDir> {
        ensure_bpffs()?;
        Ok(PinDir {
            path: PathBuf::from(format!("/sys/fs/bpf/tarpit-test-{}", unique_id())),
        })
    }

    /// Names of the pins left in the directory (empty when gone).
    pub fn entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect(&self.path, &self.path, &mut out);
        out.sort();
        out
    }
}

fn collect(base: &std::path::Path, dir: &std::path::Path, out: &mut Vec<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.display().to_string());
            }
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // bpffs allows unlink and rmdir; remove depth-first.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Mounts bpffs at /sys/fs/bpf if it is not there yet.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("mount")?;
    anyhow::ensure!(status.success(), "cannot mount bpffs at /sys/fs/bpf");
    Ok(())
}

/// The cgroup2 mount of this machine kind (hybrid layout).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// A child cgroup of the test's own, so sock_ops sees only the test's
/// sockets and not every socket on the machine.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Result<TestCgroup> {
        let path = PathBuf::from(format!("{CGROUP2_ROOT}/tarpit-test-{}", unique_id()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// Moves a process into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move {pid} into {}", self.path.display()))
    }

    /// The same command, run through `sh` that first moves itself into
    /// this cgroup and then execs the program (so the program and its
    /// children start inside the cgroup, with no race).
    pub fn wrap(&self, cmd: &std::process::Command) -> std::process::Command {
        let procs = self.path.join("cgroup.procs");
        let mut sh = std::process::Command::new("sh");
        sh.arg("-c")
            .arg(format!("echo $$ > {} && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A cgroup can only be removed when empty: move stragglers to the root.
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(format!("{CGROUP2_ROOT}/cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
