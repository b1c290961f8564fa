//! Shared checks for the duration keys of the tarpit policies.
use std::time::Duration;

use super::ConfigError;

/// No single delay may exceed this (Vamsoft ORF's cap): a longer hold only
/// makes legitimate senders that landed on a list time out, and makes the
/// MTA behind the agent hit its own command timeout.
pub const MAX_DELAY: Duration = Duration::from_secs(600);

/// Refuses a delay above [`MAX_DELAY`], naming the key.
pub fn check_delay(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d > MAX_DELAY {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{} is more than the maximum of 600s",
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(())
}

/// Checks a `*`/`?` glob used for senders and HELO names.
pub fn check_patterns(key: &str, patterns: &[String]) -> Result<(), ConfigError> {
    for p in patterns {
        if p.trim().is_empty() {
            return Err(ConfigError::invalid(key, "empty pattern"));
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::invalid(
                key,
                format!("{p:?} contains white space or control characters"),
            ));
        }
    }
    Ok(())
}
