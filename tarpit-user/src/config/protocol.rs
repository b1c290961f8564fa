//! `[protocol]`: postscreen's after-greeting tests, inline. postscreen
//! must hang up on a client that passes them (it cannot hand a live
//! session to smtpd), so each costs a good client a reconnect; the agent
//! stays in the path and applies them without one. Each is off by
//! default, as postscreen's are.
use serde::Deserialize;

use super::ConfigError;

/// What a client that trips a test gets.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TestAction {
    /// The test is not run.
    #[default]
    Off,
    /// A log line and a metric; the session goes on as without the test.
    Log,
    /// `554 5.5.1` and the connection is closed (a rejected session for
    /// `[offenders]`).
    Drop,
    /// The session goes on, and the client's address gets a strike
    /// (a rejected session for `[offenders]`, which blocks repeat
    /// offenders).
    Strike,
}

impl TestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TestAction::Off => "off",
            TestAction::Log => "log",
            TestAction::Drop => "drop",
            TestAction::Strike => "strike",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    /// A command sent before the reply to EHLO went out (RFC 2920: EHLO
    /// ends a pipelined group), or while replies are outstanding when the
    /// EHLO reply did not offer PIPELINING.
    pub pipelining: TestAction,
    /// A command of another protocol: `CONNECT`, `GET`, `POST` (an HTTP
    /// proxy scanner), `USER` (POP3).
    pub non_smtp: TestAction,
    /// A command line with a bare CR or LF, or a NUL. The line is refused
    /// (`500 5.5.2`) whatever this says; `drop` closes instead.
    pub bare_newline: TestAction,
}

impl ProtocolConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
