//! `[state]`: where run-time allow and block entries are kept across
//! reboots.
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Default location of the state file.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/tarpit/state.json";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// JSON file of the allow and block entries added at run time with
    /// `tarpit allow|block add`. Written atomically by the command line;
    /// read by the agent at start, which puts every unexpired entry back
    /// into the kernel (the kernel's maps do not survive a reboot).
    pub file: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            file: PathBuf::from(DEFAULT_STATE_FILE),
        }
    }
}

impl StateConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.file.is_absolute() {
            return Err(ConfigError::invalid(
                "state.file",
                "must be an absolute path",
            ));
        }
        if self.file.file_name().is_none() {
            return Err(ConfigError::invalid(
                "state.file",
                "must name a file, not a directory",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_directory_paths_are_refused() {
        let rel = StateConfig {
            file: PathBuf::from("state.json"),
        };
        assert!(
            rel.validate()
                .unwrap_err()
                .to_string()
                .contains("state.file")
        );
        let dir = StateConfig {
            file: PathBuf::from("/var/lib/tarpit/.."),
        };
        assert!(dir.validate().is_err());
        assert!(StateConfig::default().validate().is_ok());
    }
}
