//! The state file: allow and block entries added at run time
//! (`tarpit allow|block add`), kept across reboots.
//!
//! The kernel's maps live in bpffs, which survives an agent restart but not
//! a reboot. Every change the command line makes to the allow and block
//! lists is therefore also written here, and the agent puts the unexpired
//! entries back into the kernel when it starts ([`restore`] callers).
//!
//! The file is JSON (readable, diffable, editable in an emergency) and is
//! replaced atomically: the new content goes to a temporary file in the same
//! directory, is fsynced, renamed over the old one, and the directory is
//! fsynced. A crash leaves either the old file or the new one, never half
//! of one. Concurrent writers (two admins, a script) are serialised by an
//! advisory lock on a sibling `.lock` file, so no update is lost.
//!
//! Root writes this file (the command line, the agent at start), so every
//! access goes through [`crate::safe_fs`]: the directory is held open, no
//! name in it is followed if it is a symbolic link, temporary names are
//! unpredictable and created exclusively. A planted link is refused with
//! [`StateError::Refused`], naming it, and nothing is written through it.
//!
//! This file is the format and its safe reads and writes; `restore` puts
//! the entries back into the kernel at start.
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::safe_fs::{SafeDir, SafeFsError};

mod restore;

pub use restore::{RestoreReport, restore, restore_at_start};

/// Version of the file format; a file from a newer tarpit is refused rather
/// than rewritten without the fields this version does not know.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {} is not valid: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "state file {} has format version {found}; this tarpit understands {FORMAT_VERSION} \
         (it was written by a newer tarpit)",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write state file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A symbolic link where the state file, its lock, its temporary file
    /// or its directory should be: someone tried to redirect root's write.
    #[error("state file {}: {source}", path.display())]
    Refused { path: PathBuf, source: SafeFsError },
}

impl StateError {
    /// Tampering (a planted link) rather than damage: the agent refuses
    /// to start on it.
    pub fn is_refused(&self) -> bool {
        matches!(self, StateError::Refused { .. })
    }
}

/// Mode of a new state file: the agent re-reads it on reload, after the
/// privilege drop (`closed_loop::allow_sync`).
const FILE_MODE: u32 = 0o644;
/// Mode of a state directory the command line or the agent creates: the
/// greylist's own directory may live below it and must be reachable by the
/// agent's user.
const DIR_MODE: u32 = 0o755;

/// The error for `path` from a [`SafeFsError`]: a planted link is
/// [`StateError::Refused`], anything else `wrap`'s kind of error.
fn fs_err(
    path: &Path,
    wrap: fn(PathBuf, std::io::Error) -> StateError,
) -> impl Fn(SafeFsError) -> StateError + '_ {
    move |e| {
        if e.is_symlink() {
            StateError::Refused {
                path: path.to_owned(),
                source: e,
            }
        } else {
            wrap(path.to_owned(), e.into())
        }
    }
}

fn read_err(path: PathBuf, source: std::io::Error) -> StateError {
    StateError::Read { path, source }
}

fn write_err(path: PathBuf, source: std::io::Error) -> StateError {
    StateError::Write { path, source }
}

/// A run-time allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    /// Network (host bits zero), e.g. `198.51.100.0/24` or `fd5b:1e00::/64`.
    pub cidr: IpNet,
    /// Unix seconds when it was added.
    pub added_at: u64,
    /// Unix seconds when it expires; `None` = never.
    #[serde(default)]
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// A run-time block-list entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    pub cidr: IpNet,
    pub added_at: u64,
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Drop every port, not only the SMTP ports.
    #[serde(default)]
    pub all_ports: bool,
    /// Hold connections to the SMTP ports in the kernel (zero window, no
    /// socket) instead of dropping them. Absent in older files: drop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    #[serde(default)]
    pub block: Vec<BlockEntry>,
}

/// Unix seconds of a wall-clock time.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Wall-clock time of Unix seconds.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn expired(expires_at: Option<u64>, now: u64) -> bool {
    expires_at.is_some_and(|e| e <= now)
}

impl State {
    pub fn new() -> State {
        State {
            version: FORMAT_VERSION,
            allow: Vec::new(),
            block: Vec::new(),
        }
    }

    /// Reads the file; a missing file is an empty state (nothing was ever
    /// added), an unreadable or malformed one is an error (never silently
    /// dropped, or the next write would lose its entries).
    pub fn load(path: &Path) -> Result<State, StateError> {
        let err = fs_err(path, read_err);
        let dir = match SafeDir::open(parent_dir(path)) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(State::new()),
            Err(e) => return Err(err(e)),
        };
        let Some(bytes) = dir.read(file_name(path)).map_err(&err)? else {
            return Ok(State::new());
        };
        let text = String::from_utf8(bytes).map_err(|_| StateError::Invalid {
            path: path.to_owned(),
            reason: "not UTF-8".into(),
        })?;
        State::parse(&text).map_err(|e| match e {
            ParseError::Version(found) => StateError::Version {
                path: path.to_owned(),
                found,
            },
            ParseError::Json(reason) => StateError::Invalid {
                path: path.to_owned(),
                reason,
            },
        })
    }

    fn parse(text: &str) -> Result<State, ParseError> {
        // The version is checked before the rest, so a newer file with
        // fields this version cannot parse still gets the clear message.
        #[derive(Deserialize)]
        struct Header {
            version: u32,
        }
        let header: Header =
            serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
        if header.version > FORMAT_VERSION || header.version == 0 {
            return Err(ParseError::Version(header.version));
        }
        let mut state: State =
            serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
        for e in &state.allow {
            check_network(&e.cidr).map_err(ParseError::Json)?;
        }
        for e in &state.block {
            check_network(&e.cidr).map_err(ParseError::Json)?;
        }
        state.version = FORMAT_VERSION;
        Ok(state)
    }

    /// Adds or replaces the allow entry for `entry.cidr`.
    pub fn upsert_allow(&mut self, entry: AllowEntry) {
        self.allow.retain(|e| e.cidr != entry.cidr);
        self.allow.push(entry);
        self.allow.sort_by_key(|e| e.cidr);
    }

    /// Adds or replaces the block entry for `entry.cidr`.
    pub fn upsert_block(&mut self, entry: BlockEntry) {
        self.block.retain(|e| e.cidr != entry.cidr);
        self.block.push(entry);
        self.block.sort_by_key(|e| e.cidr);
    }

    /// Removes the allow entry for `cidr`; true if there was one.
    pub fn remove_allow(&mut self, cidr: &IpNet) -> bool {
        let before = self.allow.len();
        self.allow.retain(|e| e.cidr != *cidr);
        self.allow.len() != before
    }

    /// Removes the block entry for `cidr`; true if there was one.
    pub fn remove_block(&mut self, cidr: &IpNet) -> bool {
        let before = self.block.len();
        self.block.retain(|e| e.cidr != *cidr);
        self.block.len() != before
    }

    pub fn allow_entry(&self, cidr: &IpNet) -> Option<&AllowEntry> {
        self.allow.iter().find(|e| e.cidr == *cidr)
    }

    pub fn block_entry(&self, cidr: &IpNet) -> Option<&BlockEntry> {
        self.block.iter().find(|e| e.cidr == *cidr)
    }

    /// Drops the entries that expired before `now` (Unix seconds); returns
    /// how many went.
    pub fn prune_expired(&mut self, now: u64) -> usize {
        let before = self.allow.len() + self.block.len();
        self.allow.retain(|e| !expired(e.expires_at, now));
        self.block.retain(|e| !expired(e.expires_at, now));
        before - self.allow.len() - self.block.len()
    }

    /// Writes the state to `path` atomically (see the module docs).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = fs_err(path, write_err);
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| write_err(path.to_owned(), std::io::Error::other(e)))?;
        text.push('\n');
        let dir = SafeDir::open_or_create(parent_dir(path), DIR_MODE).map_err(&err)?;
        dir.replace(file_name(path), text.as_bytes(), FILE_MODE, None)
            .map_err(&err)
    }
}

enum ParseError {
    Version(u32),
    Json(String),
}

fn check_network(net: &IpNet) -> Result<(), String> {
    if net.trunc() != *net {
        return Err(format!("{net} has host bits set"));
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The file's name in its directory (`state.file` is validated to have
/// one; "state.json" only for a path like "/").
fn file_name(path: &Path) -> &OsStr {
    path.file_name().unwrap_or(OsStr::new("state.json"))
}

/// An exclusive lock on the state file for one read-modify-write cycle.
/// Held until dropped; the lock file itself is left in place (removing it
/// would race with a waiter that already opened it).
pub struct StateLock {
    _file: nix::fcntl::Flock<File>,
}

impl StateLock {
    pub fn acquire(path: &Path) -> Result<StateLock, StateError> {
        let err = fs_err(path, write_err);
        let dir = SafeDir::open_or_create(parent_dir(path), DIR_MODE).map_err(&err)?;
        let mut lock_name = file_name(path).to_owned();
        lock_name.push(".lock");
        let file = dir.open_lock(&lock_name, 0o600).map_err(&err)?;
        // Blocks until granted; released when the descriptor closes.
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| write_err(path.to_owned(), e.into()))?;
        Ok(StateLock { _file: file })
    }
}

/// Loads the state under the lock, lets `f` change it, and saves it if
/// `f` says it changed.
pub fn update<T>(path: &Path, f: impl FnOnce(&mut State) -> T) -> Result<T, StateError> {
    let _lock = StateLock::acquire(path)?;
    let mut state = State::load(path)?;
    let before = state.clone();
    let out = f(&mut state);
    if state != before {
        state.save(path)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
