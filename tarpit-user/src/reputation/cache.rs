//! A bounded cache whose entries expire, for DNS results per client address.
//!
//! Bots come from millions of addresses; the cache must not grow with them.
//! When it is full, expired entries are swept, and if it is still full the
//! new result is not cached: the next connection from that address is
//! looked up again, which costs a query and never a wrong answer.
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::time::Instant;

#[derive(Debug)]
pub struct TtlCache<K, V> {
    map: HashMap<K, (V, Instant)>,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The value, if present and not yet expired at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.map.get(key) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores `value` until `until`. Returns false when the cache was full
    /// of live entries and the value was not stored.
    pub fn insert(&mut self, key: K, value: V, until: Instant, now: Instant) -> bool {
        if until <= now {
            return false;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map.retain(|_, (_, u)| *u > now);
            if self.map.len() >= self.capacity {
                return false;
            }
        }
        self.map.insert(key, (value, until));
        true
    }

    pub fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The network of a client address, as the per-network limits count it:
/// its /24 for IPv4 (also written IPv4-mapped), its /64 for IPv6. A /64 is
/// what one host or one customer line is given: a client can change its
/// address within it at will, but not its /64 (nor, mostly, its /24).
pub fn network_of(ip: IpAddr) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new(v4, 24).expect("24 <= 32").trunc()),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::new(v6, 64).expect("64 <= 128").trunc()),
    }
}

/// A token bucket per client network ([`network_of`]): each network may
/// start `per_minute` new DNS look-ups per minute, in bursts of up to as
/// many. A rotating /64 thus costs at most that many queries per list and
/// minute, however many addresses it connects from, while each address's
/// answer is still cached (and judged) on its own.
///
/// Bounded like [`TtlCache`]: when the table is full, networks whose bucket
/// has filled up again (they are as good as new) are swept; if it is still
/// full, the look-up is allowed untracked (`take` says yes): the budget
/// slows a few busy networks, it must never stop look-ups for everyone.
#[derive(Debug)]
pub struct NetBudget {
    per_minute: u32,
    buckets: HashMap<IpNet, Bucket>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Look-ups left at `at`.
    tokens: f64,
    at: Instant,
}

impl NetBudget {
    /// `per_minute` = 0: no budget, every look-up goes out.
    pub fn new(per_minute: u32, capacity: usize) -> Self {
        NetBudget {
            per_minute,
            buckets: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let rate = f64::from(self.per_minute) / 60.0;
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + dt * rate).min(f64::from(self.per_minute))
    }

    /// Takes one look-up from the budget of `ip`'s network at `now`;
    /// false when that network has spent it.
    pub fn take(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let net = network_of(ip);
        let full = f64::from(self.per_minute);
        let tokens = match self.buckets.get(&net) {
            Some(b) => self.refilled(*b, now),
            None => {
                if self.buckets.len() >= self.capacity {
                    let swept: Vec<IpNet> = self
                        .buckets
                        .iter()
                        .filter(|(_, b)| self.refilled(**b, now) >= full)
                        .map(|(n, _)| *n)
                        .collect();
                    for n in swept {
                        self.buckets.remove(&n);
                    }
                    if self.buckets.len() >= self.capacity {
                        return true;
                    }
                }
                full
            }
        };
        if tokens < 1.0 {
            return false;
        }
        self.buckets.insert(
            net,
            Bucket {
                tokens: tokens - 1.0,
                at: now,
            },
        );
        true
    }

    /// How long until `ip`'s network may look up again (zero: now).
    pub fn wait(&self, ip: IpAddr, now: Instant) -> Duration {
        match self.buckets.get(&network_of(ip)) {
            Some(b) if self.per_minute > 0 => {
                let missing = 1.0 - self.refilled(*b, now);
                if missing <= 0.0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(missing * 60.0 / f64::from(self.per_minute))
                }
            }
            _ => Duration::ZERO,
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_at_their_ttl() {
        let mut c = TtlCache::new(10);
        let now = Instant::now();
        assert!(c.insert("a", 1, now + Duration::from_secs(60), now));
        assert_eq!(c.get(&"a", Instant::now()), Some(1));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(c.get(&"a", Instant::now()), Some(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.get(&"a", Instant::now()), None);
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_cache_sweeps_expired_then_refuses() {
        let mut c = TtlCache::new(2);
        let now = Instant::now();
        assert!(c.insert(1, (), now + Duration::from_secs(10), now));
        assert!(c.insert(2, (), now + Duration::from_secs(100), now));
        // Full of live entries: refused, the others stay.
        assert!(!c.insert(3, (), now + Duration::from_secs(100), now));
        assert_eq!(c.len(), 2);
        // Updating a present key is always fine.
        assert!(c.insert(2, (), now + Duration::from_secs(200), now));
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        // Entry 1 expired: swept to make room.
        assert!(c.insert(3, (), now + Duration::from_secs(100), now));
        assert_eq!(c.get(&1, now), None);
        assert_eq!(c.get(&3, now), Some(()));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_is_not_stored() {
        let mut c = TtlCache::new(2);
        let now = Instant::now();
        assert!(!c.insert(1, (), now, now));
        assert!(c.is_empty());
    }

    fn v6(last: u16) -> IpAddr {
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd5b, 0x1e00, 0, 7, 0, 0, 0, last))
    }

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        let n = |s: &str| network_of(s.parse().unwrap()).to_string();
        assert_eq!(n("198.51.100.77"), "198.51.100.0/24");
        assert_eq!(n("::ffff:198.51.100.77"), "198.51.100.0/24");
        assert_eq!(n("fd5b:1e00:0:7:abcd::1"), "fd5b:1e00:0:7::/64");
        assert_eq!(network_of(v6(1)), network_of(v6(0xffff)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_network_gets_its_burst_then_its_rate() {
        let mut b = NetBudget::new(6, 100);
        let now = Instant::now();
        // Six new addresses of one /64 at once: the burst.
        for i in 0..6 {
            assert!(b.take(v6(i), now), "look-up {i} of the burst");
        }
        assert!(!b.take(v6(6), now), "the seventh address waits");
        assert_eq!(b.wait(v6(99), now), Duration::from_secs(10));
        // Another /64 and an IPv4 /24 have budgets of their own.
        assert!(b.take("fd5b:1e00:0:8::1".parse().unwrap(), now));
        assert!(b.take("198.51.100.1".parse().unwrap(), now));
        // Six a minute: one more every ten seconds, no more.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!b.take(v6(7), Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.take(v6(7), Instant::now()));
        assert!(!b.take(v6(8), Instant::now()));
        // Over ten minutes a rotating /64 gets 6 + 60, however hard it tries.
        let mut granted = 0;
        for s in 0..600u16 {
            for k in 0..10u16 {
                if b.take(v6(1000 + s * 10 + k), Instant::now()) {
                    granted += 1;
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert!((59..=61).contains(&granted), "granted {granted}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_no_budget_and_a_full_table_sweeps_or_lets_through() {
        let mut free = NetBudget::new(0, 1);
        for i in 0..100 {
            assert!(free.take(v6(i), Instant::now()));
        }
        assert!(free.is_empty());
        let mut b = NetBudget::new(1, 2);
        let now = Instant::now();
        assert!(b.take("198.51.100.1".parse().unwrap(), now));
        assert!(b.take("198.51.101.1".parse().unwrap(), now));
        // Full of spent networks: a third is let through untracked.
        assert!(b.take("198.51.102.1".parse().unwrap(), now));
        assert!(b.take("198.51.102.2".parse().unwrap(), now));
        assert_eq!(b.len(), 2);
        assert!(!b.take("198.51.100.2".parse().unwrap(), now));
        // A minute on, both have refilled: swept, the new one is tracked.
        tokio::time::advance(Duration::from_secs(60)).await;
        let now = Instant::now();
        assert!(b.take("198.51.102.3".parse().unwrap(), now));
        assert!(!b.take("198.51.102.4".parse().unwrap(), now));
        assert_eq!(b.len(), 1);
    }
}
