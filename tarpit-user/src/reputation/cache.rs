//! A bounded cache whose entries expire, for DNS results per client address.
//!
//! Bots come from millions of addresses; the cache must not grow with them.
//! When it is full, expired entries are swept, and if it is still full the
//! new result is not cached: the next connection from that address is
//! looked up again, which costs a query and never a wrong answer.
use std::collections::HashMap;
use std::hash::Hash;

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
}
