//! `[rcpt]`: SecurityGateway's recipient tarpit.
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, delays::check_delay};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RcptConfig {
    /// RCPT commands in a session that are answered without delay.
    pub threshold: u32,
    /// Delay of the first RCPT after the threshold.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// Linear growth: the k-th delayed RCPT waits
    /// `delay * (1 + (k-1) * (scaling-1))`; 10 s and 1.5 give 10, 15, 20 s.
    pub scaling: f64,
}

impl Default for RcptConfig {
    fn default() -> Self {
        RcptConfig {
            threshold: 5,
            delay: Duration::from_secs(10),
            scaling: 1.0,
        }
    }
}

impl RcptConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_delay("rcpt.delay", self.delay)?;
        if !self.scaling.is_finite() || !(1.0..=100.0).contains(&self.scaling) {
            return Err(ConfigError::invalid(
                "rcpt.scaling",
                "must be a number from 1.0 (flat) to 100.0",
            ));
        }
        Ok(())
    }
}
