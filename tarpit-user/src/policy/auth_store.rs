//! Addresses that authenticated recently, for the "HELO delay once per
//! day" rule.
//!
//! Behind a trait: today an in-agent map; the kernel-agent loop moves it
//! into a pinned BPF map so it survives restarts and the kernel can read it.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::{Duration, Instant};

/// How long an authentication counts.
pub const AUTH_TTL: Duration = Duration::from_secs(24 * 3600);

pub trait AuthenticatedIps: Send + Sync {
    /// When `ip` last authenticated, if within [`AUTH_TTL`] of `now`.
    fn last_authenticated(&self, ip: IpAddr, now: Instant) -> Option<Instant>;
    /// Records a successful AUTH from `ip` at `at`.
    fn record(&self, ip: IpAddr, at: Instant);
}

/// A bounded in-memory store. When full, expired entries are swept; if it
/// is still full, new entries are not recorded: the address then pays the
/// HELO delay again, which is the safe side.
pub struct MemoryAuthStore {
    map: Mutex<HashMap<IpAddr, Instant>>,
    capacity: usize,
}

impl MemoryAuthStore {
    pub fn new(capacity: usize) -> MemoryAuthStore {
        MemoryAuthStore {
            map: Mutex::new(HashMap::new()),
            capacity,
        }
    }
}

impl AuthenticatedIps for MemoryAuthStore {
    fn last_authenticated(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .copied()
            .filter(|t| now.saturating_duration_since(*t) < AUTH_TTL)
    }

    fn record(&self, ip: IpAddr, at: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&ip) {
            map.retain(|_, t| at.saturating_duration_since(*t) < AUTH_TTL);
            if map.len() >= self.capacity {
                return;
            }
        }
        map.insert(ip, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_a_day() {
        let s = MemoryAuthStore::new(10);
        let ip: IpAddr = "198.51.100.5".parse().unwrap();
        let t0 = Instant::now();
        s.record(ip, t0);
        tokio::time::advance(AUTH_TTL - Duration::from_secs(1)).await;
        assert_eq!(s.last_authenticated(ip, Instant::now()), Some(t0));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.last_authenticated(ip, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_sweeps_then_refuses() {
        let s = MemoryAuthStore::new(2);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let c: IpAddr = "fd5b:1e00::3".parse().unwrap();
        s.record(a, Instant::now());
        s.record(b, Instant::now());
        s.record(c, Instant::now());
        assert!(s.last_authenticated(c, Instant::now()).is_none());
        tokio::time::advance(AUTH_TTL).await;
        s.record(c, Instant::now());
        assert!(s.last_authenticated(c, Instant::now()).is_some());
    }
}
