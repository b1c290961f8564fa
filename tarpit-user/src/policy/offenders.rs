//! Which outcomes of a session count as offences (`[offenders]` decides
//! what the closed loop does with them: blocks, slow-downs).
//!
//! - A 5xx reply that ends the session (the agent's or the MTA's) is a
//!   rejected session. The pre-greet 554 is not: the kernel counts that
//!   talk as a strike already, never twice.
//! - A RCPT answered 550 is an unknown recipient (directory harvest).
//! - A DNSBL `drop` is a rejected session too; it is counted when the
//!   session ends ([`ended`]).
use super::ports::Offence;

/// A reply that went out to the client, as far as offences go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub code: u16,
    /// The reply answered a RCPT.
    pub rcpt: bool,
    /// The session closes after it.
    pub close: bool,
    /// The reply is the pre-greet 554 (counted by the kernel).
    pub pre_greet: bool,
}

/// The offence a reply that went out is, if any.
pub fn offence(sent: Sent) -> Option<Offence> {
    let five = (500..600).contains(&sent.code);
    if sent.close && five && !sent.pre_greet {
        Some(Offence::Rejected)
    } else if sent.rcpt && sent.code == 550 && !sent.close {
        Some(Offence::UnknownRecipient)
    } else {
        None
    }
}

/// The offence a session that ended with `outcome` (the `outcome` label of
/// `tarpit_sessions_total`) is, beyond its replies: a session the agent
/// dropped for policy (`dnsbl_drop`) is a rejected session. (The
/// pre-greet 554 is counted from the kernel's event, never twice.)
pub fn ended(outcome: &str) -> Option<Offence> {
    (outcome == "dnsbl_drop").then_some(Offence::Rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dnsbl_drop_counts_as_a_rejected_session_other_ends_do_not() {
        assert_eq!(ended("quit"), None);
        assert_eq!(ended("pregreet"), None);
        assert_eq!(ended("dnsbl_drop"), Some(Offence::Rejected));
    }
}
