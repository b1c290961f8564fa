//! `[reject]`: Exchange's `TarpitTime`, a hold on every 5xx reply.
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, delays::check_delay};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RejectConfig {
    /// How long every 5xx reply (the MTA's or the agent's) is held,
    /// counted from when the command arrived. 0 = off; Exchange suggests 30s.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
}

impl Default for RejectConfig {
    fn default() -> Self {
        RejectConfig {
            delay: Duration::ZERO,
        }
    }
}

impl RejectConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_delay("reject.delay", self.delay)
    }
}
