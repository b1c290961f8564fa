//! `[allow]` and `[exclude]`: who is never tarpitted.
use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, delays::check_patterns};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowConfig {
    /// Allow-listed client networks: no delay and no pre-greet drop (when
    /// `exclude.allowlisted` is on).
    pub ips: Vec<IpNet>,
    /// The site's own networks (intranet, intermediate relays): treated as
    /// allow-listed by every rule, whatever `[exclude]` says, and never
    /// blacklisted.
    pub internal: Vec<IpNet>,
    /// Senders that skip the blacklist delay: callout-verification probes
    /// (Postfix `double-bounce@...`, Exim's null sender `<>`).
    pub callout_senders: Vec<String>,
    /// Allow-listed host names: exact (`mx.partner.example`) or `*.suffix`,
    /// matched against the client's forward-confirmed PTR name (FCrDNS).
    pub hosts: Vec<super::HostPattern>,
}

impl Default for AllowConfig {
    fn default() -> Self {
        AllowConfig {
            ips: Vec::new(),
            internal: vec![
                "127.0.0.0/8".parse().expect("literal"),
                "::1/128".parse().expect("literal"),
            ],
            callout_senders: vec!["<>".to_string(), "double-bounce@*".to_string()],
            hosts: Vec::new(),
        }
    }
}

impl AllowConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_patterns("allow.callout_senders", &self.callout_senders)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExcludeConfig {
    /// Allow-listed clients (`allow.ips`) are not tarpitted.
    pub allowlisted: bool,
    /// Sessions that authenticated (the MTA answered 235 to AUTH) are not
    /// tarpitted from then on. Only visible when the agent sees the session
    /// in clear: plaintext, or TLS terminated by the agent (`[tls]`).
    pub authenticated: bool,
}

impl Default for ExcludeConfig {
    fn default() -> Self {
        ExcludeConfig {
            allowlisted: true,
            authenticated: true,
        }
    }
}
