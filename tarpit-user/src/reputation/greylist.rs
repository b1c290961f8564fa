//! Greylisting: a temporary failure for what was never seen before.
//!
//! Real MTAs queue and retry a 4xx; most bots fire once and move on. Two
//! modes: per triplet (client /24 or /64, sender, recipient), answered at
//! RCPT with `451 4.7.1` (postgrey, spamd), or per client address, answered
//! at connect (the Exchange article's "temporary error in response to an
//! SMTP connect").
//!
//! Timing (spamd's model): the first attempt is refused and remembered; a
//! retry earlier than `min_wait` is refused again; a retry after `min_wait`
//! and within `retry_window` of the first attempt passes, and the key then
//! passes for `pass_ttl`, renewed by each pass. An attempt after the window
//! starts over. [`GreyTable`] is that logic, pure, with the clock passed in
//! (unix seconds); [`Greylist`] adds the store that survives restarts.
//!
//! The store is a log of changes, one line each, appended with a single
//! `write` (a crash loses at most the line being written, which the loader
//! skips), and compacted now and then by writing a fresh file and renaming
//! it over the old one (atomic: a reader sees the old or the new file).
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use super::metrics::ReputationMetrics;
use crate::config::{GreylistConfig, GreylistMode};

/// The reply to an unseen triplet (at RCPT).
pub const TRIPLET_REPLY: &str = "451 4.7.1 Greylisted, please try again later";
/// The reply to an unseen client at connect (the session closes after it).
pub const CONNECT_REPLY: &str = "421 4.7.1 Greylisted, please try again later";

/// Renewing a pass is written to the store only when it moves the expiry
/// by at least this much, so a busy sender does not write on every mail.
const RENEW_WRITE_STEP: u64 = 3600;

/// What is greylisted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GreyKey {
    Triplet {
        net: IpNet,
        sender: String,
        rcpt: String,
    },
    Client(IpAddr),
}

/// Lower case, without the angle brackets; the null sender is empty.
fn normalize_address(a: &str) -> String {
    let a = a.trim();
    let a = a
        .strip_prefix('<')
        .and_then(|x| x.strip_suffix('>'))
        .unwrap_or(a);
    a.to_lowercase()
}

/// Percent-encodes what would break a line of the store.
fn encode_field(s: &str) -> String {
    if s.is_empty() {
        return "<>".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c <= ' ' || c == '%' || c == '<' || c == '>' || c == '\x7f' {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
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

impl GreyKey {
    /// The triplet of a delivery attempt; the client address is widened to
    /// its /`v4_prefix` or /`v6_prefix` network.
    pub fn triplet(client: IpAddr, sender: &str, rcpt: &str, v4_prefix: u8, v6_prefix: u8) -> Self {
        let client = client.to_canonical();
        let prefix = if client.is_ipv4() {
            v4_prefix
        } else {
            v6_prefix
        };
        let net = IpNet::new(client, prefix)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(client));
        GreyKey::Triplet {
            net,
            sender: normalize_address(sender),
            rcpt: normalize_address(rcpt),
        }
    }

    pub fn client(ip: IpAddr) -> Self {
        GreyKey::Client(ip.to_canonical())
    }

    fn encode(&self) -> String {
        match self {
            GreyKey::Triplet { net, sender, rcpt } => {
                format!("t {net} {} {}", encode_field(sender), encode_field(rcpt))
            }
            GreyKey::Client(ip) => format!("c {ip}"),
        }
    }

    fn decode(fields: &[&str]) -> Option<GreyKey> {
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
}

/// The state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Refused so far; first attempt at this time.
    Pending { first: u64 },
    /// Passes until this time.
    Passed { until: u64 },
}

/// The answer for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreyVerdict {
    Pass,
    /// Refuse with a 4xx; a retry passes in `retry_in` seconds at the earliest.
    TempFail {
        retry_in: u64,
    },
}

/// What one check did, for the store and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: GreyVerdict,
    /// The new state of the key, when it must be written down.
    pub write: Option<Entry>,
    /// The table was full: passed without greylisting (fail open).
    pub full: bool,
}

/// The greylisting windows, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub min_wait: u64,
    pub retry_window: u64,
    pub pass_ttl: u64,
}

impl From<&GreylistConfig> for Windows {
    fn from(c: &GreylistConfig) -> Self {
        Windows {
            min_wait: c.min_wait.as_secs(),
            retry_window: c.retry_window.as_secs(),
            pass_ttl: c.pass_ttl.as_secs(),
        }
    }
}

/// The greylisting logic: no I/O, the time comes from the caller.
#[derive(Debug)]
pub struct GreyTable {
    entries: HashMap<GreyKey, Entry>,
    windows: Windows,
    max_entries: usize,
}

impl GreyTable {
    pub fn new(windows: Windows, max_entries: usize) -> Self {
        GreyTable {
            entries: HashMap::new(),
            windows,
            max_entries: max_entries.max(1),
        }
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        match *e {
            Entry::Pending { first } => now <= first.saturating_add(self.windows.retry_window),
            Entry::Passed { until } => now <= until,
        }
    }

    /// Decides one attempt at `now` and updates the table.
    pub fn check(&mut self, key: &GreyKey, now: u64) -> Outcome {
        let w = self.windows;
        let current = self.entries.get(key).copied().filter(|e| self.live(e, now));
        let (verdict, new) = match current {
            Some(Entry::Passed { until }) => {
                let renewed = now.saturating_add(w.pass_ttl);
                self.entries
                    .insert(key.clone(), Entry::Passed { until: renewed });
                let write = (renewed >= until.saturating_add(RENEW_WRITE_STEP))
                    .then_some(Entry::Passed { until: renewed });
                return Outcome {
                    verdict: GreyVerdict::Pass,
                    write,
                    full: false,
                };
            }
            Some(Entry::Pending { first }) => {
                let ready = first.saturating_add(w.min_wait);
                if now >= ready {
                    (
                        GreyVerdict::Pass,
                        Entry::Passed {
                            until: now.saturating_add(w.pass_ttl),
                        },
                    )
                } else {
                    return Outcome {
                        verdict: GreyVerdict::TempFail {
                            retry_in: ready - now,
                        },
                        write: None,
                        full: false,
                    };
                }
            }
            None => {
                if !self.entries.contains_key(key) && self.entries.len() >= self.max_entries {
                    self.sweep(now);
                    if self.entries.len() >= self.max_entries {
                        return Outcome {
                            verdict: GreyVerdict::Pass,
                            write: None,
                            full: true,
                        };
                    }
                }
                (
                    GreyVerdict::TempFail {
                        retry_in: w.min_wait,
                    },
                    Entry::Pending { first: now },
                )
            }
        };
        self.entries.insert(key.clone(), new);
        Outcome {
            verdict,
            write: Some(new),
            full: false,
        }
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now: u64) {
        let w = self.windows;
        self.entries.retain(|_, e| match *e {
            Entry::Pending { first } => now <= first.saturating_add(w.retry_window),
            Entry::Passed { until } => now <= until,
        });
    }

    /// New windows and size (a reload): they apply to every later check,
    /// also of keys recorded before (a pending key's first attempt and a
    /// passed key's expiry stay as they were written).
    pub fn set_limits(&mut self, windows: Windows, max_entries: usize) {
        self.windows = windows;
        self.max_entries = max_entries.max(1);
    }

    /// Sets a key's state as read from the store.
    pub fn restore(&mut self, key: GreyKey, e: Entry) {
        self.entries.insert(key, e);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &GreyKey) -> Option<Entry> {
        self.entries.get(key).copied()
    }
}

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("greylist store {}: {source}", path.display())]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

fn entry_line(key: &GreyKey, e: Entry) -> String {
    match e {
        Entry::Pending { first } => format!("P {first} {}\n", key.encode()),
        Entry::Passed { until } => format!("A {until} {}\n", key.encode()),
    }
}

fn parse_line(line: &str) -> Option<(GreyKey, Entry)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let (kind, t, rest) = (fields.first()?, fields.get(1)?, fields.get(2..)?);
    let t: u64 = t.parse().ok()?;
    let key = GreyKey::decode(rest)?;
    let e = match *kind {
        "P" => Entry::Pending { first: t },
        "A" => Entry::Passed { until: t },
        _ => return None,
    };
    Some((key, e))
}

/// Loads the log into `table`, skipping torn or foreign lines (a crash
/// mid-append leaves at most one) and expired entries.
fn load(path: &Path, table: &mut GreyTable, now: u64) -> Result<(), StoreError> {
    match File::open(path) {
        Ok(f) => {
            let mut skipped = 0usize;
            for line in BufReader::new(f).lines() {
                let Ok(line) = line else {
                    skipped += 1;
                    continue;
                };
                match parse_line(&line) {
                    Some((k, e)) => table.restore(k, e),
                    None => skipped += 1,
                }
            }
            if skipped > 0 {
                tracing::warn!(path = %path.display(), skipped, "greylist store: unreadable lines skipped");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(store_err(path, e)),
    }
    table.sweep(now);
    Ok(())
}

fn store_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError {
        path: path.to_owned(),
        source,
    }
}

/// Writes `entries` to a new file and renames it over the store.
fn compact(path: &Path, entries: &HashMap<GreyKey, Entry>) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        for (k, e) in entries {
            f.write_all(entry_line(k, *e).as_bytes())?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        store_err(path, e)
    })
}

enum Msg {
    /// A key's new state, and the time of the check (for expiry).
    Put(GreyKey, Entry, u64),
    /// Acknowledged once everything sent before is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Queued writes at most; beyond, a change is kept in memory only (the
/// store is a memory aid, never a reason to hold a session).
const WRITE_QUEUE: usize = 65_536;

/// The store's own thread: appends each change with one `write`, and
/// compacts when the log holds more than twice the live entries.
struct Writer {
    path: PathBuf,
    file: File,
    lines: usize,
    entries: HashMap<GreyKey, Entry>,
    /// The running windows (a reload changes them), for compaction.
    windows: Arc<Mutex<Windows>>,
}

impl Writer {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Msg>) {
        for msg in rx {
            match msg {
                Msg::Put(k, e, now) => {
                    if let Err(err) = self.put(k, e, now) {
                        tracing::warn!(error = %err, "greylist store not written");
                    }
                }
                Msg::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }

    fn put(&mut self, k: GreyKey, e: Entry, now: u64) -> Result<(), StoreError> {
        let line = entry_line(&k, e);
        self.entries.insert(k, e);
        self.file
            .write_all(line.as_bytes())
            .map_err(|err| store_err(&self.path, err))?;
        self.lines += 1;
        if self.lines > 2 * self.entries.len() + 1000 {
            let windows = *self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let mut t = GreyTable::new(windows, usize::MAX);
            t.entries = std::mem::take(&mut self.entries);
            t.sweep(now);
            self.entries = t.entries;
            compact(&self.path, &self.entries)?;
            self.lines = self.entries.len();
            self.file = OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(|err| store_err(&self.path, err))?;
        }
        Ok(())
    }
}

/// Greylisting with its persistent store; shared by all sessions (cheap to
/// clone). Checks are in memory and never block on the disk: changes go to
/// the store's thread, which writes them at once.
#[derive(Clone)]
pub struct Greylist {
    mode: GreylistMode,
    v4_prefix: u8,
    v6_prefix: u8,
    table: Arc<Mutex<GreyTable>>,
    /// The store thread's copy of the windows.
    windows: Arc<Mutex<Windows>>,
    writer: std::sync::mpsc::SyncSender<Msg>,
    metrics: Arc<ReputationMetrics>,
}

/// Unix seconds now (the clock the agent passes in).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl Greylist {
    /// Opens (or creates) the store; `None` when greylisting is off. `now`
    /// (unix seconds) decides what has expired.
    pub fn open(
        cfg: &GreylistConfig,
        metrics: Arc<ReputationMetrics>,
        now: u64,
    ) -> Result<Option<Greylist>, StoreError> {
        if cfg.mode == GreylistMode::Off {
            return Ok(None);
        }
        let path = cfg.store.clone();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| store_err(dir, e))?;
        }
        let windows = Windows::from(cfg);
        let mut table = GreyTable::new(windows, cfg.max_entries);
        load(&path, &mut table, now)?;
        compact(&path, &table.entries)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| store_err(&path, e))?;
        let shared_windows = Arc::new(Mutex::new(windows));
        let writer = Writer {
            path: path.clone(),
            file,
            lines: table.len(),
            entries: table.entries.clone(),
            windows: shared_windows.clone(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        std::thread::Builder::new()
            .name("greylist-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| store_err(&path, e))?;
        tracing::info!(path = %path.display(), entries = table.len(), mode = ?cfg.mode, "greylisting on");
        Ok(Some(Greylist {
            mode: cfg.mode,
            v4_prefix: cfg.ipv4_prefix,
            v6_prefix: cfg.ipv6_prefix,
            table: Arc::new(Mutex::new(table)),
            windows: shared_windows,
            writer: tx,
            metrics,
        }))
    }

    /// A reload: the same table and store with `cfg`'s windows, size and
    /// client prefixes. The windows and size apply at once to every check
    /// (the table is shared); the prefixes to sessions that start from now
    /// on (a session keeps the `Greylist` it started with). `mode` and
    /// `store` are not read: they stay as opened (restart-only).
    pub fn reconfigure(&self, cfg: &GreylistConfig) -> Greylist {
        let windows = Windows::from(cfg);
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_limits(windows, cfg.max_entries);
        *self.windows.lock().unwrap_or_else(|e| e.into_inner()) = windows;
        Greylist {
            v4_prefix: cfg.ipv4_prefix,
            v6_prefix: cfg.ipv6_prefix,
            ..self.clone()
        }
    }

    pub fn mode(&self) -> GreylistMode {
        self.mode
    }

    /// The key of a delivery attempt in triplet mode.
    pub fn triplet_key(&self, client: IpAddr, sender: &str, rcpt: &str) -> GreyKey {
        GreyKey::triplet(client, sender, rcpt, self.v4_prefix, self.v6_prefix)
    }

    /// Decides an attempt at `now` (unix seconds, see [`unix_now`]). Never
    /// waits for the disk.
    pub fn check(&self, key: &GreyKey, now: u64) -> GreyVerdict {
        let out = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(key, now);
        if let Some(e) = out.write
            && self.writer.try_send(Msg::Put(key.clone(), e, now)).is_err()
        {
            tracing::warn!("greylist store queue full: a change stays in memory only");
        }
        if out.full {
            self.metrics.greylist_full.fetch_add(1, Relaxed);
        }
        match out.verdict {
            GreyVerdict::Pass => self.metrics.greylist_pass.fetch_add(1, Relaxed),
            GreyVerdict::TempFail { .. } => self.metrics.greylist_tempfail.fetch_add(1, Relaxed),
        };
        out.verdict
    }

    /// Waits (at most `timeout`) until every change so far is written;
    /// for a clean shutdown. False if the store did not confirm in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.writer.send(Msg::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 300;
    const WINDOW: u64 = 4 * 3600;
    const PASS: u64 = 36 * 86400;

    fn table() -> GreyTable {
        GreyTable::new(
            Windows {
                min_wait: MIN,
                retry_window: WINDOW,
                pass_ttl: PASS,
            },
            100,
        )
    }

    fn key(ip: &str, from: &str, to: &str) -> GreyKey {
        GreyKey::triplet(ip.parse().unwrap(), from, to, 24, 64)
    }

    const T0: u64 = 1_700_000_000;

    #[test]
    fn first_attempt_and_early_retry_fail_retry_in_window_passes() {
        let mut t = table();
        let k = key("198.51.100.9", "<a@x.example>", "<b@tarpit.test>");
        let o = t.check(&k, T0);
        assert_eq!(o.verdict, GreyVerdict::TempFail { retry_in: MIN });
        assert_eq!(o.write, Some(Entry::Pending { first: T0 }));
        // Early retry: still refused, the first attempt time stays.
        let o = t.check(&k, T0 + MIN - 1);
        assert_eq!(o.verdict, GreyVerdict::TempFail { retry_in: 1 });
        assert_eq!(o.write, None);
        // After the minimum wait, within the window: passes.
        let o = t.check(&k, T0 + MIN);
        assert_eq!(o.verdict, GreyVerdict::Pass);
        assert_eq!(
            o.write,
            Some(Entry::Passed {
                until: T0 + MIN + PASS
            })
        );
        // And keeps passing for 36 days.
        assert_eq!(t.check(&k, T0 + MIN + PASS).verdict, GreyVerdict::Pass);
    }

    #[test]
    fn retry_after_the_window_starts_over() {
        let mut t = table();
        let k = key("198.51.100.9", "a@x.example", "b@tarpit.test");
        t.check(&k, T0);
        let o = t.check(&k, T0 + WINDOW + 1);
        assert_eq!(o.verdict, GreyVerdict::TempFail { retry_in: MIN });
        assert_eq!(
            o.write,
            Some(Entry::Pending {
                first: T0 + WINDOW + 1
            })
        );
    }

    #[test]
    fn pass_expires_after_pass_ttl_without_traffic_and_renews_with_it() {
        let mut t = table();
        let k = key("198.51.100.9", "a@x.example", "b@tarpit.test");
        t.check(&k, T0);
        t.check(&k, T0 + MIN);
        let passed_at = T0 + MIN;
        // Renewed 10 days later: passes until 10 days + 36 days.
        let o = t.check(&k, passed_at + 10 * 86400);
        assert_eq!(o.verdict, GreyVerdict::Pass);
        assert_eq!(
            o.write,
            Some(Entry::Passed {
                until: passed_at + 46 * 86400
            })
        );
        // A renewal within the hour is not written again.
        assert_eq!(t.check(&k, passed_at + 10 * 86400 + 60).write, None);
        // Silent for longer than 36 days: greylisted again.
        let late = passed_at + 10 * 86400 + 60 + PASS + 1;
        assert!(matches!(
            t.check(&k, late).verdict,
            GreyVerdict::TempFail { .. }
        ));
    }

    #[test]
    fn triplet_uses_the_client_network_and_normalized_addresses() {
        let a = key("198.51.100.9", "<A@X.example>", "b@tarpit.test");
        let b = key("198.51.100.200", "a@x.example", "<B@TARPIT.test>");
        assert_eq!(a, b);
        let c = key("198.51.101.9", "a@x.example", "b@tarpit.test");
        assert_ne!(a, c);
        let v6a = key("fd5b:1e00::2", "<>", "b@tarpit.test");
        let v6b = key("fd5b:1e00::ffff:1", "", "b@tarpit.test");
        assert_eq!(v6a, v6b);
        let mapped = key("::ffff:198.51.100.1", "a@x.example", "b@tarpit.test");
        assert_eq!(mapped, a);
        // Other sender or recipient: another triplet.
        assert_ne!(a, key("198.51.100.9", "a@x.example", "c@tarpit.test"));
    }

    #[test]
    fn connect_mode_key_is_the_exact_address() {
        let mut t = table();
        let k = GreyKey::client("198.51.100.9".parse().unwrap());
        assert!(matches!(
            t.check(&k, T0).verdict,
            GreyVerdict::TempFail { .. }
        ));
        let other = GreyKey::client("198.51.100.10".parse().unwrap());
        assert!(matches!(
            t.check(&other, T0 + MIN).verdict,
            GreyVerdict::TempFail { .. }
        ));
        assert_eq!(t.check(&k, T0 + MIN).verdict, GreyVerdict::Pass);
    }

    #[test]
    fn full_table_sweeps_then_fails_open() {
        let mut t = GreyTable::new(
            Windows {
                min_wait: MIN,
                retry_window: WINDOW,
                pass_ttl: PASS,
            },
            2,
        );
        t.check(&key("198.51.100.1", "a@x", "b@y"), T0);
        t.check(&key("198.51.100.1", "a@x", "c@y"), T0);
        let o = t.check(&key("198.51.100.1", "a@x", "d@y"), T0 + 1);
        assert_eq!(o.verdict, GreyVerdict::Pass);
        assert!(o.full);
        // After the window the old entries expire and make room.
        let o = t.check(&key("198.51.100.1", "a@x", "d@y"), T0 + WINDOW + 1);
        assert!(!o.full);
        assert!(matches!(o.verdict, GreyVerdict::TempFail { .. }));
    }

    #[test]
    fn store_lines_round_trip_odd_addresses() {
        for k in [
            key("198.51.100.9", "<>", "b@tarpit.test"),
            key("fd5b:1e00::2", "we%ird <x>@a", "b c@tarpit.test"),
            GreyKey::client("fd5b:1e00::2".parse().unwrap()),
        ] {
            for e in [Entry::Pending { first: 5 }, Entry::Passed { until: 7 }] {
                let line = entry_line(&k, e);
                assert_eq!(line.matches('\n').count(), 1);
                assert_eq!(parse_line(line.trim_end()), Some((k.clone(), e)), "{line}");
            }
        }
        assert_eq!(parse_line("A 12 t"), None);
        assert_eq!(parse_line("A 12 t 198.51.100.0/24 a@x"), None);
        assert_eq!(parse_line("X 12 c 198.51.100.1"), None);
    }

    fn cfg(dir: &Path) -> GreylistConfig {
        GreylistConfig {
            mode: GreylistMode::Triplet,
            store: dir.join("sub/greylist.db"),
            ..Default::default()
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tarpit-grey-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn pass_survives_reopen_and_torn_lines_are_skipped() {
        let dir = tempdir("reopen");
        let m = Arc::new(ReputationMetrics::default());
        let g = Greylist::open(&cfg(&dir), m.clone(), T0).unwrap().unwrap();
        let k = g.triplet_key(
            "198.51.100.9".parse().unwrap(),
            "a@x.example",
            "b@tarpit.test",
        );
        let pending = g.triplet_key(
            "198.51.100.9".parse().unwrap(),
            "a@x.example",
            "c@tarpit.test",
        );
        assert!(matches!(g.check(&k, T0), GreyVerdict::TempFail { .. }));
        assert!(matches!(
            g.check(&pending, T0),
            GreyVerdict::TempFail { .. }
        ));
        assert_eq!(g.check(&k, T0 + MIN), GreyVerdict::Pass);
        assert!(g.flush(Duration::from_secs(5)));
        drop(g);
        // A crash in the middle of a line leaves a torn line behind.
        let path = dir.join("sub/greylist.db");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"A 99999999999 t 198.51.1").unwrap();
        drop(f);
        let g = Greylist::open(&cfg(&dir), m.clone(), T0 + MIN + 1)
            .unwrap()
            .unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g.check(&k, T0 + MIN + 1), GreyVerdict::Pass);
        // The pending triplet kept its first-attempt time across the restart.
        assert_eq!(g.check(&pending, T0 + MIN + 2), GreyVerdict::Pass);
        assert_eq!(m.greylist_tempfail.load(Relaxed), 2);
        assert_eq!(m.greylist_pass.load(Relaxed), 3);
        // The compacted file holds exactly the live entries, whole lines.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn log_is_compacted_when_it_grows() {
        let dir = tempdir("compact");
        let m = Arc::new(ReputationMetrics::default());
        let g = Greylist::open(&cfg(&dir), m, T0).unwrap().unwrap();
        let k = g.triplet_key("198.51.100.9".parse().unwrap(), "a@x", "b@y");
        // Each pass renewal an hour apart writes a line for the same key.
        g.check(&k, T0);
        for i in 0..1100u64 {
            g.check(&k, T0 + MIN + i * RENEW_WRITE_STEP);
        }
        assert!(g.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(dir.join("sub/greylist.db")).unwrap();
        assert!(
            text.lines().count() < 1000,
            "{} lines",
            text.lines().count()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reconfigure_applies_windows_and_prefixes_to_the_same_table() {
        let dir = tempdir("reconf");
        let m = Arc::new(ReputationMetrics::default());
        let g = Greylist::open(&cfg(&dir), m, T0).unwrap().unwrap();
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let k = g.triplet_key(ip, "a@x", "b@y");
        assert_eq!(g.check(&k, T0), GreyVerdict::TempFail { retry_in: MIN });
        let shorter = GreylistConfig {
            min_wait: Duration::from_secs(60),
            ipv4_prefix: 32,
            ..cfg(&dir)
        };
        let g2 = g.reconfigure(&shorter);
        // The pending key kept its first attempt; the new wait applies.
        assert_eq!(
            g2.check(&k, T0 + 30),
            GreyVerdict::TempFail { retry_in: 30 }
        );
        assert_eq!(g2.check(&k, T0 + 60), GreyVerdict::Pass);
        assert_eq!(g2.len(), 1, "one table for old and new sessions");
        // New sessions key on the new prefix; one that started before keeps /24.
        assert_ne!(g2.triplet_key(ip, "a@x", "b@y"), k);
        assert_eq!(g.triplet_key(ip, "a@x", "b@y"), k);
        assert!(g2.flush(Duration::from_secs(5)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn off_opens_nothing() {
        let dir = tempdir("off");
        let c = GreylistConfig {
            store: dir.join("g.db"),
            ..Default::default()
        };
        assert!(Greylist::open(&c, Arc::default(), T0).unwrap().is_none());
        assert!(!dir.exists());
    }
}
