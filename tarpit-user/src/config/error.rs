use std::path::{Path, PathBuf};

/// Why a configuration was refused. The message always names the key (as a
/// dotted path, e.g. `kernel.smtp_ports`) or the line, and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{message}", file_prefix(file))]
    Syntax {
        file: Option<PathBuf>,
        message: String,
    },
    #[error("{}{key}: {reason}", file_prefix(file))]
    Invalid {
        file: Option<PathBuf>,
        key: String,
        reason: String,
    },
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

impl ConfigError {
    /// A value that parsed but is not acceptable.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: None,
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(super) fn from_toml(e: toml::de::Error) -> Self {
        // toml's message already carries the line, the column and the key.
        ConfigError::Syntax {
            file: None,
            message: e.to_string().trim_end().to_string(),
        }
    }

    /// Adds the file name to an error about its contents.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                file: Some(path.to_owned()),
                message,
            },
            ConfigError::Invalid { key, reason, .. } => ConfigError::Invalid {
                file: Some(path.to_owned()),
                key,
                reason,
            },
            other => other,
        }
    }

    /// The dotted key path, when the error is about one value.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
