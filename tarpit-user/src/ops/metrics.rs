//! The kernel side's metrics, read from its maps at each scrape: the
//! programs' per-CPU counters, XDP drops by reason, and the maps' fill
//! levels and capacities. [`KernelScrape`] is a prometheus-client
//! collector registered once into the agent's registry
//! (`crate::metrics::Metrics::register`).
//!
//! The kernel side is read through a [`KernelMaps`] opened at start, as
//! root, so that scrapes (and the reload's settings writes) keep working
//! after the privilege drop.
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tarpit_common::lists::BlockReason;
use tracing::debug;

use crate::kernel::KernelMaps;
use crate::metrics::encode_family;

type Labels = Vec<(&'static str, String)>;

/// Scrape-time source of the kernel's metrics, and the handle the reload
/// writes the kernel's live settings through.
pub struct KernelScrape {
    maps: Mutex<KernelMaps>,
}

impl std::fmt::Debug for KernelScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelScrape")
    }
}

impl KernelScrape {
    /// Over the pinned maps, opened for reading (call before the
    /// privilege drop).
    pub fn new(maps: KernelMaps) -> KernelScrape {
        KernelScrape {
            maps: Mutex::new(maps),
        }
    }

    /// Writes the `[kernel]` toggles, ports and window clamp of a reloaded
    /// config into the kernel's settings map, through the handle opened
    /// at start (the programs read it live).
    pub fn apply_kernel_settings(&self, cfg: &crate::config::KernelConfig) -> anyhow::Result<()> {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.set_settings(crate::kernel::settings_from(cfg))?;
        Ok(())
    }
}

impl Collector for KernelScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        match maps.counters() {
            Ok(k) => {
                let fam = Family::<Labels, Counter>::default();
                for (c, v) in &k.counters {
                    fam.get_or_create(&vec![("counter", c.name().to_string())])
                        .inc_by(*v);
                }
                encode_family(
                    &mut encoder,
                    "kernel",
                    "The kernel programs' per-CPU counters, summed over CPUs",
                    &fam,
                )?;
                let drops = Family::<Labels, Counter>::default();
                for (code, v) in &k.drops_by_reason {
                    let reason = BlockReason::from_code(*code)
                        .map_or_else(|| code.to_string(), |r| r.name().to_string());
                    drops.get_or_create(&vec![("reason", reason)]).inc_by(*v);
                }
                encode_family(
                    &mut encoder,
                    "kernel_xdp_drops",
                    "Packets XDP dropped, by block-list reason",
                    &drops,
                )?;
            }
            Err(e) => debug!(target: "tarpit::ops", "cannot read kernel counters: {e}"),
        }
        match maps.usage() {
            Ok(usage) => {
                let entries = Family::<Labels, Gauge>::default();
                let capacity = Family::<Labels, Gauge>::default();
                for u in &usage {
                    let l = vec![("map", u.name.to_string())];
                    if let Some(n) = u.entries {
                        entries.get_or_create(&l).set(i64::from(n));
                    }
                    capacity.get_or_create(&l).set(i64::from(u.capacity));
                }
                // BLOCK is the admin's part of the block list, AUTO_BLOCK
                // the automatic one: each has its own fill.
                encode_family(
                    &mut encoder,
                    "map_entries",
                    "Entries in each kernel map",
                    &entries,
                )?;
                encode_family(
                    &mut encoder,
                    "map_capacity",
                    "Capacity of each kernel map (bytes for the event ring buffer)",
                    &capacity,
                )?;
            }
            Err(e) => debug!(target: "tarpit::ops", "cannot read kernel map usage: {e}"),
        }
        Ok(())
    }
}
