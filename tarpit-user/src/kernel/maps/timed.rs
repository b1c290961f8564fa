//! The authenticated and slowed addresses: hash maps of `TimedEntry`
//! keyed by address, written by the agent (AUTH, offenders) and by
//! `tarpit auth`, read by XDP/sock_ops. One file because both maps share
//! every operation.
use std::net::IpAddr;
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use tarpit_common::{IpAddrKey, TimedEntry, maps as names};

use super::{KernelMaps, layout_errno};
use crate::kernel::{
    clock::{BootInstant, expiry_from_ttl, expiry_to_instant},
    error::KernelError,
};

/// An entry of the authenticated or slowed map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedItem {
    pub ip: IpAddr,
    pub added: BootInstant,
    pub expires: Option<BootInstant>,
}

impl TimedItem {
    pub fn is_active_at(&self, now: BootInstant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

impl KernelMaps {
    pub(super) fn timed_add(
        map: &mut HashMap<MapData, IpAddrKey, TimedEntry>,
        name: &'static str,
        ip: IpAddr,
        ttl: Option<Duration>,
    ) -> Result<(), KernelError> {
        let entry = TimedEntry {
            expires_ns: expiry_from_ttl(ttl),
            added_ns: BootInstant::now().0,
        };
        map.insert(IpAddrKey::from(ip), entry, 0)
            .map_err(|e| KernelError::from_map(format!("add {ip} to {name}"), e, None))
    }

    pub(super) fn timed_del(
        map: &mut HashMap<MapData, IpAddrKey, TimedEntry>,
        name: &str,
        ip: IpAddr,
    ) -> Result<bool, KernelError> {
        match map.remove(&IpAddrKey::from(ip)) {
            Ok(()) => Ok(true),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(KernelError::from_map(
                format!("remove {ip} from {name}"),
                e,
                None,
            )),
        }
    }

    pub(super) fn timed_get(
        map: &HashMap<MapData, IpAddrKey, TimedEntry>,
        name: &str,
        ip: IpAddr,
    ) -> Result<Option<TimedItem>, KernelError> {
        match map.get(&IpAddrKey::from(ip), 0) {
            Ok(v) => Ok(Some(timed_item(IpAddrKey::from(ip), v))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(KernelError::from_map(format!("read {name}"), e, None)),
        }
    }

    pub(super) fn timed_all(
        map: &HashMap<MapData, IpAddrKey, TimedEntry>,
        name: &str,
    ) -> Result<Vec<TimedItem>, KernelError> {
        let mut out = Vec::new();
        for item in map.iter() {
            let (k, v) =
                item.map_err(|e| KernelError::from_map(format!("read {name}"), e, None))?;
            out.push(timed_item(k, v));
        }
        out.sort_by_key(|i| i.ip);
        Ok(out)
    }

    /// Records a successful AUTH from `ip` for `ttl` (the agent uses 24 h).
    /// The map is an LRU: when full, the oldest entry makes room.
    pub fn auth_add(&mut self, ip: IpAddr, ttl: Option<Duration>) -> Result<(), KernelError> {
        Self::timed_add(&mut self.auth, names::AUTH, ip, ttl)
    }

    pub fn auth_del(&mut self, ip: IpAddr) -> Result<bool, KernelError> {
        Self::timed_del(&mut self.auth, names::AUTH, ip)
    }

    /// The entry of `ip`, expired or not (check [`TimedItem::is_active_at`]).
    pub fn auth_get(&self, ip: IpAddr) -> Result<Option<TimedItem>, KernelError> {
        Self::timed_get(&self.auth, names::AUTH, ip)
    }

    pub fn auth_list(&self) -> Result<Vec<TimedItem>, KernelError> {
        Self::timed_all(&self.auth, names::AUTH)
    }

    /// Marks `ip` for slow-down: its next connections get the TCP window
    /// clamp of the settings.
    pub fn slow_add(&mut self, ip: IpAddr, ttl: Option<Duration>) -> Result<(), KernelError> {
        Self::timed_add(&mut self.slow, names::SLOW, ip, ttl)
    }

    pub fn slow_del(&mut self, ip: IpAddr) -> Result<bool, KernelError> {
        Self::timed_del(&mut self.slow, names::SLOW, ip)
    }

    pub fn slow_get(&self, ip: IpAddr) -> Result<Option<TimedItem>, KernelError> {
        Self::timed_get(&self.slow, names::SLOW, ip)
    }

    pub fn slow_list(&self) -> Result<Vec<TimedItem>, KernelError> {
        Self::timed_all(&self.slow, names::SLOW)
    }
}

fn timed_item(k: IpAddrKey, v: TimedEntry) -> TimedItem {
    TimedItem {
        ip: IpAddr::from(k),
        added: BootInstant(v.added_ns),
        expires: expiry_to_instant(v.expires_ns),
    }
}
