//! The site key (`greylist.key` next to `greylist.db`): 16 random bytes in
//! hex, created 0600 at the first start. Every key of the store is a keyed
//! hash under it (SipHash-2-4), so the store holds no address and an
//! outsider cannot aim collisions at it. One key per site: MX hosts that
//! share a greylist share the key ([`load_or_create`] is the one place
//! that reads or makes it).
//!
//! The file says where its key came from ([`KeyOrigin`]), on a line of its
//! own after the key: `# origin: generated` when tarpit made it, `# origin:
//! cluster` when it was taken from the cluster (`cluster`, docs/cluster.md),
//! nothing when an admin wrote it (or an older tarpit, which wrote the key
//! alone). Only a key of tarpit's own is ever replaced, and only by the
//! cluster's ([`save_cluster_key`]); an admin's key is never touched.
//!
//! Its own file because it is its own secret with its own life: the store
//! is rewritten all the time, the key at most when a host joins a cluster.
use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use siphasher::sip128::{Hasher128, SipHasher24};

use super::store::{StoreError, create_new, open_read, replace, store_err, sync_dir};
use super::table::Id;

/// The site's secret: keys of the store are SipHash-2-4 under it.
#[derive(Clone, PartialEq, Eq)]
pub struct SiteKey([u8; 16]);

/// Where the site key came from (the key file's `# origin:` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Written by an admin (or by a tarpit older than the origin line):
    /// kept whatever the cluster says.
    Configured,
    /// Made by tarpit at its first start: the cluster's key replaces it.
    Generated,
    /// Taken from the cluster: follows the cluster's key.
    Cluster,
}

impl KeyOrigin {
    /// The key file's origin line (none for an admin's key).
    fn line(self) -> Option<&'static str> {
        match self {
            KeyOrigin::Configured => None,
            KeyOrigin::Generated => Some("# origin: generated"),
            KeyOrigin::Cluster => Some("# origin: cluster"),
        }
    }

    /// May the cluster's key replace a key of this origin?
    pub fn follows_cluster(self) -> bool {
        self != KeyOrigin::Configured
    }
}

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

    /// The key in hex, as in the key file and in the cluster's Redis.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A key from exactly 32 hex digits, as another host or Redis hands
    /// it over; `None` for anything else, and for a key of zeros (no
    /// secret: whoever wrote it wants the hashes known).
    pub fn from_hex(text: &str) -> Option<SiteKey> {
        let k = unhex::<16>(text)?;
        (k != [0; 16]).then_some(SiteKey(k))
    }
}

/// What a key file holds: the key, and its origin. One non-comment line
/// of 32 hex digits; `#` lines are comments, `# origin: ...` among them.
fn parse_key_file(text: &str) -> Result<(SiteKey, KeyOrigin), &'static str> {
    let mut key = None;
    let mut origin = KeyOrigin::Configured;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(o) = [KeyOrigin::Generated, KeyOrigin::Cluster]
            .into_iter()
            .find(|o| o.line() == Some(line))
        {
            origin = o;
        } else if line.starts_with('#') {
            continue;
        } else if key.is_some() {
            return Err("not a greylist key (one line of 32 hex digits)");
        } else {
            key = Some(unhex::<16>(line).ok_or("not a greylist key (32 hex digits)")?);
        }
    }
    let key = key.ok_or("not a greylist key (32 hex digits)")?;
    Ok((SiteKey(key), origin))
}

/// The text of a key file.
fn key_file(key: &SiteKey, origin: KeyOrigin) -> String {
    match origin.line() {
        Some(l) => format!("{}\n{l}\n", key.to_hex()),
        None => format!("{}\n", key.to_hex()),
    }
}

/// `N` bytes from exactly `2 * N` hex digits.
pub(super) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The key file of a store: `greylist.key` for `greylist.db`.
pub fn key_path(store: &Path) -> PathBuf {
    store.with_extension("key")
}

/// Reads the site key at `path`, or makes one (random, 0600) if there is
/// none.
pub fn load_or_create_key(path: &Path) -> Result<SiteKey, StoreError> {
    load_or_create(path).map(|(k, _)| k)
}

/// Reads the site key at `path` and where it came from, or makes one
/// (random, 0600, [`KeyOrigin::Generated`]) if there is none.
pub fn load_or_create(path: &Path) -> Result<(SiteKey, KeyOrigin), StoreError> {
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
            f.take(512).read_to_string(&mut text).map_err(err)?;
            return parse_key_file(&text).map_err(bad);
        }
        let mut k = [0u8; 16];
        getrandom::fill(&mut k).map_err(|e| err(std::io::Error::from(e)))?;
        let key = SiteKey(k);
        match create_new(path) {
            Ok(mut f) => {
                f.write_all(key_file(&key, KeyOrigin::Generated).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(err)?;
                sync_dir(path);
                tracing::info!(path = %path.display(), "greylist: new site key created");
                return Ok((key, KeyOrigin::Generated));
            }
            // Made by someone else meanwhile: read theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(e)),
        }
    }
    Err(bad("appears and disappears"))
}

/// Replaces the key file at `path` with the cluster's `key` (atomically,
/// never through a symlink), marked [`KeyOrigin::Cluster`].
pub fn save_cluster_key(path: &Path, key: &SiteKey) -> Result<(), StoreError> {
    replace(path, |f| {
        f.write_all(key_file(key, KeyOrigin::Cluster).as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tarpit-greykey-{name}-{}", std::process::id()));
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
    fn a_key_file_says_who_made_the_key_and_only_tarpit_s_own_follow_the_cluster() {
        let dir = tempdir("origin");
        let p = dir.join("greylist.key");
        let (made, origin) = load_or_create(&p).unwrap();
        assert_eq!(origin, KeyOrigin::Generated);
        assert!(origin.follows_cluster());
        assert_eq!(load_or_create(&p).unwrap(), (made.clone(), origin));
        // Taken from the cluster: replaced atomically, 0600, marked.
        let theirs = SiteKey::from_hex(&"5a".repeat(16)).unwrap();
        save_cluster_key(&p, &theirs).unwrap();
        let (k, origin) = load_or_create(&p).unwrap();
        assert!(k == theirs && origin == KeyOrigin::Cluster);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The key alone (an admin's, or an older tarpit's): configured.
        std::fs::write(&p, format!("{}\n", "07".repeat(16))).unwrap();
        let (_, origin) = load_or_create(&p).unwrap();
        assert_eq!(origin, KeyOrigin::Configured);
        assert!(!origin.follows_cluster());
        // Other comments are comments; two keys are no key.
        std::fs::write(&p, format!("# ours\n{}\n", "07".repeat(16))).unwrap();
        assert_eq!(load_or_create(&p).unwrap().1, KeyOrigin::Configured);
        std::fs::write(&p, format!("{0}\n{0}\n", "07".repeat(16))).unwrap();
        assert!(load_or_create(&p).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_handed_over_is_32_hex_digits_and_not_zeros() {
        assert!(SiteKey::from_hex(&"ab".repeat(16)).is_some());
        assert!(SiteKey::from_hex(&"AB".repeat(16)).is_some());
        for bad in [
            "".to_string(),
            "ab".repeat(15),
            "ab".repeat(17),
            format!("{} ", "ab".repeat(16)),
            "zz".repeat(16),
            "00".repeat(16),
            "é".repeat(16),
        ] {
            assert!(SiteKey::from_hex(&bad).is_none(), "{bad:?}");
        }
    }
}
