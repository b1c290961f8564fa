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
            line: 2048,
            idle: Duration::from_secs(300),
            max_total_delay: Duration::from_secs(900),
            pipeline: 100,
        }
    }
}

impl LimitsConfig {
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
