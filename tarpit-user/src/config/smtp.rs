//! `[smtp]`: how strictly the agent reads what clients send.
//!
//! The agent is the strictest reader on the path: a command line ends only
//! at CRLF, a DATA body only at CRLF.CRLF, and what it forwards is
//! re-encoded, so no MTA behind it can find a command or an end of data
//! the agent did not see (SMTP smuggling). This section only chooses what
//! happens to a body that holds bare line endings.
use serde::Deserialize;

use super::ConfigError;

/// What to do with a bare CR, a bare LF or a NUL in a DATA body.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BareLineEnding {
    /// Take a bare LF as a line end, drop bare CRs and NULs, and forward
    /// the body re-encoded with CRLF line ends (what most senders meant).
    #[default]
    Normalize,
    /// Refuse the message (`554 5.6.0`) and close the session; the MTA's
    /// connection is closed without an end of data, so nothing is queued.
    Reject,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// `"normalize"` (default) or `"reject"`. Command lines are always
    /// strict: a bare CR, LF or NUL in one gets `500 5.5.2` and is not
    /// forwarded.
    pub bare_line_ending: BareLineEnding,
}

impl SmtpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}
