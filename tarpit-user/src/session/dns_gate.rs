//! Where the session meets the reputation checks (`crate::reputation`).
//!
//! - At connect the lookups start ([`start`]); they run while the client
//!   waits for the banner.
//! - During the greeting delay, a client that DNS allow-lists (DNSWL, or a
//!   forward-confirmed name on `allow.hosts`) is let through at once
//!   (`super::open` waits for the verdict before it parks the client).
//! - After the delay, before the MTA is contacted ([`gate`]): `drop`
//!   closes the connection; `delay` and `reject` mark the client
//!   blacklisted, so the ORF blacklist delay holds every reply from MAIL
//!   FROM on; connect-mode greylisting answers `421 4.7.1`. No MTA
//!   connection is spent on any of them.
//! - At RCPT ([`Session::rcpt_gate`]): `reject` answers 554 (held by the
//!   blacklist delay, as ORF does) and triplet greylisting answers 451,
//!   both in place of the MTA.
//!
//! Internal, allow-listed and authenticated clients are never looked up,
//! rejected or greylisted. Callout senders are rejected like any other:
//! their exception (ORF's) only lifts the first holds of the blacklist
//! delay, so that a verification probe is not held past its timeout.
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::info;

use super::relay::{Kind, Session};
use super::{Shared, say_and_close};
use crate::config::GreylistMode;
use crate::metrics::Outcome;
use crate::policy::{Delay, SessionState};
use crate::reputation::dnsbl::ListAction;
use crate::reputation::greylist::{CONNECT_REPLY, TRIPLET_REPLY};
use crate::reputation::{GreyKey, GreyVerdict, ReputationHandle, unix_now};
use crate::smtp::Reply;

/// A session's lookups, if it has any. Boxed: the handle carries the
/// verdict to come, and a client without lookups (no lists configured, or
/// one the tarpit does not apply to) should not pay for it while held.
pub(super) type Lookups = Option<Box<ReputationHandle>>;

/// Starts the DNS lookups for a client the tarpit applies to.
pub(super) fn start(shared: &Shared, state: &SessionState) -> Lookups {
    if shared.policy.excluded(state) || !shared.reputation.is_active() {
        return None;
    }
    Some(Box::new(shared.reputation.start_lookups(state.client.ip)))
}

/// Never greylisted: internal, allow-listed (by IP or DNS), authenticated.
fn greylist_exempt(state: &SessionState) -> bool {
    state.client.internal || state.client.allowlisted || state.authenticated
}

/// Applies the DNS verdict and connect-mode greylisting; `Err` ends the
/// session with that outcome (the client has been answered or dropped).
pub(super) async fn gate(
    shared: &Shared,
    state: &mut SessionState,
    stream: &mut TcpStream,
    peer: SocketAddr,
    rep: &mut Lookups,
) -> Result<(), Outcome> {
    if !shared.policy.enabled() {
        return Ok(());
    }
    if let Some(h) = rep.as_mut() {
        let v = h.verdict().await;
        if v.exempt() {
            info!(client = %peer, dnswl = v.dnswl, host = v.allow_host.as_deref().unwrap_or(""), "allow-listed by DNS");
            state.client.allowlisted = true;
        }
        match v.action() {
            Some(ListAction::Drop) => {
                info!(client = %peer, score = v.score, "DNSBL: connection dropped");
                let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
                return Err(Outcome::DnsblDrop);
            }
            Some(ListAction::Delay | ListAction::Reject) => state.client.blacklisted = true,
            Some(ListAction::Log) | None => {}
        }
    }
    if let Some(g) = &shared.greylist
        && g.mode() == GreylistMode::Connect
        && !greylist_exempt(state)
        && let GreyVerdict::TempFail { retry_in } =
            g.check(&GreyKey::client(state.client.ip), unix_now())
    {
        info!(client = %peer, retry_in, "greylisted at connect");
        say_and_close(stream, &format!("{CONNECT_REPLY}\r\n")).await;
        return Err(Outcome::Greylisted);
    }
    Ok(())
}

/// The `reject` reply, if the verdict asks for one (known by now).
pub(super) async fn reject_reply(rep: &mut Lookups) -> Option<String> {
    let v = rep.as_mut()?.verdict().await;
    (v.action() == Some(ListAction::Reject)).then(|| v.reject_reply())
}

impl Session<'_> {
    /// The reply the agent gives to a RCPT itself, if any.
    pub(super) fn rcpt_gate(&mut self, rcpt: &str) -> Option<String> {
        let policy = &self.shared.policy;
        if !policy.enabled() {
            return None;
        }
        if let Some(r) = &self.dnsbl_reject
            && policy.blacklisted(&self.state)
            && !policy.excluded(&self.state)
        {
            return Some(r.clone());
        }
        let g = self.shared.greylist.as_ref()?;
        if g.mode() != GreylistMode::Triplet || greylist_exempt(&self.state) {
            return None;
        }
        let key = g.triplet_key(self.state.client.ip, &self.sender, rcpt);
        match g.check(&key, unix_now()) {
            GreyVerdict::Pass => None,
            GreyVerdict::TempFail { retry_in } => {
                info!(client = %self.peer, sender = %self.sender, rcpt, retry_in, "greylisted");
                Some(TRIPLET_REPLY.to_string())
            }
        }
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
