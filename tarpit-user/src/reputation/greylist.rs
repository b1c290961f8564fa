//! Greylisting: a temporary failure for what was never seen before.
//!
//! Real MTAs queue and retry a 4xx; most bots fire once and move on. Two
//! modes: per triplet (client /24 or /64, sender, recipient), answered at
//! RCPT with `451 4.7.1` (postgrey, spamd), or per client address, answered
//! at connect (the Exchange article's "temporary error in response to an
//! SMTP connect").
//!
//! Timing (spamd's model): the first attempt is refused and remembered as
//! pending; a retry earlier than `min_wait` is refused again; a retry after
//! `min_wait` and within `retry_window` of the first attempt passes, and
//! the key is then known for `pass_ttl`, renewed by each pass. An attempt
//! after the window starts over.
//!
//! Bounded, whatever clients send (`table`): keys are fixed-size keyed
//! hashes (the raw sender and recipient are never kept); first attempts
//! are bounded in total and per client network, and a network over its
//! share gets the same 451 without being recorded; a full table evicts its
//! oldest entries, it never lets everyone pass. [`Greylist`] adds the
//! hashing under the site key and the store that survives restarts
//! (`store`).
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::metrics::ReputationMetrics;
use crate::config::{GreylistConfig, GreylistMode};

mod grey_key;
mod legacy;
mod site_key;
mod store;
mod table;

pub use grey_key::GreyKey;
pub use site_key::{KeyOrigin, SiteKey, key_path, load_or_create, load_or_create_key};
pub use store::{HEADER_BYTES, KNOWN_BYTES, PENDING_BYTES, StoreError};
pub use table::{GreyCheck, GreyTable, GreyVerdict, Limits, Record, Windows};
pub use table::{Id, NetId, Pending};

impl From<&GreylistConfig> for Windows {
    fn from(c: &GreylistConfig) -> Self {
        Windows {
            min_wait: c.min_wait.as_secs(),
            retry_window: c.retry_window.as_secs(),
            pass_ttl: c.pass_ttl.as_secs(),
        }
    }
}

impl From<&GreylistConfig> for Limits {
    fn from(c: &GreylistConfig) -> Self {
        Limits {
            windows: Windows::from(c),
            max_pending: c.max_pending,
            max_known: c.max_entries,
            per_network: c.pending_per_network,
        }
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
    /// The site key and its origin; replaced when this host takes the
    /// cluster's key ([`Greylist::adopt_key`]). Lock order: key, then table.
    key: Arc<RwLock<KeyState>>,
    /// The key file (`greylist.key`).
    key_path: std::path::PathBuf,
    table: Arc<Mutex<GreyTable>>,
    writer: std::sync::mpsc::SyncSender<store::Msg>,
    metrics: Arc<ReputationMetrics>,
    /// Where this host's changes go to reach the other MX hosts (the
    /// cluster); `None` without one.
    share: Option<Arc<dyn GreyShare>>,
}

/// The site key in use, and where it came from.
struct KeyState {
    key: SiteKey,
    origin: KeyOrigin,
}

/// Why the cluster's key was not taken.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("this host's greylist.key was written by an admin (no `# origin:` line): it is kept")]
    Configured,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Hands this host's greylist changes to whoever shares them with the
/// other MX hosts (`cluster`). Must not block: a check never waits for
/// the network, the receiver queues (and counts what it cannot queue).
pub trait GreyShare: Send + Sync {
    fn publish(&self, record: Record, now: u64);
}

/// Unix seconds now (the clock the agent passes in).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

impl Greylist {
    /// Opens (or creates) the store and the site key next to it; `None`
    /// when greylisting is off. `now` (unix seconds) decides what has
    /// expired. A store in the old format is migrated (its keys hashed).
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
            std::fs::create_dir_all(dir).map_err(|e| store::store_err(dir, e))?;
        }
        let (key, origin) = load_or_create(&key_path(&path))?;
        let mut table = GreyTable::new(Limits::from(cfg));
        let (v4, v6) = (cfg.ipv4_prefix, cfg.ipv6_prefix);
        let found = store::load(&path, &key, &mut table, |k| k.hashed(&key, v4, v6))?;
        table.sweep(now);
        table.enforce_bounds();
        let records = table.records();
        store::compact(&path, &key, &records)?;
        if found == store::Found::Legacy {
            tracing::info!(path = %path.display(), entries = records.len(), "greylist store migrated: keys hashed, addresses dropped");
        }
        let file = store::open_append(&path)?;
        let table = Arc::new(Mutex::new(table));
        let writer = store::Writer {
            path: path.clone(),
            key: key.clone(),
            file,
            lines: records.len(),
            live: records.len(),
            table: table.clone(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(store::WRITE_QUEUE);
        std::thread::Builder::new()
            .name("greylist-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| store::store_err(&path, e))?;
        tracing::info!(path = %path.display(), entries = records.len(), mode = ?cfg.mode, "greylisting on");
        let g = Greylist {
            mode: cfg.mode,
            v4_prefix: cfg.ipv4_prefix,
            v6_prefix: cfg.ipv6_prefix,
            key: Arc::new(RwLock::new(KeyState { key, origin })),
            key_path: key_path(&path),
            table,
            writer: tx,
            metrics,
            share: None,
        };
        g.update_gauges(&g.lock());
        Ok(Some(g))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GreyTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauges(&self, t: &GreyTable) {
        let m = &self.metrics;
        m.greylist_pending.store(t.pending_len() as u64, Relaxed);
        m.greylist_known.store(t.known_len() as u64, Relaxed);
    }

    /// A reload: the same table and store with `cfg`'s windows, bounds and
    /// client prefixes. The windows and bounds apply at once to every check
    /// (the table is shared); the prefixes to sessions that start from now
    /// on (a session keeps the `Greylist` it started with). `mode` and
    /// `store` are not read: they stay as opened (restart-only).
    pub fn reconfigure(&self, cfg: &GreylistConfig) -> Greylist {
        {
            let mut t = self.lock();
            t.set_limits(Limits::from(cfg));
            self.update_gauges(&t);
        }
        Greylist {
            v4_prefix: cfg.ipv4_prefix,
            v6_prefix: cfg.ipv6_prefix,
            ..self.clone()
        }
    }

    /// The same greylist, its changes handed to `share` from now on.
    pub fn with_share(mut self, share: Arc<dyn GreyShare>) -> Greylist {
        self.share = Some(share);
        self
    }

    fn key_state(&self) -> std::sync::RwLockReadGuard<'_, KeyState> {
        self.key.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The site key and where it came from: hosts that share a greylist
    /// must hash under the same key, which the cluster shares
    /// (docs/cluster.md).
    pub fn site_key(&self) -> (SiteKey, KeyOrigin) {
        let k = self.key_state();
        (k.key.clone(), k.origin)
    }

    /// Takes the cluster's site key in place of this host's own: writes
    /// it to the key file (marked as the cluster's), forgets every entry
    /// (hashed under the old key, they would never match again: senders
    /// are greylisted here once more, or pass on the other hosts' word)
    /// and rewrites the store under it. Refused for a key an admin wrote.
    /// False when `key` is already the key.
    pub fn adopt_key(&self, key: SiteKey, now: u64) -> Result<bool, AdoptError> {
        let mut state = self.key.write().unwrap_or_else(|e| e.into_inner());
        if state.key == key {
            return Ok(false);
        }
        if !state.origin.follows_cluster() {
            return Err(AdoptError::Configured);
        }
        // The file first: if it cannot be written, nothing changes.
        site_key::save_cluster_key(&self.key_path, &key)?;
        {
            let mut t = self.lock();
            t.clear();
            self.update_gauges(&t);
        }
        let _ = self.writer.send(store::Msg::Rekey(key.clone(), now));
        *state = KeyState {
            key,
            origin: KeyOrigin::Cluster,
        };
        Ok(true)
    }

    /// Takes in a record another MX host made (see [`GreyTable::merge`])
    /// and writes it to the local store when it changed the table, so it
    /// survives a restart like a local one.
    pub fn merge(&self, record: Record, now: u64) -> bool {
        let changed = {
            let mut t = self.lock();
            let changed = t.merge(record, now);
            self.update_gauges(&t);
            changed
        };
        if changed && self.writer.try_send(store::Msg::Put(record, now)).is_err() {
            tracing::warn!("greylist store queue full: a change stays in memory only");
        }
        changed
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
        // The key is held until the change is in the table and handed on:
        // a key change (which clears the table) lets no old hash in after.
        let site = self.key_state();
        let (id, net) = key.hashed(&site.key, self.v4_prefix, self.v6_prefix);
        let out = {
            let mut t = self.lock();
            let out = t.check(&id, net, now);
            self.update_gauges(&t);
            out
        };
        if let Some(r) = out.write {
            if self.writer.try_send(store::Msg::Put(r, now)).is_err() {
                tracing::warn!("greylist store queue full: a change stays in memory only");
            }
            if let Some(share) = &self.share {
                share.publish(r, now);
            }
        }
        drop(site);
        let m = &self.metrics;
        if out.capped {
            m.greylist_capped.fetch_add(1, Relaxed);
        }
        let (ep, ek) = out.evicted;
        if ep + ek > 0 {
            m.greylist_full.fetch_add(1, Relaxed);
            m.greylist_evicted_pending.fetch_add(ep as u64, Relaxed);
            m.greylist_evicted_known.fetch_add(ek as u64, Relaxed);
        }
        match out.verdict {
            GreyVerdict::Pass => m.greylist_pass.fetch_add(1, Relaxed),
            GreyVerdict::TempFail { .. } => m.greylist_tempfail.fetch_add(1, Relaxed),
        };
        out.verdict
    }

    /// Waits (at most `timeout`) until every change so far is written;
    /// for a clean shutdown. False if the store did not confirm in time.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.writer.send(store::Msg::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }

    /// Entries in the table (pending and known).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// First attempts waiting for their retry, and known keys.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.lock();
        (t.pending_len(), t.known_len())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use super::*;

    const MIN: u64 = 300;
    const T0: u64 = 1_700_000_000;

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
        let ip: IpAddr = "198.51.100.9".parse().unwrap();
        let k = g.triplet_key(ip, "a@x.example", "b@tarpit.test");
        let pending = g.triplet_key(ip, "a@x.example", "c@tarpit.test");
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
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"A 0000000065").unwrap();
        drop(f);
        let g = Greylist::open(&cfg(&dir), m.clone(), T0 + MIN + 1)
            .unwrap()
            .unwrap();
        assert_eq!(g.counts(), (1, 1));
        assert_eq!(g.check(&k, T0 + MIN + 1), GreyVerdict::Pass);
        // The pending triplet kept its first-attempt time across the restart.
        assert_eq!(g.check(&pending, T0 + MIN + 2), GreyVerdict::Pass);
        assert_eq!(m.greylist_tempfail.load(Relaxed), 2);
        assert_eq!(m.greylist_pass.load(Relaxed), 3);
        assert_eq!(m.greylist_known.load(Relaxed), 2);
        // The compacted file holds no address, only whole lines.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        assert!(
            !text.contains("tarpit.test") && !text.contains("198.51"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_of_tarpit_s_own_gives_way_to_the_cluster_s_and_an_admin_s_does_not() {
        let dir = tempdir("adopt");
        let m = Arc::new(ReputationMetrics::default());
        let g = Greylist::open(&cfg(&dir), m.clone(), T0).unwrap().unwrap();
        let (own, origin) = g.site_key();
        assert_eq!(origin, KeyOrigin::Generated);
        let k = g.triplet_key("198.51.100.9".parse().unwrap(), "a@x", "b@y");
        assert!(matches!(g.check(&k, T0), GreyVerdict::TempFail { .. }));
        // A session's clone (taken before) sees the change too.
        let session = g.clone();
        // Its own key again: nothing changes.
        assert!(!g.adopt_key(own, T0).unwrap());
        assert_eq!(g.counts(), (1, 0));
        let cluster = SiteKey::from_hex(&"5a".repeat(16)).unwrap();
        assert!(g.adopt_key(cluster.clone(), T0 + 1).unwrap());
        assert_eq!(g.site_key(), (cluster.clone(), KeyOrigin::Cluster));
        assert_eq!(g.counts(), (0, 0), "entries under the old key are gone");
        // The same attempt is a first attempt again, under the new key.
        assert!(matches!(
            session.check(&k, T0 + MIN),
            GreyVerdict::TempFail { .. }
        ));
        assert!(g.flush(Duration::from_secs(5)));
        drop((g, session));
        // Restarted: the cluster's key, and what was noted under it.
        let g = Greylist::open(&cfg(&dir), m.clone(), T0 + MIN + 1)
            .unwrap()
            .unwrap();
        assert_eq!(g.site_key(), (cluster, KeyOrigin::Cluster));
        assert_eq!(g.counts(), (1, 0));
        drop(g);
        // An admin's key (no origin line) is never replaced.
        let path = dir.join("sub/greylist.key");
        std::fs::write(&path, format!("{}\n", "07".repeat(16))).unwrap();
        let g = Greylist::open(&cfg(&dir), m, T0).unwrap().unwrap();
        let other = SiteKey::from_hex(&"5b".repeat(16)).unwrap();
        assert!(matches!(
            g.adopt_key(other, T0),
            Err(AdoptError::Configured)
        ));
        assert_eq!(g.site_key().1, KeyOrigin::Configured);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", "07".repeat(16))
        );
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
            g.check(&k, T0 + MIN + i * table::RENEW_WRITE_STEP);
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

    /// A store written by an older tarpit (raw addresses) keeps every
    /// triplet: passed ones pass at once, pending ones keep their first
    /// attempt; the file is rewritten without the addresses.
    #[test]
    fn old_format_store_is_migrated_and_keeps_its_triplets() {
        let dir = tempdir("migrate");
        let c = cfg(&dir);
        std::fs::create_dir_all(c.store.parent().unwrap()).unwrap();
        let until = T0 + 30 * 86400;
        std::fs::write(
            &c.store,
            format!(
                "P {T0} t 198.51.100.0/24 a@x.example b@tarpit.test\n\
                 A {until} t 198.51.100.0/24 a@x.example b@tarpit.test\n\
                 A {until} t fd5b:1e00::/64 <> we%20ird@tarpit.test\n\
                 P {T0} t 198.51.100.0/24 c@x.example d@tarpit.test\n\
                 A {until} c 198.51.100.7\n\
                 A 99 t 198.51"
            ),
        )
        .unwrap();
        let m = Arc::new(ReputationMetrics::default());
        let g = Greylist::open(&c, m.clone(), T0 + 10).unwrap().unwrap();
        assert_eq!(g.counts(), (1, 3));
        let ip: IpAddr = "198.51.100.20".parse().unwrap();
        let v6: IpAddr = "fd5b:1e00::9".parse().unwrap();
        assert_eq!(
            g.check(
                &g.triplet_key(ip, "A@x.example", "<b@tarpit.test>"),
                T0 + 10
            ),
            GreyVerdict::Pass
        );
        assert_eq!(
            g.check(&g.triplet_key(v6, "<>", "we ird@tarpit.test"), T0 + 10),
            GreyVerdict::Pass
        );
        assert_eq!(
            g.check(&GreyKey::client("198.51.100.7".parse().unwrap()), T0 + 10),
            GreyVerdict::Pass
        );
        // The pending one kept its first attempt (T0): it passes at T0 + MIN.
        let pending = g.triplet_key(ip, "c@x.example", "d@tarpit.test");
        assert_eq!(
            g.check(&pending, T0 + 11),
            GreyVerdict::TempFail { retry_in: MIN - 11 }
        );
        assert_eq!(g.check(&pending, T0 + MIN), GreyVerdict::Pass);
        assert!(g.flush(Duration::from_secs(5)));
        let text = std::fs::read_to_string(&c.store).unwrap();
        assert!(text.starts_with("tarpit-greylist 2 "), "{text}");
        assert!(
            !text.contains("tarpit.test") && !text.contains("198.51"),
            "{text}"
        );
        drop(g);
        // And a second start reads the new format: still passing.
        let g = Greylist::open(&c, m, T0 + MIN + 1).unwrap().unwrap();
        assert_eq!(g.counts(), (0, 4));
        assert_eq!(
            g.check(
                &g.triplet_key(ip, "a@x.example", "b@tarpit.test"),
                T0 + MIN + 1
            ),
            GreyVerdict::Pass
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_store_under_another_key_is_dropped_not_misread() {
        let dir = tempdir("otherkey");
        let c = cfg(&dir);
        let g = Greylist::open(&c, Arc::default(), T0).unwrap().unwrap();
        let k = g.triplet_key("198.51.100.9".parse().unwrap(), "a@x", "b@y");
        g.check(&k, T0);
        g.check(&k, T0 + MIN);
        assert!(g.flush(Duration::from_secs(5)));
        drop(g);
        std::fs::remove_file(key_path(&c.store)).unwrap();
        let g = Greylist::open(&c, Arc::default(), T0 + MIN)
            .unwrap()
            .unwrap();
        assert_eq!(g.counts(), (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The file size docs/reputation.md states: a header plus one
    /// fixed-width line per entry after a compaction, and never more than
    /// 2 x entries + 1000 lines between compactions.
    #[test]
    fn store_file_size_per_entry_is_as_documented() {
        let dir = tempdir("size");
        let c = GreylistConfig {
            max_pending: 400,
            pending_per_network: 400,
            max_entries: 300,
            ..cfg(&dir)
        };
        let g = Greylist::open(&c, Arc::default(), T0).unwrap().unwrap();
        // Every attempt from its own network: only the bounds apply.
        let ip = |i: u64| -> IpAddr { format!("10.{}.{}.1", i / 256, i % 256).parse().unwrap() };
        for i in 0..3000 {
            let k = g.triplet_key(ip(i), "a@x", &format!("r{i}@y"));
            assert!(matches!(
                g.check(&k, T0 + i / 10),
                GreyVerdict::TempFail { .. }
            ));
        }
        for i in 2700..3000 {
            let k = g.triplet_key(ip(i), "a@x", &format!("r{i}@y"));
            assert_eq!(g.check(&k, T0 + 300 + MIN), GreyVerdict::Pass);
        }
        assert!(g.flush(Duration::from_secs(5)));
        let (p, k) = g.counts();
        assert!(p <= 400 && k <= 300, "{p} {k}");
        let size = std::fs::metadata(&c.store).unwrap().len() as usize;
        let bound = store::HEADER_BYTES
            + (2 * (400 + 300) + 1000) * store::PENDING_BYTES.max(store::KNOWN_BYTES);
        assert!(size <= bound, "{size} > {bound}");
        drop(g);
        // After the compaction of a restart: exactly header + lines.
        let g = Greylist::open(&c, Arc::default(), T0 + 400 + MIN)
            .unwrap()
            .unwrap();
        let (p, k) = g.counts();
        let size = std::fs::metadata(&c.store).unwrap().len() as usize;
        assert_eq!(
            size,
            store::HEADER_BYTES + p * store::PENDING_BYTES + k * store::KNOWN_BYTES
        );
        assert_eq!(k, 300);
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
