//! The kernel's counters and the kind, fill and shape of every pinned
//! map: what `tarpit stats`, `tarpit maps` and the metrics endpoint show.
//! Here, in the kernel module, because reading a map's description takes
//! aya (`MapInfo`), which no other module may use.
use aya::maps::{MapInfo, MapType};
use tarpit_common::{
    BlockReason, Counter,
    counters::{COUNTERS_LEN, drop_reason_index},
    lists::MAX_REASONS,
    maps as names,
};

use super::KernelMaps;
use crate::kernel::{error::KernelError, layout::MAPS};

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

/// One map's kind, shape and fill level (`tarpit maps`).
#[derive(Debug, Clone, PartialEq)]
pub struct MapUsage {
    pub name: &'static str,
    pub map_type: MapType,
    /// The kernel's id of the map (as `bpftool map show` lists it).
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Entries in use (`None` where that is not a meaningful number:
    /// arrays, the ring buffer, socket storage).
    pub entries: Option<u32>,
    /// Capacity in entries (bytes for the ring buffer).
    pub capacity: u32,
}

impl KernelMaps {
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
            let info = MapInfo::from_pin(&pin).map_err(|e| {
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
                id: info.id(),
                key_size: info.key_size(),
                value_size: info.value_size(),
            });
        }
        Ok(out)
    }
}

impl MapUsage {
    /// The map's kind as bpftool names it: `LruHash` -> `lru_hash`,
    /// `PerCpuArray` -> `percpu_array`.
    pub fn kind(&self) -> String {
        kind_name(&format!("{:?}", self.map_type))
    }
}

fn kind_name(debug: &str) -> String {
    match debug {
        "Hash" => "hash",
        "Array" => "array",
        "LruHash" => "lru_hash",
        "LruPerCpuHash" => "lru_percpu_hash",
        "PerCpuHash" => "percpu_hash",
        "PerCpuArray" => "percpu_array",
        "LpmTrie" => "lpm_trie",
        "RingBuf" => "ringbuf",
        "SkStorage" => "sk_storage",
        "SockMap" => "sockmap",
        "SockHash" => "sockhash",
        "ProgramArray" => "prog_array",
        "PerfEventArray" => "perf_event_array",
        other => return other.to_ascii_lowercase(),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_follow_bpftool() {
        assert_eq!(kind_name("LruHash"), "lru_hash");
        assert_eq!(kind_name("LpmTrie"), "lpm_trie");
        assert_eq!(kind_name("PerCpuArray"), "percpu_array");
        assert_eq!(kind_name("SkStorage"), "sk_storage");
    }
}
