//! The kernel hold's loader side (issue 21; the programs are in
//! `tarpit-ebpf/src/hold.rs`, the shared types in `tarpit_common::hold`).
//!
//! The hold program is verified on its own: a kernel without the raw
//! SYN-cookie helpers (before 6.0) refuses it, and the rest loads as
//! before. It is reached through a program array slot that the loader
//! fills only when the hold can work here; an empty slot means the main
//! XDP program drops held addresses, as any block entry.
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, MapError, ProgramArray},
    programs::Xdp,
};
use tarpit_common::hold::{HOLD_PROG_INDEX, HOLD_PROGS, HOLD_SETTINGS, HoldSettings};

use crate::config::KernelConfig;

/// The hold program's name in the object.
pub const HOLD_PROGRAM: &str = "tarpit_hold";

/// The caps the config asks for; the total is split over the possible
/// CPUs, since each CPU keeps its own share of it.
pub fn settings_from(cfg: &KernelConfig) -> HoldSettings {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    HoldSettings {
        per_source_rate: cfg.hold_rate_per_source,
        per_source_burst: cfg.hold_burst_per_source,
        cpu_rate: (cfg.hold_rate_total / cpus).max(1),
        cpu_burst: (cfg.hold_burst_total / cpus).max(1),
        reserved: [0; 4],
    }
}

/// Loads (verifies) the hold program; `Err` carries the kernel's reason.
pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut Xdp = ebpf
        .program_mut(HOLD_PROGRAM)
        .ok_or_else(|| format!("the kernel object has no program {HOLD_PROGRAM}"))?
        .try_into()
        .map_err(|e| format!("{HOLD_PROGRAM}: {e}"))?;
    prog.load()
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
}

/// Writes the caps and fills the hold slot (`active`) or empties it, so a
/// pinned slot never keeps a program of an earlier start that should not
/// run now.
pub fn install(ebpf: &mut Ebpf, cfg: &KernelConfig, active: bool) -> Result<()> {
    let map = ebpf
        .map_mut(HOLD_SETTINGS)
        .with_context(|| format!("the kernel object has no {HOLD_SETTINGS} map"))?;
    Array::<_, HoldSettings>::try_from(map)?
        .set(0, settings_from(cfg), 0)
        .context("cannot write the hold settings")?;
    let fd = if active {
        let prog: &Xdp = ebpf
            .program(HOLD_PROGRAM)
            .with_context(|| format!("no program {HOLD_PROGRAM}"))?
            .try_into()?;
        Some(prog.fd()?.try_clone()?)
    } else {
        None
    };
    let map = ebpf
        .map_mut(HOLD_PROGS)
        .with_context(|| format!("the kernel object has no {HOLD_PROGS} map"))?;
    let mut slots = ProgramArray::try_from(map)?;
    match fd {
        Some(fd) => slots
            .set(HOLD_PROG_INDEX, &fd, 0)
            .context("cannot install the hold program")?,
        None => match slots.clear_index(&HOLD_PROG_INDEX) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e).context("cannot empty the hold slot"),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_split_over_cpus_and_never_zero() {
        let cfg = KernelConfig {
            hold_rate_total: 1,
            hold_burst_total: 1,
            ..KernelConfig::default()
        };
        let s = settings_from(&cfg);
        assert_eq!((s.cpu_rate, s.cpu_burst), (1, 1));
        let d = settings_from(&KernelConfig::default());
        assert_eq!(d.per_source_rate, 20);
        assert!(d.cpu_rate >= 1 && d.cpu_rate <= 20_000);
    }
}
