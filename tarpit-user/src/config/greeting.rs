//! `[greeting]`: qmail's `GREETDELAY` and `DROP_PRE_GREET`, postscreen's teaser.
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, delays::check_delay};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreetingConfig {
    /// How long the banner is held. The backend MTA is only connected after
    /// it, so clients waiting here cost the MTA nothing.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// A client that sends anything before the banner gets
    /// `554 5.5.1 SMTP protocol violation` and is disconnected.
    pub drop_pre_greet: bool,
    /// When set, a `220-<teaser>` line is sent at once and the real banner
    /// (the MTA's) ends the multi-line greeting after the delay, like
    /// postscreen's `postscreen_greet_banner`: bots that answer the first
    /// line talk before the final `220 ` and are caught.
    pub teaser: Option<String>,
}

impl Default for GreetingConfig {
    fn default() -> Self {
        GreetingConfig {
            delay: Duration::from_secs(5),
            drop_pre_greet: true,
            teaser: None,
        }
    }
}

impl GreetingConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_delay("greeting.delay", self.delay)?;
        if let Some(t) = &self.teaser
            && (t.len() > 400 || t.chars().any(|c| c.is_control()))
        {
            return Err(ConfigError::invalid(
                "greeting.teaser",
                "must be at most 400 characters without control characters",
            ));
        }
        Ok(())
    }
}
