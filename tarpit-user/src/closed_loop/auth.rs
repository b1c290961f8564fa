//! Authenticated addresses in the kernel's pinned AUTH map, so the
//! "HELO delay once per day" rule holds across connections and agent
//! restarts, and the sk_lookup program can steer them past the agent.
//!
//! Entries carry their own expiry (24 h), compared by the kernel and here
//! alike; the map is an LRU, so a full map forgets the oldest address,
//! which then pays the HELO delay again: the safe side.
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::{Duration, Instant};
use tracing::{info, warn};

use crate::kernel::{BootInstant, KernelMaps};
use crate::policy::{AUTH_TTL, AuthenticatedIps};

pub struct KernelAuthStore {
    maps: Arc<Mutex<KernelMaps>>,
    ttl: Duration,
}

impl KernelAuthStore {
    pub fn new(maps: Arc<Mutex<KernelMaps>>) -> KernelAuthStore {
        KernelAuthStore {
            maps,
            ttl: AUTH_TTL,
        }
    }
}

/// When an entry written `age` ago was written, on tokio's clock.
fn written_at(now: Instant, age: Duration) -> Instant {
    now.checked_sub(age).unwrap_or(now)
}

impl AuthenticatedIps for KernelAuthStore {
    fn last_authenticated(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        let item = {
            let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            maps.auth_get(ip.to_canonical())
        };
        match item {
            Ok(Some(item)) => {
                let boot_now = BootInstant::now();
                if !item.is_active_at(boot_now) {
                    return None;
                }
                let age = Duration::from_nanos(boot_now.0.saturating_sub(item.added.0));
                Some(written_at(now, age))
            }
            Ok(None) => None,
            Err(e) => {
                warn!(client = %ip, "cannot read the authenticated map: {e}");
                None
            }
        }
    }

    fn record(&self, ip: IpAddr, _at: Instant) {
        let ip = ip.to_canonical();
        let res = {
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            maps.auth_add(ip, Some(self.ttl))
        };
        match res {
            Ok(()) => info!(
                client = %ip,
                "authenticated address recorded in the kernel for {}",
                humantime::format_duration(self.ttl)
            ),
            Err(e) => warn!(client = %ip, "cannot record the authenticated address: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn age_maps_back_onto_the_tokio_clock() {
        let now = Instant::now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let later = Instant::now();
        assert_eq!(written_at(later, Duration::from_secs(3600)), now);
        // An age beyond what the clock can express reads as "just now".
        let _ = written_at(later, Duration::from_secs(u64::MAX / 4));
    }
}
