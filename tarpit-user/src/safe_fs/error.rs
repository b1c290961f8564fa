//! What can go wrong in [`super::SafeDir`], and how an errno becomes a
//! message that names the planted link, if there is one. Apart from the
//! operations so that the refusals read in one place.
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// Why a file operation was refused or failed. Every variant names the
/// full path.
#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error(
        "{} is a symbolic link: refusing to follow it (a link planted there would redirect \
         a privileged write; remove it and check who could create it)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("{} is not a {expected}", path.display())]
    WrongType {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{} has {links} hard links: refusing to change its owner", path.display())]
    HardLinked { path: PathBuf, links: u64 },
    #[error("{} is not a single file name", name.display())]
    BadName { name: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SafeFsError {
    /// A link was found where a file or directory was expected: a sign of
    /// tampering, which callers treat as fatal rather than as damage.
    pub fn is_symlink(&self) -> bool {
        matches!(self, SafeFsError::Symlink { .. })
    }

    /// The file (or directory) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SafeFsError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl From<SafeFsError> for std::io::Error {
    fn from(e: SafeFsError) -> std::io::Error {
        let kind = match &e {
            SafeFsError::Symlink { .. } => std::io::ErrorKind::Other,
            SafeFsError::Io { source, .. } => source.kind(),
            _ => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, e)
    }
}

pub(super) type Result<T> = std::result::Result<T, SafeFsError>;

pub(super) fn io(op: &'static str, path: &Path, e: impl Into<std::io::Error>) -> SafeFsError {
    SafeFsError::Io {
        op,
        path: path.to_owned(),
        source: e.into(),
    }
}

/// Turns an open's errno into an error: ELOOP under `O_NOFOLLOW` or
/// `RESOLVE_NO_SYMLINKS` (and ENOTDIR under `O_DIRECTORY`) mean a link
/// where none may be; the name is looked at again to say so.
pub(super) fn classify(
    path: &Path,
    op: &'static str,
    e: Errno,
    expected: &'static str,
) -> SafeFsError {
    if matches!(e, Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV) {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return SafeFsError::Symlink {
                    path: path.to_owned(),
                };
            }
            Ok(_) if e == Errno::ENOTDIR => {
                return SafeFsError::WrongType {
                    path: path.to_owned(),
                    expected,
                };
            }
            _ => {}
        }
    }
    io(op, path, e)
}
