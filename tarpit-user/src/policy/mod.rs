//! The tarpit policies as pure decisions: no sockets, no clock reads.
//!
//! One place decides: [`Policy::decide`] takes every event of a session
//! ([`Event`]: connect, DNS verdict, pre-greet talk, each command, each
//! reply, ...) and returns what to do ([`Action`]: hold, reply in place of
//! the MTA, drop, ask the greylist, report an offence, exempt). The
//! session carries the actions out. [`Policy::explain`] says, from the same
//! precedence code, what `tarpit ip` prints.
//!
//! One file per origin, each compiled from its own config section:
//!
//! | rule (origin) | file | config |
//! | --- | --- | --- |
//! | who is spared, in which order (all) | [`precedence`] | `enabled`, `[exclude]`, `[allow]` |
//! | greeting delay, pre-greet drop, teaser (qmail) | [`qmail`] | `[greeting]` |
//! | HELO delay, once a day for authenticated IPs; RCPT threshold, delay, scaling (SecurityGateway) | [`securitygateway`] | `[helo]`, `[rcpt]` |
//! | 5xx delay (Exchange `TarpitTime`) | [`exchange`] | `[reject]` |
//! | blacklist delay from MAIL FROM on, callout exceptions, internal never blacklisted (ORF) | [`orf`] | `[blacklist]`, `allow.callout_senders` |
//! | DNSBL drop/reject/delay, DNSWL and `allow.hosts` allow (postscreen) | [`dnsbl`] | the verdict's action |
//! | greylisting at connect or per triplet | [`greylist`] | `[greylist]` |
//! | which outcomes are offences (closed loop) | [`offenders`] | - |
//! | after-greeting tests: pipelining, non-SMTP commands, bare newlines (postscreen) | [`protocol`] | `[protocol]` |
//! | cap on the total delay of a session | [`Policy::settle`] | `limits.max_total_delay` |
//!
//! A new timing rule is one config section, one file here (its struct, its
//! `new` from the section, its decision), a line in [`Policy`] and in
//! [`Policy::decide`], its unit tests, and docs.
pub mod auth_store;
mod decide;
pub mod dnsbl;
pub mod exchange;
mod explain;
pub mod facts;
pub mod greylist;
pub mod offenders;
pub mod orf;
pub mod pattern;
pub mod ports;
pub mod precedence;
pub mod protocol;
pub mod qmail;
pub mod securitygateway;

use std::net::IpAddr;

use tokio::time::{Duration, Instant};

use crate::config::{Config, MAX_DELAY};
pub use auth_store::{AUTH_TTL, AuthenticatedIps, MemoryAuthStore};
pub use decide::{Action, Event};
pub use explain::Explanation;
pub use facts::{Blocked, Dns, Facts, Grey};
pub use greylist::GreyAsk;
pub use offenders::Sent;

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
    /// A hold of `duration` (at most [`MAX_DELAY`]); none if zero.
    pub fn new(duration: Duration, reason: Reason) -> Option<Delay> {
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

/// What a session knows of its client, in short (from [`Facts`] and the
/// config's networks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub internal: bool,
    /// On an allow list: the kernel's, `allow.ips`, or DNS (DNSWL,
    /// `allow.hosts`) once the verdict is in.
    pub allowlisted: bool,
    /// On `blacklist.ips`, or a DNSBL `delay`/`reject` verdict.
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
    /// When the client's address last authenticated (within a day), for
    /// the HELO delay's once-a-day rule.
    pub last_auth: Option<Instant>,
    /// The HELO delay was paid in this session (a second EHLO after
    /// STARTTLS does not pay again).
    pub helo_paid: bool,
    /// RCPT commands in the session.
    pub rcpts: u32,
    /// Total hold given so far.
    pub delay_spent: Duration,
    /// The DNSBL `reject` action's reply, for this client's RCPTs (boxed:
    /// thousands of held clients each have a state).
    pub dnsbl_reject: Option<Box<str>>,
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
            last_auth: None,
            helo_paid: false,
            rcpts: 0,
            delay_spent: Duration::ZERO,
            dnsbl_reject: None,
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

/// The configuration, compiled for fast decisions: one part per origin.
#[derive(Debug, Clone)]
pub struct Policy {
    pub precedence: precedence::Precedence,
    pub qmail: qmail::Qmail,
    pub securitygateway: securitygateway::SecurityGateway,
    pub exchange: exchange::Exchange,
    pub orf: orf::Orf,
    pub postscreen: dnsbl::Postscreen,
    pub greylisting: greylist::Greylisting,
    /// postscreen's after-greeting tests (`[protocol]`).
    pub protocol: protocol::Protocol,
    /// `limits.max_total_delay`: the session's budget of holds.
    pub max_total_delay: Duration,
}

impl Policy {
    pub fn new(c: &Config) -> Policy {
        Policy {
            precedence: precedence::Precedence::new(c),
            qmail: qmail::Qmail::new(&c.greeting),
            securitygateway: securitygateway::SecurityGateway::new(&c.helo, &c.rcpt),
            exchange: exchange::Exchange::new(&c.reject),
            orf: orf::Orf::new(&c.blacklist, &c.allow),
            postscreen: dnsbl::Postscreen,
            greylisting: greylist::Greylisting::new(&c.greylist),
            protocol: protocol::Protocol::new(&c.protocol),
            max_total_delay: c.limits.max_total_delay,
        }
    }

    /// The master switch (`enabled`).
    pub fn enabled(&self) -> bool {
        self.precedence.enabled
    }

    /// A recent AUTH spares the address's next sessions from their start
    /// (`helo.authenticated_once_per_day` with `exclude.authenticated`).
    pub fn auth_spares_new_sessions(&self) -> bool {
        self.precedence.auth_spares_new_sessions
    }

    /// What is known of a client that connected to `local_port` from `ip`
    /// before anything is asked (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn facts(&self, ip: IpAddr, local_port: u16) -> Facts {
        let implicit = self.precedence.implicit_tls_ports.contains(&local_port);
        Facts::new(ip, implicit)
    }

    /// Whether a rule reads when the client last authenticated
    /// ([`Facts::last_auth`]): only `helo.authenticated_once_per_day`.
    pub fn wants_last_auth(&self) -> bool {
        self.securitygateway.auth_once_per_day
    }

    /// Classifies a new client (IPv4-mapped IPv6 addresses count as IPv4)
    /// from the config's networks alone.
    pub fn classify(&self, ip: IpAddr, local_port: u16) -> Client {
        self.client(&self.facts(ip, local_port))
    }

    /// A client from its facts and the config's networks.
    pub fn client(&self, f: &Facts) -> Client {
        let ip =
            f.ip.map_or(IpAddr::from([0, 0, 0, 0]), |ip| ip.to_canonical());
        Client {
            ip,
            internal: self.precedence.internal_net(ip).is_some(),
            allowlisted: f.kernel_allow.is_some()
                || self.precedence.allow_net(ip).is_some()
                || matches!(f.dns, Dns::Allowed(_)),
            blacklisted: self.orf.ip_net(ip).is_some(),
            implicit_tls: f.implicit_tls,
        }
    }

    /// The state of a session that starts with these facts: a recent AUTH
    /// counts from the start with [`Policy::auth_spares_new_sessions`].
    pub fn session(&self, f: &Facts) -> SessionState {
        let mut s = SessionState::new(self.client(f));
        s.last_auth = f.last_auth;
        s.authenticated = f.last_auth.is_some() && self.auth_spares_new_sessions();
        s
    }

    /// No tarpit at all for this session (from now on): the master switch
    /// is off, or the client is internal, allow-listed or authenticated
    /// ([`precedence`]).
    pub fn excluded(&self, s: &SessionState) -> bool {
        self.precedence.excluded(s)
    }

    /// Whether the client, its HELO name or the current sender is
    /// blacklisted (internal hosts never are).
    pub fn blacklisted(&self, s: &SessionState) -> bool {
        self.orf.blacklisted(s)
    }

    /// ORF's callout exception ([`orf::Orf::callout_spared`]).
    pub fn callout_spared(&self, s: &SessionState, step: Step<'_>) -> bool {
        self.orf.callout_spared(s, step)
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
        let delay = self.clamp(s, self.qmail.greeting_delay());
        GreetingPlan {
            delay,
            check_pre_greet: self.qmail.watch_pre_greet(s.client.implicit_tls),
            teaser: self.qmail.teaser(s.client.implicit_tls),
        }
    }

    /// Updates the session with a command the client sent. Call before
    /// [`Policy::command_delay`] for the same command.
    pub fn observe(&self, s: &mut SessionState, step: Step<'_>) {
        match step {
            Step::Helo(_) | Step::Mail(_) | Step::Rset => s.txn_rcpts = 0,
            Step::Rcpt => {
                s.rcpts = s.rcpts.saturating_add(1);
                s.txn_rcpts = s.txn_rcpts.saturating_add(1);
            }
            Step::Data | Step::DataEnd | Step::Other => {}
        }
        self.orf.observe(s, step);
    }

    /// The k-th RCPT of a session (1-based): SecurityGateway's rule.
    pub fn rcpt_delay(&self, k: u32) -> Option<Delay> {
        self.securitygateway.rcpt_delay(k)
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
            Step::Helo(_) => self.securitygateway.helo_delay(s, last_auth, now),
            Step::Rcpt => self.securitygateway.rcpt_delay(s.rcpts),
            _ => None,
        };
        Delay::longer(own, self.orf.command_delay(s, step))
    }

    /// The final hold of a reply with `code`, counted from the arrival of
    /// its command: the command's own delay, or the 5xx delay if longer,
    /// within what is left of the session's budget (which it then uses).
    pub fn settle(&self, s: &mut SessionState, command: Option<Delay>, code: u16) -> Option<Delay> {
        let reject = if self.excluded(s) {
            None
        } else {
            self.exchange.reply_delay(code)
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

#[cfg(test)]
mod decide_tests;

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
