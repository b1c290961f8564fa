//! `[helo]`: SecurityGateway's EHLO/HELO delay.
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, delays::check_delay};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeloConfig {
    /// How long the reply to HELO/EHLO is held (0 = off).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// An address that authenticated (the MTA answered 235 to AUTH) pays
    /// the HELO delay at most once per 24 hours.
    pub authenticated_once_per_day: bool,
}

impl Default for HeloConfig {
    fn default() -> Self {
        HeloConfig {
            delay: Duration::ZERO,
            authenticated_once_per_day: false,
        }
    }
}

impl HeloConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_delay("helo.delay", self.delay)
    }
}
