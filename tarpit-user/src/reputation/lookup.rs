//! One client's look-ups: every list and the host-name check in parallel,
//! each answered from its cache when it can, spent from the network's
//! budget when it cannot, and cut at the deadline (what has not answered
//! counts as not listed). Apart from `mod.rs` because this is the one part
//! of the checks that waits on the network.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::cache::{self, NetBudget, TtlCache};
use super::dnsbl::{self, Judgement, ListAction};
use super::fcrdns::{self, HostCheck};
use super::metrics::{ListMetrics, ReputationMetrics, SiteMetrics};
use super::resolver::{Answer, Dns, Failure};
use super::{CheckSettings, DnsVerdict, lock};

/// One list's A records for one address; `None`: not listed.
type ListResult = Option<Vec<Ipv4Addr>>;

/// The configured checks and their caches, shared by every look-up.
pub(super) struct Checks {
    pub(super) settings: CheckSettings,
    pub(super) dns: Option<Dns>,
    /// (domain index, address) -> the list's A records (None: not listed).
    pub(super) results: Mutex<TtlCache<(usize, IpAddr), ListResult>>,
    /// Clients that passed, with the verdict they got.
    pub(super) allow: Mutex<TtlCache<IpAddr, DnsVerdict>>,
    /// address -> confirmed allow-listed host name (None: not allowed).
    pub(super) hosts: Mutex<TtlCache<IpAddr, Option<String>>>,
    /// New look-ups per client network (`dns.prefix_lookups_per_minute`).
    pub(super) budget: Mutex<NetBudget>,
    pub(super) metrics: Arc<ReputationMetrics>,
    /// The counters of `settings.domains` and `settings.sites`, by index
    /// (shared with `metrics`, which keeps them across reloads).
    pub(super) lists: Vec<Arc<ListMetrics>>,
    pub(super) sites: Vec<Arc<SiteMetrics>>,
}

enum Done {
    List(usize, Answer<Vec<Ipv4Addr>>),
    Host(HostCheck, Option<u32>),
}

impl Checks {
    pub(super) async fn check(self: Arc<Self>, ip: IpAddr, deadline: Instant) -> DnsVerdict {
        let m = &self.metrics;
        m.verdicts.fetch_add(1, Relaxed);
        let now = Instant::now();
        if let Some(mut v) = lock(&self.allow).get(&ip, now) {
            m.allow_cache_hits.fetch_add(1, Relaxed);
            v.from_allow_cache = true;
            return v;
        }
        let Some(dns) = self.dns.clone() else {
            return DnsVerdict::clean(true);
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
        let v = DnsVerdict {
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
