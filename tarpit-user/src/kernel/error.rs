//! Errors of the pinned-map handle: what a caller (agent, CLI) must tell
//! apart - no maps at all, maps from another tarpit, a full map, no rights.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Nothing pinned where the config says.
    #[error(
        "no tarpit maps at {}; start the agent with `tarpit run`",
        path.display()
    )]
    NoMaps { path: PathBuf },
    /// Maps from another tarpit version (or something else entirely).
    #[error(
        "the maps at {} have another layout ({detail}); this tarpit reads layout {expected}: \
         stop the agent and run `tarpit detach` to remove them (their state is lost)",
        path.display()
    )]
    LayoutMismatch {
        path: PathBuf,
        expected: u32,
        detail: String,
    },
    /// The map has no room for another entry.
    #[error("the {map} map is full ({capacity} entries); remove entries or raise kernel.{key}")]
    MapFull {
        map: &'static str,
        key: &'static str,
        capacity: u32,
    },
    /// Not allowed to use bpf(2).
    #[error("{what}: permission denied (needs root or CAP_BPF)")]
    PermissionDenied { what: String },
    /// A value the caller gave that cannot be stored.
    #[error("{0}")]
    Invalid(String),
    /// Any other failure of a map operation.
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl KernelError {
    /// Classifies an aya map error: permission and "full" errors get their
    /// own variants.
    pub(crate) fn from_map(
        what: impl Into<String>,
        source: aya::maps::MapError,
        full: Option<(&'static str, &'static str, u32)>,
    ) -> KernelError {
        let what = what.into();
        if let Some(errno) = map_errno(&source) {
            if errno == libc::EPERM || errno == libc::EACCES {
                return KernelError::PermissionDenied { what };
            }
            if (errno == libc::E2BIG || errno == libc::ENOSPC || errno == libc::ENOMEM)
                && let Some((map, key, capacity)) = full
            {
                return KernelError::MapFull { map, key, capacity };
            }
        }
        KernelError::Map { what, source }
    }
}

/// The errno inside an aya map error, if it came from a syscall.
pub(crate) fn map_errno(e: &aya::maps::MapError) -> Option<i32> {
    use aya::maps::MapError;
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        MapError::PinError {
            error: aya::pin::PinError::SyscallError(s),
            ..
        } => s.io_error.raw_os_error(),
        _ => None,
    }
}
