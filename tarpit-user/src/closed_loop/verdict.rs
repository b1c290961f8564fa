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
use crate::policy::ports::{PreGreetSource, Talk};

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

/// The decision, given the kernel's answer (pure: unit-tested): whether
/// the client talked first and who struck it, and whether the kernel knew
/// the flow.
///
/// The agent asks only before its banner goes out, so bytes it saw on the
/// socket by then were sent before any greeting: pre-greet talk, whatever
/// the flow's record says. The record can miss it: a client whose first
/// data segment is also the ACK that completes the handshake (its own ACK
/// lost, or a raw client that never sends one) is seen by tc before
/// sock_ops has made the flow, which then reads "awaiting the greeting".
/// The kernel's flag adds what the agent cannot see at that moment (bytes
/// of a flow it has not peeked at yet).
pub fn decide(kernel: Option<FlowVerdict>, seen_by_agent: bool) -> (Talk, bool) {
    let agent = if seen_by_agent {
        Talk::Unstruck
    } else {
        Talk::Silent
    };
    match kernel {
        Some(FlowVerdict::PreGreet { .. }) => (Talk::Struck, true),
        Some(FlowVerdict::AwaitingGreeting) | Some(FlowVerdict::Clean) => (agent, true),
        Some(FlowVerdict::Unknown) | None => (agent, false),
    }
}

impl PreGreetSource for KernelPreGreet {
    fn talked_first(&self, client: SocketAddr, local: SocketAddr, seen_by_agent: bool) -> Talk {
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
        assert_eq!(decide(pg, false), (Talk::Struck, true));
        assert_eq!(decide(pg, true), (Talk::Struck, true));
        assert_eq!(
            decide(Some(FlowVerdict::Clean), false),
            (Talk::Silent, true)
        );
        assert_eq!(
            decide(Some(FlowVerdict::AwaitingGreeting), false),
            (Talk::Silent, true)
        );
    }

    #[test]
    fn bytes_the_agent_saw_before_its_banner_are_pre_greet_talk() {
        // Talk on the handshake's own ACK: tc saw it before sock_ops made
        // the flow, so the record still awaits the greeting and no strike
        // was counted: the session reports it.
        assert_eq!(
            decide(Some(FlowVerdict::AwaitingGreeting), true),
            (Talk::Unstruck, true)
        );
        assert_eq!(
            decide(Some(FlowVerdict::Clean), true),
            (Talk::Unstruck, true)
        );
    }

    #[test]
    fn unknown_flows_fall_back_to_the_agent() {
        assert_eq!(
            decide(Some(FlowVerdict::Unknown), true),
            (Talk::Unstruck, false)
        );
        assert_eq!(
            decide(Some(FlowVerdict::Unknown), false),
            (Talk::Silent, false)
        );
        assert_eq!(decide(None, true), (Talk::Unstruck, false));
    }
}
