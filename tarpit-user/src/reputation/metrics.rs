//! Counters and latency histograms of the reputation checks, as
//! prometheus-client metrics that [`ReputationMetrics::register`] puts into
//! the agent's one registry.
//!
//! One [`ReputationMetrics`] lives as long as the agent: a reload that
//! rebuilds the checks hands the same one to the new checks, so every
//! family counts on across reloads. The per-list and per-site counters are
//! created by name when a list first appears; a list a reload removes
//! keeps its last counts (it is still exported), one it adds back counts
//! on from there.
//!
//! The checks count with `fetch_add(n, Relaxed)`, read with `load` and set
//! gauges with `store`, as they did when these were plain atomics: the
//! small [`Count`], [`Level`] and [`Latency`] wrappers keep those calls and
//! write into the registered metrics (the ordering argument is ignored:
//! prometheus-client's metrics are atomics of their own).
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the lookup latency buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

type Labels = Vec<(&'static str, String)>;

/// A counter, counted like the atomic it replaced.
#[derive(Debug, Clone, Default)]
pub struct Count(Counter);

impl Count {
    /// Adds `n`; returns the previous value.
    pub fn fetch_add(&self, n: u64, _order: Ordering) -> u64 {
        self.0.inc_by(n)
    }

    pub fn load(&self, _order: Ordering) -> u64 {
        self.0.get()
    }
}

/// A gauge, set like the atomic it replaced.
#[derive(Debug, Clone, Default)]
pub struct Level(Gauge);

impl Level {
    pub fn store(&self, v: u64, _order: Ordering) {
        self.0.set(i64::try_from(v).unwrap_or(i64::MAX));
    }

    pub fn load(&self, _order: Ordering) -> u64 {
        u64::try_from(self.0.get()).unwrap_or(0)
    }
}

/// A latency histogram over [`LATENCY_BUCKETS`], in seconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram,
    /// Observations, for [`Latency::count`] (prometheus-client does not
    /// read a histogram back outside its own tests); not registered.
    observed: Counter,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::of(latency_histogram())
    }
}

impl Latency {
    fn of(histogram: Histogram) -> Latency {
        Latency {
            histogram,
            observed: Counter::default(),
        }
    }

    pub fn observe(&self, d: Duration) {
        self.histogram.observe(d.as_secs_f64());
        self.observed.inc();
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.observed.get()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Per list domain: what its queries did.
#[derive(Debug, Default)]
pub struct ListMetrics {
    pub domain: String,
    /// Queries sent (not exported; tests read it).
    pub queries: Count,
    /// Answers with records (the address is on the list, before filters).
    pub listed: Count,
    /// NXDOMAIN / no records: not on the list.
    pub not_listed: Count,
    /// Failed queries (refused, network down, SERVFAIL), treated as not listed.
    pub errors: Count,
    /// Queries still unanswered at the session's DNS deadline.
    pub timeouts: Count,
    /// Answers taken from the per-address result cache.
    pub cache_hits: Count,
    /// Queries not sent: the client's network (/24, /64) had spent its
    /// look-up budget (`dns.prefix_lookups_per_minute`); not listed.
    pub over_budget: Count,
    pub latency: Latency,
}

/// Per configured site: how often it counted toward a client's score.
#[derive(Debug, Default)]
pub struct SiteMetrics {
    pub spec: String,
    pub hits: Count,
}

/// Metrics kept by name for the life of the process, in the order they
/// first appeared.
#[derive(Debug)]
pub struct Named<T>(Mutex<Vec<Arc<T>>>);

impl<T> Default for Named<T> {
    fn default() -> Self {
        Named(Mutex::new(Vec::new()))
    }
}

impl<T> Named<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<T>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of every entry so far.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<T>> {
        self.lock().clone().into_iter()
    }

    fn find(&self, pred: impl Fn(&T) -> bool) -> Option<Arc<T>> {
        self.lock().iter().find(|x| pred(x)).cloned()
    }

    /// The entry `pred` picks, or the one `make` builds (then kept).
    fn get_or_insert(&self, pred: impl Fn(&T) -> bool, make: impl FnOnce() -> T) -> Arc<T> {
        let mut v = self.lock();
        if let Some(x) = v.iter().find(|x| pred(x)) {
            return x.clone();
        }
        let x = Arc::new(make());
        v.push(x.clone());
        x
    }
}

/// The labelled families behind the per-list, per-site and per-outcome
/// counters (what [`ReputationMetrics::register`] registers).
#[derive(Debug)]
struct Families {
    queries: Family<Labels, Counter>,
    lookup_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    site_hits: Family<Labels, Counter>,
    verdicts: Family<Labels, Counter>,
    greylist_evicted: Family<Labels, Counter>,
    greylist_entries: Family<Labels, Gauge>,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            queries: Family::default(),
            lookup_seconds: Family::new_with_constructor(latency_histogram),
            site_hits: Family::default(),
            verdicts: Family::default(),
            greylist_evicted: Family::default(),
            greylist_entries: Family::default(),
        }
    }
}

fn label(name: &'static str, value: &str) -> Labels {
    vec![(name, value.to_string())]
}

/// The counter of `labels` in `family`, created at zero.
fn count(family: &Family<Labels, Counter>, labels: Labels) -> Count {
    Count(family.get_or_create(&labels).clone())
}

#[derive(Debug)]
pub struct ReputationMetrics {
    families: Families,
    pub lists: Named<ListMetrics>,
    pub sites: Named<SiteMetrics>,
    /// Verdicts given (`tarpit_dnsbl_checks_total`).
    pub verdicts: Count,
    /// Verdicts by outcome.
    pub listed_log: Count,
    pub listed_delay: Count,
    pub listed_reject: Count,
    pub listed_drop: Count,
    pub dnswl: Count,
    /// Verdicts with at least one lookup failed or timed out (DNS down or
    /// silent): the client was treated as not listed.
    pub incomplete: Count,
    /// Verdicts served by the temporary allow cache (no query at all).
    pub allow_cache_hits: Count,
    /// Host-name allow list: PTR lookups, and names confirmed.
    pub fcrdns_lookups: Count,
    pub fcrdns_confirmed: Count,
    pub fcrdns_errors: Count,
    pub fcrdns_latency: Latency,
    /// Greylisting: deferred and passed checks.
    pub greylist_tempfail: Count,
    pub greylist_pass: Count,
    /// Checks that found a table full (its oldest entries were evicted;
    /// nobody passes for it), and the entries evicted from each table.
    pub greylist_full: Count,
    pub greylist_evicted_pending: Count,
    pub greylist_evicted_known: Count,
    /// First attempts refused unrecorded: their network had its share of
    /// pending entries.
    pub greylist_capped: Count,
    /// Gauges: pending (awaiting a retry) and known (passed) entries.
    pub greylist_pending: Level,
    pub greylist_known: Level,
}

impl Default for ReputationMetrics {
    fn default() -> Self {
        let f = Families::default();
        let outcome = |o: &str| count(&f.verdicts, label("outcome", o));
        let evicted = |t: &str| count(&f.greylist_evicted, label("table", t));
        let entries = |t: &str| Level(f.greylist_entries.get_or_create(&label("table", t)).clone());
        ReputationMetrics {
            listed_log: outcome("log"),
            listed_delay: outcome("delay"),
            listed_reject: outcome("reject"),
            listed_drop: outcome("drop"),
            dnswl: outcome("dnswl"),
            greylist_evicted_pending: evicted("pending"),
            greylist_evicted_known: evicted("known"),
            greylist_pending: entries("pending"),
            greylist_known: entries("known"),
            lists: Named::default(),
            sites: Named::default(),
            verdicts: Count::default(),
            incomplete: Count::default(),
            allow_cache_hits: Count::default(),
            fcrdns_lookups: Count::default(),
            fcrdns_confirmed: Count::default(),
            fcrdns_errors: Count::default(),
            fcrdns_latency: Latency::default(),
            greylist_tempfail: Count::default(),
            greylist_pass: Count::default(),
            greylist_full: Count::default(),
            greylist_capped: Count::default(),
            families: f,
        }
    }
}

impl ReputationMetrics {
    pub fn new(domains: &[String], specs: &[String]) -> Self {
        let m = ReputationMetrics::default();
        for d in domains {
            m.list_or_insert(d);
        }
        for s in specs {
            m.site_or_insert(s);
        }
        m
    }

    /// The counters of one list domain, if it was ever configured.
    pub fn list(&self, domain: &str) -> Option<Arc<ListMetrics>> {
        self.lists.find(|l| l.domain == domain)
    }

    /// The counters of one list domain, created at zero the first time.
    pub fn list_or_insert(&self, domain: &str) -> Arc<ListMetrics> {
        let f = &self.families;
        self.lists.get_or_insert(
            |l| l.domain == domain,
            || {
                let result = |r: &'static str| {
                    count(
                        &f.queries,
                        vec![("list", domain.to_string()), ("result", r.to_string())],
                    )
                };
                ListMetrics {
                    domain: domain.to_string(),
                    queries: Count::default(),
                    listed: result("listed"),
                    not_listed: result("not_listed"),
                    errors: result("error"),
                    timeouts: result("timeout"),
                    cache_hits: result("cached"),
                    over_budget: result("over_budget"),
                    latency: Latency::of(
                        f.lookup_seconds
                            .get_or_create(&label("list", domain))
                            .clone(),
                    ),
                }
            },
        )
    }

    /// The counters of one configured site, created at zero the first time.
    pub fn site_or_insert(&self, spec: &str) -> Arc<SiteMetrics> {
        let f = &self.families;
        self.sites.get_or_insert(
            |s| s.spec == spec,
            || SiteMetrics {
                spec: spec.to_string(),
                hits: count(&f.site_hits, label("site", spec)),
            },
        )
    }

    /// These families alone in the text format, without `# EOF` (for
    /// tools and tests: the agent's `/metrics` encodes its one registry,
    /// into which [`ReputationMetrics::register`] put them).
    pub fn render(&self, out: &mut String) {
        let mut registry = Registry::with_prefix("tarpit");
        self.register(&mut registry);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(out, &registry);
    }

    /// Registers every family into `registry` (the agent's, prefixed
    /// `tarpit`). Once per instance: the families count on across
    /// reloads, and lists added later appear in them.
    pub fn register(&self, registry: &mut Registry) {
        let f = &self.families;
        registry.register(
            "dnsbl_queries",
            "DNS queries per list, by result",
            f.queries.clone(),
        );
        registry.register(
            "dnsbl_site_hits",
            "Times a configured site counted toward a client's score",
            f.site_hits.clone(),
        );
        registry.register(
            "dnsbl_lookup_seconds",
            "DNSBL/DNSWL query latency per list",
            f.lookup_seconds.clone(),
        );
        registry.register(
            "dnsbl_verdicts",
            "Reputation verdicts by outcome",
            f.verdicts.clone(),
        );
        for (name, help, c) in [
            ("dnsbl_checks", "Clients checked", &self.verdicts),
            (
                "dnsbl_incomplete",
                "Checks with a failed or timed-out lookup (treated as not listed)",
                &self.incomplete,
            ),
            (
                "dnsbl_allow_cache_hits",
                "Checks answered by the temporary allow cache",
                &self.allow_cache_hits,
            ),
            (
                "fcrdns_lookups",
                "PTR lookups for the host-name allow list",
                &self.fcrdns_lookups,
            ),
            (
                "fcrdns_confirmed",
                "Clients allow-listed by a forward-confirmed host name",
                &self.fcrdns_confirmed,
            ),
            (
                "fcrdns_errors",
                "Host-name checks that failed in DNS",
                &self.fcrdns_errors,
            ),
        ] {
            registry.register(name, help, c.0.clone());
        }
        registry.register(
            "fcrdns_lookup_seconds",
            "Host-name check latency",
            self.fcrdns_latency.histogram.clone(),
        );
        for (name, help, c) in [
            (
                "greylist_tempfail",
                "Greylisting deferrals (4xx)",
                &self.greylist_tempfail,
            ),
            (
                "greylist_pass",
                "Greylisting checks passed",
                &self.greylist_pass,
            ),
            (
                "greylist_full",
                "Greylisting checks that found a table full: its oldest entries were evicted \
                 (nobody passes for it)",
                &self.greylist_full,
            ),
        ] {
            registry.register(name, help, c.0.clone());
        }
        registry.register(
            "greylist_evicted",
            "Greylist entries evicted from a full table, by table",
            f.greylist_evicted.clone(),
        );
        registry.register(
            "greylist_network_capped",
            "First attempts refused without being recorded: their client network had its \
             share of pending entries",
            self.greylist_capped.0.clone(),
        );
        registry.register(
            "greylist_entries",
            "Greylist entries held, by table",
            f.greylist_entries.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn render(m: &ReputationMetrics) -> String {
        let mut reg = Registry::with_prefix("tarpit");
        m.register(&mut reg);
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        s
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = ReputationMetrics::default();
        m.fcrdns_latency.observe(Duration::from_micros(500));
        m.fcrdns_latency.observe(Duration::from_millis(30));
        let s = render(&m);
        for (le, n) in [
            ("0.001", 1),
            ("0.025", 1),
            ("0.05", 2),
            ("5.0", 2),
            ("+Inf", 2),
        ] {
            assert!(
                s.contains(&format!(
                    "tarpit_fcrdns_lookup_seconds_bucket{{le=\"{le}\"}} {n}\n"
                )),
                "{le}: {s}"
            );
        }
        assert!(s.contains("tarpit_fcrdns_lookup_seconds_count 2\n"), "{s}");
        assert_eq!(m.fcrdns_latency.count(), 2);
        assert!(
            s.contains("# TYPE tarpit_fcrdns_lookup_seconds histogram"),
            "{s}"
        );
    }

    #[test]
    fn render_names_lists_and_sites() {
        let m = ReputationMetrics::new(&["bl.test".into()], &["bl.test*3".into()]);
        m.list_or_insert("bl.test").listed.fetch_add(2, Relaxed);
        m.site_or_insert("bl.test*3").hits.fetch_add(1, Relaxed);
        m.greylist_pending.store(4, Relaxed);
        let s = render(&m);
        let mut alone = String::new();
        m.render(&mut alone);
        assert_eq!(
            s,
            format!("{alone}# EOF\n"),
            "one encoding, with or without EOF"
        );
        assert!(s.contains("tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"listed\"} 2"));
        assert!(s.contains("tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"timeout\"} 0"));
        assert!(s.contains("tarpit_dnsbl_site_hits_total{site=\"bl.test*3\"} 1"));
        assert!(s.contains("tarpit_dnsbl_lookup_seconds_bucket{le=\"+Inf\",list=\"bl.test\"} 0"));
        assert!(s.contains("# TYPE tarpit_dnsbl_queries counter"), "{s}");
        assert!(s.contains("# HELP tarpit_dnsbl_queries DNS queries per list, by result.\n"));
        assert!(
            s.contains("tarpit_dnsbl_verdicts_total{outcome=\"dnswl\"} 0"),
            "{s}"
        );
        assert!(s.contains("tarpit_dnsbl_checks_total 0"), "{s}");
        assert!(
            s.contains("tarpit_greylist_evicted_total{table=\"known\"} 0"),
            "{s}"
        );
        assert!(s.contains("tarpit_greylist_network_capped_total 0"), "{s}");
        assert!(s.contains("# TYPE tarpit_greylist_entries gauge"), "{s}");
        assert!(
            s.contains("tarpit_greylist_entries{table=\"pending\"} 4"),
            "{s}"
        );
    }

    #[test]
    fn lists_are_kept_by_name_across_rebuilds() {
        let m = ReputationMetrics::new(&["bl.test".into()], &[]);
        m.list_or_insert("bl.test").queries.fetch_add(3, Relaxed);
        // A rebuilt configuration asks for the same list and a new one.
        let again = m.list_or_insert("bl.test");
        assert_eq!(again.queries.load(Relaxed), 3, "counts on");
        m.list_or_insert("new.test");
        let names: Vec<String> = m.lists.iter().map(|l| l.domain.clone()).collect();
        assert_eq!(names, ["bl.test", "new.test"]);
        assert!(m.list("gone.test").is_none());
        // A list added after registration is exported all the same.
        let mut reg = Registry::with_prefix("tarpit");
        m.register(&mut reg);
        m.list_or_insert("late.test");
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &reg).unwrap();
        assert!(s.contains("list=\"late.test\""), "{s}");
    }
}
