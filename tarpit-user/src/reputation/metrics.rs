//! Counters and latency histograms of the reputation checks: plain atomics,
//! rendered in the Prometheus text format by [`ReputationMetrics::render`]
//! so that any metrics endpoint can append them.
//!
//! One [`ReputationMetrics`] lives as long as the agent: a reload that
//! rebuilds the checks hands the same one to the new checks, so every
//! family counts on across reloads. The per-list and per-site counters are
//! created by name when a list first appears; a list a reload removes
//! keeps its last counts (it is still rendered), one it adds back counts
//! on from there.
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the lookup latency buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A cumulative latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Observations at or below `LATENCY_BUCKETS[i]`.
    pub fn bucket(&self, i: usize) -> u64 {
        self.buckets.get(i).map_or(0, |b| b.load(Relaxed))
    }

    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros.load(Relaxed))
    }
}

/// Per list domain: what its queries did.
#[derive(Debug, Default)]
pub struct ListMetrics {
    pub domain: String,
    /// Queries sent.
    pub queries: AtomicU64,
    /// Answers with records (the address is on the list, before filters).
    pub listed: AtomicU64,
    /// NXDOMAIN / no records: not on the list.
    pub not_listed: AtomicU64,
    /// Failed queries (refused, network down, SERVFAIL), treated as not listed.
    pub errors: AtomicU64,
    /// Queries still unanswered at the session's DNS deadline.
    pub timeouts: AtomicU64,
    /// Answers taken from the per-address result cache.
    pub cache_hits: AtomicU64,
    /// Queries not sent: the client's network (/24, /64) had spent its
    /// look-up budget (`dns.prefix_lookups_per_minute`); not listed.
    pub over_budget: AtomicU64,
    pub latency: Histogram,
}

/// Per configured site: how often it counted toward a client's score.
#[derive(Debug, Default)]
pub struct SiteMetrics {
    pub spec: String,
    pub hits: AtomicU64,
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

#[derive(Debug, Default)]
pub struct ReputationMetrics {
    pub lists: Named<ListMetrics>,
    pub sites: Named<SiteMetrics>,
    /// Verdicts given.
    pub verdicts: AtomicU64,
    /// Verdicts by outcome.
    pub listed_log: AtomicU64,
    pub listed_delay: AtomicU64,
    pub listed_reject: AtomicU64,
    pub listed_drop: AtomicU64,
    pub dnswl: AtomicU64,
    /// Verdicts with at least one lookup failed or timed out (DNS down or
    /// silent): the client was treated as not listed.
    pub incomplete: AtomicU64,
    /// Verdicts served by the temporary allow cache (no query at all).
    pub allow_cache_hits: AtomicU64,
    /// Host-name allow list: PTR lookups, and names confirmed.
    pub fcrdns_lookups: AtomicU64,
    pub fcrdns_confirmed: AtomicU64,
    pub fcrdns_errors: AtomicU64,
    pub fcrdns_latency: Histogram,
    /// Greylisting: deferred and passed checks.
    pub greylist_tempfail: AtomicU64,
    pub greylist_pass: AtomicU64,
    /// Checks that found a table full (its oldest entries were evicted;
    /// nobody passes for it), and the entries evicted from each table.
    pub greylist_full: AtomicU64,
    pub greylist_evicted_pending: AtomicU64,
    pub greylist_evicted_known: AtomicU64,
    /// First attempts refused unrecorded: their network had its share of
    /// pending entries.
    pub greylist_capped: AtomicU64,
    /// Gauges: pending (awaiting a retry) and known (passed) entries.
    pub greylist_pending: AtomicU64,
    pub greylist_known: AtomicU64,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn hist(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {}",
            h.bucket(i)
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
        h.count()
    );
    let l = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{l} {}", h.sum().as_secs_f64());
    let _ = writeln!(out, "{name}_count{l} {}", h.count());
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
        self.lists.get_or_insert(
            |l| l.domain == domain,
            || ListMetrics {
                domain: domain.to_string(),
                ..Default::default()
            },
        )
    }

    /// The counters of one configured site, created at zero the first time.
    pub fn site_or_insert(&self, spec: &str) -> Arc<SiteMetrics> {
        self.sites.get_or_insert(
            |s| s.spec == spec,
            || SiteMetrics {
                spec: spec.to_string(),
                hits: AtomicU64::new(0),
            },
        )
    }

    /// Appends every counter in the OpenMetrics text format (counter
    /// families named without `_total`, samples with it), before `# EOF`.
    pub fn render(&self, out: &mut String) {
        let c = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let family = name.strip_suffix("_total").unwrap_or(name);
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        };
        let _ = writeln!(
            out,
            "# HELP tarpit_dnsbl_queries DNS queries per list, by result.\n# TYPE tarpit_dnsbl_queries counter"
        );
        for l in self.lists.iter() {
            let d = esc(&l.domain);
            for (result, v) in [
                ("listed", &l.listed),
                ("not_listed", &l.not_listed),
                ("error", &l.errors),
                ("timeout", &l.timeouts),
                ("cached", &l.cache_hits),
                ("over_budget", &l.over_budget),
            ] {
                let _ = writeln!(
                    out,
                    "tarpit_dnsbl_queries_total{{list=\"{d}\",result=\"{result}\"}} {}",
                    v.load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP tarpit_dnsbl_site_hits Times a configured site counted toward a client's score.\n# TYPE tarpit_dnsbl_site_hits counter"
        );
        for s in self.sites.iter() {
            let _ = writeln!(
                out,
                "tarpit_dnsbl_site_hits_total{{site=\"{}\"}} {}",
                esc(&s.spec),
                s.hits.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tarpit_dnsbl_lookup_seconds DNSBL/DNSWL query latency per list.\n# TYPE tarpit_dnsbl_lookup_seconds histogram"
        );
        for l in self.lists.iter() {
            hist(
                out,
                "tarpit_dnsbl_lookup_seconds",
                &format!("list=\"{}\"", esc(&l.domain)),
                &l.latency,
            );
        }
        let _ = writeln!(
            out,
            "# HELP tarpit_dnsbl_verdicts Reputation verdicts by outcome.\n# TYPE tarpit_dnsbl_verdicts counter"
        );
        for (o, v) in [
            ("log", &self.listed_log),
            ("delay", &self.listed_delay),
            ("reject", &self.listed_reject),
            ("drop", &self.listed_drop),
            ("dnswl", &self.dnswl),
        ] {
            let _ = writeln!(
                out,
                "tarpit_dnsbl_verdicts_total{{outcome=\"{o}\"}} {}",
                v.load(Relaxed)
            );
        }
        c(
            out,
            "tarpit_dnsbl_checks_total",
            "Clients checked.",
            &self.verdicts,
        );
        c(
            out,
            "tarpit_dnsbl_incomplete_total",
            "Checks with a failed or timed-out lookup (treated as not listed).",
            &self.incomplete,
        );
        c(
            out,
            "tarpit_dnsbl_allow_cache_hits_total",
            "Checks answered by the temporary allow cache.",
            &self.allow_cache_hits,
        );
        c(
            out,
            "tarpit_fcrdns_lookups_total",
            "PTR lookups for the host-name allow list.",
            &self.fcrdns_lookups,
        );
        c(
            out,
            "tarpit_fcrdns_confirmed_total",
            "Clients allow-listed by a forward-confirmed host name.",
            &self.fcrdns_confirmed,
        );
        c(
            out,
            "tarpit_fcrdns_errors_total",
            "Host-name checks that failed in DNS.",
            &self.fcrdns_errors,
        );
        let _ = writeln!(
            out,
            "# HELP tarpit_fcrdns_lookup_seconds Host-name check latency.\n# TYPE tarpit_fcrdns_lookup_seconds histogram"
        );
        hist(
            out,
            "tarpit_fcrdns_lookup_seconds",
            "",
            &self.fcrdns_latency,
        );
        c(
            out,
            "tarpit_greylist_tempfail_total",
            "Greylisting deferrals (4xx).",
            &self.greylist_tempfail,
        );
        c(
            out,
            "tarpit_greylist_pass_total",
            "Greylisting checks passed.",
            &self.greylist_pass,
        );
        c(
            out,
            "tarpit_greylist_full_total",
            "Greylisting checks that found a table full: its oldest entries were evicted (nobody passes for it).",
            &self.greylist_full,
        );
        let _ = writeln!(
            out,
            "# HELP tarpit_greylist_evicted Greylist entries evicted from a full table, by table.\n# TYPE tarpit_greylist_evicted counter"
        );
        for (table, v) in [
            ("pending", &self.greylist_evicted_pending),
            ("known", &self.greylist_evicted_known),
        ] {
            let _ = writeln!(
                out,
                "tarpit_greylist_evicted_total{{table=\"{table}\"}} {}",
                v.load(Relaxed)
            );
        }
        c(
            out,
            "tarpit_greylist_network_capped_total",
            "First attempts refused without being recorded: their client network had its share of pending entries.",
            &self.greylist_capped,
        );
        let _ = writeln!(
            out,
            "# HELP tarpit_greylist_entries Greylist entries held, by table.\n# TYPE tarpit_greylist_entries gauge"
        );
        for (table, v) in [
            ("pending", &self.greylist_pending),
            ("known", &self.greylist_known),
        ] {
            let _ = writeln!(
                out,
                "tarpit_greylist_entries{{table=\"{table}\"}} {}",
                v.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        assert_eq!(h.count(), 2);
        assert_eq!(h.bucket(0), 1); // <= 1 ms
        assert_eq!(h.bucket(4), 1); // <= 25 ms
        assert_eq!(h.bucket(5), 2); // <= 50 ms
        assert_eq!(h.bucket(11), 2);
    }

    #[test]
    fn render_names_lists_and_sites() {
        let m = ReputationMetrics::new(&["bl.test".into()], &["bl.test*3".into()]);
        m.list_or_insert("bl.test").listed.fetch_add(2, Relaxed);
        m.site_or_insert("bl.test*3").hits.fetch_add(1, Relaxed);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"listed\"} 2"));
        assert!(s.contains("tarpit_dnsbl_site_hits_total{site=\"bl.test*3\"} 1"));
        assert!(s.contains("tarpit_dnsbl_lookup_seconds_bucket{list=\"bl.test\",le=\"+Inf\"} 0"));
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
    }
}
