//! `[state]`: where run-time allow and block entries are kept across
//! reboots.
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, GreylistConfig, GreylistMode};

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

    /// The greylist store's directory is handed to `daemon.user`; root
    /// writes the state file (and the pid file) into theirs. Sharing one
    /// (or the greylist's being above the state's) would let the
    /// unprivileged agent plant links where root writes.
    pub fn validate_with(
        &self,
        greylist: &GreylistConfig,
        pid_file: Option<&Path>,
    ) -> Result<(), ConfigError> {
        if greylist.mode == GreylistMode::Off {
            return Ok(());
        }
        let Some(grey_dir) = greylist.store.parent().map(normal) else {
            return Ok(());
        };
        let roots = [
            ("state.file", Some(self.file.as_path())),
            ("daemon.pid_file", pid_file),
        ];
        for (key, file) in roots {
            let Some(dir) = file.and_then(Path::parent).map(normal) else {
                continue;
            };
            if dir.starts_with(&grey_dir) {
                let reason = format!(
                    "must be in a directory of its own: {} is handed to daemon.user, and \
                     root writes {key} ({}) {} (e.g. store = \"{}\")",
                    grey_dir.display(),
                    file.map(Path::display)
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                    if dir == grey_dir {
                        "into it"
                    } else {
                        "below it"
                    },
                    super::DEFAULT_GREYLIST_STORE,
                );
                return Err(ConfigError::invalid("greylist.store", reason));
            }
        }
        Ok(())
    }
}

/// `path` without `.` components and repeated separators, for comparing
/// directories as written (both are absolute; links are compared at start,
/// by device and inode, in `ops::privileges`).
fn normal(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
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

    fn greylist(store: &str) -> GreylistConfig {
        GreylistConfig {
            mode: GreylistMode::Triplet,
            store: PathBuf::from(store),
            ..GreylistConfig::default()
        }
    }

    #[test]
    fn greylist_store_must_have_a_directory_of_its_own() {
        let state = StateConfig::default();
        // the defaults are apart
        state
            .validate_with(&GreylistConfig::default(), None)
            .unwrap();
        state
            .validate_with(&greylist(super::super::DEFAULT_GREYLIST_STORE), None)
            .unwrap();
        // the old default: the state's own directory
        for store in [
            "/var/lib/tarpit/greylist.db",
            "/var/lib/tarpit/./greylist.db",
            "/var/lib/g.db",
        ] {
            let e = state.validate_with(&greylist(store), None).unwrap_err();
            assert_eq!(e.key(), Some("greylist.store"), "{store}: {e}");
            assert!(e.to_string().contains("state.file"), "{e}");
            assert!(e.to_string().contains("daemon.user"), "{e}");
        }
        // off: the path is not used
        let mut off = greylist("/var/lib/tarpit/greylist.db");
        off.mode = GreylistMode::Off;
        state.validate_with(&off, None).unwrap();
        // the pid file's directory too
        let e = state
            .validate_with(
                &greylist("/run/tarpit/g.db"),
                Some(Path::new("/run/tarpit/tarpit.pid")),
            )
            .unwrap_err();
        assert!(e.to_string().contains("daemon.pid_file"), "{e}");
        // and through the whole config, as check-config sees it
        let e = crate::config::Config::parse(
            "[greylist]\nmode = \"triplet\"\nstore = \"/srv/t/g.db\"\n[state]\nfile = \"/srv/t/state.json\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("greylist.store"), "{e}");
    }
}
