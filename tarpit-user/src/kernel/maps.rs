//! A typed handle over the pinned maps, opened from the pin directory
//! without loading any program: the agent, the CLI and tests all use it,
//! with the agent running or not. Every change takes effect in the kernel
//! at once.
//!
//! This file opens the maps and holds what spans all of them (settings,
//! the sweep of expired entries); one child module per kind of map says
//! how its entries are read and written: `lists` (allow and block lists,
//! eviction of automatic blocks), `timed` (authenticated and slowed
//! addresses), `flows` (per-address and per-flow state, the pre-greet
//! verdict), `usage` (counters and the fill of every map, for the CLI and
//! the metrics).
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use tarpit_common::{
    FlowKey, FlowState, IpAddrKey, IpState, ListEntry, TimedEntry,
    maps::{self as names, Settings},
};

use super::{
    clock::BootInstant,
    error::KernelError,
    layout::{self, PinState},
};

pub mod evictions;
mod flows;
mod lists;
mod timed;
mod usage;

pub use flows::PreGreetVerdict;
pub use lists::{
    AutoBlockAdded, BlockSpec, ListItem, MigrateReport, evict_batch, eviction_victims,
};
pub use timed::TimedItem;
pub use usage::{KernelCounters, MapUsage};

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
    /// `None` on pins made before it existed (their programs look every
    /// list up).
    lists_used: Option<Array<MapData, u32>>,
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
            lists_used: if pin_path.join(names::LISTS_USED).exists() {
                Some(typed!(Array, pin_path, names::LISTS_USED))
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
}

fn layout_errno(e: &aya::maps::MapError) -> Option<i32> {
    super::error::map_errno(e)
}
