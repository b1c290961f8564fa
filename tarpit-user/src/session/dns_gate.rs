//! Where the session meets the reputation checks (`crate::reputation`)
//! and carries out what the policy makes of them (`crate::policy::dnsbl`,
//! `crate::policy::greylist`):
//!
//! - At connect the look-ups start ([`start`]), when the policy asks for
//!   them; they run while the client waits for the banner, and their
//!   verdict ([`verdict`], as the policy's [`Dns`] facts) may end that
//!   wait at once (`Event::DnsKnown`).
//! - After the delay, before the MTA is contacted ([`gate`]): the policy
//!   may drop the client, or ask the greylist store about its address
//!   (connect mode) and answer `421 4.7.1`. No MTA connection is spent on
//!   either.
//! - At RCPT ([`Session::rcpt`]): the policy's 554 (DNSBL `reject`) or,
//!   after asking the store about the triplet, its 451, both in place of
//!   the MTA.
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::info;

use super::relay::{Kind, Session};
use super::{Shared, say_and_close};
use crate::metrics::Outcome;
use crate::policy::{Delay, Dns, Event, SessionState, Step};
use crate::reputation::{GreyKey, GreyVerdict, ReputationHandle, unix_now};
use crate::smtp::Reply;

/// A session's look-ups, if it has any. Boxed: the handle carries the
/// verdict to come, and a client without look-ups (no lists configured,
/// or one the tarpit does not apply to) should not pay for it while held.
pub(super) type Lookups = Option<Box<ReputationHandle>>;

/// Starts the DNS look-ups, if the policy wants them (`look_up`) and any
/// list is configured.
pub(super) fn start(shared: &Shared, ip: IpAddr, look_up: bool) -> Lookups {
    if !look_up || !shared.reputation.is_active() {
        return None;
    }
    Some(Box::new(shared.reputation.start_lookups(ip)))
}

/// The verdict, waited for (after the greeting delay it is known).
pub(super) async fn verdict(rep: &mut Lookups) -> Dns {
    match rep.as_mut() {
        Some(h) => h.verdict().await.facts(),
        None => Dns::Unknown,
    }
}

/// The greeting delay is over: what the policy makes of the DNS verdict
/// and of connect-mode greylisting; `Err` ends the session with that
/// outcome (the client has been answered or dropped).
pub(super) async fn gate(
    shared: &Shared,
    state: &mut SessionState,
    stream: &mut TcpStream,
    peer: SocketAddr,
    rep: &mut Lookups,
) -> Result<(), Outcome> {
    let dns = verdict(rep).await;
    let action = shared.policy.decide(state, Event::GreetingOver(&dns));
    match &dns {
        Dns::Allowed(why) if shared.policy.enabled() => {
            info!(client = %peer, why = why.as_str(), "allow-listed by DNS")
        }
        Dns::Listed { score, .. } if action.close => {
            info!(client = %peer, score, "DNSBL: connection dropped");
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
            return Err(Outcome::DnsblDrop);
        }
        _ => {}
    }
    let (Some(ask), Some(g)) = (action.greylist, &shared.greylist) else {
        return Ok(());
    };
    let check = g.check(&GreyKey::client(state.client.ip), unix_now());
    let passed = !matches!(check, GreyVerdict::TempFail { .. });
    let answer = shared.policy.decide(state, Event::Greylist { ask, passed });
    if let (Some(text), GreyVerdict::TempFail { retry_in }) = (answer.reply, check) {
        info!(client = %peer, retry_in, "greylisted at connect");
        say_and_close(stream, &format!("{text}\r\n")).await;
        return Err(Outcome::Greylisted);
    }
    Ok(())
}

impl Session<'_> {
    /// A RCPT as the policy sees it: its hold, and the reply the agent
    /// gives in place of the MTA's, if any (after asking the greylist
    /// store when the policy says so).
    pub(super) fn rcpt(&mut self, rcpt: &str) -> (Option<Delay>, Option<String>) {
        let action = self.command_policy(Step::Rcpt);
        let (Some(ask), Some(g)) = (action.greylist, &self.shared.greylist) else {
            return (action.hold, action.reply);
        };
        let key = g.triplet_key(self.state.client.ip, &self.sender, rcpt);
        let check = g.check(&key, unix_now());
        let passed = !matches!(check, GreyVerdict::TempFail { .. });
        let answer = self
            .shared
            .policy
            .decide(&mut self.state, Event::Greylist { ask, passed });
        if let GreyVerdict::TempFail { retry_in } = check {
            info!(client = %self.peer, sender = %self.sender, rcpt, retry_in, "greylisted");
        }
        (action.hold, answer.reply)
    }

    /// What the policy says of a command that arrived now.
    pub(super) fn command_policy(&mut self, step: Step<'_>) -> crate::policy::Action {
        let event = Event::Command {
            step,
            now: Instant::now(),
            draining: self.shared.shutdown.is_draining(),
        };
        self.shared.policy.decide(&mut self.state, event)
    }

    /// A reply the agent makes in place of the MTA's, held as the MTA's
    /// reply to the same command would be (the blacklist delay, the 5xx
    /// delay).
    pub(super) fn push_local_held(&mut self, text: &str, command_delay: Option<Delay>) {
        let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
        let reply = Reply::local(code, text.get(4..).unwrap_or(""));
        self.push_reply(Kind::Local, reply, command_delay, false);
    }
}
