//! The tarpit policies as pure decisions: no sockets, no clock reads.
//!
//! The session asks three questions, each answered from the configuration
//! and the session's state alone:
//! - [`Policy::greeting`]: how long to hold the banner, and whether talking
//!   first is a violation;
//! - [`Policy::command_delay`]: when a command arrives, how long its reply
//!   must be held (counted from that arrival);
//! - [`Policy::settle`]: when the reply is known, the final hold (5xx
//!   replies may add the reject delay), clamped to the session's budget.
//!
//! | rule (origin) | where |
//! | --- | --- |
//! | greeting delay, pre-greet drop (qmail) | [`Policy::greeting`] |
//! | master switch, exclusions (SecurityGateway) | [`Policy::excluded`] |
//! | HELO delay, once a day for authenticated IPs (SecurityGateway) | [`Policy::command_delay`] |
//! | RCPT threshold, delay, scaling (SecurityGateway) | [`Policy::rcpt_delay`] |
//! | 5xx delay (Exchange `TarpitTime`) | [`Policy::settle`] |
//! | blacklist delay from MAIL FROM on, callout exceptions, internal (ORF) | [`Policy::command_delay`] |
//! | cap on the total delay of a session | [`Policy::settle`] |
pub mod auth_store;
pub mod pattern;
pub mod ports;

use std::net::IpAddr;

use ipnet::IpNet;
use tokio::time::{Duration, Instant};

use crate::config::{Config, MAX_DELAY};
pub use auth_store::{AUTH_TTL, AuthenticatedIps, MemoryAuthStore};
use pattern::PatternList;

/// Why a reply was held; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Greeting,
    Helo,
    Rcpt,
    Reject,
    Blacklist,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Greeting => "greeting",
            Reason::Helo => "helo",
            Reason::Rcpt => "rcpt",
            Reason::Reject => "reject",
            Reason::Blacklist => "blacklist",
        }
    }
}

/// A hold and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    pub duration: Duration,
    pub reason: Reason,
}

impl Delay {
    fn new(duration: Duration, reason: Reason) -> Option<Delay> {
        (!duration.is_zero()).then_some(Delay {
            duration: duration.min(MAX_DELAY),
            reason,
        })
    }

    /// The longer of two holds of one reply (they overlap, they do not add
    /// up: each is counted from the same start).
    pub fn longer(a: Option<Delay>, b: Option<Delay>) -> Option<Delay> {
        match (a, b) {
            (Some(x), Some(y)) => Some(if y.duration > x.duration { y } else { x }),
            (x, None) => x,
            (None, y) => y,
        }
    }
}

/// What the agent knows about a client when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub internal: bool,
    pub allowlisted: bool,
    pub blacklisted: bool,
    /// Connected to an implicit-TLS port (465): it speaks first.
    pub implicit_tls: bool,
}

/// One step of the SMTP dialogue, as far as policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Helo(&'a str),
    Mail(&'a str),
    Rcpt,
    /// The DATA command (its reply is the 354).
    Data,
    /// End of a DATA body, or a BDAT chunk.
    DataEnd,
    Rset,
    Other,
}

/// What a session has shown so far.
#[derive(Debug, Clone)]
pub struct SessionState {
    pub client: Client,
    pub helo_blacklisted: bool,
    /// The current transaction's sender is blacklisted.
    pub sender_blacklisted: bool,
    /// The current transaction's sender is a callout probe: no blacklist
    /// delay on its MAIL reply and first two RCPT replies.
    pub callout_sender: bool,
    /// RCPT commands in the current transaction (since MAIL, RSET or HELO);
    /// only the first few matter (callouts), and a held session stays small.
    pub txn_rcpts: u16,
    pub authenticated: bool,
    /// The HELO delay was paid in this session (a second EHLO after
    /// STARTTLS does not pay again).
    pub helo_paid: bool,
    /// RCPT commands in the session.
    pub rcpts: u32,
    /// Total hold given so far.
    pub delay_spent: Duration,
}

impl SessionState {
    pub fn new(client: Client) -> SessionState {
        SessionState {
            client,
            helo_blacklisted: false,
            sender_blacklisted: false,
            callout_sender: false,
            txn_rcpts: 0,
            authenticated: false,
            helo_paid: false,
            rcpts: 0,
            delay_spent: Duration::ZERO,
        }
    }
}

/// What to do before the banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GreetingPlan {
    pub delay: Option<Delay>,
    /// Talking before the final `220 ` is a violation (554 and close).
    pub check_pre_greet: bool,
    /// Send `220-<teaser>` at once.
    pub teaser: Option<String>,
}

/// The configuration, compiled for fast decisions.
#[derive(Debug, Clone)]
pub struct Policy {
    pub enabled: bool,
    pub greeting_delay: Duration,
    pub drop_pre_greet: bool,
    pub teaser: Option<String>,
    pub helo_delay: Duration,
    pub auth_once_per_day: bool,
    pub rcpt_threshold: u32,
    pub rcpt_delay: Duration,
    pub rcpt_scaling: f64,
    pub reject_delay: Duration,
    pub blacklist_delay: Duration,
    pub blacklist_ips: Vec<IpNet>,
    pub blacklist_senders: PatternList,
    pub blacklist_helos: PatternList,
    pub exclude_allowlisted: bool,
    pub exclude_authenticated: bool,
    pub allow_ips: Vec<IpNet>,
    pub internal: Vec<IpNet>,
    pub callout_senders: PatternList,
    pub max_total_delay: Duration,
    pub implicit_tls_ports: Vec<u16>,
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

impl Policy {
    pub fn new(c: &Config) -> Policy {
        Policy {
            enabled: c.enabled,
            greeting_delay: c.greeting.delay,
            drop_pre_greet: c.greeting.drop_pre_greet,
            teaser: c.greeting.teaser.clone(),
            helo_delay: c.helo.delay,
            auth_once_per_day: c.helo.authenticated_once_per_day,
            rcpt_threshold: c.rcpt.threshold,
            rcpt_delay: c.rcpt.delay,
            rcpt_scaling: c.rcpt.scaling,
            reject_delay: c.reject.delay,
            blacklist_delay: c.blacklist.delay,
            blacklist_ips: c.blacklist.ips.clone(),
            blacklist_senders: PatternList::new(&c.blacklist.senders),
            blacklist_helos: PatternList::new(&c.blacklist.helos),
            exclude_allowlisted: c.exclude.allowlisted,
            exclude_authenticated: c.exclude.authenticated,
            allow_ips: c.allow.ips.clone(),
            internal: c.allow.internal.clone(),
            callout_senders: PatternList::new(&c.allow.callout_senders),
            max_total_delay: c.limits.max_total_delay,
            implicit_tls_ports: c.tls.implicit_ports.clone(),
        }
    }

    /// Classifies a new client (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn classify(&self, ip: IpAddr, local_port: u16) -> Client {
        let ip = ip.to_canonical();
        Client {
            ip,
            internal: contains(&self.internal, ip),
            allowlisted: contains(&self.allow_ips, ip),
            blacklisted: contains(&self.blacklist_ips, ip),
            implicit_tls: self.implicit_tls_ports.contains(&local_port),
        }
    }

    /// No tarpit at all for this session (from now on): the master switch
    /// is off, or the client is internal, allow-listed or authenticated.
    pub fn excluded(&self, s: &SessionState) -> bool {
        !self.enabled
            || s.client.internal
            || (s.client.allowlisted && self.exclude_allowlisted)
            || (s.authenticated && self.exclude_authenticated)
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

    /// Greeting delay and pre-greet check; charges the delay to the budget.
    pub fn greeting(&self, s: &mut SessionState) -> GreetingPlan {
        if self.excluded(s) {
            return GreetingPlan {
                delay: None,
                check_pre_greet: false,
                teaser: None,
            };
        }
        let delay = self.clamp(s, Delay::new(self.greeting_delay, Reason::Greeting));
        GreetingPlan {
            delay,
            check_pre_greet: self.drop_pre_greet && !s.client.implicit_tls,
            teaser: if s.client.implicit_tls {
                None
            } else {
                self.teaser.clone()
            },
        }
    }

    /// Updates the session with a command the client sent. Call before
    /// [`Policy::command_delay`] for the same command.
    pub fn observe(&self, s: &mut SessionState, step: Step<'_>) {
        match step {
            Step::Helo(name) => {
                s.helo_blacklisted = self.blacklist_helos.matches(name);
                s.sender_blacklisted = false;
                s.callout_sender = false;
                s.txn_rcpts = 0;
            }
            Step::Mail(sender) => {
                s.sender_blacklisted = self.blacklist_senders.matches_sender(sender);
                s.callout_sender = self.callout_senders.matches_sender(sender);
                s.txn_rcpts = 0;
            }
            Step::Rcpt => {
                s.rcpts = s.rcpts.saturating_add(1);
                s.txn_rcpts = s.txn_rcpts.saturating_add(1);
            }
            Step::Rset => {
                s.sender_blacklisted = false;
                s.callout_sender = false;
                s.txn_rcpts = 0;
            }
            Step::Data | Step::DataEnd | Step::Other => {}
        }
    }

    /// The k-th RCPT of a session (1-based): SecurityGateway's rule.
    pub fn rcpt_delay(&self, k: u32) -> Option<Delay> {
        if k <= self.rcpt_threshold {
            return None;
        }
        let beyond = f64::from(k - self.rcpt_threshold - 1);
        let factor = 1.0 + beyond * (self.rcpt_scaling - 1.0);
        let secs = (self.rcpt_delay.as_secs_f64() * factor).min(MAX_DELAY.as_secs_f64());
        Delay::new(Duration::from_secs_f64(secs), Reason::Rcpt)
    }

    /// The hold for the reply to a command that just arrived.
    /// `last_auth` is when the client's address last authenticated.
    pub fn command_delay(
        &self,
        s: &mut SessionState,
        step: Step<'_>,
        last_auth: Option<Instant>,
        now: Instant,
    ) -> Option<Delay> {
        if self.excluded(s) {
            return None;
        }
        let own = match step {
            Step::Helo(_) => {
                let recently =
                    last_auth.is_some_and(|t| now.saturating_duration_since(t) < AUTH_TTL);
                if s.helo_paid || (self.auth_once_per_day && recently) {
                    None
                } else {
                    s.helo_paid = true;
                    Delay::new(self.helo_delay, Reason::Helo)
                }
            }
            Step::Rcpt => self.rcpt_delay(s.rcpts),
            _ => None,
        };
        let blacklist = match step {
            Step::Mail(_) | Step::Rcpt | Step::Data | Step::DataEnd
                if self.blacklisted(s) && !self.callout_spared(s, step) =>
            {
                Delay::new(self.blacklist_delay, Reason::Blacklist)
            }
            _ => None,
        };
        Delay::longer(own, blacklist)
    }

    /// The final hold of a reply with `code`, counted from the arrival of
    /// its command: the command's own delay, or the 5xx delay if longer,
    /// within what is left of the session's budget (which it then uses).
    pub fn settle(&self, s: &mut SessionState, command: Option<Delay>, code: u16) -> Option<Delay> {
        let reject = if (500..600).contains(&code) && !self.excluded(s) {
            Delay::new(self.reject_delay, Reason::Reject)
        } else {
            None
        };
        self.clamp(s, Delay::longer(command, reject))
    }

    fn clamp(&self, s: &mut SessionState, d: Option<Delay>) -> Option<Delay> {
        let d = d?;
        let left = self.max_total_delay.saturating_sub(s.delay_spent);
        let d = Delay::new(d.duration.min(left), d.reason)?;
        s.delay_spent += d.duration;
        Some(d)
    }
}

#[cfg(test)]
mod tests;

/// When a reply may go out. Its hold counts from when its command arrived
/// (ORF's accounting: time the MTA or a lookup took is part of the delay)
/// or from when the reply before it went out, whichever is later: holds of
/// pipelined commands add up as if the commands had been sent one by one.
/// A reply is never sent before it exists.
pub fn release_at(
    arrival: Instant,
    previous_release: Instant,
    ready: Instant,
    delay: Option<Delay>,
) -> Instant {
    let start = arrival.max(previous_release);
    let held = start + delay.map_or(Duration::ZERO, |d| d.duration);
    held.max(ready)
}
