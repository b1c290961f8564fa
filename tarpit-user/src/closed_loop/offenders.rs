//! Repeat offenders: which addresses earned an XDP block, which a
//! slow-down. Pure bookkeeping (no maps, no clock reads): the caller
//! passes the time, so the rules are unit-tested with a paused clock.
//!
//! Each offender keeps the times of its recent offences per kind; those
//! older than the window are forgotten. When one kind reaches its
//! threshold the offender is blocked and its record starts afresh (after
//! the block's TTL it begins with a clean sheet). An offence below the
//! threshold earns a slow-down (of the address) when that is switched on.
//!
//! An offender is one address, or with `offenders.aggregate_ipv6_prefix`
//! (`..._ipv4_prefix`) one network of that size: the strikes of all its
//! addresses add up, and the block covers the network, so a bot rotating
//! through its /64 is blocked as one.
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;

use tarpit_common::BlockReason;
use tokio::time::{Duration, Instant};

use crate::config::OffendersConfig;

pub use crate::policy::ports::Offence;

/// The block-list reason an offence's block carries.
pub fn block_reason(kind: Offence) -> BlockReason {
    match kind {
        Offence::PreGreet => BlockReason::Pregreet,
        Offence::Rejected => BlockReason::Rejected,
        Offence::UnknownRecipient => BlockReason::Harvest,
    }
}

/// Where an offence's times are kept in a [`Record`].
fn slot(kind: Offence) -> usize {
    match kind {
        Offence::PreGreet => 0,
        Offence::Rejected => 1,
        Offence::UnknownRecipient => 2,
    }
}

/// What the caller must do about an offence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanction {
    /// Nothing (below the threshold, slow-down off).
    Nothing,
    /// Clamp its TCP window for a while.
    SlowDown { count: u32 },
    /// Put `net` on the block list (the address, or its network when
    /// strikes aggregate per prefix).
    Block {
        net: IpNet,
        reason: BlockReason,
        offence: Offence,
        count: u32,
    },
}

#[derive(Debug, Default)]
struct Record {
    times: [VecDeque<Instant>; 3],
    last: Option<Instant>,
}

/// The thresholds and the window, taken from `[offenders]`.
#[derive(Debug, Clone)]
pub struct Rules {
    pub thresholds: [u32; 3],
    pub window: Duration,
    pub slowdown: bool,
    pub max_tracked: usize,
    /// Prefix lengths whose strikes add up (0 = per address).
    pub aggregate_ipv6: u8,
    pub aggregate_ipv4: u8,
}

impl Rules {
    pub fn from_config(c: &OffendersConfig) -> Rules {
        Rules {
            thresholds: [
                c.pregreet_strikes,
                c.rejected_sessions,
                c.unknown_recipients,
            ],
            window: c.window,
            slowdown: c.slowdown,
            max_tracked: c.max_tracked,
            aggregate_ipv6: c.aggregate_ipv6_prefix,
            aggregate_ipv4: c.aggregate_ipv4_prefix,
        }
    }

    /// The offender an address's strikes count for: the address itself
    /// (a /32 or /128), or its network when strikes aggregate.
    pub fn offender(&self, ip: IpAddr) -> IpNet {
        let ip = ip.to_canonical();
        let len = match ip {
            IpAddr::V4(_) => self.aggregate_ipv4,
            IpAddr::V6(_) => self.aggregate_ipv6,
        };
        let host = IpNet::from(ip);
        if len == 0 {
            return host;
        }
        IpNet::new(ip, len.min(host.max_prefix_len()))
            .map(|n| n.trunc())
            .unwrap_or(host)
    }
}

/// The network to block for an offender, narrowed to the one address
/// that struck last when the network overlaps one of `spared` (internal
/// networks, which XDP's allow list does not hold): an aggregated block
/// must never drop the site's own hosts.
pub fn block_target(net: IpNet, ip: IpAddr, spared: &[IpNet]) -> IpNet {
    let overlaps = |n: &IpNet| n.contains(&net.network()) || net.contains(&n.network());
    if spared.iter().any(overlaps) {
        IpNet::from(ip.to_canonical())
    } else {
        net
    }
}

/// Recent offences per offender, bounded in size.
#[derive(Debug)]
pub struct Tracker {
    rules: Rules,
    ips: HashMap<IpNet, Record>,
}

impl Tracker {
    pub fn new(rules: Rules) -> Tracker {
        Tracker {
            rules,
            ips: HashMap::new(),
        }
    }

    /// New thresholds (reload); recorded offences are kept (under the
    /// offender they were counted for, should the aggregation change).
    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    pub fn tracked(&self) -> usize {
        self.ips.len()
    }

    /// Offences of `kind` counted for `ip`'s offender (the address or its
    /// network) within the window before `now`.
    pub fn count(&self, ip: IpAddr, kind: Offence, now: Instant) -> u32 {
        let Some(r) = self.ips.get(&self.rules.offender(ip)) else {
            return 0;
        };
        r.times[slot(kind)]
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < self.rules.window)
            .count() as u32
    }

    /// Records one offence and says what it earned.
    pub fn record(&mut self, ip: IpAddr, kind: Offence, now: Instant) -> Sanction {
        self.record_at(ip, kind, now, now)
    }

    /// Records one offence made at `at` (another MX host's, told late:
    /// after an outage of the cluster), counted in the window before
    /// `now`; one already out of the window earns nothing and is not kept.
    pub fn record_at(&mut self, ip: IpAddr, kind: Offence, at: Instant, now: Instant) -> Sanction {
        let window = self.rules.window;
        let at = at.min(now);
        if now.saturating_duration_since(at) >= window {
            return Sanction::Nothing;
        }
        let ip = self.rules.offender(ip);
        if !self.ips.contains_key(&ip) && self.ips.len() >= self.rules.max_tracked {
            self.make_room(now);
        }
        let r = self.ips.entry(ip).or_default();
        r.last = Some(r.last.map_or(at, |l| l.max(at)));
        let q = &mut r.times[slot(kind)];
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            q.pop_front();
        }
        // In time order, also when told late.
        let pos = q.partition_point(|t| *t <= at);
        q.insert(pos, at);
        let count = q.len() as u32;
        let threshold = self.rules.thresholds[slot(kind)];
        if threshold > 0 && count >= threshold {
            self.ips.remove(&ip);
            return Sanction::Block {
                net: ip,
                reason: block_reason(kind),
                offence: kind,
                count,
            };
        }
        // Bound the queue: beyond the threshold nothing more is learnt.
        let keep = if threshold > 0 {
            threshold as usize
        } else {
            64
        };
        if q.len() > keep {
            q.pop_front();
        }
        if self.rules.slowdown {
            Sanction::SlowDown { count }
        } else {
            Sanction::Nothing
        }
    }

    /// Forgets addresses with nothing left in the window, then (if still
    /// full) the one seen longest ago.
    fn make_room(&mut self, now: Instant) {
        let window = self.rules.window;
        self.ips.retain(|_, r| {
            r.last
                .is_some_and(|t| now.saturating_duration_since(t) < window)
        });
        if self.ips.len() >= self.rules.max_tracked
            && let Some(oldest) = self
                .ips
                .iter()
                .min_by_key(|(_, r)| r.last)
                .map(|(ip, _)| *ip)
        {
            self.ips.remove(&oldest);
        }
    }

    /// Drops addresses whose offences all left the window.
    pub fn expire(&mut self, now: Instant) {
        let window = self.rules.window;
        self.ips.retain(|_, r| {
            r.last
                .is_some_and(|t| now.saturating_duration_since(t) < window)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pregreet: u32, rejected: u32, unknown: u32, slowdown: bool) -> Rules {
        Rules {
            thresholds: [pregreet, rejected, unknown],
            window: Duration::from_secs(600),
            slowdown,
            max_tracked: 100,
            aggregate_ipv6: 0,
            aggregate_ipv4: 0,
        }
    }

    fn host(s: &str) -> IpNet {
        IpNet::from(ip(s).to_canonical())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn third_strike_within_the_window_blocks_and_starts_afresh() {
        let mut t = Tracker::new(rules(3, 0, 0, true));
        let a = ip("198.51.100.9");
        assert_eq!(
            t.record(a, Offence::PreGreet, Instant::now()),
            Sanction::SlowDown { count: 1 }
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(
            t.record(a, Offence::PreGreet, Instant::now()),
            Sanction::SlowDown { count: 2 }
        );
        assert_eq!(
            t.record(a, Offence::PreGreet, Instant::now()),
            Sanction::Block {
                net: host("198.51.100.9"),
                reason: BlockReason::Pregreet,
                offence: Offence::PreGreet,
                count: 3
            }
        );
        assert_eq!(t.count(a, Offence::PreGreet, Instant::now()), 0);
        assert_eq!(
            t.record(a, Offence::PreGreet, Instant::now()),
            Sanction::SlowDown { count: 1 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_strike_told_late_counts_with_its_own_time_and_an_expired_one_not_at_all() {
        let mut t = Tracker::new(rules(3, 0, 0, false));
        let a = ip("198.51.100.19");
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_secs(500)).await;
        let now = Instant::now();
        // Made 500 s ago (the window is 600 s): counts.
        assert_eq!(
            t.record_at(a, Offence::PreGreet, t0, now),
            Sanction::Nothing
        );
        // Made 700 s ago: out of the window, not kept.
        let stale = t0.checked_sub(Duration::from_secs(200)).unwrap();
        assert_eq!(
            t.record_at(a, Offence::PreGreet, stale, now),
            Sanction::Nothing
        );
        assert_eq!(t.count(a, Offence::PreGreet, now), 1);
        // One here now, and a second told late: three, a block.
        t.record(a, Offence::PreGreet, now);
        let late = t0 + Duration::from_secs(100);
        assert!(matches!(
            t.record_at(a, Offence::PreGreet, late, now),
            Sanction::Block { count: 3, .. }
        ));
        // The one made at t0 leaves the window first, whatever the order
        // the strikes were told in.
        let b = ip("198.51.100.20");
        t.record(b, Offence::PreGreet, now);
        t.record_at(b, Offence::PreGreet, t0, now);
        tokio::time::advance(Duration::from_secs(150)).await;
        assert_eq!(t.count(b, Offence::PreGreet, Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn strikes_older_than_the_window_do_not_count() {
        let mut t = Tracker::new(rules(3, 0, 0, false));
        let a = ip("fd5b:1e00::9");
        t.record(a, Offence::PreGreet, Instant::now());
        t.record(a, Offence::PreGreet, Instant::now());
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(
            t.record(a, Offence::PreGreet, Instant::now()),
            Sanction::Nothing
        );
        assert_eq!(t.count(a, Offence::PreGreet, Instant::now()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn kinds_count_apart_and_zero_threshold_never_blocks() {
        let mut t = Tracker::new(rules(3, 2, 0, false));
        let a = ip("198.51.100.10");
        t.record(a, Offence::PreGreet, Instant::now());
        t.record(a, Offence::PreGreet, Instant::now());
        assert_eq!(
            t.record(a, Offence::Rejected, Instant::now()),
            Sanction::Nothing
        );
        assert!(matches!(
            t.record(a, Offence::Rejected, Instant::now()),
            Sanction::Block {
                reason: BlockReason::Rejected,
                ..
            }
        ));
        let b = ip("198.51.100.11");
        for _ in 0..200 {
            assert_eq!(
                t.record(b, Offence::UnknownRecipient, Instant::now()),
                Sanction::Nothing
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn harvest_runs_block_with_their_reason() {
        let mut t = Tracker::new(rules(0, 0, 5, true));
        let a = ip("198.51.100.12");
        for i in 1..5 {
            assert_eq!(
                t.record(a, Offence::UnknownRecipient, Instant::now()),
                Sanction::SlowDown { count: i }
            );
        }
        assert!(matches!(
            t.record(a, Offence::UnknownRecipient, Instant::now()),
            Sanction::Block {
                reason: BlockReason::Harvest,
                count: 5,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn mapped_v4_is_the_same_address() {
        let mut t = Tracker::new(rules(2, 0, 0, false));
        t.record(ip("198.51.100.13"), Offence::PreGreet, Instant::now());
        assert!(matches!(
            t.record(
                ip("::ffff:198.51.100.13"),
                Offence::PreGreet,
                Instant::now()
            ),
            Sanction::Block { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_stays_bounded() {
        let mut r = rules(3, 0, 0, false);
        r.max_tracked = 10;
        let mut t = Tracker::new(r);
        for i in 0..50u8 {
            t.record(
                IpAddr::from([198, 51, 100, i]),
                Offence::PreGreet,
                Instant::now(),
            );
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!(t.tracked() <= 10);
        // The newest is still there.
        assert_eq!(
            t.count(
                IpAddr::from([198, 51, 100, 49]),
                Offence::PreGreet,
                Instant::now()
            ),
            1
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        t.expire(Instant::now());
        assert_eq!(t.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn strikes_of_one_ipv6_network_add_up_to_a_block_of_the_network() {
        let mut r = rules(3, 0, 0, false);
        r.aggregate_ipv6 = 64;
        let mut t = Tracker::new(r);
        let now = Instant::now();
        assert_eq!(
            t.record(ip("fd5b:1e00:0:7::1"), Offence::PreGreet, now),
            Sanction::Nothing
        );
        assert_eq!(
            t.record(ip("fd5b:1e00:0:7::2"), Offence::PreGreet, now),
            Sanction::Nothing
        );
        // Another /64 counts apart.
        assert_eq!(
            t.record(ip("fd5b:1e00:0:8::1"), Offence::PreGreet, now),
            Sanction::Nothing
        );
        assert_eq!(
            t.count(ip("fd5b:1e00:0:7::ffff"), Offence::PreGreet, now),
            2
        );
        assert_eq!(
            t.record(ip("fd5b:1e00:0:7:abcd::3"), Offence::PreGreet, now),
            Sanction::Block {
                net: "fd5b:1e00:0:7::/64".parse().unwrap(),
                reason: BlockReason::Pregreet,
                offence: Offence::PreGreet,
                count: 3
            }
        );
        assert_eq!(t.count(ip("fd5b:1e00:0:8::1"), Offence::PreGreet, now), 1);
        // IPv4 stays per address while only IPv6 aggregates.
        t.record(ip("198.51.100.1"), Offence::PreGreet, now);
        t.record(ip("198.51.100.2"), Offence::PreGreet, now);
        assert_eq!(t.count(ip("198.51.100.3"), Offence::PreGreet, now), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv4_aggregates_per_prefix_when_asked_mapped_addresses_included() {
        let mut r = rules(2, 0, 0, false);
        r.aggregate_ipv4 = 24;
        let mut t = Tracker::new(r);
        let now = Instant::now();
        t.record(ip("198.51.100.7"), Offence::PreGreet, now);
        assert!(matches!(
            t.record(ip("::ffff:198.51.100.200"), Offence::PreGreet, now),
            Sanction::Block { net, .. } if net == "198.51.100.0/24".parse::<IpNet>().unwrap()
        ));
    }

    #[test]
    fn offender_is_the_address_without_aggregation() {
        let mut r = rules(3, 0, 0, false);
        assert_eq!(r.offender(ip("fd5b:1e00::9")), host("fd5b:1e00::9"));
        assert_eq!(r.offender(ip("::ffff:198.51.100.9")), host("198.51.100.9"));
        r.aggregate_ipv6 = 128;
        r.aggregate_ipv4 = 32;
        assert_eq!(r.offender(ip("fd5b:1e00::9")), host("fd5b:1e00::9"));
        assert_eq!(r.offender(ip("198.51.100.9")), host("198.51.100.9"));
        r.aggregate_ipv6 = 48;
        assert_eq!(
            r.offender(ip("fd5b:1e00:0:7::1")),
            "fd5b:1e00::/48".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn an_aggregated_block_never_covers_an_internal_network() {
        let net: IpNet = "fd5b:1e00:0:7::/64".parse().unwrap();
        let bot = ip("fd5b:1e00:0:7::9");
        assert_eq!(block_target(net, bot, &[]), net);
        let far: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(block_target(net, bot, &[far]), net);
        for inside in ["fd5b:1e00:0:7::25/128", "fd5b:1e00::/48"] {
            let spared: IpNet = inside.parse().unwrap();
            assert_eq!(block_target(net, bot, &[spared]), host("fd5b:1e00:0:7::9"));
        }
    }
}
