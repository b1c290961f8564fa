//! A typed handle over the pinned maps, opened from the pin directory
//! without loading any program: the agent, the CLI and tests all use it,
//! with the agent running or not. Every change takes effect in the kernel
//! at once.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapType, PerCpuArray};
use ipnet::IpNet;
use tarpit_common::{
    BlockReason, Counter, FlowKey, FlowState, IpAddrKey, IpState, ListEntry, TimedEntry,
    counters::{COUNTERS_LEN, drop_reason_index},
    lists::{LIST_F_ALL_PORTS, LIST_F_HOLD, MAX_REASONS},
    maps::{self as names, Settings},
    state::{FLOW_F_PREGREET, FLOW_F_TEASER, FLOW_F_UNSEEN, FLOW_GREETED},
};

use super::{
    clock::{BootInstant, expiry_from_ttl, expiry_to_instant},
    error::KernelError,
    layout::{self, MAPS, PinState},
    prefix,
};

/// One allow or block list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListItem {
    pub net: IpNet,
    pub added: BootInstant,
    /// `None` = never expires.
    pub expires: Option<BootInstant>,
    /// Reason code (block list; 0 on the allow list).
    pub reason_code: u32,
    /// Block entry for every port, not only SMTP.
    pub all_ports: bool,
    /// An automatic block (the agent's [`names::AUTO_BLOCK`] part), not
    /// the admin's; always false on the allow list.
    pub automatic: bool,
    /// Held in the kernel (zero window, no socket) rather than dropped.
    pub hold: bool,
}

impl ListItem {
    pub fn reason(&self) -> Option<BlockReason> {
        BlockReason::from_code(self.reason_code)
    }

    pub fn is_active_at(&self, now: BootInstant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// What to put on the block list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// `None` = until removed.
    pub ttl: Option<Duration>,
    pub reason: BlockReason,
    /// Drop every port, not only the SMTP ports.
    pub all_ports: bool,
    /// Hold TCP connections to the SMTP ports in the kernel (zero window,
    /// no socket) instead of dropping them (`tarpit_common::hold`).
    pub hold: bool,
}

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

/// The kernel's answer to "did this client talk before the greeting?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreGreetVerdict {
    /// No record of the flow (evicted, closed, older than the programs, not
    /// a watched port, or a handshake the kernel did not complete), or the
    /// client acknowledged server bytes tc egress never saw (replies routed
    /// around it): never treat as a strike.
    Unknown,
    /// The greeting is not complete and the client has been quiet.
    AwaitingGreeting,
    /// The greeting is complete and the client did not talk before it.
    Clean,
    /// The client talked before the greeting (after a `220-` teaser when
    /// `teaser` is set).
    PreGreet { teaser: bool },
}

/// Summed per-CPU counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Every [`Counter`] with its total.
    pub counters: Vec<(Counter, u64)>,
    /// XDP drops per block reason code (only codes with drops).
    pub drops_by_reason: Vec<(u32, u64)>,
}

impl KernelCounters {
    pub fn get(&self, c: Counter) -> u64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    pub fn drops(&self, reason: BlockReason) -> u64 {
        self.drops_by_reason
            .iter()
            .find(|(k, _)| *k == reason.code())
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// One map's kind and fill level (`tarpit maps`).
#[derive(Debug, Clone, PartialEq)]
pub struct MapUsage {
    pub name: &'static str,
    pub map_type: MapType,
    /// Entries in use (`None` where that is not a meaningful number:
    /// arrays, the ring buffer, socket storage).
    pub entries: Option<u32>,
    /// Capacity in entries (bytes for the ring buffer).
    pub capacity: u32,
}

/// What [`KernelMaps::auto_block_add`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoBlockAdded {
    /// False when an active admin entry for exactly this prefix is there
    /// already (it stands; a second row would only confuse).
    pub added: bool,
    /// Automatic entries removed to make room, oldest first.
    pub evicted: Vec<IpNet>,
}

/// Automatic blocks moved out of the admin's list by
/// [`KernelMaps::migrate_automatic_blocks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub moved: usize,
    /// Expired, or no room left: not moved, removed.
    pub dropped: usize,
}

/// How many automatic entries one eviction removes at once: a scan of a
/// full list costs about a second per million entries, so a flood pays it
/// once per 1/64 of the list, not once per block.
pub const fn evict_batch(capacity: u32) -> usize {
    let n = (capacity / 64) as usize;
    if n == 0 { 1 } else { n }
}

/// Which automatic entries make room for `want` new ones: every expired
/// entry (the kernel ignores them already), then the oldest active ones by
/// the time they were added (ties by prefix, so the choice is stable).
/// `keep` (the prefix being written) is never chosen.
pub fn eviction_victims(
    items: &[ListItem],
    now: BootInstant,
    want: usize,
    keep: Option<IpNet>,
) -> Vec<IpNet> {
    let mut candidates: Vec<&ListItem> = items.iter().filter(|i| Some(i.net) != keep).collect();
    candidates.sort_by_key(|i| (i.is_active_at(now), i.added, i.net));
    let expired = candidates
        .iter()
        .take_while(|i| !i.is_active_at(now))
        .count();
    candidates
        .into_iter()
        .take(expired.max(want))
        .map(|i| i.net)
        .collect()
}

/// Entries removed by [`KernelMaps::sweep_expired`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub allow: usize,
    pub block: usize,
    pub auth: usize,
    pub slow: usize,
}

type Trie = LpmTrie<MapData, [u8; 16], ListEntry>;

/// The pinned maps, typed.
pub struct KernelMaps {
    pin_path: PathBuf,
    settings: Array<MapData, Settings>,
    syn_count: HashMap<MapData, IpAddrKey, u64>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    ip_state: HashMap<MapData, IpAddrKey, IpState>,
    allow: Trie,
    block: Trie,
    /// `None` on pins made before the automatic part existed (an agent of
    /// this version has not started there yet): everything is the admin's.
    auto_block: Option<Trie>,
    auth: HashMap<MapData, IpAddrKey, TimedEntry>,
    slow: HashMap<MapData, IpAddrKey, TimedEntry>,
    counters: PerCpuArray<MapData, u64>,
    capacity_allow: u32,
    capacity_block: u32,
    capacity_auto_block: u32,
}

fn open_map(pin_path: &Path, name: &str) -> Result<Map, KernelError> {
    let p = pin_path.join(name);
    let data = MapData::from_pin(&p)
        .map_err(|e| KernelError::from_map(format!("cannot open {}", p.display()), e, None))?;
    Map::from_map_data(data).map_err(|e| KernelError::from_map(name.to_string(), e, None))
}

macro_rules! typed {
    ($ty:ident, $pin:expr, $name:expr) => {
        $ty::try_from(open_map($pin, $name)?)
            .map_err(|e| KernelError::from_map(format!("map {}", $name), e, None))?
    };
}

fn capacity(pin_path: &Path, name: &str) -> u32 {
    aya::maps::MapInfo::from_pin(pin_path.join(name))
        .map(|i| i.max_entries())
        .unwrap_or(0)
}

impl KernelMaps {
    /// Opens the maps pinned at `pin_path`, after checking they have this
    /// tarpit's layout.
    pub fn open(pin_path: &Path) -> Result<KernelMaps, KernelError> {
        if !pin_path.join(names::LAYOUT).exists() {
            match layout::check(pin_path) {
                Ok(PinState::Empty) => {
                    return Err(KernelError::NoMaps {
                        path: pin_path.to_owned(),
                    });
                }
                Err(e) => return Err(e),
                Ok(PinState::Compatible) => {}
            }
        }
        layout::check(pin_path)?;
        Ok(KernelMaps {
            pin_path: pin_path.to_owned(),
            settings: typed!(Array, pin_path, names::SETTINGS),
            syn_count: typed!(HashMap, pin_path, names::SYN_COUNT),
            flows: typed!(HashMap, pin_path, names::FLOWS),
            ip_state: typed!(HashMap, pin_path, names::IP_STATE),
            allow: typed!(LpmTrie, pin_path, names::ALLOW),
            block: typed!(LpmTrie, pin_path, names::BLOCK),
            auto_block: if pin_path.join(names::AUTO_BLOCK).exists() {
                Some(typed!(LpmTrie, pin_path, names::AUTO_BLOCK))
            } else {
                None
            },
            auth: typed!(HashMap, pin_path, names::AUTH),
            slow: typed!(HashMap, pin_path, names::SLOW),
            counters: typed!(PerCpuArray, pin_path, names::COUNTERS),
            capacity_allow: capacity(pin_path, names::ALLOW),
            capacity_block: capacity(pin_path, names::BLOCK),
            capacity_auto_block: capacity(pin_path, names::AUTO_BLOCK),
        })
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    // ---- settings ----

    pub fn settings(&self) -> Result<Settings, KernelError> {
        self.settings
            .get(&0, 0)
            .map_err(|e| KernelError::from_map("read settings", e, None))
    }

    /// Changes the kernel programs' settings live.
    pub fn set_settings(&mut self, s: Settings) -> Result<(), KernelError> {
        self.settings
            .set(0, s, 0)
            .map_err(|e| KernelError::from_map("write settings", e, None))
    }

    // ---- allow and block lists ----

    fn list_add(
        trie: &mut Trie,
        map: &'static str,
        key: &'static str,
        cap: u32,
        net: IpNet,
        entry: ListEntry,
    ) -> Result<(), KernelError> {
        let k = prefix::key_of(&net);
        let err =
            |e| KernelError::from_map(format!("add {net} to {map}"), e, Some((map, key, cap)));
        match trie.insert(&k, entry, 0) {
            Ok(()) => Ok(()),
            // Kernels before 6.13 check a full trie before looking for the
            // key, so replacing an entry of a full list fails with ENOSPC.
            // Make room by removing the old entry, then put it back if the
            // new one still cannot go in (a racing add took the slot).
            Err(e) if layout_errno(&e) == Some(libc::ENOSPC) => {
                let Ok(old) = trie.get(&k, 0) else {
                    return Err(err(e));
                };
                if trie.remove(&k).is_err() {
                    return Err(err(e));
                }
                trie.insert(&k, entry, 0).map_err(|e| {
                    let _ = trie.insert(&k, old, 0);
                    err(e)
                })
            }
            Err(e) => Err(err(e)),
        }
    }

    fn list_del(trie: &mut Trie, map: &str, net: IpNet) -> Result<bool, KernelError> {
        match trie.remove(&prefix::key_of(&net)) {
            Ok(()) => Ok(true),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(KernelError::from_map(
                format!("remove {net} from {map}"),
                e,
                None,
            )),
        }
    }

    fn list_all(trie: &Trie, map: &str, automatic: bool) -> Result<Vec<ListItem>, KernelError> {
        let mut out = Vec::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(|e| KernelError::from_map(format!("read {map}"), e, None))?;
            out.push(ListItem {
                net: prefix::net_of(&k),
                added: BootInstant(v.added_ns()),
                expires: expiry_to_instant(v.expires_ns()),
                reason_code: v.reason,
                all_ports: v.all_ports(),
                automatic,
                hold: v.hold(),
            });
        }
        out.sort_by_key(|a| a.net);
        Ok(out)
    }

    /// The longest active entry containing `ip`, as the kernel would pick
    /// it (expired entries are skipped, as the kernel sweeps them).
    fn list_match(items: Vec<ListItem>, ip: IpAddr) -> Option<ListItem> {
        let now = BootInstant::now();
        items
            .into_iter()
            .filter(|i| i.is_active_at(now) && prefix::contains(&i.net, ip))
            .max_by_key(|i| i.net.prefix_len() as u32 + if i.net.addr().is_ipv4() { 96 } else { 0 })
    }

    /// Adds (or replaces) an allow-list prefix.
    pub fn allow_add(&mut self, net: IpNet, ttl: Option<Duration>) -> Result<(), KernelError> {
        let k = prefix::key_of(&net);
        let entry = ListEntry::new(
            k.prefix_len(),
            BootInstant::now().0,
            expiry_from_ttl(ttl),
            0,
            0,
        );
        Self::list_add(
            &mut self.allow,
            names::ALLOW,
            "allow_entries",
            self.capacity_allow,
            net,
            entry,
        )
    }

    /// Removes an allow-list prefix; `false` when it was not there.
    pub fn allow_del(&mut self, net: IpNet) -> Result<bool, KernelError> {
        Self::list_del(&mut self.allow, names::ALLOW, net)
    }

    pub fn allow_list(&self) -> Result<Vec<ListItem>, KernelError> {
        Self::list_all(&self.allow, names::ALLOW, false)
    }

    /// The allow-list entry that covers `ip` now, if any.
    pub fn allow_match(&self, ip: IpAddr) -> Result<Option<ListItem>, KernelError> {
        Ok(Self::list_match(self.allow_list()?, ip))
    }

    /// Adds (or replaces) a block-list prefix. The admin's entries
    /// ([`BlockReason::Manual`]) go to the admin's list and fail only when
    /// that list is full; every other reason is an automatic block
    /// ([`Self::auto_block_add`]), which makes its own room.
    pub fn block_add(&mut self, net: IpNet, spec: BlockSpec) -> Result<(), KernelError> {
        if spec.reason != BlockReason::Manual && self.auto_block.is_some() {
            return self.auto_block_add(net, spec).map(|_| ());
        }
        let entry = Self::block_entry(&net, BootInstant::now(), spec);
        Self::list_add(
            &mut self.block,
            names::BLOCK,
            "block_entries",
            self.capacity_block,
            net,
            entry,
        )?;
        // The admin's word stands: an automatic entry for the same prefix
        // would only show twice.
        if let Some(auto) = &mut self.auto_block {
            Self::list_del(auto, names::AUTO_BLOCK, net)?;
        }
        Ok(())
    }

    fn block_entry(net: &IpNet, now: BootInstant, spec: BlockSpec) -> ListEntry {
        ListEntry::new(
            prefix::key_of(net).prefix_len(),
            now.0,
            expiry_from_ttl(spec.ttl),
            spec.reason.code(),
            if spec.all_ports { LIST_F_ALL_PORTS } else { 0 }
                | if spec.hold { LIST_F_HOLD } else { 0 },
        )
    }

    /// Puts an automatic block on the agent's part of the block list. When
    /// that part is full, its expired and then its oldest entries make
    /// room ([`eviction_victims`], [`evict_batch`] at a time); the admin's
    /// list is never touched, so `tarpit block add` never fails because of
    /// a flood of offenders.
    pub fn auto_block_add(
        &mut self,
        net: IpNet,
        spec: BlockSpec,
    ) -> Result<AutoBlockAdded, KernelError> {
        let now = BootInstant::now();
        let entry = Self::block_entry(&net, now, spec);
        if self.admin_holds(&net, now) {
            return Ok(AutoBlockAdded::default());
        }
        let evicted = self.auto_insert(net, entry, now)?;
        Ok(AutoBlockAdded {
            added: true,
            evicted,
        })
    }

    /// Whether the admin's list has an active entry for exactly `net`.
    fn admin_holds(&self, net: &IpNet, now: BootInstant) -> bool {
        let k = prefix::key_of(net);
        // An LPM lookup returns the longest match: exact when its own
        // prefix length is the key's.
        self.block.get(&k, 0).is_ok_and(|e| {
            e.prefix_len == k.prefix_len() && (e.expires_ns() == 0 || now.0 < e.expires_ns())
        })
    }

    /// Inserts into the automatic part, evicting when it is full; returns
    /// what was evicted.
    fn auto_insert(
        &mut self,
        net: IpNet,
        entry: ListEntry,
        now: BootInstant,
    ) -> Result<Vec<IpNet>, KernelError> {
        let cap = self.capacity_auto_block;
        let Some(auto) = &mut self.auto_block else {
            return Err(KernelError::Invalid(format!(
                "no {} map at {}: start the agent once to create it",
                names::AUTO_BLOCK,
                self.pin_path.display()
            )));
        };
        let add = |auto: &mut Trie| {
            Self::list_add(
                auto,
                names::AUTO_BLOCK,
                "auto_block_entries",
                cap,
                net,
                entry,
            )
        };
        match add(auto) {
            Ok(()) => return Ok(Vec::new()),
            Err(KernelError::MapFull { .. }) => {}
            Err(e) => return Err(e),
        }
        let items = Self::list_all(auto, names::AUTO_BLOCK, true)?;
        let mut evicted = Vec::new();
        for victim in eviction_victims(&items, now, evict_batch(cap), Some(net)) {
            if Self::list_del(auto, names::AUTO_BLOCK, victim)? {
                evicted.push(victim);
            }
        }
        add(auto)?;
        Ok(evicted)
    }

    /// Removes a block-list prefix from both parts; `false` when it was in
    /// neither.
    pub fn block_del(&mut self, net: IpNet) -> Result<bool, KernelError> {
        let admin = Self::list_del(&mut self.block, names::BLOCK, net)?;
        let auto = match &mut self.auto_block {
            Some(auto) => Self::list_del(auto, names::AUTO_BLOCK, net)?,
            None => false,
        };
        Ok(admin || auto)
    }

    /// Both parts of the block list, sorted by prefix (automatic entries
    /// say so in [`ListItem::automatic`]).
    pub fn block_list(&self) -> Result<Vec<ListItem>, KernelError> {
        let mut out = Self::list_all(&self.block, names::BLOCK, false)?;
        if let Some(auto) = &self.auto_block {
            out.extend(Self::list_all(auto, names::AUTO_BLOCK, true)?);
            out.sort_by_key(|a| a.net);
        }
        Ok(out)
    }

    /// The block-list entry that covers `ip` now, if any.
    pub fn block_match(&self, ip: IpAddr) -> Result<Option<ListItem>, KernelError> {
        Ok(Self::list_match(self.block_list()?, ip))
    }

    /// Moves automatic blocks (any reason but manual) out of the admin's
    /// list into the automatic part: pins of an older tarpit kept both in
    /// one list. Admin entries stay where they are; expired ones, and any
    /// the automatic part has no room for, are removed.
    pub fn migrate_automatic_blocks(&mut self) -> Result<MigrateReport, KernelError> {
        let mut report = MigrateReport::default();
        if self.auto_block.is_none() {
            return Ok(report);
        }
        let now = BootInstant::now();
        let manual = BlockReason::Manual.code();
        for item in Self::list_all(&self.block, names::BLOCK, false)? {
            if item.reason_code == manual {
                continue;
            }
            let moved = item.is_active_at(now) && {
                let entry = ListEntry::new(
                    prefix::key_of(&item.net).prefix_len(),
                    item.added.0,
                    item.expires.map_or(0, |e| e.0),
                    item.reason_code,
                    if item.all_ports { LIST_F_ALL_PORTS } else { 0 }
                        | if item.hold { LIST_F_HOLD } else { 0 },
                );
                self.auto_insert(item.net, entry, now).is_ok()
            };
            Self::list_del(&mut self.block, names::BLOCK, item.net)?;
            if moved {
                report.moved += 1;
            } else {
                report.dropped += 1;
            }
        }
        Ok(report)
    }

    // ---- authenticated and slowed addresses ----

    fn timed_add(
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

    fn timed_del(
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

    fn timed_get(
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

    fn timed_all(
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

    /// Removes expired entries from the allow, block, authenticated and
    /// slowed maps (the kernel ignores them already; this frees the room).
    pub fn sweep_expired(&mut self) -> Result<SweepReport, KernelError> {
        let now = BootInstant::now();
        let mut report = SweepReport::default();
        for item in self.allow_list()? {
            if !item.is_active_at(now) && self.allow_del(item.net)? {
                report.allow += 1;
            }
        }
        for item in self.block_list()? {
            if item.is_active_at(now) {
                continue;
            }
            // From its own part only: the same prefix may be active in the other.
            let gone = match (&mut self.auto_block, item.automatic) {
                (Some(auto), true) => Self::list_del(auto, names::AUTO_BLOCK, item.net)?,
                _ => Self::list_del(&mut self.block, names::BLOCK, item.net)?,
            };
            if gone {
                report.block += 1;
            }
        }
        for item in self.auth_list()? {
            if !item.is_active_at(now) && self.auth_del(item.ip)? {
                report.auth += 1;
            }
        }
        for item in self.slow_list()? {
            if !item.is_active_at(now) && self.slow_del(item.ip)? {
                report.slow += 1;
            }
        }
        Ok(report)
    }

    // ---- per-address and per-flow state ----

    /// What the kernel knows about one address.
    pub fn ip_state(&self, ip: IpAddr) -> Result<Option<IpState>, KernelError> {
        match self.ip_state.get(&IpAddrKey::from(ip), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(KernelError::from_map("read per-IP state", e, None)),
        }
    }

    /// Every address the kernel remembers. Entries can be evicted or added
    /// while iterating (the map is live); each one is read consistently.
    pub fn ip_states(&self) -> Result<Vec<(IpAddr, IpState)>, KernelError> {
        let mut out = Vec::new();
        for item in self.ip_state.iter() {
            match item {
                Ok((k, v)) => out.push((IpAddr::from(k), v)),
                // Evicted between listing its key and reading it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(KernelError::from_map("read per-IP state", e, None)),
            }
        }
        Ok(out)
    }

    /// Connection attempts (SYNs) to a watched port seen from `ip` in XDP.
    pub fn syn_count(&self, ip: IpAddr) -> Result<u64, KernelError> {
        match self.syn_count.get(&IpAddrKey::from(ip), 0) {
            Ok(v) => Ok(v),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(0),
            Err(e) => Err(KernelError::from_map("read SYN counts", e, None)),
        }
    }

    /// Did the client at `client` talk to `server` before the greeting?
    /// Addresses as the server's socket sees them (IPv4-mapped IPv6 from a
    /// dual-stack socket is the same client as plain IPv4).
    pub fn flow_verdict(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<PreGreetVerdict, KernelError> {
        let key = FlowKey {
            client: IpAddrKey::from(client.ip()),
            server: IpAddrKey::from(server.ip()),
            client_port: client.port(),
            server_port: server.port(),
        };
        let flow = match self.flows.get(&key, 0) {
            Ok(f) => f,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(PreGreetVerdict::Unknown),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => {
                return Ok(PreGreetVerdict::Unknown);
            }
            Err(e) => return Err(KernelError::from_map("read flow table", e, None)),
        };
        Ok(verdict_of(&flow))
    }

    /// Number of flows the kernel tracks now.
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }

    // ---- counters and maps ----

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> Result<KernelCounters, KernelError> {
        let sum = |i: u32| -> Result<u64, KernelError> {
            let v = self
                .counters
                .get(&i, 0)
                .map_err(|e| KernelError::from_map("read counters", e, None))?;
            Ok(v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        let mut out = KernelCounters::default();
        for c in Counter::ALL {
            out.counters.push((c, sum(c.index())?));
        }
        for code in 0..MAX_REASONS {
            let idx = drop_reason_index(code);
            debug_assert!(idx < COUNTERS_LEN);
            let n = sum(idx)?;
            if n > 0 {
                out.drops_by_reason.push((code, n));
            }
        }
        Ok(out)
    }

    /// Kind, fill level and capacity of every pinned map.
    pub fn usage(&self) -> Result<Vec<MapUsage>, KernelError> {
        let mut out = Vec::new();
        for spec in MAPS {
            let pin = self.pin_path.join(spec.name);
            // A map new in this version, on pins of an older one.
            if !pin.exists() {
                continue;
            }
            let info = aya::maps::MapInfo::from_pin(&pin).map_err(|e| {
                KernelError::from_map(format!("inspect map {}", spec.name), e, None)
            })?;
            let entries = match spec.name {
                names::SYN_COUNT => Some(self.syn_count.keys().filter(|k| k.is_ok()).count()),
                names::FLOWS => Some(self.flow_count()),
                names::IP_STATE => Some(self.ip_state.keys().filter(|k| k.is_ok()).count()),
                names::ALLOW => Some(self.allow.keys().filter(|k| k.is_ok()).count()),
                names::BLOCK => Some(self.block.keys().filter(|k| k.is_ok()).count()),
                names::AUTO_BLOCK => self
                    .auto_block
                    .as_ref()
                    .map(|t| t.keys().filter(|k| k.is_ok()).count()),
                names::AUTH => Some(self.auth.keys().filter(|k| k.is_ok()).count()),
                names::SLOW => Some(self.slow.keys().filter(|k| k.is_ok()).count()),
                _ => None,
            };
            out.push(MapUsage {
                name: spec.name,
                map_type: spec.map_type,
                entries: entries.map(|n| n as u32),
                capacity: info.max_entries(),
            });
        }
        Ok(out)
    }
}

fn timed_item(k: IpAddrKey, v: TimedEntry) -> TimedItem {
    TimedItem {
        ip: IpAddr::from(k),
        added: BootInstant(v.added_ns),
        expires: expiry_to_instant(v.expires_ns),
    }
}

fn layout_errno(e: &aya::maps::MapError) -> Option<i32> {
    super::error::map_errno(e)
}

/// The verdict of a flow record (pure: unit-tested).
pub fn verdict_of(flow: &FlowState) -> PreGreetVerdict {
    if flow.flags & FLOW_F_UNSEEN != 0 {
        PreGreetVerdict::Unknown
    } else if flow.flags & FLOW_F_PREGREET != 0 {
        PreGreetVerdict::PreGreet {
            teaser: flow.flags & FLOW_F_TEASER != 0,
        }
    } else if flow.state == FLOW_GREETED {
        PreGreetVerdict::Clean
    } else {
        PreGreetVerdict::AwaitingGreeting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarpit_common::state::{FLOW_AWAIT_GREETING, FLOW_TEASER};

    #[test]
    fn verdicts() {
        let f = |state, flags| FlowState {
            state,
            flags,
            ..FlowState::established(1, 100, 200)
        };
        assert_eq!(
            verdict_of(&f(FLOW_AWAIT_GREETING, 0)),
            PreGreetVerdict::AwaitingGreeting
        );
        assert_eq!(
            verdict_of(&f(FLOW_TEASER, 0)),
            PreGreetVerdict::AwaitingGreeting
        );
        assert_eq!(verdict_of(&f(FLOW_GREETED, 0)), PreGreetVerdict::Clean);
        assert_eq!(
            verdict_of(&f(FLOW_GREETED, FLOW_F_PREGREET)),
            PreGreetVerdict::PreGreet { teaser: false }
        );
        assert_eq!(
            verdict_of(&f(FLOW_GREETED, FLOW_F_PREGREET | FLOW_F_TEASER)),
            PreGreetVerdict::PreGreet { teaser: true }
        );
        // Replies egress never saw: unknown, whatever the state says.
        assert_eq!(
            verdict_of(&f(FLOW_AWAIT_GREETING, FLOW_F_UNSEEN)),
            PreGreetVerdict::Unknown
        );
    }

    #[test]
    fn longest_active_prefix_wins_and_expired_is_skipped() {
        let now = BootInstant::now();
        let item = |net: &str, expires: Option<BootInstant>| ListItem {
            net: net.parse().unwrap(),
            added: now,
            expires,
            reason_code: 0,
            all_ports: false,
            automatic: true,
            hold: false,
        };
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let items = vec![
            item("198.51.0.0/16", None),
            item("198.51.100.0/24", Some(BootInstant(1))),
            item("10.0.0.0/8", None),
        ];
        let m = KernelMaps::list_match(items, ip).unwrap();
        assert_eq!(m.net, "198.51.0.0/16".parse::<IpNet>().unwrap());
        let items = vec![
            item("198.51.0.0/16", None),
            item("198.51.100.0/24", Some(now.plus(Duration::from_secs(60)))),
        ];
        let m = KernelMaps::list_match(items, ip).unwrap();
        assert_eq!(m.net, "198.51.100.0/24".parse::<IpNet>().unwrap());
        assert!(KernelMaps::list_match(vec![item("fd5b:1e00::/64", None)], ip).is_none());
    }

    fn auto_item(net: &str, added: u64, expires: Option<u64>) -> ListItem {
        ListItem {
            net: net.parse().unwrap(),
            added: BootInstant(added),
            expires: expires.map(BootInstant),
            reason_code: BlockReason::Pregreet.code(),
            all_ports: false,
            automatic: true,
            hold: false,
        }
    }

    #[test]
    fn eviction_takes_expired_entries_then_the_oldest() {
        let now = BootInstant(1_000);
        let items = vec![
            auto_item("198.51.100.3/32", 300, Some(5_000)),
            auto_item("198.51.100.1/32", 100, Some(5_000)),
            auto_item("fd5b:1e00::/64", 200, None),
            auto_item("198.51.100.9/32", 900, Some(999)), // expired
            auto_item("198.51.100.2/32", 100, Some(5_000)),
        ];
        let nets = |v: Vec<IpNet>| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // The expired one is free room; the oldest by added time next, ties
        // by prefix.
        assert_eq!(
            nets(eviction_victims(&items, now, 3, None)),
            ["198.51.100.9/32", "198.51.100.1/32", "198.51.100.2/32"]
        );
        // Every expired entry goes, even beyond the batch.
        assert_eq!(
            nets(eviction_victims(&items, now, 0, None)),
            ["198.51.100.9/32"]
        );
        // The prefix being written is never its own victim.
        let keep = "198.51.100.1/32".parse().ok();
        assert_eq!(
            nets(eviction_victims(&items, now, 2, keep)),
            ["198.51.100.9/32", "198.51.100.2/32"]
        );
        assert_eq!(eviction_victims(&items, now, 99, None).len(), 5);
        assert!(eviction_victims(&[], now, 1, None).is_empty());
    }

    #[test]
    fn eviction_batches_are_a_sixty_fourth_and_at_least_one() {
        assert_eq!(evict_batch(1), 1);
        assert_eq!(evict_batch(8), 1);
        assert_eq!(evict_batch(128), 2);
        assert_eq!(evict_batch(65_536), 1024);
    }
}
