//! postscreen's after-greeting tests (`[protocol]`), inline: the session
//! notices the behaviour, the policy says what it costs
//! (`crate::policy::protocol`), and the session carries that out: a log
//! line and a metric always, then a 554 and a close, or a strike.
use tracing::info;

use super::{Close, Kind, Session};
use crate::metrics::Outcome;
use crate::policy::Event;
use crate::policy::protocol::{NON_SMTP_VERBS, Test};
use crate::smtp::Command;

impl Session<'_> {
    /// The client tripped `test`: `true` when the session ends for it
    /// (its 554 is queued; the caller stops).
    pub(super) fn tripped(&mut self, test: Test) -> bool {
        let a = self
            .shared
            .policy
            .decide(&mut self.state, Event::Protocol(test));
        if !a.note {
            return false;
        }
        let action = if a.close {
            "drop"
        } else if a.offence.is_some() {
            "strike"
        } else {
            "log"
        };
        self.shared.metrics.protocol_test(test.as_str(), action);
        info!(client = %self.peer, test = test.as_str(), action, "after-greeting test tripped");
        if let Some(o) = a.offence {
            self.shared.ports.offences.offence(self.state.client.ip, o);
        }
        if a.close {
            let text = a
                .reply
                .as_deref()
                .unwrap_or("554 5.5.1 SMTP protocol violation");
            self.push_local(text, Kind::Local, true);
            self.close_after_flush = Some(Close(Outcome::Protocol));
            self.backend_quit();
            return true;
        }
        false
    }

    /// A command pipelined where it must not be: before the reply to EHLO
    /// went out (RFC 2920: EHLO ends a group), or behind outstanding
    /// replies when PIPELINING was not offered.
    pub(super) fn pipelined_early(&self) -> bool {
        if !self.shared.policy.protocol.runs(Test::Pipelining) {
            return false;
        }
        self.pending.iter().any(|p| p.kind == Kind::Ehlo)
            || (!self.pipelining && !self.pending.is_empty())
    }

    /// A command of another protocol (HTTP proxy scanners, POP3).
    pub(super) fn non_smtp(&self, cmd: &Command, canonical: &[u8]) -> bool {
        if *cmd != Command::Other || !self.shared.policy.protocol.runs(Test::NonSmtp) {
            return false;
        }
        let verb = canonical
            .split(|&b| b == b' ' || b == b'\r')
            .next()
            .unwrap_or(b"");
        NON_SMTP_VERBS.iter().any(|v| v.as_bytes() == verb)
    }
}
