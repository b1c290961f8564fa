//! Who talked first. Today the agent watches its own socket; the kernel's
//! per-flow flag (tc program) replaces it behind the same trait, so there
//! is one verdict source.
use std::net::SocketAddr;

/// The pre-greet verdict for one connection.
pub trait PreGreetVerdict: Send + Sync {
    /// Asked while the banner is held and just before it goes out.
    /// `seen_by_agent`: client bytes arrived on the agent's socket before
    /// the final `220 ` (after a `220-` teaser counts too).
    fn talked_first(&self, client: SocketAddr, local: SocketAddr, seen_by_agent: bool) -> bool;
}

/// The agent's own detector: bytes on the socket before the banner.
#[derive(Debug, Default, Clone, Copy)]
pub struct AgentPreGreet;

impl PreGreetVerdict for AgentPreGreet {
    fn talked_first(&self, _client: SocketAddr, _local: SocketAddr, seen_by_agent: bool) -> bool {
        seen_by_agent
    }
}
