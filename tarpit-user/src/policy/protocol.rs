//! postscreen's after-greeting tests (`[protocol]`): what a client that
//! tripped one gets. The session notices the behaviour (it reads the
//! client); this says what it means.
use super::decide::Action;
use super::ports::Offence;
use super::qmail::PRE_GREET_REPLY;
use crate::config::{ProtocolConfig, TestAction};

/// A behaviour postscreen tests for after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// A command before the EHLO reply, or pipelined without PIPELINING.
    Pipelining,
    /// `CONNECT`, `GET`, `POST`, `USER`.
    NonSmtp,
    /// A bare CR or LF (or a NUL) in a command line.
    BareNewline,
}

impl Test {
    /// A metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Test::Pipelining => "pipelining",
            Test::NonSmtp => "non_smtp",
            Test::BareNewline => "bare_newline",
        }
    }
}

/// The verbs of other protocols that postscreen's non-SMTP test knows.
pub const NON_SMTP_VERBS: [&str; 4] = ["CONNECT", "GET", "POST", "USER"];

#[derive(Debug, Clone, Default)]
pub struct Protocol {
    cfg: ProtocolConfig,
}

impl Protocol {
    pub fn new(cfg: &ProtocolConfig) -> Protocol {
        Protocol { cfg: cfg.clone() }
    }

    /// Whether `test` runs at all (the session need not look otherwise).
    pub fn runs(&self, test: Test) -> bool {
        self.action_of(test) != TestAction::Off
    }

    fn action_of(&self, test: Test) -> TestAction {
        match test {
            Test::Pipelining => self.cfg.pipelining,
            Test::NonSmtp => self.cfg.non_smtp,
            Test::BareNewline => self.cfg.bare_newline,
        }
    }

    /// What a client that tripped `test` gets; `spared` clients (allow
    /// list, internal, authenticated, master switch off) get nothing.
    pub fn tripped(&self, test: Test, spared: bool) -> Action {
        let action = if spared {
            TestAction::Off
        } else {
            self.action_of(test)
        };
        match action {
            TestAction::Off => Action::default(),
            TestAction::Log => Action {
                note: true,
                ..Action::default()
            },
            TestAction::Drop => Action {
                note: true,
                reply: Some(PRE_GREET_REPLY.to_string()),
                close: true,
                ..Action::default()
            },
            TestAction::Strike => Action {
                note: true,
                offence: Some(Offence::Rejected),
                ..Action::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_action_and_off_by_default() {
        let p = Protocol::new(&ProtocolConfig::default());
        for t in [Test::Pipelining, Test::NonSmtp, Test::BareNewline] {
            assert!(!p.runs(t));
            assert_eq!(p.tripped(t, false), Action::default());
        }
        let p = Protocol::new(&ProtocolConfig {
            pipelining: TestAction::Log,
            non_smtp: TestAction::Drop,
            bare_newline: TestAction::Strike,
        });
        let a = p.tripped(Test::Pipelining, false);
        assert!(a.note && !a.close && a.offence.is_none());
        let a = p.tripped(Test::NonSmtp, false);
        assert!(a.note && a.close);
        assert!(a.reply.as_deref().is_some_and(|r| r.starts_with("554 ")));
        let a = p.tripped(Test::BareNewline, false);
        assert_eq!(a.offence, Some(Offence::Rejected));
        assert!(!a.close);
        assert_eq!(p.tripped(Test::NonSmtp, true), Action::default(), "spared");
    }
}
