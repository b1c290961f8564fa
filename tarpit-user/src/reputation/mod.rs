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
//!                                 └► PTR → A/AAAA (host allow list)      ├► score → Verdict
//!                                                         deadline ──────┘
//! ```
pub mod cache;
pub mod dnsbl;
pub mod fcrdns;
pub mod greylist;
pub mod metrics;
pub mod resolver;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Config, ConfigError, DnsConfig, DnsblConfig, DnswlConfig};
use cache::{NetBudget, TtlCache};
use dnsbl::{Hit, Judgement, ListAction, Scoring, Site};
use fcrdns::{HostCheck, HostPattern};
pub use greylist::{GreyKey, GreyVerdict, Greylist, unix_now};
use metrics::{ListMetrics, ReputationMetrics, SiteMetrics};
use resolver::{Answer, Dns, Failure};

/// Why the reputation checks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ReputationError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Resolver(#[from] resolver::ResolverError),
}

/// Everything DNS said about one client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Combined DNSBL/DNSWL score.
    pub score: i32,
    /// The sites that counted.
    pub hits: Vec<Hit>,
    /// Set when the score reached `dnsbl.threshold`: what to do.
    pub listed: Option<ListAction>,
    /// The score reached `dnswl.threshold`: exempt like an allow-listed IP.
    pub dnswl: bool,
    /// A forward-confirmed PTR name on the host-name allow list.
    pub allow_host: Option<String>,
    /// False when a lookup failed or timed out (then "not listed").
    pub complete: bool,
    /// Served by the temporary allow cache, without a query.
    pub from_allow_cache: bool,
}

impl Verdict {
    /// A client no DNS rule applies to (no lists configured, or DNS gave
    /// nothing in time).
    fn clean(complete: bool) -> Verdict {
        Verdict {
            complete,
            ..Default::default()
        }
    }

    /// Allow-listed by DNSWL or by host name: never tarpitted, never
    /// greylisted.
    pub fn exempt(&self) -> bool {
        self.dnswl || self.allow_host.is_some()
    }

    /// The action to take, if any: none for exempt clients (an allow list
    /// wins over a block list, as in SecurityGateway).
    pub fn action(&self) -> Option<ListAction> {
        if self.exempt() { None } else { self.listed }
    }

    /// The reply for the `reject` action, naming the lists (postscreen's
    /// wording, an RFC 3463 code for "delivery not authorized").
    pub fn reject_reply(&self) -> String {
        let lists: Vec<&str> = self
            .hits
            .iter()
            .filter(|h| h.weight > 0)
            .map(|h| h.domain.as_str())
            .collect();
        format!(
            "554 5.7.1 Service unavailable; client blocked using {}",
            if lists.is_empty() {
                "DNSBL".to_string()
            } else {
                lists.join(", ")
            }
        )
    }
}

/// The settings the checks run with, taken from the config sections.
struct Settings {
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

impl Settings {
    fn clamp_ttl(&self, ttl: Option<u32>) -> Duration {
        let t = ttl.map_or(self.min_ttl, |s| Duration::from_secs(u64::from(s)));
        t.clamp(self.min_ttl, self.max_ttl)
    }
}

/// One list's A records for one address; `None`: not listed.
type ListResult = Option<Vec<Ipv4Addr>>;

struct Inner {
    settings: Settings,
    dns: Option<Dns>,
    /// (domain index, address) -> the list's A records (None: not listed).
    results: Mutex<TtlCache<(usize, IpAddr), ListResult>>,
    /// Clients that passed, with the verdict they got.
    allow: Mutex<TtlCache<IpAddr, Verdict>>,
    /// address -> confirmed allow-listed host name (None: not allowed).
    hosts: Mutex<TtlCache<IpAddr, Option<String>>>,
    /// New look-ups per client network (`dns.prefix_lookups_per_minute`).
    budget: Mutex<NetBudget>,
    metrics: Arc<ReputationMetrics>,
    /// The counters of `settings.domains` and `settings.sites`, by index
    /// (shared with `metrics`, which keeps them across reloads).
    lists: Vec<Arc<ListMetrics>>,
    sites: Vec<Arc<SiteMetrics>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The DNS-based checks, shared by all sessions (cheap to clone).
#[derive(Clone)]
pub struct Reputation {
    inner: Arc<Inner>,
}

/// One client's checks in flight; the verdict is awaited at most until
/// the deadline set at connect.
pub struct ReputationHandle {
    rx: Option<oneshot::Receiver<Verdict>>,
    deadline: Instant,
    verdict: Option<Verdict>,
}

impl ReputationHandle {
    /// The verdict, waiting for it at most until `dns.timeout` after
    /// connect. Later calls return the same verdict at once. Cancel-safe:
    /// dropped while waiting (another `select!` branch won), it loses
    /// nothing, and a later call waits on.
    pub async fn verdict(&mut self) -> &Verdict {
        if self.verdict.is_none() {
            let v = match self.rx.as_mut() {
                // The task keeps the same deadline; the grace only covers
                // scheduling, so a stuck task cannot hold the session.
                Some(rx) => {
                    match tokio::time::timeout_at(self.deadline + Duration::from_millis(100), rx)
                        .await
                    {
                        Ok(Ok(v)) => v,
                        _ => Verdict::clean(false),
                    }
                }
                None => Verdict::clean(false),
            };
            self.rx = None;
            self.verdict = Some(v);
        }
        self.verdict.get_or_insert_with(|| Verdict::clean(false))
    }

    /// The verdict if it is already known, without waiting.
    pub fn try_verdict(&mut self) -> Option<&Verdict> {
        if self.verdict.is_none()
            && let Some(rx) = self.rx.as_mut()
            && let Ok(v) = rx.try_recv()
        {
            self.rx = None;
            self.verdict = Some(v);
        }
        self.verdict.as_ref()
    }
}

enum Done {
    List(usize, Answer<Vec<Ipv4Addr>>),
    Host(HostCheck, Option<u32>),
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
        let settings = Settings {
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
            inner: Arc::new(Inner {
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
        self.inner.dns.is_some()
    }

    pub fn metrics(&self) -> &Arc<ReputationMetrics> {
        &self.inner.metrics
    }

    /// Starts every lookup for `ip` now (call at connect, inside a tokio
    /// runtime). The work runs in its own task, bounded by `dns.timeout`.
    pub fn start_lookups(&self, ip: IpAddr) -> ReputationHandle {
        let ip = ip.to_canonical();
        let deadline = Instant::now() + self.inner.settings.timeout;
        if self.inner.dns.is_none() {
            return ReputationHandle {
                rx: None,
                deadline,
                verdict: Some(Verdict::clean(true)),
            };
        }
        let (tx, rx) = oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let v = inner.check(ip, deadline).await;
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
        lock(&self.inner.allow).remove(&ip);
        lock(&self.inner.hosts).remove(&ip);
        let mut r = lock(&self.inner.results);
        for i in 0..self.inner.settings.domains.len() {
            r.remove(&(i, ip));
        }
    }
}

impl Inner {
    async fn check(self: Arc<Self>, ip: IpAddr, deadline: Instant) -> Verdict {
        let m = &self.metrics;
        m.verdicts.fetch_add(1, Relaxed);
        let now = Instant::now();
        if let Some(mut v) = lock(&self.allow).get(&ip, now) {
            m.allow_cache_hits.fetch_add(1, Relaxed);
            v.from_allow_cache = true;
            return v;
        }
        let Some(dns) = self.dns.clone() else {
            return Verdict::clean(true);
        };
        let s = &self.settings;
        let mut answers: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        let mut misses: Vec<usize> = Vec::new();
        for (i, domain) in s.domains.iter().enumerate() {
            let cached = lock(&self.results).get(&(i, ip), now);
            match cached {
                Some(r) => {
                    self.lists[i].cache_hits.fetch_add(1, Relaxed);
                    if let Some(a) = r {
                        answers.insert(domain.clone(), a);
                    }
                }
                None => misses.push(i),
            }
        }
        let mut allow_host = None;
        let mut host_pending = false;
        if !s.allow_hosts.is_empty() {
            match lock(&self.hosts).get(&ip, now) {
                Some(h) => allow_host = h,
                None => host_pending = true,
            }
        }
        let mut complete = true;
        // Only what must go out costs budget: cached answers are free.
        if (!misses.is_empty() || host_pending) && !lock(&self.budget).take(ip, now) {
            // The network's budget is spent: not looked up, as on a DNS
            // timeout (not listed, not cached, counted).
            complete = false;
            for i in misses.drain(..) {
                self.lists[i].over_budget.fetch_add(1, Relaxed);
            }
            if host_pending {
                host_pending = false;
                m.fcrdns_errors.fetch_add(1, Relaxed);
            }
            tracing::debug!(client = %ip, network = %cache::network_of(ip), "the network's DNS look-up budget is spent; not looked up (treated as not listed)");
        }
        let mut pending: Vec<bool> = vec![false; s.domains.len()];
        let mut tasks: JoinSet<Done> = JoinSet::new();
        for i in misses {
            pending[i] = true;
            let name = dnsbl::query_name(ip, &s.domains[i]);
            let (dns, me) = (dns.clone(), self.clone());
            tasks.spawn(async move {
                let t0 = Instant::now();
                me.lists[i].queries.fetch_add(1, Relaxed);
                let a = dns.a(&name).await;
                me.lists[i].latency.observe(t0.elapsed());
                Done::List(i, a)
            });
        }
        if host_pending {
            let (dns, me) = (dns.clone(), self.clone());
            tasks.spawn(async move {
                let t0 = Instant::now();
                me.metrics.fcrdns_lookups.fetch_add(1, Relaxed);
                let (h, ttl) = fcrdns::check(&dns, ip, &me.settings.allow_hosts).await;
                me.metrics.fcrdns_latency.observe(t0.elapsed());
                Done::Host(h, ttl)
            });
        }
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(None) => break,
                Ok(Some(Err(_))) => complete = false,
                Ok(Some(Ok(Done::List(i, a)))) => {
                    pending[i] = false;
                    let lm = &self.lists[i];
                    let now = Instant::now();
                    match a {
                        Answer::Found(addrs, ttl) => {
                            lm.listed.fetch_add(1, Relaxed);
                            let until = now + s.clamp_ttl(Some(ttl));
                            lock(&self.results).insert((i, ip), Some(addrs.clone()), until, now);
                            answers.insert(s.domains[i].clone(), addrs);
                        }
                        Answer::NotFound(neg) => {
                            lm.not_listed.fetch_add(1, Relaxed);
                            let until = now + s.clamp_ttl(neg);
                            lock(&self.results).insert((i, ip), None, until, now);
                        }
                        Answer::Failed(f) => {
                            complete = false;
                            match f {
                                Failure::Timeout => lm.timeouts.fetch_add(1, Relaxed),
                                Failure::Error => lm.errors.fetch_add(1, Relaxed),
                            };
                            tracing::info!(client = %ip, list = %s.domains[i], failure = ?f, "DNSBL lookup failed; treated as not listed");
                        }
                    }
                }
                Ok(Some(Ok(Done::Host(h, ttl)))) => {
                    host_pending = false;
                    let now = Instant::now();
                    match h {
                        HostCheck::Confirmed(name) => {
                            m.fcrdns_confirmed.fetch_add(1, Relaxed);
                            let until = now + s.clamp_ttl(ttl);
                            lock(&self.hosts).insert(ip, Some(name.clone()), until, now);
                            allow_host = Some(name);
                        }
                        HostCheck::NotAllowed => {
                            let until = now + s.clamp_ttl(ttl);
                            lock(&self.hosts).insert(ip, None, until, now);
                        }
                        HostCheck::Failed(_) => {
                            complete = false;
                            m.fcrdns_errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                Err(_) => {
                    // The deadline: what has not answered counts as not listed.
                    complete = false;
                    for (i, p) in pending.iter().enumerate() {
                        if *p {
                            self.lists[i].timeouts.fetch_add(1, Relaxed);
                            tracing::info!(client = %ip, list = %s.domains[i], "DNSBL lookup still unanswered at the deadline; treated as not listed");
                        }
                    }
                    if host_pending {
                        m.fcrdns_errors.fetch_add(1, Relaxed);
                    }
                    tasks.abort_all();
                    break;
                }
            }
        }
        let score = dnsbl::score(&s.sites, &answers);
        for h in &score.hits {
            if let Some(sm) = self.sites.iter().find(|x| x.spec == h.spec) {
                sm.hits.fetch_add(1, Relaxed);
            }
        }
        let judgement = s.scoring.judge(&score);
        let v = Verdict {
            score: score.total,
            hits: score.hits,
            listed: match judgement {
                Judgement::Listed(a) => Some(a),
                _ => None,
            },
            dnswl: judgement == Judgement::AllowListed,
            allow_host,
            complete,
            from_allow_cache: false,
        };
        if !complete {
            m.incomplete.fetch_add(1, Relaxed);
        }
        match v.action() {
            Some(a) => {
                match a {
                    ListAction::Log => &m.listed_log,
                    ListAction::Delay => &m.listed_delay,
                    ListAction::Reject => &m.listed_reject,
                    ListAction::Drop => &m.listed_drop,
                }
                .fetch_add(1, Relaxed);
                let lists: Vec<&str> = v.hits.iter().map(|h| h.spec.as_str()).collect();
                tracing::info!(client = %ip, score = v.score, action = %a, lists = ?lists, "client listed");
            }
            None => {
                if v.dnswl {
                    m.dnswl.fetch_add(1, Relaxed);
                }
                if v.listed.is_none() && complete {
                    let now = Instant::now();
                    lock(&self.allow).insert(ip, v.clone(), now + s.allow_ttl, now);
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(v, Verdict::clean(true));
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

    #[tokio::test(start_paused = true)]
    async fn verdict_survives_a_cancelled_wait() {
        let (tx, rx) = oneshot::channel();
        let mut h = ReputationHandle {
            rx: Some(rx),
            deadline: Instant::now() + Duration::from_secs(5),
            verdict: None,
        };
        // Another branch wins first (the greeting delay ends).
        tokio::select! {
            _ = h.verdict() => panic!("no verdict yet"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let listed = Verdict {
            score: 3,
            listed: Some(ListAction::Delay),
            complete: true,
            ..Default::default()
        };
        tx.send(listed.clone()).unwrap();
        assert_eq!(h.verdict().await, &listed);
        assert_eq!(h.try_verdict(), Some(&listed));
    }

    #[tokio::test(start_paused = true)]
    async fn verdict_wait_is_bounded_by_the_deadline() {
        let (_tx, rx) = oneshot::channel::<Verdict>();
        let start = Instant::now();
        let mut h = ReputationHandle {
            rx: Some(rx),
            deadline: start + Duration::from_secs(5),
            verdict: None,
        };
        let v = h.verdict().await.clone();
        assert!(!v.complete && v.listed.is_none());
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5100));
    }

    #[test]
    fn allow_lists_win_over_block_lists_and_reply_names_lists() {
        let v = Verdict {
            score: 3,
            hits: vec![
                Hit {
                    domain: "bl.test".into(),
                    spec: "bl.test*3".into(),
                    weight: 3,
                },
                Hit {
                    domain: "wl.test".into(),
                    spec: "wl.test*-1".into(),
                    weight: -1,
                },
            ],
            listed: Some(ListAction::Reject),
            ..Default::default()
        };
        assert_eq!(v.action(), Some(ListAction::Reject));
        assert_eq!(
            v.reject_reply(),
            "554 5.7.1 Service unavailable; client blocked using bl.test"
        );
        let allowed = Verdict {
            allow_host: Some("mx.partner.example".into()),
            ..v
        };
        assert!(allowed.exempt());
        assert_eq!(allowed.action(), None);
    }
}
