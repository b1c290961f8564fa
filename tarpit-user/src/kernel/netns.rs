//! Running one call inside a named network namespace.
//!
//! aya resolves interface names in the calling thread's namespace, and
//! `ip netns exec` would remount /sys (hiding bpffs and cgroups), so only a
//! short-lived helper thread enters the namespace; the agent itself stays
//! where it is.
use std::fs::File;

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// Runs `f` on a thread that has joined `/var/run/netns/<name>`.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> Result<T> {
    let path = format!("/var/run/netns/{name}");
    let ns = File::open(&path).with_context(|| format!("no network namespace {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {name}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in network namespace {name} panicked"))?
    })
}
