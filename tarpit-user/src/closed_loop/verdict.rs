//! The agent's pre-greet decision from the kernel's per-flow flag: one
//! verdict source for kernel and agent.
//!
//! The tc program sees the client's bytes before the socket does, so when
//! the agent notices talk (or is about to send its banner) the flow's
//! record already says whether the client spoke before the greeting. Only
//! a flow the kernel has no record of (not on a watched interface or port,
//! evicted, older than the program) falls back to what the agent saw on
//! its own socket; those fallbacks are counted.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};

use crate::kernel::{KernelMaps, PreGreetVerdict as FlowVerdict};
use crate::policy::ports::PreGreetSource;

/// Where the answers came from (for logs and tests).
#[derive(Debug, Default)]
pub struct VerdictCounts {
    pub kernel: AtomicU64,
    pub fallback: AtomicU64,
}

pub struct KernelPreGreet {
    maps: Arc<Mutex<KernelMaps>>,
    pub counts: Arc<VerdictCounts>,
}

impl KernelPreGreet {
    pub fn new(maps: Arc<Mutex<KernelMaps>>) -> KernelPreGreet {
        KernelPreGreet {
            maps,
            counts: Arc::default(),
        }
    }
}

/// The decision, given the kernel's answer (pure: unit-tested).
pub fn decide(kernel: Option<FlowVerdict>, seen_by_agent: bool) -> (bool, bool) {
    match kernel {
        Some(FlowVerdict::PreGreet { .. }) => (true, true),
        Some(FlowVerdict::AwaitingGreeting) | Some(FlowVerdict::Clean) => (false, true),
        Some(FlowVerdict::Unknown) | None => (seen_by_agent, false),
    }
}

impl PreGreetSource for KernelPreGreet {
    fn talked_first(&self, client: SocketAddr, local: SocketAddr, seen_by_agent: bool) -> bool {
        let answer = {
            let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            maps.flow_verdict(client, local)
        };
        let kernel = match answer {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(client = %client, "cannot read the kernel's flow table: {e}");
                None
            }
        };
        let (talked, from_kernel) = decide(kernel, seen_by_agent);
        if from_kernel {
            self.counts.kernel.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counts.fallback.fetch_add(1, Ordering::Relaxed);
            debug!(client = %client, "no kernel record of this flow: the agent's own observation decides");
        }
        talked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_decides_when_it_knows_the_flow() {
        let pg = Some(FlowVerdict::PreGreet { teaser: false });
        assert_eq!(decide(pg, false), (true, true));
        assert_eq!(decide(pg, true), (true, true));
        // The agent saw bytes, but the kernel saw them after the greeting
        // (or never): not a pre-greet talker.
        assert_eq!(decide(Some(FlowVerdict::Clean), true), (false, true));
        assert_eq!(
            decide(Some(FlowVerdict::AwaitingGreeting), true),
            (false, true)
        );
    }

    #[test]
    fn unknown_flows_fall_back_to_the_agent() {
        assert_eq!(decide(Some(FlowVerdict::Unknown), true), (true, false));
        assert_eq!(decide(Some(FlowVerdict::Unknown), false), (false, false));
        assert_eq!(decide(None, true), (true, false));
    }
}
