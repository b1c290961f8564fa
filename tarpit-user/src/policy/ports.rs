//! What the policy needs from outside, as traits: the kernel's allow list,
//! the store of authenticated addresses, the pre-greet verdict and a sink
//! for offences. The closed loop (`closed_loop`) implements them over the
//! kernel's maps; [`Ports::standalone`] implements them without a kernel
//! (unit tests, tools). The agent builds one [`Ports`] at start and hands
//! it to the sessions (`session::Shared`), so no session reaches a
//! process-wide static.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use super::auth_store::AuthenticatedIps;
use super::auth_store::MemoryAuthStore;

/// Addresses remembered for the "HELO delay once per day" rule when no
/// kernel map holds them.
pub const AUTH_STORE_CAPACITY: usize = 100_000;

/// The kernel's allow list (config and run-time entries), so one list
/// spares a client in XDP, sk_lookup and the agent alike.
pub trait AllowList: Send + Sync {
    /// Is `ip` on the list? `false` when the list cannot be read (the
    /// config's own `allow.ips` still apply).
    fn allowlisted(&self, ip: IpAddr) -> bool;
}

/// Whether a client talked before the greeting, and who counts the strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Talk {
    /// It did not.
    Silent,
    /// It did, and the kernel's tc program struck the address already.
    Struck,
    /// It did, and nobody has counted it yet: the session reports the
    /// offence (a flow the kernel has no record of, or talk riding on the
    /// handshake's own ACK, which tc sees before the flow exists).
    Unstruck,
}

impl Talk {
    pub fn talked(self) -> bool {
        self != Talk::Silent
    }
}

/// Who talked first: the kernel's per-flow flag when the loop runs, the
/// agent's own observation otherwise (one verdict source).
pub trait PreGreetSource: Send + Sync {
    /// Asked while the banner is held and just before it goes out.
    /// `seen_by_agent`: client bytes arrived on the agent's socket before
    /// the final `220 ` (after a `220-` teaser counts too).
    fn talked_first(&self, client: SocketAddr, local: SocketAddr, seen_by_agent: bool) -> Talk;
}

/// The agent's own detector: bytes on the socket before the banner.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentPreGreet;

impl PreGreetSource for AgentPreGreet {
    fn talked_first(&self, _client: SocketAddr, _local: SocketAddr, seen_by_agent: bool) -> Talk {
        if seen_by_agent {
            Talk::Unstruck
        } else {
            Talk::Silent
        }
    }
}

/// Something an address did that counts towards a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offence {
    /// Talked before the greeting (struck by the kernel, or reported by
    /// the session when the kernel could not see it: [`Talk::Unstruck`]).
    PreGreet,
    /// A session the agent or the MTA ended with a 5xx and a drop.
    Rejected,
    /// A recipient the MTA did not know (`550 5.1.1`): directory harvest.
    UnknownRecipient,
}

impl Offence {
    pub fn as_str(self) -> &'static str {
        match self {
            Offence::PreGreet => "pre-greet strikes",
            Offence::Rejected => "rejected sessions",
            Offence::UnknownRecipient => "unknown recipients",
        }
    }

    /// A short stable name (logs, the cluster's messages).
    pub fn code(self) -> &'static str {
        match self {
            Offence::PreGreet => "pregreet",
            Offence::Rejected => "rejected",
            Offence::UnknownRecipient => "unknown_recipient",
        }
    }

    /// The offence of a [`Offence::code`].
    pub fn from_code(code: &str) -> Option<Offence> {
        [
            Offence::PreGreet,
            Offence::Rejected,
            Offence::UnknownRecipient,
        ]
        .into_iter()
        .find(|o| o.code() == code)
    }
}

/// Where sessions report offences (repeat offenders are blocked in XDP by
/// the closed loop).
pub trait OffenceSink: Send + Sync {
    /// Reports an offence seen by a session.
    fn offence(&self, ip: IpAddr, offence: Offence);
}

/// Nothing is allow-listed (no kernel list to read).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAllowList;

impl AllowList for NoAllowList {
    fn allowlisted(&self, _ip: IpAddr) -> bool {
        false
    }
}

/// Offences go nowhere (no loop to act on them).
#[derive(Debug, Default, Clone, Copy)]
pub struct IgnoreOffences;

impl OffenceSink for IgnoreOffences {
    fn offence(&self, _ip: IpAddr, _offence: Offence) {}
}

/// Everything the sessions need from outside the policy, handed in.
#[derive(Clone)]
pub struct Ports {
    pub allow: Arc<dyn AllowList>,
    pub auth: Arc<dyn AuthenticatedIps>,
    pub pregreet: Arc<dyn PreGreetSource>,
    pub offences: Arc<dyn OffenceSink>,
}

impl Ports {
    /// Without a kernel loop: nothing allow-listed, an in-memory store of
    /// authenticated addresses, the agent's own pre-greet detector,
    /// offences ignored.
    pub fn standalone() -> Ports {
        Ports::standalone_with_auth_capacity(AUTH_STORE_CAPACITY)
    }

    /// [`Ports::standalone`] with a smaller store (tests).
    pub fn standalone_with_auth_capacity(capacity: usize) -> Ports {
        Ports {
            allow: Arc::new(NoAllowList),
            auth: Arc::new(MemoryAuthStore::new(capacity)),
            pregreet: Arc::new(AgentPreGreet),
            offences: Arc::new(IgnoreOffences),
        }
    }
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ports")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_spares_nobody_and_trusts_the_agents_own_eyes() {
        let p = Ports::standalone();
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        assert!(!p.allow.allowlisted(ip));
        let a: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        let l: SocketAddr = "198.51.100.1:25".parse().unwrap();
        assert_eq!(p.pregreet.talked_first(a, l, true), Talk::Unstruck);
        assert_eq!(p.pregreet.talked_first(a, l, false), Talk::Silent);
    }
}
