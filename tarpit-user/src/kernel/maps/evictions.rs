//! Automatic blocks this process evicted from the full automatic part of
//! the block list to make room, lately: an eviction is this host's own
//! housekeeping, not a deletion, and the cluster (`cluster::mirror`), which
//! finds changes by comparing the kernel's block list with what it
//! shared, must not tell the other hosts to delete the block.
//!
//! One log per process, since the closed loop and the cluster hold maps of
//! their own. An eviction is noted *before* the entry leaves the kernel,
//! so whoever sees it gone finds the note; notes are kept [`KEEP`] and at
//! most [`MAX_NOTES`].
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use ipnet::IpNet;

use super::super::{clock::BootInstant, prefix};

/// How long an eviction is remembered: far longer than the cluster's
/// 250 ms between looks at the kernel.
pub const KEEP: Duration = Duration::from_secs(60);
/// Notes kept at most (a full table evicts 1/64 of itself at a time).
pub const MAX_NOTES: usize = 1 << 17;

fn log() -> &'static Mutex<HashMap<IpNet, u64>> {
    static LOG: OnceLock<Mutex<HashMap<IpNet, u64>>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The one spelling of a network (IPv4-mapped as IPv4, host bits zero).
fn canonical(net: IpNet) -> IpNet {
    prefix::net_of(&prefix::key_of(&net))
}

/// Notes that `net` is being evicted at `now` (before it is deleted).
pub(super) fn note(net: IpNet, now: BootInstant) {
    let mut log = log().lock().unwrap_or_else(|e| e.into_inner());
    if log.len() >= MAX_NOTES {
        let keep = KEEP.as_nanos() as u64;
        log.retain(|_, at| now.0.saturating_sub(*at) < keep);
        if log.len() >= MAX_NOTES {
            // Still full: the oldest notes matter least.
            let mut ats: Vec<u64> = log.values().copied().collect();
            ats.sort_unstable();
            let cut = ats[ats.len() / 2];
            log.retain(|_, at| *at > cut);
        }
    }
    log.insert(canonical(net), now.0);
}

/// Whether the kernel entry for `net` written at `written` (boot-clock
/// nanoseconds) left the kernel by an eviction of this process: evicted
/// within [`KEEP`], and not written again since.
pub fn evicted(net: IpNet, written: u64) -> bool {
    let now = BootInstant::now().0;
    let log = log().lock().unwrap_or_else(|e| e.into_inner());
    log.get(&canonical(net))
        .is_some_and(|&at| at >= written && now.saturating_sub(at) < KEEP.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eviction_is_known_for_the_entry_it_removed_not_for_a_later_one() {
        let net: IpNet = "198.51.100.230/32".parse().unwrap();
        let mapped: IpNet = "::ffff:198.51.100.230/128".parse().unwrap();
        let now = BootInstant::now();
        let written = now.0.saturating_sub(1_000);
        assert!(!evicted(net, written));
        note(mapped, now);
        assert!(evicted(net, written), "one spelling for v4 and mapped");
        // Blocked again after the eviction, then gone: not the eviction's.
        assert!(!evicted(net, now.0 + 1));
        // Long ago: forgotten.
        let other: IpNet = "198.51.100.231/32".parse().unwrap();
        let old = BootInstant(now.0.saturating_sub(KEEP.as_nanos() as u64 + 1));
        note(other, old);
        assert!(!evicted(other, 0));
    }
}
