//! ORF's blacklist (`[blacklist]`, `allow.callout_senders`): a blacklisted
//! client IP, HELO name or sender has every reply held
//! `blacklist.delay` from MAIL FROM on; internal networks are never
//! blacklisted; callout probes are spared their first holds. A DNSBL
//! `delay` or `reject` verdict marks the client blacklisted too
//! ([`super::dnsbl`]).
use std::net::IpAddr;

use ipnet::IpNet;
use tokio::time::Duration;

use super::pattern::PatternList;
use super::{Delay, Reason, SessionState, Step};
use crate::config::{AllowConfig, BlacklistConfig};

/// `[blacklist]` and `allow.callout_senders`, compiled.
#[derive(Debug, Clone)]
pub struct Orf {
    pub delay: Duration,
    pub ips: Vec<IpNet>,
    pub senders: PatternList,
    pub helos: PatternList,
    pub callout_senders: PatternList,
}

impl Orf {
    pub fn new(c: &BlacklistConfig, allow: &AllowConfig) -> Orf {
        Orf {
            delay: c.delay,
            ips: c.ips.clone(),
            senders: PatternList::new(&c.senders),
            helos: PatternList::new(&c.helos),
            callout_senders: PatternList::new(&allow.callout_senders),
        }
    }

    /// The `blacklist.ips` network that covers `ip`, if any.
    pub fn ip_net(&self, ip: IpAddr) -> Option<IpNet> {
        self.ips.iter().find(|n| n.contains(&ip)).copied()
    }

    /// Notes what a command says of the transaction: its HELO name, its
    /// sender, a new transaction.
    pub fn observe(&self, s: &mut SessionState, step: Step<'_>) {
        match step {
            Step::Helo(name) => {
                s.helo_blacklisted = self.helos.matches(name);
                s.sender_blacklisted = false;
                s.callout_sender = false;
            }
            Step::Mail(sender) => {
                s.sender_blacklisted = self.senders.matches_sender(sender);
                s.callout_sender = self.callout_senders.matches_sender(sender);
            }
            Step::Rset => {
                s.sender_blacklisted = false;
                s.callout_sender = false;
            }
            Step::Rcpt | Step::Data | Step::DataEnd | Step::Other => {}
        }
    }

    /// Whether the client, its HELO name or the current sender is
    /// blacklisted (internal hosts never are).
    pub fn blacklisted(&self, s: &SessionState) -> bool {
        !s.client.internal && (s.client.blacklisted || s.helo_blacklisted || s.sender_blacklisted)
    }

    /// ORF's callout exception: a sender verification probe (Postfix's
    /// `double-bounce@`, Exim's null sender) sends MAIL and one or two RCPTs
    /// (Exim's `callout/random` two) and never DATA, and gives up long
    /// before a 60 s hold. Its MAIL reply and first two RCPT replies are
    /// not held; anything more is no longer a callout and is held.
    pub fn callout_spared(&self, s: &SessionState, step: Step<'_>) -> bool {
        s.callout_sender
            && match step {
                Step::Mail(_) => true,
                Step::Rcpt => s.txn_rcpts <= 2,
                _ => false,
            }
    }

    /// The blacklist hold of the reply to `step`.
    pub fn command_delay(&self, s: &SessionState, step: Step<'_>) -> Option<Delay> {
        match step {
            Step::Mail(_) | Step::Rcpt | Step::Data | Step::DataEnd
                if self.blacklisted(s) && !self.callout_spared(s, step) =>
            {
                Delay::new(self.delay, Reason::Blacklist)
            }
            _ => None,
        }
    }
}
