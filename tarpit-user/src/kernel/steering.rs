//! The sk_lookup side of the loader: trusted clients straight to the MTA,
//! and fail-open when the agent is gone (see `tarpit_common::steer`).
//!
//! The program is attached to a network namespace through a link pinned
//! under `<pin_path>/links/`, so it outlives the agent: a crashed agent's
//! listener leaves the sockmap by itself and the program then hands every
//! client to the MTA. A new agent swaps the program in place (the old link
//! is held across the loader's clean-up of stale links, so steering never
//! stops), puts the MTA's listener and its own back into the sockmap, and
//! takes traffic back without anyone restarting anything.
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, Map, MapData, PerCpuArray, SockMap};
use aya::programs::{SkLookup, links::FdLink};
use tarpit_common::steer::{
    self, SLOT_AGENT_V4, SLOT_AGENT_V6, SLOT_MTA_V4, SLOT_MTA_V6, STEER_COUNTERS_LEN, SteerSettings,
};
use tracing::{info, warn};

const _: () = assert!(steer::STEER_C_PASSED < STEER_COUNTERS_LEN);

use super::{Kernel, attach, listener, sys};

pub const SK_LOOKUP_PROGRAM: &str = "tarpit_sk_lookup";

/// The pinned link of a previous agent, held open while the loader
/// removes link pins it does not know, so the program keeps running.
pub struct HeldLink {
    pin: PathBuf,
    fd: OwnedFd,
}

/// The network namespace file sk_lookup attaches to: the configured
/// `kernel.netns`, else the agent's own.
fn netns_path(netns: Option<&str>) -> PathBuf {
    match netns {
        Some(ns) => PathBuf::from(format!("/var/run/netns/{ns}")),
        None => PathBuf::from("/proc/self/ns/net"),
    }
}

/// Where the sk_lookup link of a namespace is pinned.
pub fn link_pin(pin_path: &Path, netns: Option<&str>) -> Result<PathBuf> {
    let p = netns_path(netns);
    let ino = std::fs::metadata(&p)
        .with_context(|| format!("cannot open network namespace {}", p.display()))?
        .ino();
    Ok(attach::link_pin(
        pin_path,
        "sk_lookup",
        None,
        &ino.to_string(),
    ))
}

/// Call before [`Kernel::load`]: keeps a previous agent's steering link
/// alive while the loader tidies up the link directory.
pub fn hold_link(pin_path: &Path, netns: Option<&str>) -> Option<HeldLink> {
    let pin = link_pin(pin_path, netns).ok()?;
    if !pin.exists() {
        return None;
    }
    match sys::obj_get(&pin) {
        Ok(fd) => Some(HeldLink { pin, fd }),
        Err(e) => {
            warn!("steering link {} cannot be opened: {e}", pin.display());
            None
        }
    }
}

/// Counters of the steering decisions, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SteerCounters {
    pub allowed: u64,
    pub authenticated: u64,
    pub agent: u64,
    pub fail_open: u64,
    pub passed: u64,
}

/// The pinned steering maps, opened by path (agent, CLI, tests).
pub struct SteerMaps {
    sockets: SockMap<MapData>,
    settings: Array<MapData, SteerSettings>,
    counters: PerCpuArray<MapData, u64>,
}

fn open(pin_path: &Path, name: &str) -> Result<Map> {
    let p = pin_path.join(name);
    let data = MapData::from_pin(&p).with_context(|| format!("cannot open {}", p.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl SteerMaps {
    pub fn open(pin_path: &Path) -> Result<SteerMaps> {
        Ok(SteerMaps {
            sockets: SockMap::try_from(open(pin_path, steer::STEER)?)?,
            settings: Array::try_from(open(pin_path, steer::STEER_SETTINGS)?)?,
            counters: PerCpuArray::try_from(open(pin_path, steer::STEER_COUNTERS)?)?,
        })
    }

    pub fn set_settings(&mut self, s: SteerSettings) -> Result<()> {
        self.settings
            .set(0, s, 0)
            .context("cannot write the steering settings")
    }

    pub fn settings(&self) -> Result<SteerSettings> {
        Ok(self.settings.get(&0, 0)?)
    }

    /// Puts a listening socket into a slot (replacing what was there).
    pub fn set_slot(&mut self, slot: u32, fd: &OwnedFd) -> Result<()> {
        use std::os::fd::AsRawFd;
        struct Raw(i32);
        impl AsRawFd for Raw {
            fn as_raw_fd(&self) -> i32 {
                self.0
            }
        }
        self.sockets
            .set(slot, &Raw(fd.as_raw_fd()), 0)
            .with_context(|| format!("cannot put a listener into steering slot {slot}"))
    }

    pub fn clear_slot(&mut self, slot: u32) -> Result<bool> {
        match self.sockets.clear_index(&slot) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) if super::error::map_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e).context("cannot clear a steering slot"),
        }
    }

    pub fn counters(&self) -> Result<SteerCounters> {
        let sum = |i: u32| -> Result<u64> {
            let v = self.counters.get(&i, 0)?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(SteerCounters {
            allowed: sum(steer::STEER_C_ALLOWED)?,
            authenticated: sum(steer::STEER_C_AUTHENTICATED)?,
            agent: sum(steer::STEER_C_AGENT)?,
            fail_open: sum(steer::STEER_C_FAIL_OPEN)?,
            passed: sum(steer::STEER_C_PASSED)?,
        })
    }

    /// Takes the listeners at `addrs` (from whichever process holds them,
    /// `first` looked at first) into the v4/v6 slots of a pair. A
    /// dual-stack listener also fills the IPv4 slot if no other does.
    pub fn take_listeners(
        &mut self,
        addrs: &[SocketAddr],
        first: Option<u32>,
        slots: (u32, u32),
        what: &str,
    ) -> Result<Vec<listener::TakenListener>> {
        let mut taken = Vec::new();
        let mut v4_set = false;
        for addr in addrs {
            let l = listener::take_listener(*addr, first)
                .with_context(|| format!("{what} listener {addr}"))?;
            if l.bound.is_ipv4() {
                self.set_slot(slots.0, &l.fd)?;
                v4_set = true;
            } else {
                self.set_slot(slots.1, &l.fd)?;
            }
            info!(
                "steering: {what} listener {addr} (process {}, bound {}) in the sockmap",
                l.pid, l.bound
            );
            taken.push(l);
        }
        if !v4_set && let Some(l) = taken.iter().find(|l| l.dual_stack) {
            self.set_slot(slots.0, &l.fd)?;
        }
        Ok(taken)
    }

    /// The MTA's plain listeners into the MTA slots.
    pub fn take_mta(&mut self, addrs: &[SocketAddr]) -> Result<Vec<listener::TakenListener>> {
        let me = std::process::id();
        let _ = self.clear_slot(SLOT_MTA_V4);
        let _ = self.clear_slot(SLOT_MTA_V6);
        let taken = self.take_listeners(addrs, None, (SLOT_MTA_V4, SLOT_MTA_V6), "MTA")?;
        if taken.iter().any(|l| l.pid == me) {
            bail!("the MTA listener is one of the agent's own sockets");
        }
        Ok(taken)
    }

    /// The inodes of the sockets listening on `addrs` now (`None` where
    /// nothing listens): a changed inode means the MTA was restarted and
    /// its listener must be taken again.
    pub fn listener_inodes(addrs: &[SocketAddr]) -> Vec<Option<u64>> {
        addrs
            .iter()
            .map(|a| listener::listener_inode(*a).ok().map(|e| e.inode))
            .collect()
    }

    /// The agent's own listeners into the agent slots: from now on the
    /// program hands untrusted clients to the agent.
    pub fn take_agent(&mut self, addrs: &[SocketAddr]) -> Result<()> {
        let me = std::process::id();
        let taken =
            self.take_listeners(addrs, Some(me), (SLOT_AGENT_V4, SLOT_AGENT_V6), "agent")?;
        if let Some(l) = taken.iter().find(|l| l.pid != me) {
            bail!(
                "listener {} belongs to process {}, not to this agent",
                l.bound,
                l.pid
            );
        }
        Ok(())
    }
}

impl Kernel {
    /// Loads the sk_lookup program and attaches it to the agent's network
    /// namespace (or `kernel.netns`), swapping the program of a previous
    /// agent's link in place when there is one (`held`, see [`hold_link`]).
    /// With `persist` the link is pinned and outlives the agent (fail-open).
    pub fn attach_steering(&mut self, held: Option<HeldLink>, persist: bool) -> Result<()> {
        let netns = self.cfg.netns.clone();
        let pin = link_pin(&self.cfg.pin_path, netns.as_deref())?;
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .context("the kernel object has no sk_lookup program (rebuild the eBPF object)")?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the verifier refused {SK_LOOKUP_PROGRAM}"))?;
        let prog_fd = prog.fd()?.try_clone()?;
        if let Some(h) = held {
            match sys::link_update(h.fd.as_fd(), prog_fd.as_fd()) {
                Ok(()) => {
                    if !h.pin.exists() {
                        pin_fd(&h.fd, &h.pin)?;
                    }
                    info!("sk_lookup: program replaced in place ({})", h.pin.display());
                    if persist {
                        self.held.push(attach::Attachment::Pinned(h.pin));
                        return Ok(());
                    }
                    // Not persistent any more: let it go with this process.
                    let _ = std::fs::remove_file(&h.pin);
                }
                Err(e) => warn!("sk_lookup: old link not reusable ({e}); attaching anew"),
            }
        }
        let ns_file = File::open(netns_path(netns.as_deref()))
            .context("cannot open the network namespace for sk_lookup")?;
        let held = attach::attach_or_replace(prog_fd.as_fd(), &pin, persist, "sk_lookup", || {
            let id = prog
                .attach(ns_file.as_fd())
                .context("cannot attach sk_lookup to the network namespace")?;
            Ok(FdLink::from(prog.take_link(id)?))
        })?;
        self.held.push(held);
        Ok(())
    }
}

/// Pins a link fd at `path` (BPF_OBJ_PIN).
fn pin_fd(fd: &OwnedFd, path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = std::os::fd::AsRawFd::as_raw_fd(fd) as u32 as u64;
    // SAFETY: BPF_OBJ_PIN (6) with a valid path pointer and fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        bail!(
            "cannot pin the sk_lookup link at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
