//! What one greylist decision costs the agent at RCPT: the session's own
//! two calls, `Greylist::triplet_key` and `Greylist::check`, timed one by
//! one against a store of its own in a temporary directory. Run by
//! `cargo xtask bench` (scenario `cluster_greylist`) to set the local
//! decision against a Redis round trip; prints one JSON object.
//!
//! `greylist_check_cost COUNT`: COUNT new triplets (first tries: recorded
//! and handed to the store's thread), the same COUNT retried after the
//! minimum wait (they pass and become known), then once more (a known
//! triplet, renewed). Each phase once without and once with a hand-off
//! to the cluster as the agent makes it (`try_send` on a bounded tokio
//! channel, drained by another thread, as the cluster task drains it).
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tarpit::config::{GreylistConfig, GreylistMode};
use tarpit::reputation::metrics::ReputationMetrics;
use tarpit::reputation::{GreyRecord, GreyShare, GreyVerdict, Greylist, unix_now};

/// The cluster's hand-off: what `cluster::GreyOutlet` does.
struct Outlet(tokio::sync::mpsc::Sender<(GreyRecord, u64)>);

impl GreyShare for Outlet {
    fn publish(&self, record: GreyRecord, now: u64) {
        let _ = self.0.try_send((record, now));
    }
}

/// Nanoseconds of each call, sorted.
fn phase(g: &Greylist, count: u32, now: u64, sender: &str) -> (Vec<f64>, u32) {
    let mut ns = Vec::with_capacity(count as usize);
    let mut passed = 0;
    for i in 0..count {
        // One client network per triplet, so the per-network cap of
        // pending first tries never applies.
        let client = IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, 7));
        let rcpt = format!("user{}@example.org", i & 0xff);
        let t = Instant::now();
        let key = g.triplet_key(client, sender, &rcpt);
        let v = g.check(&key, now);
        ns.push(t.elapsed().as_nanos() as f64);
        if matches!(v, GreyVerdict::Pass) {
            passed += 1;
        }
    }
    ns.sort_by(|a, b| a.total_cmp(b));
    (ns, passed)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn main() -> Result<()> {
    let count: u32 = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "10000".into())
        .parse()
        .context("COUNT must be a number")?;
    let dir = std::env::temp_dir().join(format!("tarpit-greylist-cost-{}", std::process::id()));
    let out = run(&dir, count);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{}", serde_json::to_string(&out?)?);
    Ok(())
}

fn run(dir: &std::path::Path, count: u32) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    out.insert("checks_per_phase".into(), count.into());
    for shared in [false, true] {
        let sub = dir.join(if shared { "shared" } else { "local" });
        let cfg = GreylistConfig {
            mode: GreylistMode::Triplet,
            store: sub.join("greylist.db"),
            max_pending: (count as usize).max(1000),
            ..GreylistConfig::default()
        };
        let now = unix_now();
        let Some(mut g) = Greylist::open(&cfg, Arc::new(ReputationMetrics::default()), now)? else {
            bail!("greylisting is off");
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(10_000);
        let drain =
            shared.then(|| std::thread::spawn(move || while rx.blocking_recv().is_some() {}));
        if shared {
            g = g.with_share(Arc::new(Outlet(tx)));
        } else {
            drop(tx);
        }
        let min_wait = cfg.min_wait.as_secs();
        let sender = "sender@example.net";
        let tag = if shared { "_shared" } else { "" };
        for (name, at, want_pass) in [
            ("first_try", now, false),
            ("retry_pass", now + min_wait, true),
            ("known", now + min_wait + 1, true),
        ] {
            let (ns, passed) = phase(&g, count, at, sender);
            let want = if want_pass { count } else { 0 };
            if passed != want {
                bail!("{name}: {passed} of {count} passed, expected {want}");
            }
            let mean = ns.iter().sum::<f64>() / ns.len().max(1) as f64;
            out.insert(format!("{name}{tag}_p50_ns"), quantile(&ns, 0.5).into());
            out.insert(format!("{name}{tag}_p99_ns"), quantile(&ns, 0.99).into());
            out.insert(format!("{name}{tag}_mean_ns"), mean.into());
        }
        g.flush(std::time::Duration::from_secs(10));
        drop(g);
        if let Some(d) = drain {
            let _ = d.join();
        }
    }
    Ok(out)
}
