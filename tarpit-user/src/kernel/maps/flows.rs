//! Per-address and per-flow state the kernel programs keep: SYN counts,
//! the per-IP history, and the flow table behind the pre-greet verdict.
//! Read-only from user space; here so the verdict's reading of the flow
//! flags sits next to the only code that reads them.
use std::net::{IpAddr, SocketAddr};

use tarpit_common::{
    FlowKey, FlowState, IpAddrKey, IpState,
    state::{FLOW_F_PREGREET, FLOW_F_TEASER, FLOW_F_UNSEEN, FLOW_GREETED},
};

use super::{KernelMaps, layout_errno};
use crate::kernel::error::KernelError;

/// The kernel's answer to "did this client talk before the greeting?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreGreetVerdict {
    /// No record of the flow (evicted, closed, older than the programs, not
    /// a watched port, or a handshake the kernel did not complete), or the
    /// client acknowledged server bytes tc egress never saw (replies routed
    /// around it): never treat as a strike.
    Unknown,
    /// The greeting is not complete and the client has been quiet.
    AwaitingGreeting,
    /// The greeting is complete and the client did not talk before it.
    Clean,
    /// The client talked before the greeting (after a `220-` teaser when
    /// `teaser` is set).
    PreGreet { teaser: bool },
}

impl KernelMaps {
    /// What the kernel knows about one address.
    pub fn ip_state(&self, ip: IpAddr) -> Result<Option<IpState>, KernelError> {
        match self.ip_state.get(&IpAddrKey::from(ip), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(KernelError::from_map("read per-IP state", e, None)),
        }
    }

    /// Every address the kernel remembers. Entries can be evicted or added
    /// while iterating (the map is live); each one is read consistently.
    pub fn ip_states(&self) -> Result<Vec<(IpAddr, IpState)>, KernelError> {
        let mut out = Vec::new();
        for item in self.ip_state.iter() {
            match item {
                Ok((k, v)) => out.push((IpAddr::from(k), v)),
                // Evicted between listing its key and reading it.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(KernelError::from_map("read per-IP state", e, None)),
            }
        }
        Ok(out)
    }

    /// Connection attempts (SYNs) to a watched port that XDP let through
    /// from `ip` (dropped ones are not counted).
    pub fn syn_count(&self, ip: IpAddr) -> Result<u64, KernelError> {
        match self.syn_count.get(&IpAddrKey::from(ip), 0) {
            Ok(v) => Ok(v),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(0),
            Err(e) => Err(KernelError::from_map("read SYN counts", e, None)),
        }
    }

    /// Did the client at `client` talk to `server` before the greeting?
    /// Addresses as the server's socket sees them (IPv4-mapped IPv6 from a
    /// dual-stack socket is the same client as plain IPv4).
    pub fn flow_verdict(
        &self,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Result<PreGreetVerdict, KernelError> {
        let key = FlowKey {
            client: IpAddrKey::from(client.ip()),
            server: IpAddrKey::from(server.ip()),
            client_port: client.port(),
            server_port: server.port(),
        };
        let flow = match self.flows.get(&key, 0) {
            Ok(f) => f,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(PreGreetVerdict::Unknown),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => {
                return Ok(PreGreetVerdict::Unknown);
            }
            Err(e) => return Err(KernelError::from_map("read flow table", e, None)),
        };
        Ok(verdict_of(&flow))
    }

    /// Number of flows the kernel tracks now.
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(|k| k.is_ok()).count()
    }
}

/// The verdict of a flow record (pure: unit-tested).
pub fn verdict_of(flow: &FlowState) -> PreGreetVerdict {
    if flow.flags & FLOW_F_UNSEEN != 0 {
        PreGreetVerdict::Unknown
    } else if flow.flags & FLOW_F_PREGREET != 0 {
        PreGreetVerdict::PreGreet {
            teaser: flow.flags & FLOW_F_TEASER != 0,
        }
    } else if flow.state == FLOW_GREETED {
        PreGreetVerdict::Clean
    } else {
        PreGreetVerdict::AwaitingGreeting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarpit_common::state::{FLOW_AWAIT_GREETING, FLOW_TEASER};

    #[test]
    fn verdicts() {
        let f = |state, flags| FlowState {
            state,
            flags,
            ..FlowState::established(1, 100, 200)
        };
        assert_eq!(
            verdict_of(&f(FLOW_AWAIT_GREETING, 0)),
            PreGreetVerdict::AwaitingGreeting
        );
        assert_eq!(
            verdict_of(&f(FLOW_TEASER, 0)),
            PreGreetVerdict::AwaitingGreeting
        );
        assert_eq!(verdict_of(&f(FLOW_GREETED, 0)), PreGreetVerdict::Clean);
        assert_eq!(
            verdict_of(&f(FLOW_GREETED, FLOW_F_PREGREET)),
            PreGreetVerdict::PreGreet { teaser: false }
        );
        assert_eq!(
            verdict_of(&f(FLOW_GREETED, FLOW_F_PREGREET | FLOW_F_TEASER)),
            PreGreetVerdict::PreGreet { teaser: true }
        );
        // Replies egress never saw: unknown, whatever the state says.
        assert_eq!(
            verdict_of(&f(FLOW_AWAIT_GREETING, FLOW_F_UNSEEN)),
            PreGreetVerdict::Unknown
        );
    }
}
