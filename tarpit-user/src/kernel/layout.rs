//! What the pinned maps must look like: one table of names, types and
//! key/value sizes, checked before a loader reuses pins and before the CLI
//! reads them, plus the layout marker. Maps from another tarpit version are
//! refused, never misread.
//!
//! A map this table has but the pin directory lacks is not a mismatch: it
//! is new in this version (pins made by an older one). The loader creates
//! it next to the reused pins and [`upgrade`] moves what belongs in it;
//! readers treat it as absent until then.
use std::path::Path;

use aya::maps::{Array, Map, MapData, MapType};
use tarpit_common::{
    AttachKey, Event, FlowKey, FlowState, IpAddrKey, IpState, ListEntry, TimedEntry, hold,
    maps::{self as names, LAYOUT_MAGIC, LAYOUT_VERSION, Settings},
    steer,
};

use super::error::KernelError;

/// One pinned map as this tarpit expects it.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    /// The `[kernel]` key of its capacity, if it has one.
    pub size_key: Option<&'static str>,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// Every map of the kernel object, pinned by these names.
pub const MAPS: &[MapSpec] = &[
    spec(names::LAYOUT, MapType::Array, 4, size::<u64>(), None),
    spec(names::SETTINGS, MapType::Array, 4, size::<Settings>(), None),
    spec(
        names::SYN_COUNT,
        MapType::LruHash,
        size::<IpAddrKey>(),
        8,
        Some("syn_count_entries"),
    ),
    spec(
        names::FLOWS,
        MapType::LruHash,
        size::<FlowKey>(),
        size::<FlowState>(),
        Some("flow_entries"),
    ),
    spec(
        names::IP_STATE,
        MapType::LruHash,
        size::<IpAddrKey>(),
        size::<IpState>(),
        Some("ip_state_entries"),
    ),
    spec(
        names::ALLOW,
        MapType::LpmTrie,
        20,
        size::<ListEntry>(),
        Some("allow_entries"),
    ),
    spec(
        names::BLOCK,
        MapType::LpmTrie,
        20,
        size::<ListEntry>(),
        Some("block_entries"),
    ),
    spec(
        names::AUTO_BLOCK,
        MapType::LpmTrie,
        20,
        size::<ListEntry>(),
        Some("auto_block_entries"),
    ),
    spec(names::LISTS_USED, MapType::Array, 4, 4, None),
    spec(
        names::AUTH,
        MapType::LruHash,
        size::<IpAddrKey>(),
        size::<TimedEntry>(),
        Some("auth_entries"),
    ),
    spec(
        names::SLOW,
        MapType::LruHash,
        size::<IpAddrKey>(),
        size::<TimedEntry>(),
        Some("slow_entries"),
    ),
    spec(names::EVENTS, MapType::RingBuf, 0, 0, Some("events_bytes")),
    spec(names::COUNTERS, MapType::PerCpuArray, 4, 8, None),
    spec(names::SOCK_MARK, MapType::SkStorage, 4, 4, None),
    spec(
        names::SCRATCH,
        MapType::PerCpuArray,
        4,
        tarpit_common::greeting::GREETING_BUF as u32,
        None,
    ),
    spec(
        names::ATTACHMENTS,
        MapType::Hash,
        size::<AttachKey>(),
        4,
        None,
    ),
    spec(steer::STEER, MapType::SockMap, 4, 4, None),
    spec(
        steer::STEER_SETTINGS,
        MapType::Array,
        4,
        size::<steer::SteerSettings>(),
        None,
    ),
    spec(steer::STEER_COUNTERS, MapType::PerCpuArray, 4, 8, None),
    spec(hold::HOLD_PROGS, MapType::ProgramArray, 4, 4, None),
];

const fn spec(
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    size_key: Option<&'static str>,
) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size,
        value_size,
        size_key,
    }
}

// The ring buffer's record type is fixed too, though the map does not say.
const _: () = assert!(std::mem::size_of::<Event>() == 64);

pub fn spec_of(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|s| s.name == name)
}

/// What is pinned at a pin directory.
#[derive(Debug, PartialEq, Eq)]
pub enum PinState {
    /// No map of ours (a new or cleaned directory).
    Empty,
    /// Every pinned map matches this tarpit's layout.
    Compatible,
}

fn mismatch(path: &Path, detail: String) -> KernelError {
    KernelError::LayoutMismatch {
        path: path.to_owned(),
        expected: LAYOUT_VERSION,
        detail,
    }
}

/// Reads the layout marker and checks type and sizes of every pinned map.
pub fn check(pin_path: &Path) -> Result<PinState, KernelError> {
    let mut seen = 0;
    for s in MAPS {
        let p = pin_path.join(s.name);
        if !p.exists() {
            continue;
        }
        seen += 1;
        let info = aya::maps::MapInfo::from_pin(&p)
            .map_err(|e| KernelError::from_map(format!("cannot open {}", p.display()), e, None))?;
        let ty = info
            .map_type()
            .map_err(|e| mismatch(pin_path, format!("{}: {e}", s.name)))?;
        if ty != s.map_type || info.key_size() != s.key_size || info.value_size() != s.value_size {
            return Err(mismatch(
                pin_path,
                format!(
                    "{} is {:?} with {}-byte keys and {}-byte values, expected {:?} {}/{}",
                    s.name,
                    ty,
                    info.key_size(),
                    info.value_size(),
                    s.map_type,
                    s.key_size,
                    s.value_size
                ),
            ));
        }
    }
    if seen == 0 {
        return Ok(PinState::Empty);
    }
    let marker = pin_path.join(names::LAYOUT);
    if !marker.exists() {
        return Err(mismatch(pin_path, "no layout marker".into()));
    }
    let value = read_marker(&marker)?;
    // 0: the loader that made the maps died before writing the marker.
    if value != LAYOUT_MAGIC && value != 0 {
        let detail = if value >> 32 == LAYOUT_MAGIC >> 32 {
            format!("layout {}", value as u32)
        } else {
            format!("marker {value:#x}")
        };
        return Err(mismatch(pin_path, detail));
    }
    Ok(PinState::Compatible)
}

/// Maps whose entries live no longer than a connection: when the pinned
/// copy has another key or value size (an older tarpit), it is unpinned so
/// the loader makes a fresh one, instead of refusing the whole directory.
/// Programs of the older tarpit keep their copy until they are replaced.
pub const TRANSIENT: &[&str] = &[names::FLOWS];

/// Unpins every transient map whose pinned layout differs from this
/// tarpit's; returns the names it unpinned.
pub fn recreate_transient(pin_path: &Path) -> Result<Vec<&'static str>, KernelError> {
    let mut out = Vec::new();
    for s in MAPS.iter().filter(|s| TRANSIENT.contains(&s.name)) {
        let p = pin_path.join(s.name);
        if !p.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&p)
            .map_err(|e| KernelError::from_map(format!("cannot open {}", p.display()), e, None))?;
        let same_type = info.map_type().is_ok_and(|t| t == s.map_type);
        if same_type && info.key_size() == s.key_size && info.value_size() == s.value_size {
            continue;
        }
        std::fs::remove_file(&p).map_err(|e| {
            mismatch(
                pin_path,
                format!("{} has an older layout and cannot be unpinned: {e}", s.name),
            )
        })?;
        tracing::info!(
            map = s.name,
            old_value_size = info.value_size(),
            new_value_size = s.value_size,
            "pinned map of an older layout replaced (its entries are per connection)"
        );
        out.push(s.name);
    }
    Ok(out)
}

/// Maps of this layout not pinned at `pin_path` (new in this version),
/// read before a loader creates them.
pub fn missing(pin_path: &Path) -> Vec<&'static str> {
    MAPS.iter()
        .filter(|s| !pin_path.join(s.name).exists())
        .map(|s| s.name)
        .collect()
}

/// Brings reused pins of an older tarpit up to this layout, once the
/// loader has created the maps that were `new` ([`missing`] before the
/// load): automatic blocks move out of the admin's block list into their
/// own part (admin entries stay). Logged; a failure leaves the admin's
/// entries as they were and is not fatal.
pub fn upgrade(pin_path: &Path, new: &[&str]) {
    if !new.contains(&names::AUTO_BLOCK) {
        return;
    }
    let res = super::KernelMaps::open(pin_path).and_then(|mut m| m.migrate_automatic_blocks());
    match res {
        Ok(r) if r.moved + r.dropped > 0 => tracing::info!(
            moved = r.moved,
            dropped = r.dropped,
            "pins of an older tarpit: automatic blocks moved out of the admin's block list \
             into {} (expired ones dropped); admin entries kept",
            names::AUTO_BLOCK
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            "pins of an older tarpit: automatic blocks stay in the admin's block list ({e})"
        ),
    }
}

fn read_marker(path: &Path) -> Result<u64, KernelError> {
    let data = MapData::from_pin(path)
        .map_err(|e| KernelError::from_map(format!("cannot open {}", path.display()), e, None))?;
    let map =
        Map::from_map_data(data).map_err(|e| KernelError::from_map("layout marker", e, None))?;
    let array: Array<_, u64> =
        Array::try_from(map).map_err(|e| KernelError::from_map("layout marker", e, None))?;
    array
        .get(&0, 0)
        .map_err(|e| KernelError::from_map("layout marker", e, None))
}

/// Writes the marker (the loader does this after creating the maps).
pub fn write_marker(map: &mut Map) -> Result<(), KernelError> {
    let mut array: Array<_, u64> =
        Array::try_from(map).map_err(|e| KernelError::from_map("layout marker", e, None))?;
    array
        .set(0, LAYOUT_MAGIC, 0)
        .map_err(|e| KernelError::from_map("cannot write the layout marker", e, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_common_map_name_has_a_spec() {
        for name in [
            names::SYN_COUNT,
            names::SETTINGS,
            names::FLOWS,
            names::IP_STATE,
            names::ALLOW,
            names::BLOCK,
            names::AUTO_BLOCK,
            names::AUTH,
            names::SLOW,
            names::EVENTS,
            names::COUNTERS,
            names::SOCK_MARK,
            names::SCRATCH,
            names::LAYOUT,
            names::ATTACHMENTS,
            names::LISTS_USED,
        ] {
            assert!(spec_of(name).is_some(), "{name}");
        }
        assert_eq!(MAPS.len(), 20);
    }

    #[test]
    fn empty_directory_is_empty() {
        let dir = std::env::temp_dir().join(format!("tarpit-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(check(&dir).unwrap(), PinState::Empty);
        std::fs::remove_dir(&dir).unwrap();
    }
}
