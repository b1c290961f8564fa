//! The greylist's store: a header naming the site key (by a fingerprint,
//! not the key, [`super::site_key`]), then a log of fixed-width records,
//! one line each, appended with a single `write` by the store's own thread
//! (a crash loses at most a torn last line, which the loader skips),
//! compacted now and then by writing a fresh file and renaming it over the
//! old one (a reader sees the old or the new file). A store in the old
//! format is read through [`super::legacy`].
//!
//! The lines stay a fixed-width text format rather than a serde format
//! (JSON lines): their sizes are the bounds docs/reputation.md states and
//! the tests check (69 and 52 bytes a line; JSON would take 80 to 100),
//! and a store written by an earlier version must keep loading as it is.
//!
//! The store's directory is handed to the agent's user after the privilege
//! drop, so nothing here follows a symbolic link: files are opened with
//! `O_NOFOLLOW` and created with `O_EXCL`.
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::GreyKey;
use super::legacy;
use super::site_key::{SiteKey, key_path, unhex};
use super::table::{GreyTable, Id, NetId, Pending, Record};

/// Why the store or the key could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("greylist store {}: {source}", path.display())]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

pub(super) fn store_err(path: &Path, source: std::io::Error) -> StoreError {
    let source = if source.raw_os_error() == Some(libc::ELOOP) {
        std::io::Error::new(
            source.kind(),
            "is a symbolic link: refused (nothing is read or written through it)",
        )
    } else {
        source
    };
    StoreError {
        path: path.to_owned(),
        source,
    }
}

/// The first line of a store in the current format, before the key's
/// fingerprint.
const MAGIC: &str = "tarpit-greylist 2";

/// Bytes of the header line, and of each record line (fixed width):
/// docs/reputation.md states them.
pub const HEADER_BYTES: usize = 35;
pub const PENDING_BYTES: usize = 69;
pub const KNOWN_BYTES: usize = 52;

/// Lines longer than this are not records of any format (a corrupt file
/// must not make the loader allocate without bound).
const MAX_LINE: u64 = 16 * 1024;

/// Opens an existing regular file for reading, never through a symlink;
/// `None` if there is none.
pub(super) fn open_read(path: &Path) -> std::io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => {
            if !f.metadata()?.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            Ok(Some(f))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates a new file (mode 0600); fails if the name exists in any form,
/// a symlink included.
pub(super) fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

fn header(key: &SiteKey) -> String {
    format!("{MAGIC} {:016x}\n", key.fingerprint())
}

pub fn record_line(r: &Record) -> String {
    match r {
        Record::Pending { id, p } => {
            format!("P {:016x} {:016x} {}\n", p.first, p.net, hex::encode(id))
        }
        Record::Known { id, until } => format!("A {until:016x} {}\n", hex::encode(id)),
    }
}

fn parse_record(line: &str) -> Option<Record> {
    let f: Vec<&str> = line.split(' ').collect();
    let num = |s: &str| (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok())?;
    match f.as_slice() {
        ["P", first, net, id] => Some(Record::Pending {
            id: unhex(id)?,
            p: Pending {
                first: num(first)?,
                net: num(net)?,
            },
        }),
        ["A", until, id] => Some(Record::Known {
            id: unhex(id)?,
            until: num(until)?,
        }),
        _ => None,
    }
}

/// What [`load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No store, or an empty one.
    Nothing,
    /// The current format under this site's key.
    Current,
    /// The old format: its keys were hashed (a migration).
    Legacy,
    /// The current format under another key: its entries mean nothing
    /// here and were dropped.
    OtherKey,
}

/// Calls `f` with each line of `r` (without its end), skipping (and
/// counting) lines that are too long or not text.
fn for_each_line(r: impl Read, mut f: impl FnMut(&str)) -> std::io::Result<usize> {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    let mut skipped = 0;
    loop {
        buf.clear();
        let n = (&mut r).take(MAX_LINE).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(skipped);
        }
        if buf.last() != Some(&b'\n') && n as u64 == MAX_LINE {
            // Too long: skip to the end of the line.
            skipped += 1;
            loop {
                buf.clear();
                let n = (&mut r).take(MAX_LINE).read_until(b'\n', &mut buf)?;
                if n == 0 || buf.last() == Some(&b'\n') {
                    break;
                }
            }
            continue;
        }
        match std::str::from_utf8(&buf) {
            Ok(s) => f(s.trim_end_matches(['\n', '\r'])),
            Err(_) => skipped += 1,
        }
    }
}

/// Loads the store at `path` into `table`, in either format; `hash` turns
/// an old-format key into its id and network. Torn and foreign lines are
/// skipped (a crash mid-append leaves at most one).
pub fn load(
    path: &Path,
    key: &SiteKey,
    table: &mut GreyTable,
    hash: impl Fn(&GreyKey) -> (Id, NetId),
) -> Result<Found, StoreError> {
    let Some(f) = open_read(path).map_err(|e| store_err(path, e))? else {
        return Ok(Found::Nothing);
    };
    let want = header(key);
    let want = want.trim_end();
    let mut found = Found::Nothing;
    let mut skipped = 0usize;
    let mut newer = false;
    let skipped_lines = for_each_line(f, |line| {
        if found == Found::Nothing {
            if line == want {
                found = Found::Current;
                return;
            } else if line.starts_with(MAGIC) {
                found = Found::OtherKey;
                return;
            } else if line.starts_with("tarpit-greylist ") {
                newer = true;
                found = Found::OtherKey;
                return;
            }
            found = Found::Legacy;
        }
        match found {
            Found::Current => match parse_record(line) {
                Some(r) => table.restore(r),
                None => skipped += 1,
            },
            Found::Legacy => match legacy::parse_line(line) {
                Some((k, e)) => {
                    let (id, net) = hash(&k);
                    table.restore(match e {
                        legacy::Entry::Pending { first } => Record::Pending {
                            id,
                            p: Pending { first, net },
                        },
                        legacy::Entry::Passed { until } => Record::Known { id, until },
                    });
                }
                None => skipped += 1,
            },
            Found::OtherKey | Found::Nothing => {}
        }
    })
    .map_err(|e| store_err(path, e))?;
    if newer {
        return Err(store_err(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "written by a newer tarpit (unknown format): not touched",
            ),
        ));
    }
    skipped += skipped_lines;
    if skipped > 0 {
        tracing::warn!(path = %path.display(), skipped, "greylist store: unreadable lines skipped");
    }
    if found == Found::OtherKey {
        tracing::warn!(
            path = %path.display(),
            key = %key_path(path).display(),
            "greylist store written under another site key: its entries are dropped"
        );
    }
    Ok(found)
}

/// Writes `records` to a new file beside `path` (created with `O_EXCL`,
/// never through a symlink), syncs it and renames it over the store.
pub fn compact(path: &Path, key: &SiteKey, records: &[Record]) -> Result<(), StoreError> {
    replace(path, |f| {
        f.write_all(header(key).as_bytes())?;
        for r in records {
            f.write_all(record_line(r).as_bytes())?;
        }
        Ok(())
    })
}

/// Replaces the file at `path` atomically with what `write` writes: a new
/// file beside it (mode 0600, created with `O_EXCL`, never through a
/// symlink), synced, renamed over it, the directory synced.
pub(super) fn replace(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let file = match create_new(&tmp) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by a crash, or planted: unlinking never follows a link.
            std::fs::remove_file(&tmp).map_err(|e| store_err(&tmp, e))?;
            create_new(&tmp).map_err(|e| store_err(&tmp, e))?
        }
        Err(e) => return Err(store_err(&tmp, e)),
    };
    let all = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(file);
        write(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    };
    all().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        store_err(path, e)
    })
}

/// Opens the store for appending, never through a symlink.
pub fn open_append(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| store_err(path, e))
}

pub enum Msg {
    /// A key's new state, and the time of the check (for expiry).
    Put(Record, u64),
    /// Acknowledged once everything sent before is written.
    Flush(std::sync::mpsc::Sender<()>),
    /// The site key changed (taken from the cluster): the store is
    /// rewritten under it with what the table holds now.
    Rekey(SiteKey, u64),
}

/// Queued writes at most (fixed-size records: under 4 MiB); beyond, a
/// change is kept in memory only (the store is a memory aid, never a
/// reason to hold a session).
pub const WRITE_QUEUE: usize = 65_536;

/// The store's own thread: appends each change with one `write`, and
/// compacts from the table itself when the log holds more than twice the
/// live entries (so the file stays within 2 x entries + 1000 lines).
pub struct Writer {
    pub path: PathBuf,
    pub key: SiteKey,
    pub file: File,
    /// Lines in the file, and live entries at the last look.
    pub lines: usize,
    pub live: usize,
    pub table: Arc<Mutex<GreyTable>>,
}

impl Writer {
    pub fn run(mut self, rx: std::sync::mpsc::Receiver<Msg>) {
        for msg in rx {
            match msg {
                Msg::Put(r, now) => {
                    if let Err(err) = self.put(&r, now) {
                        tracing::warn!(error = %err, "greylist store not written");
                    }
                }
                Msg::Flush(ack) => {
                    let _ = ack.send(());
                }
                Msg::Rekey(key, now) => {
                    self.key = key;
                    if let Err(err) = self.compact(now) {
                        tracing::warn!(error = %err, "greylist store not rewritten under the new key");
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GreyTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put(&mut self, r: &Record, now: u64) -> Result<(), StoreError> {
        self.file
            .write_all(record_line(r).as_bytes())
            .map_err(|err| store_err(&self.path, err))?;
        self.lines += 1;
        if self.lines > 2 * self.live + 1000 {
            let live = self.lock().len();
            self.live = live;
        }
        if self.lines > 2 * self.live + 1000 {
            self.compact(now)?;
        }
        Ok(())
    }

    /// Rewrites the store from the table.
    fn compact(&mut self, now: u64) -> Result<(), StoreError> {
        let records = {
            let mut t = self.lock();
            t.sweep(now);
            t.records()
        };
        compact(&self.path, &self.key, &records)?;
        self.lines = records.len();
        self.live = records.len();
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::site_key::load_or_create_key;
    use super::*;

    #[test]
    fn record_lines_have_the_documented_fixed_width_and_round_trip() {
        let key = SiteKey::from_bytes([7; 16]);
        assert_eq!(header(&key).len(), HEADER_BYTES);
        let p = Record::Pending {
            id: [0xab; 16],
            p: Pending {
                first: u64::MAX,
                net: 1,
            },
        };
        let k = Record::Known {
            id: [1; 16],
            until: 0,
        };
        assert_eq!(record_line(&p).len(), PENDING_BYTES);
        assert_eq!(record_line(&k).len(), KNOWN_BYTES);
        for r in [p, k] {
            assert_eq!(parse_record(record_line(&r).trim_end()), Some(r));
        }
        assert_eq!(parse_record("A 12 abab"), None);
        assert_eq!(parse_record(&record_line(&k)[..30]), None, "torn line");
    }

    fn tempdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tarpit-greystore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn symlinks_are_refused_and_their_targets_untouched() {
        let dir = tempdir("symlink");
        let target = dir.join("target");
        std::fs::write(&target, "precious\n").unwrap();
        // At the key's name: refused, named, nothing written.
        let key = dir.join("greylist.key");
        std::os::unix::fs::symlink(&target, &key).unwrap();
        let e = load_or_create_key(&key).unwrap_err().to_string();
        assert!(
            e.contains("greylist.key") && e.contains("symbolic link"),
            "{e}"
        );
        // At the store's name: refused for reading and appending.
        let store = dir.join("greylist.db");
        std::os::unix::fs::symlink(&target, &store).unwrap();
        let k = SiteKey::from_bytes([1; 16]);
        let mut t = GreyTable::new(super::super::table::Limits {
            windows: super::super::table::Windows {
                min_wait: 1,
                retry_window: 2,
                pass_ttl: 3,
            },
            max_pending: 1,
            max_known: 1,
            per_network: 1,
        });
        assert!(load(&store, &k, &mut t, |_| ([0; 16], 0)).is_err());
        assert!(open_append(&store).is_err());
        // At the compaction's temporary name: replaced, not followed.
        let real = dir.join("real.db");
        let tmp_real = dir.join(format!(".real.db.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp_real).unwrap();
        compact(&real, &k, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        assert!(std::fs::symlink_metadata(&real).unwrap().is_file());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
