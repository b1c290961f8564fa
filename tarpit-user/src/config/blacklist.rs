//! `[blacklist]`: Vamsoft ORF's tarpit delay for blacklisted senders.
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    ConfigError,
    delays::{check_delay, check_patterns},
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlacklistConfig {
    /// Delay of each reply from MAIL FROM on (MAIL, RCPT, DATA, end of
    /// data, BDAT), counted from when the command arrived. At most 600s.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Client networks that are blacklisted.
    pub ips: Vec<IpNet>,
    /// Envelope sender patterns (`*` and `?`, case-insensitive), e.g.
    /// `*@spam.example`; the null sender is written `<>`.
    pub senders: Vec<String>,
    /// HELO/EHLO name patterns, e.g. `*.dynamic.example`.
    pub helos: Vec<String>,
}

impl Default for BlacklistConfig {
    fn default() -> Self {
        BlacklistConfig {
            delay: Duration::from_secs(60),
            ips: Vec::new(),
            senders: Vec::new(),
            helos: Vec::new(),
        }
    }
}

impl BlacklistConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_delay("blacklist.delay", self.delay)?;
        check_patterns("blacklist.senders", &self.senders)?;
        check_patterns("blacklist.helos", &self.helos)
    }
}
