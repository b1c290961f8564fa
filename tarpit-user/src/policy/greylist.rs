//! Greylisting (`[greylist]`): a temporary failure for what was never
//! seen before, per client address at connect (`421 4.7.1`, the session
//! closes) or per triplet at RCPT (`451 4.7.1` in place of the MTA's
//! reply). Internal, allow-listed (by IP or DNS) and authenticated clients
//! are never greylisted ([`super::precedence::Precedence::never_greylisted`]).
//!
//! The store (the reputation module's greylist) remembers who passed; the
//! policy says when to ask it ([`super::Action::greylist`]) and what a
//! "not yet" means.
use crate::config::{GreylistConfig, GreylistMode};

/// The reply to an unseen triplet (at RCPT).
pub const TRIPLET_REPLY: &str = "451 4.7.1 Greylisted, please try again later";
/// The reply to an unseen client at connect (the session closes after it).
pub const CONNECT_REPLY: &str = "421 4.7.1 Greylisted, please try again later";

/// What the store is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreyAsk {
    /// The client's address, after the greeting delay.
    Connect,
    /// The (client network, sender, recipient) of the RCPT at hand.
    Triplet,
}

/// `[greylist]`, compiled.
#[derive(Debug, Clone)]
pub struct Greylisting {
    pub mode: GreylistMode,
}

impl Greylisting {
    pub fn new(c: &GreylistConfig) -> Greylisting {
        Greylisting { mode: c.mode }
    }

    /// Whether to ask the store after the greeting delay.
    pub fn at_connect(&self, exempt: bool) -> Option<GreyAsk> {
        (self.mode == GreylistMode::Connect && !exempt).then_some(GreyAsk::Connect)
    }

    /// Whether to ask the store at a RCPT.
    pub fn at_rcpt(&self, exempt: bool) -> Option<GreyAsk> {
        (self.mode == GreylistMode::Triplet && !exempt).then_some(GreyAsk::Triplet)
    }

    /// The reply to a "not yet" from the store, and whether the session
    /// ends with it.
    pub fn refusal(&self, ask: GreyAsk) -> (&'static str, bool) {
        match ask {
            GreyAsk::Connect => (CONNECT_REPLY, true),
            GreyAsk::Triplet => (TRIPLET_REPLY, false),
        }
    }
}
