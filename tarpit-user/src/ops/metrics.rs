//! The operational metrics that are not per session: the kernel's per-CPU
//! counters and map fill levels (read from the maps at each scrape), the
//! bypass steering counts (with `[bypass]` on), block-list churn, config
//! reloads and dropped log lines. Appended by
//! [`crate::metrics::Metrics::render`] to the agent's exposition.
//!
//! The kernel side is read through a [`KernelMaps`] opened at start, as
//! root, so that scrapes keep working after the privilege drop.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tarpit_common::lists::BlockReason;
use tracing::debug;

use crate::kernel::{KernelMaps, SteerCounters};

type Labels = Vec<(&'static str, String)>;

/// Block-list churn, counted by whoever adds or sweeps entries.
static BLOCKS_ADDED: AtomicU64 = AtomicU64::new(0);
static BLOCKS_EXPIRED: AtomicU64 = AtomicU64::new(0);
static BLOCKS_EVICTED: AtomicU64 = AtomicU64::new(0);

/// Kernel features and whether this kernel runs them, as found at start
/// (a verifier that refuses a program degrades its feature, see
/// [`crate::kernel::Kernel::features`]).
static KERNEL_FEATURES: Mutex<Vec<(&'static str, bool)>> = Mutex::new(Vec::new());

/// Records whether a kernel feature works on this kernel, for
/// `tarpit_kernel_feature_available`.
pub fn kernel_feature(name: &'static str, available: bool) {
    let mut f = KERNEL_FEATURES.lock().unwrap_or_else(|p| p.into_inner());
    match f.iter_mut().find(|(n, _)| *n == name) {
        Some(e) => e.1 = available,
        None => f.push((name, available)),
    }
}

/// The agent put `n` entries on the kernel's block list.
pub fn blocks_added(n: u64) {
    BLOCKS_ADDED.fetch_add(n, Relaxed);
}

/// `n` expired block-list entries were swept from the kernel's map.
pub fn blocks_expired(n: u64) {
    BLOCKS_EXPIRED.fetch_add(n, Relaxed);
}

/// `n` automatic blocks were evicted to make room for newer ones (the
/// automatic part of the block list was full).
pub fn blocks_evicted(n: u64) {
    BLOCKS_EVICTED.fetch_add(n, Relaxed);
}

/// Scrape-time source of the operational metrics.
pub struct OpsMetrics {
    kernel: Option<Mutex<KernelMaps>>,
    steer: Option<crate::closed_loop::LoopHandle>,
}

static INSTALLED: OnceLock<Arc<OpsMetrics>> = OnceLock::new();

impl OpsMetrics {
    /// Opens the pinned maps for reading (None when the kernel side is not
    /// there, e.g. in unit tests). Call before the privilege drop.
    pub fn new(
        kernel: Option<KernelMaps>,
        steer: Option<crate::closed_loop::LoopHandle>,
    ) -> Arc<OpsMetrics> {
        let m = Arc::new(OpsMetrics {
            kernel: kernel.map(Mutex::new),
            steer,
        });
        let _ = INSTALLED.set(m.clone());
        m
    }

    /// Writes the `[kernel]` toggles, ports and window clamp of a reloaded
    /// config into the kernel's settings map, through the handle opened
    /// at start (the programs read it live).
    pub fn apply_kernel_settings(&self, cfg: &crate::config::KernelConfig) -> anyhow::Result<()> {
        let Some(maps) = &self.kernel else {
            return Ok(());
        };
        let mut maps = maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.set_settings(crate::kernel::settings_from(cfg))?;
        Ok(())
    }

    /// Appends the families in the text format, without the `# EOF` line.
    pub fn render(&self, out: &mut String) {
        let mut reg = Registry::with_prefix("tarpit");
        self.kernel_families(&mut reg);
        match self.steer.as_ref().and_then(|l| l.steer_counters()) {
            Some(Ok(c)) => steer_family(&mut reg, &c),
            Some(Err(e)) => debug!(target: "tarpit::ops", "cannot read steering counters: {e}"),
            None => {}
        }

        let reloads = Family::<Labels, Counter>::default();
        let counts = super::reload::counts();
        reloads
            .get_or_create(&vec![("result", "applied".to_string())])
            .inc_by(counts.applied.load(Relaxed));
        reloads
            .get_or_create(&vec![("result", "refused".to_string())])
            .inc_by(counts.refused.load(Relaxed));
        reg.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            reloads,
        );
        let dropped = Counter::<u64>::default();
        dropped.inc_by(crate::logging::dropped_total());
        reg.register(
            "log_lines_dropped",
            "Log lines dropped by the rate limit ([log] rate_limit)",
            dropped,
        );
        for (name, help, v) in [
            (
                "blocks_added",
                "Entries the agent put on the kernel's block list",
                &BLOCKS_ADDED,
            ),
            (
                "blocks_expired",
                "Expired block-list entries swept from the kernel's map",
                &BLOCKS_EXPIRED,
            ),
            (
                "blocks_evicted",
                "Automatic blocks evicted, oldest first, when their part of the block list \
                 (kernel.auto_block_entries) was full",
                &BLOCKS_EVICTED,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Relaxed));
            reg.register(name, help, c);
        }

        let features = Family::<Labels, Gauge>::default();
        for (name, ok) in KERNEL_FEATURES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            features
                .get_or_create(&vec![("feature", name.to_string())])
                .set(i64::from(*ok));
        }
        reg.register(
            "kernel_feature_available",
            "1 when this kernel runs the feature, 0 when it was degraded at load (the log says why)",
            features,
        );

        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &reg);
        let end = text.rfind("# EOF").unwrap_or(text.len());
        out.push_str(&text[..end]);
    }

    fn kernel_families(&self, reg: &mut Registry) {
        let Some(maps) = &self.kernel else {
            return;
        };
        let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
        match maps.counters() {
            Ok(k) => {
                let fam = Family::<Labels, Counter>::default();
                for (c, v) in &k.counters {
                    fam.get_or_create(&vec![("counter", c.name().to_string())])
                        .inc_by(*v);
                }
                reg.register(
                    "kernel",
                    "The kernel programs' per-CPU counters, summed over CPUs",
                    fam,
                );
                let drops = Family::<Labels, Counter>::default();
                for (code, v) in &k.drops_by_reason {
                    let reason = BlockReason::from_code(*code)
                        .map_or_else(|| code.to_string(), |r| r.name().to_string());
                    drops.get_or_create(&vec![("reason", reason)]).inc_by(*v);
                }
                reg.register(
                    "kernel_xdp_drops",
                    "Packets XDP dropped, by block-list reason",
                    drops,
                );
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
                reg.register("map_entries", "Entries in each kernel map", entries);
                reg.register(
                    "map_capacity",
                    "Capacity of each kernel map (bytes for the event ring buffer)",
                    capacity,
                );
            }
            Err(e) => debug!(target: "tarpit::ops", "cannot read kernel map usage: {e}"),
        }
    }
}

/// `tarpit_bypass_steered_total{decision}`: what the sk_lookup program did
/// with each new connection to a steered port. `allowlisted`,
/// `authenticated`, `fail_open`: handed to the MTA's listener; `agent`:
/// to the agent's; `passed`: left to the kernel's own lookup (no usable
/// socket in the map).
fn steer_family(reg: &mut Registry, c: &SteerCounters) {
    let fam = Family::<Labels, Counter>::default();
    for (decision, v) in [
        ("allowlisted", c.allowed),
        ("authenticated", c.authenticated),
        ("agent", c.agent),
        ("fail_open", c.fail_open),
        ("passed", c.passed),
    ] {
        fam.get_or_create(&vec![("decision", decision.to_string())])
            .inc_by(v);
    }
    reg.register(
        "bypass_steered",
        "Connections the sk_lookup program steered, by decision (bypass)",
        fam,
    );
}

/// The installed instance, if the agent made one.
pub fn installed() -> Option<Arc<OpsMetrics>> {
    INSTALLED.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_without_kernel() {
        let m = OpsMetrics {
            kernel: None,
            steer: None,
        };
        blocks_added(2);
        let mut out = String::new();
        m.render(&mut out);
        assert!(!out.contains("# EOF"), "{out}");
        assert!(
            out.contains("tarpit_config_reloads_total{result=\"applied\"}"),
            "{out}"
        );
        assert!(out.contains("tarpit_log_lines_dropped_total"), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("tarpit_blocks_added_total "))
            .unwrap_or_else(|| panic!("{out}"));
        let v: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v >= 2);
        assert!(out.contains("tarpit_blocks_expired_total"), "{out}");
        blocks_evicted(3);
        let mut out = String::new();
        m.render(&mut out);
        let line = out
            .lines()
            .find(|l| l.starts_with("tarpit_blocks_evicted_total "))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= 3);
        kernel_feature("pregreet", false);
        kernel_feature("pregreet", true);
        kernel_feature("sock_ops", false);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("tarpit_kernel_feature_available{feature=\"pregreet\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tarpit_kernel_feature_available{feature=\"sock_ops\"} 0"),
            "{out}"
        );
        // Without a bypass (no closed loop here) there is no steering family.
        assert!(!out.contains("bypass_steered"), "{out}");
    }

    #[test]
    fn steering_counts_render_by_decision() {
        let mut reg = Registry::with_prefix("tarpit");
        steer_family(
            &mut reg,
            &SteerCounters {
                allowed: 3,
                authenticated: 2,
                agent: 7,
                fail_open: 1,
                passed: 0,
            },
        );
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("# TYPE tarpit_bypass_steered counter"),
            "{text}"
        );
        for (decision, v) in [
            ("allowlisted", 3),
            ("authenticated", 2),
            ("agent", 7),
            ("fail_open", 1),
            ("passed", 0),
        ] {
            assert!(
                text.contains(&format!(
                    "tarpit_bypass_steered_total{{decision=\"{decision}\"}} {v}\n"
                )),
                "{decision}: {text}"
            );
        }
    }
}
