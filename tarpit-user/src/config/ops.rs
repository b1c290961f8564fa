//! `[log]` and `[daemon]`: how the agent runs as a service - its log
//! format and flood limit, the user it drops to, its pid file and how long
//! a stop may take.
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Longest `daemon.shutdown_timeout` accepted: systemd's stop timeout in
/// the shipped unit (`TimeoutStopSec`) must stay above it.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, like postscreen's (the default).
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "human" or "json". Changing it needs a restart.
    pub format: LogFormat,
    /// A tracing filter ("info", "warn,tarpit::session=info", ...).
    /// `RUST_LOG` in the environment wins over it. Reloadable.
    pub level: String,
    /// Most lines per second the per-session log may write (bursts up to
    /// the same number); the rest are counted and reported as
    /// "N log lines dropped". 0 = no limit. Lines about the agent itself
    /// (start, reload, stop, kernel) are never dropped. Reloadable.
    pub rate_limit: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".to_string(),
            rate_limit: 100,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("not a tracing filter: {e}"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// After binding its ports and loading the kernel programs, the agent
    /// switches to this user and keeps only the capabilities it still needs
    /// (see docs/operations.md). Unset = keep running as started (root).
    pub user: Option<String>,
    /// Group to switch to; unset = the user's primary group.
    pub group: Option<String>,
    /// File that holds the agent's process id, for `tarpit reload`.
    /// Unset = none.
    pub pid_file: Option<PathBuf>,
    /// On SIGTERM: how long sessions already talking to the MTA may take
    /// to finish before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            user: None,
            group: None,
            pid_file: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl DaemonConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, name) in [("daemon.user", &self.user), ("daemon.group", &self.group)] {
            if let Some(name) = name
                && !valid_account_name(name)
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("{name:?} is not a user or group name (or numeric id)"),
                ));
            }
        }
        if self.group.is_some() && self.user.is_none() {
            return Err(ConfigError::invalid(
                "daemon.group",
                "set daemon.user too: the group alone does not drop root's capabilities",
            ));
        }
        if let Some(p) = &self.pid_file
            && (!p.is_absolute() || p.file_name().is_none())
        {
            return Err(ConfigError::invalid(
                "daemon.pid_file",
                "must be an absolute path to a file",
            ));
        }
        if self.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(ConfigError::invalid(
                "daemon.shutdown_timeout",
                format!(
                    "at most {} (systemd's stop timeout must stay above it)",
                    humantime::format_duration(MAX_SHUTDOWN_TIMEOUT)
                ),
            ));
        }
        Ok(())
    }
}

/// Names as useradd accepts them (plus numeric ids): no spaces, colons or
/// slashes that would make a lookup mean something else.
fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::Config;

    #[test]
    fn shipped_config_documents_every_key() {
        let text = include_str!("../../../config/tarpit.toml");
        let log = text.split("\n[log]\n").nth(1).expect("[log] section");
        for key in ["format", "level", "rate_limit"] {
            assert!(log.contains(&format!("\n{key} = ")), "log.{key}");
        }
        let daemon = text.split("\n[daemon]\n").nth(1).expect("[daemon] section");
        for key in ["user", "group", "pid_file", "shutdown_timeout"] {
            assert!(daemon.contains(&format!("{key} = ")), "daemon.{key}");
        }
        let c = Config::parse(text).unwrap();
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.daemon, DaemonConfig::default());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[log]\nlevel = \"info,,=[\"\n", "log.level"),
            ("[daemon]\nuser = \"a b\"\n", "daemon.user"),
            ("[daemon]\ngroup = \"mail\"\n", "daemon.group"),
            ("[daemon]\npid_file = \"run/x.pid\"\n", "daemon.pid_file"),
            (
                "[daemon]\nshutdown_timeout = \"11m\"\n",
                "daemon.shutdown_timeout",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
        }
        let e = Config::parse("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
        let c = Config::parse(
            "[log]\nformat = \"json\"\nrate_limit = 0\n[daemon]\nuser = \"nobody\"\n",
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.daemon.user.as_deref(), Some("nobody"));
    }

    #[test]
    fn account_names() {
        for ok in ["tarpit", "_tarpit", "nobody", "65534", "mail-in", "a.b"] {
            assert!(valid_account_name(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "a:b", "../x", &"x".repeat(33)] {
            assert!(!valid_account_name(bad), "{bad}");
        }
    }
}
