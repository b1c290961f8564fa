//! What DNS says about a client: DNSBL/DNSWL scores, the host-name allow
//! list (FCrDNS), and greylisting.
//!
//! The session calls [`Reputation::start_lookups`] the moment a client
//! connects: every list is queried in parallel, and the answers arrive
//! while the client sits in the greeting delay (as in postscreen). When the
//! session needs to know (at MAIL FROM for the blacklist delay, or at once
//! for a `drop` action), it awaits [`ReputationHandle::verdict`], which
//! never waits past `dns.timeout` counted from connect: whatever has not
//! answered by then counts as "not listed", and a metric says so.
//!
//! ```text
//! connect ──► start_lookups(ip) ──► [allow cache?] ─► verdict at once
//!                                 └► per list: [result cache?] or A query ┐
//!                                 └► PTR → A/AAAA (host allow list)      ├► score → DnsVerdict
//!                                                         deadline ──────┘
//! ```
//!
//! Files: this one builds the checks from the config; `lookup` runs one
//! client's queries against the caches and the deadline; `verdict` is what
//! the session gets back.
pub mod cache;
pub mod dnsbl;
pub mod fcrdns;
pub mod greylist;
mod lookup;
pub mod metrics;
pub mod resolver;
mod verdict;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{Config, ConfigError, DnsConfig, DnsblConfig, DnswlConfig};
use cache::{NetBudget, TtlCache};
use dnsbl::{Scoring, Site};
use fcrdns::HostPattern;
pub use greylist::{GreyKey, GreyShare, GreyVerdict, Greylist, Record as GreyRecord, unix_now};
use lookup::Checks;
use metrics::ReputationMetrics;
use resolver::Dns;
pub use verdict::{DnsVerdict, ReputationHandle};

/// Why the reputation checks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReputationError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Resolver(#[from] resolver::ResolverError),
}

/// The settings the checks run with, taken from the config sections.
struct CheckSettings {
    sites: Vec<Site>,
    /// Unique list domains, in site order: one query each.
    domains: Vec<String>,
    scoring: Scoring,
    allow_hosts: Vec<HostPattern>,
    timeout: Duration,
    min_ttl: Duration,
    max_ttl: Duration,
    allow_ttl: Duration,
}

impl CheckSettings {
    fn clamp_ttl(&self, ttl: Option<u32>) -> Duration {
        let t = ttl.map_or(self.min_ttl, |s| Duration::from_secs(u64::from(s)));
        t.clamp(self.min_ttl, self.max_ttl)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The DNS-based checks, shared by all sessions (cheap to clone).
#[derive(Clone)]
pub struct Reputation {
    checks: Arc<Checks>,
}

impl Reputation {
    /// Builds the checks from the config sections. `allow_hosts` is the
    /// host-name allow list (`allow.hosts`). Without lists and host names
    /// no resolver is built and every verdict is clean at once.
    pub fn new(
        dns: &DnsConfig,
        bl: &DnsblConfig,
        wl: &DnswlConfig,
        allow_hosts: Vec<HostPattern>,
    ) -> Result<Reputation, ReputationError> {
        Self::with_metrics(
            dns,
            bl,
            wl,
            allow_hosts,
            Arc::new(ReputationMetrics::default()),
        )
    }

    /// The checks of a whole config, counting into `metrics` (the agent
    /// passes the same one at start and at every reload, so the families
    /// count on). Errors name the key: a resolver that cannot be built is
    /// `dns.nameservers`' fault (with none given, the system's
    /// configuration is read).
    pub fn from_config(
        config: &Config,
        metrics: Arc<ReputationMetrics>,
    ) -> Result<Reputation, ConfigError> {
        Self::with_metrics(
            &config.dns,
            &config.dnsbl,
            &config.dnswl,
            config.allow.hosts.clone(),
            metrics,
        )
        .map_err(|e| match e {
            ReputationError::Config(e) => e,
            ReputationError::Resolver(e) => ConfigError::invalid("dns.nameservers", e.to_string()),
        })
    }

    /// Does `new` ask for other checks than `old`? (`[dns]`, `[dnsbl]`,
    /// `[dnswl]`, `allow.hosts`: what [`Reputation::from_config`] reads.)
    pub fn config_changed(old: &Config, new: &Config) -> bool {
        old.dns != new.dns
            || old.dnsbl != new.dnsbl
            || old.dnswl != new.dnswl
            || old.allow.hosts != new.allow.hosts
    }

    /// As [`Reputation::new`], counting into `metrics`.
    pub fn with_metrics(
        dns: &DnsConfig,
        bl: &DnsblConfig,
        wl: &DnswlConfig,
        allow_hosts: Vec<HostPattern>,
        metrics: Arc<ReputationMetrics>,
    ) -> Result<Reputation, ReputationError> {
        dns.validate()?;
        bl.validate(wl)?;
        let sites = bl.all_sites(wl)?;
        let mut domains: Vec<String> = Vec::new();
        for s in &sites {
            if !domains.contains(&s.domain) {
                domains.push(s.domain.clone());
            }
        }
        let resolver = if sites.is_empty() && allow_hosts.is_empty() {
            None
        } else {
            Some(Dns::new(&dns.nameserver_addrs(), dns.timeout)?)
        };
        let lists = domains.iter().map(|d| metrics.list_or_insert(d)).collect();
        let site_metrics = sites
            .iter()
            .map(|s| metrics.site_or_insert(&s.spec))
            .collect();
        let settings = CheckSettings {
            scoring: Scoring {
                threshold: bl.threshold,
                allow_threshold: wl.threshold,
                default_action: bl.action,
                actions: bl.normalized_actions(),
            },
            sites,
            domains,
            allow_hosts,
            timeout: dns.timeout,
            min_ttl: bl.min_ttl,
            max_ttl: bl.max_ttl,
            allow_ttl: bl.allow_ttl,
        };
        Ok(Reputation {
            checks: Arc::new(Checks {
                settings,
                dns: resolver,
                results: Mutex::new(TtlCache::new(dns.cache_entries)),
                allow: Mutex::new(TtlCache::new(dns.cache_entries)),
                hosts: Mutex::new(TtlCache::new(dns.cache_entries)),
                budget: Mutex::new(NetBudget::new(
                    dns.prefix_lookups_per_minute,
                    dns.cache_entries,
                )),
                metrics,
                lists,
                sites: site_metrics,
            }),
        })
    }

    /// True when there is anything to look up.
    pub fn is_active(&self) -> bool {
        self.checks.dns.is_some()
    }

    pub fn metrics(&self) -> &Arc<ReputationMetrics> {
        &self.checks.metrics
    }

    /// Starts every lookup for `ip` now (call at connect, inside a tokio
    /// runtime). The work runs in its own task, bounded by `dns.timeout`.
    pub fn start_lookups(&self, ip: IpAddr) -> ReputationHandle {
        let ip = ip.to_canonical();
        let deadline = Instant::now() + self.checks.settings.timeout;
        if self.checks.dns.is_none() {
            return ReputationHandle {
                rx: None,
                deadline,
                verdict: Some(DnsVerdict::clean(true)),
            };
        }
        let (tx, rx) = oneshot::channel();
        let checks = self.checks.clone();
        tokio::spawn(async move {
            let v = checks.check(ip, deadline).await;
            let _ = tx.send(v);
        });
        ReputationHandle {
            rx: Some(rx),
            deadline,
            verdict: None,
        }
    }

    /// Forgets what is cached about `ip` (e.g. after a config reload).
    pub fn forget(&self, ip: IpAddr) {
        let ip = ip.to_canonical();
        lock(&self.checks.allow).remove(&ip);
        lock(&self.checks.hosts).remove(&ip);
        let mut r = lock(&self.checks.results);
        for i in 0..self.checks.settings.domains.len() {
            r.remove(&(i, ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    #[tokio::test]
    async fn without_lists_the_verdict_is_clean_at_once() {
        let r = Reputation::new(
            &DnsConfig::default(),
            &DnsblConfig::default(),
            &DnswlConfig::default(),
            vec![],
        )
        .unwrap();
        assert!(!r.is_active());
        let mut h = r.start_lookups("198.51.100.9".parse().unwrap());
        let v = h.try_verdict().unwrap().clone();
        assert_eq!(v, DnsVerdict::clean(true));
        assert_eq!(h.verdict().await.action(), None);
    }

    /// Six addresses of one /64 with a budget of three look-ups: three
    /// queries go out, three clients are "not looked up" (incomplete, not
    /// listed, counted); another /64 has a budget of its own. The name
    /// server swallows every query, so each look-up ends at the timeout.
    #[tokio::test]
    async fn a_rotating_slash_64_spends_its_budget_and_no_more() {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns: DnsConfig = toml::from_str(&format!(
            "nameservers = [\"{}\"]\ntimeout = \"100ms\"\nprefix_lookups_per_minute = 3",
            sink.local_addr().unwrap()
        ))
        .unwrap();
        let bl: DnsblConfig = toml::from_str("sites = [\"bl.test\"]").unwrap();
        let r = Reputation::new(&dns, &bl, &DnswlConfig::default(), vec![]).unwrap();
        let mut incomplete = 0;
        for i in 1..=6 {
            let ip: IpAddr = format!("fd5b:1e00:0:9::{i}").parse().unwrap();
            let v = r.start_lookups(ip).verdict().await.clone();
            assert_eq!(v.action(), None);
            incomplete += usize::from(!v.complete);
        }
        let l = r.metrics().list("bl.test").unwrap();
        assert_eq!(l.queries.load(Relaxed), 3);
        assert_eq!(l.over_budget.load(Relaxed), 3);
        assert_eq!(incomplete, 6, "timeouts and skipped look-ups alike");
        r.start_lookups("fd5b:1e00:0:a::1".parse().unwrap())
            .verdict()
            .await;
        assert_eq!(l.queries.load(Relaxed), 4, "another /64 is looked up");
        assert_eq!(l.over_budget.load(Relaxed), 3);
    }
}
