//! [`Policy::decide`]: every event of a session in, every action out.
//!
//! The session carries actions out (holds, replies, drops, look-ups,
//! offences) and reports what happened next as events; it decides nothing
//! itself. Pure: no clock is read (time comes in the events), no I/O.
use tokio::time::Instant;

use super::facts::Dns;
use super::greylist::GreyAsk;
use super::offenders::{self, Sent};
use super::ports::Offence;
use super::qmail::PRE_GREET_REPLY;
use super::{Delay, Policy, SessionState, Step};

/// Something that happened in a session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// The client connected ([`Policy::session`] made its state).
    Connect,
    /// The DNS verdict came in while the banner is held.
    DnsKnown(&'a Dns),
    /// The client talked before the banner (the pre-greet source says so).
    TalkedFirst,
    /// The greeting delay is over (with the DNS verdict, if look-ups ran).
    GreetingOver(&'a Dns),
    /// The greylist store answered what [`Action::greylist`] asked:
    /// `passed` false is "not yet".
    Greylist { ask: GreyAsk, passed: bool },
    /// A command arrived at `now`. `draining`: the agent stops.
    Command {
        step: Step<'a>,
        now: Instant,
        draining: bool,
    },
    /// The reply with `code` to a command is known (the MTA's, or one the
    /// agent makes); `command` is what [`Event::Command`] held it.
    Reply { code: u16, command: Option<Delay> },
    /// A reply went out to the client.
    Sent(Sent),
    /// The MTA accepted the client's AUTH (235).
    Authenticated,
    /// The client tripped an after-greeting test (`[protocol]`).
    Protocol(super::protocol::Test),
}

/// What the session must do; the default is "nothing: pass to the MTA".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Action {
    /// Hold the reply (or the banner) this long, counted from its
    /// command's arrival (see [`super::release_at`]).
    pub hold: Option<Delay>,
    /// The agent's own reply, in place of the MTA's (without CRLF). At
    /// [`Event::Connect`]: the text of a `220-` teaser to send at once.
    pub reply: Option<String>,
    /// Close the connection (after `reply`, if any), without asking the
    /// MTA.
    pub close: bool,
    /// An offence to report to the closed loop.
    pub offence: Option<Offence>,
    /// The client is spared from now on: a held banner goes out now.
    pub exempt: bool,
    /// Talking before the banner is a violation: watch for it.
    pub watch_pre_greet: bool,
    /// Start the DNS look-ups (while the banner is held).
    pub look_up: bool,
    /// Ask the greylist store, then report [`Event::Greylist`].
    pub greylist: Option<GreyAsk>,
    /// Remember that the client authenticated now (the auth store).
    pub remember_auth: bool,
    /// The client tripped an after-greeting test that runs: log it and
    /// count it (with `reply`/`close` or `offence` as its action says).
    pub note: bool,
}

impl Action {
    /// Nothing for the agent to do: the MTA answers.
    pub fn passes(&self) -> bool {
        self.reply.is_none() && !self.close && self.greylist.is_none()
    }

    fn hold(hold: Option<Delay>) -> Action {
        Action {
            hold,
            ..Action::default()
        }
    }
}

impl Policy {
    /// The one place that decides what the tarpit does.
    pub fn decide(&self, s: &mut SessionState, event: Event<'_>) -> Action {
        match event {
            Event::Connect => {
                let g = self.greeting(s);
                Action {
                    hold: g.delay,
                    reply: g.teaser.map(|t| format!("220-{t}")),
                    watch_pre_greet: g.check_pre_greet,
                    look_up: !self.excluded(s),
                    ..Action::default()
                }
            }
            Event::DnsKnown(dns) => self.postscreen.while_held(dns),
            Event::TalkedFirst => Action {
                hold: self.settle(s, None, 554),
                reply: Some(PRE_GREET_REPLY.to_string()),
                close: true,
                ..Action::default()
            },
            Event::GreetingOver(dns) => {
                if !self.precedence.enabled {
                    return Action::default();
                }
                if let Some(drop) = self.postscreen.apply(s, dns) {
                    return drop;
                }
                Action {
                    greylist: self
                        .greylisting
                        .at_connect(self.precedence.never_greylisted(s)),
                    ..Action::default()
                }
            }
            Event::Greylist { passed: true, .. } => Action::default(),
            Event::Greylist { ask, passed: false } => {
                let (text, close) = self.greylisting.refusal(ask);
                Action {
                    reply: Some(text.to_string()),
                    close,
                    ..Action::default()
                }
            }
            Event::Command {
                step,
                now,
                draining,
            } => {
                self.observe(s, step);
                let last_auth = s.last_auth;
                // No tarpit while the agent stops: the session should end.
                let hold = self
                    .command_delay(s, step, last_auth, now)
                    .filter(|_| !draining);
                let mut action = Action::hold(hold);
                if step == Step::Rcpt && self.precedence.enabled {
                    action.reply =
                        self.postscreen
                            .rcpt_reply(s, self.blacklisted(s), self.excluded(s));
                    if action.reply.is_none() {
                        action.greylist = self
                            .greylisting
                            .at_rcpt(self.precedence.never_greylisted(s));
                    }
                }
                action
            }
            Event::Reply { code, command } => Action::hold(self.settle(s, command, code)),
            Event::Sent(sent) => Action {
                offence: offenders::offence(sent),
                ..Action::default()
            },
            Event::Protocol(test) => self.protocol.tripped(test, self.excluded(s)),
            Event::Authenticated => {
                s.authenticated = true;
                Action {
                    remember_auth: true,
                    ..Action::default()
                }
            }
        }
    }
}
