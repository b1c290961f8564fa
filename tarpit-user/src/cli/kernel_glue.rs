//! The command line's view of the kernel's pinned maps: a thin layer over
//! [`crate::kernel::KernelMaps`] (the typed handle that opens the pins,
//! checks their layout and classifies errors) that turns boot-clock stamps
//! into wall-clock times and kernel records into the rows the subcommands
//! print.
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use tarpit_common::{Counter, IpAddrKey, IpState, lists::BlockReason};

use crate::kernel::{self, BlockSpec, BootInstant, ListItem, TimedItem};

/// The boot clock (`CLOCK_BOOTTIME`) the kernel programs stamp times with
/// (`bpf_ktime_get_boot_ns`), read together with the wall clock so the two
/// can be converted.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub boot_ns: u64,
    pub wall: SystemTime,
}

impl Clock {
    pub fn now() -> Clock {
        Clock {
            boot_ns: BootInstant::now().as_nanos(),
            wall: SystemTime::now(),
        }
    }

    /// Wall-clock time of a boot-clock stamp.
    pub fn wall_of(&self, boot_ns: u64) -> SystemTime {
        if boot_ns >= self.boot_ns {
            self.wall + Duration::from_nanos(boot_ns - self.boot_ns)
        } else {
            self.wall - Duration::from_nanos(self.boot_ns - boot_ns)
        }
    }
}

/// One allow- or block-list entry as the kernel holds it.
#[derive(Clone, Debug)]
pub struct ListRow {
    pub net: IpNet,
    pub added: SystemTime,
    pub expires: Option<SystemTime>,
    pub active: bool,
    /// Block list only.
    pub reason: Option<String>,
    pub all_ports: bool,
    /// Block list only: held in the kernel rather than dropped.
    pub hold: bool,
}

/// One authenticated address.
#[derive(Clone, Debug)]
pub struct AuthRow {
    pub ip: IpAddr,
    pub added: SystemTime,
    pub expires: Option<SystemTime>,
    pub active: bool,
}

/// The kernel's history of one address.
#[derive(Clone, Debug)]
pub struct IpRow {
    pub ip: IpAddr,
    pub first_seen: Option<SystemTime>,
    pub last_seen: Option<SystemTime>,
    pub last_strike: Option<SystemTime>,
    pub conns_live: u64,
    pub conns_total: u64,
    pub strikes: u32,
    pub flags: Vec<&'static str>,
}

/// Size and fill of one pinned map.
#[derive(Clone, Debug)]
pub struct MapRow {
    pub name: String,
    pub kind: String,
    /// Keys present; `None` where counting makes no sense (ring buffers,
    /// socket storage).
    pub entries: Option<u64>,
    pub capacity: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub id: u32,
}

/// The admin's view of the pinned maps of a running (or stopped, not
/// detached) tarpit: [`kernel::KernelMaps`] with boot-clock stamps turned
/// into wall-clock rows (named apart so the two types never meet under one
/// name).
pub struct AdminMaps {
    inner: kernel::KernelMaps,
}

/// Which list an operation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Allow,
    Block,
}

impl List {
    fn name(self) -> &'static str {
        match self {
            List::Allow => "allow list",
            List::Block => "block list",
        }
    }
}

/// The one form of an address the maps use: IPv4-mapped IPv6 is IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    IpAddr::from(IpAddrKey::from(ip))
}

fn reason_name(code: u32) -> String {
    BlockReason::from_code(code)
        .map(|r| r.name().to_string())
        .unwrap_or_else(|| format!("code-{code}"))
}

fn flag_names(flags: u32) -> Vec<&'static str> {
    use tarpit_common::state::*;
    let mut v = Vec::new();
    for (bit, name) in [
        (IP_F_ALLOWED, "allowed"),
        (IP_F_AUTHENTICATED, "authenticated"),
        (IP_F_BLOCKED, "blocked"),
        (IP_F_SLOWED, "slowed"),
        (IP_F_PREGREET, "pregreet"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

impl AdminMaps {
    /// Opens the maps. Errors: no maps ("start the agent"), no rights,
    /// another layout (refused, never misread).
    pub fn open(pin_path: &Path) -> Result<AdminMaps> {
        Ok(AdminMaps {
            inner: kernel::KernelMaps::open(pin_path)?,
        })
    }

    pub fn pin_path(&self) -> &Path {
        self.inner.pin_path()
    }

    /// Every entry of a list, sorted by network.
    pub fn list(&self, list: List, clock: &Clock) -> Result<Vec<ListRow>> {
        let items = match list {
            List::Allow => self.inner.allow_list()?,
            List::Block => self.inner.block_list()?,
        };
        Ok(items.iter().map(|i| list_row(list, i, clock)).collect())
    }

    /// Adds or replaces an entry. A full list is an error that says so.
    pub fn insert(
        &mut self,
        list: List,
        net: &IpNet,
        ttl: Option<Duration>,
        reason: BlockReason,
        all_ports: bool,
        hold: bool,
    ) -> Result<()> {
        match list {
            List::Allow => self.inner.allow_add(*net, ttl)?,
            List::Block => self.inner.block_add(
                *net,
                BlockSpec {
                    ttl,
                    reason,
                    all_ports,
                    hold,
                },
            )?,
        }
        Ok(())
    }

    /// Removes the entry for exactly `net`; false if there was none.
    pub fn remove(&mut self, list: List, net: &IpNet) -> Result<bool> {
        let r = match list {
            List::Allow => self.inner.allow_del(*net),
            List::Block => self.inner.block_del(*net),
        };
        r.with_context(|| format!("cannot remove {net} from the {}", list.name()))
    }

    /// Every authenticated address.
    pub fn auth_list(&self, clock: &Clock) -> Result<Vec<AuthRow>> {
        Ok(self
            .inner
            .auth_list()?
            .iter()
            .map(|i| auth_row(i, clock))
            .collect())
    }

    pub fn auth_get(&self, ip: IpAddr, clock: &Clock) -> Result<Option<AuthRow>> {
        Ok(self.inner.auth_get(ip)?.map(|i| auth_row(&i, clock)))
    }

    /// The slow-down entry of `ip` (its TCP window is clamped), if any.
    pub fn slow_get(&self, ip: IpAddr, clock: &Clock) -> Result<Option<AuthRow>> {
        Ok(self.inner.slow_get(ip)?.map(|i| auth_row(&i, clock)))
    }

    pub fn auth_insert(&mut self, ip: IpAddr, ttl: Option<Duration>) -> Result<()> {
        Ok(self.inner.auth_add(ip, ttl)?)
    }

    pub fn auth_remove(&mut self, ip: IpAddr) -> Result<bool> {
        Ok(self.inner.auth_del(ip)?)
    }

    /// SYNs to a watched port XDP saw from `ip` (0 when never seen).
    pub fn syn_count(&self, ip: IpAddr) -> Result<u64> {
        Ok(self.inner.syn_count(ip)?)
    }

    /// The kernel's history of one address.
    pub fn ip_state(&self, ip: IpAddr, clock: &Clock) -> Result<Option<IpRow>> {
        Ok(self
            .inner
            .ip_state(ip)?
            .map(|s| ip_row(canonical(ip), &s, clock)))
    }

    /// Every address the kernel remembers.
    pub fn ip_states(&self, clock: &Clock) -> Result<Vec<IpRow>> {
        Ok(self
            .inner
            .ip_states()?
            .iter()
            .map(|(ip, s)| ip_row(*ip, s, clock))
            .collect())
    }

    /// Every counter summed over the CPUs: the named counters, then the
    /// drops per block reason as `xdp_drop_<reason>` (zeros included, so
    /// the set of names is stable for scripts).
    pub fn counters(&self) -> Result<Vec<(String, u64)>> {
        let k = self.inner.counters()?;
        let mut out: Vec<(String, u64)> = Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), k.get(*c)))
            .collect();
        for r in BlockReason::ALL {
            out.push((format!("xdp_drop_{}", r.name()), k.drops(r)));
        }
        Ok(out)
    }

    /// Type, fill and capacity of every pinned map.
    pub fn map_rows(&self) -> Result<Vec<MapRow>> {
        let mut rows = Vec::new();
        for u in self.inner.usage()? {
            rows.push(MapRow {
                name: u.name.to_string(),
                kind: u.kind(),
                entries: u.entries.map(u64::from),
                capacity: u.capacity,
                key_size: u.key_size,
                value_size: u.value_size,
                id: u.id,
            });
        }
        Ok(rows)
    }
}

fn list_row(list: List, i: &ListItem, clock: &Clock) -> ListRow {
    ListRow {
        net: i.net,
        added: clock.wall_of(i.added.as_nanos()),
        expires: i.expires.map(|e| clock.wall_of(e.as_nanos())),
        active: i.is_active_at(BootInstant(clock.boot_ns)),
        reason: (list == List::Block).then(|| reason_name(i.reason_code)),
        all_ports: i.all_ports,
        hold: i.hold,
    }
}

fn auth_row(i: &TimedItem, clock: &Clock) -> AuthRow {
    AuthRow {
        ip: i.ip,
        added: clock.wall_of(i.added.as_nanos()),
        expires: i.expires.map(|e| clock.wall_of(e.as_nanos())),
        active: i.is_active_at(BootInstant(clock.boot_ns)),
    }
}

fn ip_row(ip: IpAddr, s: &IpState, clock: &Clock) -> IpRow {
    let time = |ns: u64| (ns != 0).then(|| clock.wall_of(ns));
    IpRow {
        ip,
        first_seen: time(s.first_seen_ns),
        last_seen: time(s.last_seen_ns),
        last_strike: time(s.last_strike_ns),
        conns_live: s.live(),
        conns_total: s.conns_total,
        strikes: s.strikes,
        flags: flag_names(s.flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_are_ipv4() {
        let ip: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(canonical(ip), "198.51.100.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn boot_stamps_become_wall_times_on_both_sides_of_now() {
        let c = Clock::now();
        assert_eq!(
            c.wall_of(c.boot_ns + 3_600_000_000_000),
            c.wall + Duration::from_secs(3600)
        );
        assert_eq!(
            c.wall_of(c.boot_ns - 5_000_000_000),
            c.wall - Duration::from_secs(5)
        );
        assert_eq!(c.wall_of(c.boot_ns), c.wall);
    }
}
