//! The site key (`greylist.key` next to `greylist.db`): 16 random bytes in
//! hex, created 0600 at the first start and never rewritten. Every key of
//! the store is a keyed hash under it (SipHash-2-4), so the store holds no
//! address and an outsider cannot aim collisions at it. One key per site:
//! MX hosts that share a greylist share the key ([`load_or_create_key`] is
//! the one place that reads or makes it).
//!
//! Its own file because it is its own secret with its own life: the store
//! is rewritten all the time, the key never.
use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use siphasher::sip128::{Hasher128, SipHasher24};

use super::store::{StoreError, create_new, open_read, store_err, sync_dir};
use super::table::Id;

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
        hex::encode(self.0)
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
        getrandom::fill(&mut k).map_err(|e| err(std::io::Error::from(e)))?;
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
}
