//! The signals that stop the agent (SIGTERM, SIGINT). The stop itself, its
//! phases and the token handed to servers and sessions are
//! [`crate::shutdown`]'s, re-exported here for the daemon's code.
pub use crate::shutdown::{
    DrainReport, Phase, SHUTDOWN_REPLY, SessionGuard, Shutdown, ShutdownController,
};

/// Which signal asked the agent to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl std::fmt::Display for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        })
    }
}

/// Handlers for SIGTERM and SIGINT, installed when created (so a signal
/// that arrives before anyone waits is not lost).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Must be called inside the runtime.
    pub fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Term,
            _ = self.int.recv() => StopSignal::Int,
        }
    }
}
