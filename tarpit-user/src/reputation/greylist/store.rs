//! The greylist's files: the site key, the store, and the reader of the
//! old store format.
//!
//! - **Site key** (`greylist.key` next to `greylist.db`): 16 random bytes in
//!   hex, created 0600 at the first start and never rewritten. Every key of
//!   the store is a keyed hash under it, so the store holds no address and
//!   an outsider cannot aim collisions at it. One key per site: MX hosts
//!   that share a greylist share the key ([`load_or_create_key`] is the
//!   one place that reads or makes it).
//! - **Store**: a header naming the key (by a fingerprint, not the key),
//!   then a log of fixed-width records, one line each, appended with a
//!   single `write` (a crash loses at most a torn last line, which the
//!   loader skips), compacted now and then by writing a fresh file and
//!   renaming it over the old one (a reader sees the old or the new file).
//! - **Old format** (raw sender and recipient, before the keys were
//!   hashed): read once, at the first start after an upgrade, hashed with
//!   the site key and written back in the new format, so nobody is
//!   greylisted again because of the upgrade.
//!
//! The store's directory is handed to the agent's user after the privilege
//! drop, so nothing here follows a symbolic link: files are opened with
//! `O_NOFOLLOW` and created with `O_EXCL`.
use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use siphasher::sip128::{Hasher128, SipHasher24};

use super::GreyKey;
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

/// The site's secret: keys of the store are SipHash-2-4 under it.
#[derive(Clone)]
pub struct SiteKey([u8; 16]);

impl std::fmt::Debug for SiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SiteKey({:016x})", self.fingerprint())
    }
}

impl SiteKey {
    pub fn from_bytes(b: [u8; 16]) -> Self {
        SiteKey(b)
    }

    /// A 128-bit hash of `parts`, each length-prefixed (so no two lists of
    /// parts hash alike by construction), under a one-byte domain `tag`.
    pub fn hash128(&self, tag: u8, parts: &[&[u8]]) -> Id {
        let mut h = SipHasher24::new_with_key(&self.0);
        h.write(&[tag]);
        for p in parts {
            h.write(&(p.len() as u64).to_le_bytes());
            h.write(p);
        }
        h.finish128().as_bytes()
    }

    pub fn hash64(&self, tag: u8, parts: &[&[u8]]) -> u64 {
        let b = self.hash128(tag, parts);
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[..8]);
        u64::from_le_bytes(x)
    }

    /// Names the key in the store's header without revealing it: a store
    /// written under another key is recognised as such.
    pub fn fingerprint(&self) -> u64 {
        self.hash64(b'f', &[])
    }

    fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The key file of a store: `greylist.key` for `greylist.db`.
pub fn key_path(store: &Path) -> PathBuf {
    store.with_extension("key")
}

/// Opens an existing regular file for reading, never through a symlink;
/// `None` if there is none.
fn open_read(path: &Path) -> std::io::Result<Option<File>> {
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
fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// Reads the site key at `path`, or makes one (random, 0600) if there is
/// none. The one place the key is read or written: sharing it between MX
/// hosts later changes only this.
pub fn load_or_create_key(path: &Path) -> Result<SiteKey, StoreError> {
    let err = |e| store_err(path, e);
    let bad = |what: &str| {
        store_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
        )
    };
    for _ in 0..2 {
        if let Some(f) = open_read(path).map_err(err)? {
            let mut text = String::new();
            f.take(256).read_to_string(&mut text).map_err(err)?;
            let k = unhex::<16>(text.trim())
                .ok_or_else(|| bad("not a greylist key (32 hex digits)"))?;
            return Ok(SiteKey(k));
        }
        let mut k = [0u8; 16];
        fill_random(&mut k).map_err(err)?;
        let key = SiteKey(k);
        match create_new(path) {
            Ok(mut f) => {
                f.write_all(format!("{}\n", key.to_hex()).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(err)?;
                sync_dir(path);
                tracing::info!(path = %path.display(), "greylist: new site key created");
                return Ok(key);
            }
            // Made by someone else meanwhile: read theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(bad("appears and disappears"))
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

fn header(key: &SiteKey) -> String {
    format!("{MAGIC} {:016x}\n", key.fingerprint())
}

pub fn record_line(r: &Record) -> String {
    match r {
        Record::Pending { id, p } => format!("P {:016x} {:016x} {}\n", p.first, p.net, hex(id)),
        Record::Known { id, until } => format!("A {until:016x} {}\n", hex(id)),
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

/// The old format: `P first KEY` / `A until KEY` with KEY `t NET SENDER
/// RCPT` (percent-encoded, `<>` for the null sender) or `c IP`.
pub mod legacy {
    use super::super::GreyKey;

    /// An entry of the old store.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Entry {
        Pending { first: u64 },
        Passed { until: u64 },
    }

    fn decode_field(s: &str) -> Option<String> {
        if s == "<>" {
            return Some(String::new());
        }
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    fn decode_key(fields: &[&str]) -> Option<GreyKey> {
        match fields {
            ["t", net, sender, rcpt] => Some(GreyKey::Triplet {
                net: net.parse().ok()?,
                sender: decode_field(sender)?,
                rcpt: decode_field(rcpt)?,
            }),
            ["c", ip] => Some(GreyKey::Client(ip.parse().ok()?)),
            _ => None,
        }
    }

    /// One line of the old store.
    pub fn parse_line(line: &str) -> Option<(GreyKey, Entry)> {
        let fields: Vec<&str> = line.split(' ').collect();
        let (kind, t, rest) = (fields.first()?, fields.get(1)?, fields.get(2..)?);
        let t: u64 = t.parse().ok()?;
        let key = decode_key(rest)?;
        let e = match *kind {
            "P" => Entry::Pending { first: t },
            "A" => Entry::Passed { until: t },
            _ => return None,
        };
        Some((key, e))
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
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(file);
        f.write_all(header(key).as_bytes())?;
        for r in records {
            f.write_all(record_line(r).as_bytes())?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    };
    write().map_err(|e| {
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
            let records = {
                let mut t = self.lock();
                t.sweep(now);
                t.records()
            };
            compact(&self.path, &self.key, &records)?;
            self.lines = records.len();
            self.live = records.len();
            self.file = open_append(&self.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lines_have_the_documented_fixed_width_and_round_trip() {
        let key = SiteKey([7; 16]);
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

    #[test]
    fn old_lines_parse() {
        let (k, e) = legacy::parse_line("P 5 t fd5b:1e00::/64 we%25ird%20%3cx%3e@a b@t").unwrap();
        assert_eq!(e, legacy::Entry::Pending { first: 5 });
        assert_eq!(
            k,
            GreyKey::Triplet {
                net: "fd5b:1e00::/64".parse().unwrap(),
                sender: "we%ird <x>@a".into(),
                rcpt: "b@t".into()
            }
        );
        assert!(legacy::parse_line("A 7 c 198.51.100.1").is_some());
        assert!(legacy::parse_line("A 12 t 198.51.100.0/24 a@x").is_none());
    }

    fn tempdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tarpit-greystore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_is_created_0600_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir("key");
        let p = key_path(&dir.join("greylist.db"));
        assert_eq!(p, dir.join("greylist.key"));
        let a = load_or_create_key(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(a.0, b.0);
        assert_ne!(a.0, [0; 16]);
        std::fs::write(&p, "nonsense\n").unwrap();
        assert!(load_or_create_key(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
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
        let k = SiteKey([1; 16]);
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
