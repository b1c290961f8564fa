//! postscreen-style DNS actions (`[dnsbl]`, `[dnswl]`, `allow.hosts`): the
//! verdict of the look-ups made while the banner is held.
//!
//! - An allow (DNSWL score, forward-confirmed `allow.hosts` name) lets the
//!   client through the greeting at once and spares it like `allow.ips`.
//! - `drop`: the connection is closed after the greeting delay, before the
//!   MTA is contacted, without a word.
//! - `delay`: the client is blacklisted (ORF's delay from MAIL FROM on).
//! - `reject`: blacklisted too, and every RCPT gets the `554` naming the
//!   lists in place of the MTA's answer, held like the MTA's would be.
//! - `log`: nothing but the log line and the metric.
//!
//! The thresholds and weights are the look-ups' business
//! (the reputation module); the policy acts on the action they name.
use super::facts::Dns;
use super::{Action, SessionState};
use crate::config::ListAction;

/// The DNS verdict's part of the decision (no configuration of its own:
/// the action comes with the verdict).
#[derive(Debug, Clone, Default)]
pub struct Postscreen;

impl Postscreen {
    /// The verdict came in while the banner is held: an allow ends the
    /// wait at once.
    pub fn while_held(&self, dns: &Dns) -> Action {
        Action {
            exempt: matches!(dns, Dns::Allowed(_)),
            ..Action::default()
        }
    }

    /// The greeting delay is over: the verdict takes effect. Returns the
    /// drop, if the verdict asks for one.
    pub fn apply(&self, s: &mut SessionState, dns: &Dns) -> Option<Action> {
        match dns {
            Dns::Allowed(_) => s.client.allowlisted = true,
            Dns::Listed { action, reply, .. } => match action {
                ListAction::Drop => {
                    return Some(Action {
                        close: true,
                        ..Action::default()
                    });
                }
                ListAction::Delay => s.client.blacklisted = true,
                ListAction::Reject => {
                    s.client.blacklisted = true;
                    s.dnsbl_reject = Some(reply.as_str().into());
                }
                ListAction::Log => {}
            },
            Dns::Unknown | Dns::Clean => {}
        }
        None
    }

    /// The `reject` action's reply to a RCPT, in place of the MTA's.
    /// `blacklisted`: the blacklist still holds (internal clients never
    /// are); `excluded`: the client is spared.
    pub fn rcpt_reply(
        &self,
        s: &SessionState,
        blacklisted: bool,
        excluded: bool,
    ) -> Option<String> {
        s.dnsbl_reject
            .as_deref()
            .filter(|_| blacklisted && !excluded)
            .map(str::to_string)
    }

    /// What `tarpit ip` says of a listed client.
    pub fn explain(&self, score: i32, action: ListAction) -> Option<String> {
        let what = match action {
            ListAction::Drop => "the connection is dropped after the greeting delay (action drop)",
            ListAction::Reject => {
                "every RCPT is rejected with 554, held by the blacklist delay (action reject)"
            }
            ListAction::Delay => {
                "the blacklist delay holds every reply from MAIL FROM on (action delay)"
            }
            ListAction::Log => return None,
        };
        Some(format!(
            "DNSBL score {score} reaches dnsbl.threshold: {what}"
        ))
    }
}
