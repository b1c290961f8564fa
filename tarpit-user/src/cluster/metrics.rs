//! The cluster's families in the agent's registry (all prefixed
//! `tarpit_cluster_`): whether Redis is reachable, what was shared, what
//! could not be shared at once and waits for Redis to return, and what
//! came from the other nodes (applied or refused, and why, and how long
//! it took to get here).
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Buckets of the propagation lag (seconds): a block should reach the
/// other nodes within a second (the scan's quarter second, the channel,
/// and the clocks' difference).
const LAG_BUCKETS: [f64; 9] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0];

#[derive(Clone)]
pub struct ClusterMetrics {
    /// 1 while connected and subscribed, 0 while this node is on its own.
    pub up: Gauge,
    /// Local-only periods begun (Redis lost).
    pub outages: Counter,
    published: Family<Labels, Counter>,
    unshared: Family<Labels, Counter>,
    /// Changes made while Redis was gone, written after it returned.
    pub replayed: Counter,
    /// Changes waiting for Redis.
    pub backlog: Gauge,
    /// Changes dropped because the backlog was full.
    pub lost: Counter,
    applied: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    /// From a change at another node to its application here, for changes
    /// that came over the channel (not those read when catching up).
    lag: Histogram,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        ClusterMetrics {
            up: Gauge::default(),
            outages: Counter::default(),
            published: Family::default(),
            unshared: Family::default(),
            replayed: Counter::default(),
            backlog: Gauge::default(),
            lost: Counter::default(),
            applied: Family::default(),
            refused: Family::default(),
            lag: Histogram::new(LAG_BUCKETS),
        }
    }
}

impl ClusterMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "cluster_up",
            "1 while Redis is reachable and the change channel subscribed; 0 while this \
             node runs on local state only",
            self.up.clone(),
        );
        r.register(
            "cluster_outages",
            "Times the connection to Redis was lost (local-only periods begun)",
            self.outages.clone(),
        );
        r.register(
            "cluster_published",
            "Changes of this node written to Redis, by kind",
            self.published.clone(),
        );
        r.register(
            "cluster_unshared",
            "Changes of this node that could not be written to Redis at once (down or \
             slow) and were kept for replay, by kind",
            self.unshared.clone(),
        );
        r.register(
            "cluster_replayed",
            "Kept changes written to Redis after it returned",
            self.replayed.clone(),
        );
        r.register(
            "cluster_backlog",
            "Changes waiting for Redis to return",
            self.backlog.clone(),
        );
        r.register(
            "cluster_lost",
            "Changes not kept for replay because the backlog was full",
            self.lost.clone(),
        );
        r.register(
            "cluster_applied",
            "Changes of other nodes applied here, by kind (block, unblock, greylist)",
            self.applied.clone(),
        );
        r.register(
            "cluster_propagation_seconds",
            "From a block or authenticated address made at another node to its \
             application here (changes over the channel; clocks must agree)",
            self.lag.clone(),
        );
        r.register(
            "cluster_refused",
            "Blocks of other nodes not applied here, by reason (allow.internal, \
             allow.ips, allow list, too wide)",
            self.refused.clone(),
        );
    }

    /// A change made `lag` ago at another node was applied here.
    pub fn lag(&self, lag: std::time::Duration) {
        self.lag.observe(lag.as_secs_f64());
    }

    pub fn published(&self, kind: &'static str) {
        self.published.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn unshared(&self, kind: &'static str) {
        self.unshared.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn applied(&self, kind: &'static str) {
        self.applied.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&vec![("reason", reason)]).inc();
    }
}
