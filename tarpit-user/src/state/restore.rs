//! Putting the state file back into the kernel when the agent starts: the
//! one part of the state file that talks to the kernel, kept apart from the
//! file format and its safe writes (`super`).
use std::path::Path;
use std::time::{Duration, SystemTime};

use tarpit_common::BlockReason;

use super::{State, StateError, StateLock, from_unix, unix};
use crate::kernel::{BlockSpec, KernelMaps};

/// What [`restore`] put back into the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub allow: usize,
    pub block: usize,
    /// Entries that had expired while the agent was away (dropped from
    /// the file).
    pub expired: usize,
    /// Entries the kernel refused (e.g. a full map); logged one by one.
    pub failed: usize,
}

/// Puts the unexpired entries of the state file into the kernel's maps at
/// `pin_path` (the agent calls it right after loading the kernel side).
/// Expiry times are wall-clock in the file and become boot-clock TTLs
/// here, so an entry added for a day still ends when it should after a
/// reboot. Entries already in the kernel are rewritten with the same
/// values. A single refused entry is logged and the rest still go in.
pub fn restore(pin_path: &Path, state_file: &Path) -> anyhow::Result<RestoreReport> {
    let mut report = RestoreReport::default();
    // Nothing saved yet: no lock file or directory is made either. (A
    // link, even a dangling one, is something: loading it is refused.)
    if state_file.symlink_metadata().is_err() {
        return Ok(report);
    }
    let _lock = StateLock::acquire(state_file)?;
    let mut state = State::load(state_file)?;
    let now = SystemTime::now();
    report.expired = state.prune_expired(unix(now));
    if report.expired > 0 {
        state.save(state_file)?;
    }
    if state.allow.is_empty() && state.block.is_empty() {
        return Ok(report);
    }
    let ttl_of = |expires_at: Option<u64>| {
        expires_at.map(|e| {
            from_unix(e)
                .duration_since(now)
                .unwrap_or(Duration::from_secs(1))
        })
    };
    let mut maps = KernelMaps::open(pin_path)?;
    for e in &state.allow {
        match maps.allow_add(e.cidr, ttl_of(e.expires_at)) {
            Ok(()) => report.allow += 1,
            Err(err) => {
                report.failed += 1;
                tracing::error!(cidr = %e.cidr, "saved allow entry not restored: {err}");
            }
        }
    }
    for e in &state.block {
        let spec = BlockSpec {
            ttl: ttl_of(e.expires_at),
            reason: BlockReason::Manual,
            all_ports: e.all_ports,
            hold: e.hold,
        };
        match maps.block_add(e.cidr, spec) {
            Ok(()) => report.block += 1,
            Err(err) => {
                report.failed += 1;
                tracing::error!(cidr = %e.cidr, "saved block entry not restored: {err}");
            }
        }
    }
    Ok(report)
}

/// [`restore`] for the agent's start: logs what happened and does not stop
/// the agent for a damaged file (mail must flow; the file is left untouched
/// for the admin to repair). A planted symbolic link is different: someone
/// tried to make root write elsewhere, and the agent refuses to start.
pub fn restore_at_start(pin_path: &Path, state_file: &Path) -> anyhow::Result<()> {
    match restore(pin_path, state_file) {
        Ok(r) => tracing::info!(
            file = %state_file.display(),
            allow = r.allow,
            block = r.block,
            expired = r.expired,
            failed = r.failed,
            "saved allow and block entries restored"
        ),
        Err(e) => {
            if let Some(refused) = e.downcast_ref::<StateError>()
                && refused.is_refused()
            {
                return Err(e);
            }
            tracing::error!(
                file = %state_file.display(),
                "saved allow and block entries not restored: {e:#}"
            )
        }
    }
    Ok(())
}
