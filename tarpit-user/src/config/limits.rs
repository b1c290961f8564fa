//! `[limits]`: every resource a client can make the agent hold is bounded.
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent sessions in total; more get `421 4.3.2` and are closed.
    pub sessions: usize,
    /// Concurrent sessions per client address (internal and allow-listed
    /// networks are exempt); more get `421 4.7.0 Too many connections`.
    pub per_ip: usize,
    /// Concurrent sessions per IPv6 /64, with the same exemptions and
    /// reply as `per_ip`. A /64 is what one host, one VPS or one customer
    /// line is given, so it is IPv6's "one address": without this cap a
    /// client rotating through its 2^64 addresses holds every session.
    /// Big senders do run many hosts in one /64 (outbound MX farms), so
    /// the default is ten hosts at full `per_ip` (200, 2% of the default
    /// `sessions`): one /64 cannot starve the rest, a farm is not slowed.
    /// 0 = no cap.
    pub per_ipv6_prefix: usize,
    /// Concurrent sessions per IPv4 /24, as `per_ipv6_prefix`. Off (0) by
    /// default: IPv4 addresses are scarce (a /24 holds at most 256 x
    /// `per_ip` anyway), and one /24 is often shared by a provider's whole
    /// outbound farm or by many users behind carrier-grade NAT.
    pub per_ipv4_prefix: usize,
    /// Sessions kept for internal (`allow.internal`) and allow-listed
    /// (`allow.ips`, the kernel allow list) clients: other clients get
    /// `421 4.3.2` once `sessions - reserved_sessions` are open, so a flood
    /// never locks out the site's own relays and partners. Unset: 5% of
    /// `sessions` (500 of the default 10,000). Must be below `sessions`.
    pub reserved_sessions: Option<usize>,
    /// Longest command line in bytes, CRLF included; longer gets
    /// `500 5.5.2 Line too long` (RFC 5321 needs at least 512).
    pub line: usize,
    /// A client silent this long while the agent waits for it gets
    /// `421 4.4.2` and is closed.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Total delay one session can be given; once spent, it gets no more.
    #[serde(with = "humantime_serde")]
    pub max_total_delay: Duration,
    /// Commands a pipelining client may have outstanding before the agent
    /// stops reading from it.
    pub pipeline: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            sessions: 10_000,
            per_ip: 20,
            per_ipv6_prefix: 200,
            per_ipv4_prefix: 0,
            reserved_sessions: None,
            line: 2048,
            idle: Duration::from_secs(300),
            max_total_delay: Duration::from_secs(900),
            pipeline: 100,
        }
    }
}

impl LimitsConfig {
    /// The sessions kept for internal and allow-listed clients
    /// (`reserved_sessions`, or 5% of `sessions` when unset).
    pub fn reserved(&self) -> usize {
        self.reserved_sessions.unwrap_or(self.sessions / 20)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sessions == 0 {
            return Err(ConfigError::invalid(
                "limits.sessions",
                "must be at least 1",
            ));
        }
        if self.per_ip == 0 {
            return Err(ConfigError::invalid("limits.per_ip", "must be at least 1"));
        }
        if let Some(r) = self.reserved_sessions
            && r >= self.sessions
        {
            return Err(ConfigError::invalid(
                "limits.reserved_sessions",
                format!(
                    "must be below limits.sessions ({}): other clients need at least one",
                    self.sessions
                ),
            ));
        }
        if !(512..=65_536).contains(&self.line) {
            return Err(ConfigError::invalid(
                "limits.line",
                "must be from 512 (RFC 5321) to 65536 bytes",
            ));
        }
        if self.idle < Duration::from_secs(1) || self.idle > Duration::from_secs(3600) {
            return Err(ConfigError::invalid("limits.idle", "must be from 1s to 1h"));
        }
        if self.max_total_delay > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "limits.max_total_delay",
                "must be at most 1h",
            ));
        }
        if !(1..=10_000).contains(&self.pipeline) {
            return Err(ConfigError::invalid(
                "limits.pipeline",
                "must be from 1 to 10000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_five_percent_unless_set_and_stays_below_sessions() {
        let mut l = LimitsConfig::default();
        assert_eq!(l.reserved(), 500);
        assert!(l.validate().is_ok());
        l.sessions = 10;
        assert_eq!(l.reserved(), 0, "5% of 10 rounds down");
        l.reserved_sessions = Some(9);
        assert!(l.validate().is_ok());
        assert_eq!(l.reserved(), 9);
        l.reserved_sessions = Some(10);
        let e = l.validate().unwrap_err().to_string();
        assert!(e.contains("limits.reserved_sessions"), "{e}");
    }

    #[test]
    fn prefix_caps_default_to_a_v6_cap_and_no_v4_cap() {
        let l: LimitsConfig = toml::from_str("").unwrap();
        assert_eq!((l.per_ipv6_prefix, l.per_ipv4_prefix), (200, 0));
        let l: LimitsConfig =
            toml::from_str("per_ipv6_prefix = 0\nper_ipv4_prefix = 64\nreserved_sessions = 3")
                .unwrap();
        assert_eq!((l.per_ipv6_prefix, l.per_ipv4_prefix), (0, 64));
        assert_eq!(l.reserved(), 3);
    }
}
