//! One-address lookups in the kernel's allow list, cheap enough for every
//! new connection: the kernel's own longest-prefix match, not a scan.
//!
//! The agent asks this when a client connects, so an entry added at run
//! time (`tarpit allow add`) or synced from the config spares the client
//! in the agent exactly as it does in XDP and sk_lookup: one list.
//!
//! A list that never held an entry is not looked up, as in the kernel
//! (`names::LISTS_USED`): the agent reads the list's flag at most once
//! per [`RECHECK`] while it is clear ([`UsedFlag`]), and never again once
//! it is set (flags are never cleared). So on a site without allow-list
//! entries a connection costs no bpf(2) call here, and an entry added
//! to a list that was empty (`tarpit allow add`, which sets the flag
//! before it inserts) counts in the agent within [`RECHECK`]; XDP and
//! sk_lookup read the flag themselves and see it at once.
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::{Array, LpmTrie, Map, MapData, lpm_trie::Key};
use tarpit_common::{IpAddrKey, ListEntry, lists::PREFIX_BITS, maps as names};

use super::{KernelMaps, clock::BootInstant, error::KernelError};

/// How long the agent may take an allow list's clear "used" flag as still
/// clear without reading it again: the longest an entry added to an empty
/// list can go unseen by the agent's own check.
pub const RECHECK: Duration = Duration::from_secs(1);

pub struct AllowLookup {
    trie: LpmTrie<MapData, [u8; 16], ListEntry>,
    pin_path: std::path::PathBuf,
    /// The kernel's `LISTS_USED`; `None` on pins made before it existed
    /// (the list is then always looked up).
    lists_used: Option<Array<MapData, u32>>,
    used: UsedFlag,
}

/// A userspace copy of one `LISTS_USED` flag. It can say "never held an
/// entry" only for [`RECHECK`] after the flag was last read clear; once
/// read set it stays set (the kernel never clears it); a flag that cannot
/// be read counts as set (an extra look-up, never a missed entry).
#[derive(Debug)]
pub struct UsedFlag {
    epoch: Instant,
    /// The flag was read set.
    set: AtomicBool,
    /// When it was last read clear: nanoseconds since `epoch`, plus one
    /// (0: never).
    clear_at: AtomicU64,
}

impl UsedFlag {
    pub fn new(epoch: Instant) -> UsedFlag {
        UsedFlag {
            epoch,
            set: AtomicBool::new(false),
            clear_at: AtomicU64::new(0),
        }
    }

    /// Forgets a clear reading: the next question reads the flag again
    /// (after a write of the agent's own, which it need not wait out).
    pub fn recheck(&self) {
        self.clear_at.store(0, Ordering::Relaxed);
    }

    /// May the list hold entries at `now`? `read` reads the kernel's flag
    /// (`None`: unreadable); it is called only when the copy is too old.
    pub fn may_hold(&self, now: Instant, read: impl FnOnce() -> Option<bool>) -> bool {
        if self.set.load(Ordering::Relaxed) {
            return true;
        }
        let now_ns = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let clear_at = self.clear_at.load(Ordering::Relaxed);
        if clear_at != 0 && clear_at <= now_ns && now_ns - clear_at < RECHECK.as_nanos() as u64 {
            return false;
        }
        match read() {
            Some(false) => {
                self.clear_at.store(now_ns, Ordering::Relaxed);
                false
            }
            Some(true) => {
                self.set.store(true, Ordering::Relaxed);
                true
            }
            None => true,
        }
    }
}

impl AllowLookup {
    pub fn open(pin_path: &Path) -> Result<AllowLookup, KernelError> {
        let p = pin_path.join(names::ALLOW);
        let data = MapData::from_pin(&p)
            .map_err(|e| KernelError::from_map(format!("cannot open {}", p.display()), e, None))?;
        let map = Map::from_map_data(data)
            .map_err(|e| KernelError::from_map(names::ALLOW.to_string(), e, None))?;
        let trie = LpmTrie::try_from(map)
            .map_err(|e| KernelError::from_map(names::ALLOW.to_string(), e, None))?;
        let lists_used = if pin_path.join(names::LISTS_USED).exists() {
            let p = pin_path.join(names::LISTS_USED);
            let data = MapData::from_pin(&p).map_err(|e| {
                KernelError::from_map(format!("cannot open {}", p.display()), e, None)
            })?;
            let map = Map::from_map_data(data)
                .map_err(|e| KernelError::from_map(names::LISTS_USED.to_string(), e, None))?;
            Some(
                Array::try_from(map)
                    .map_err(|e| KernelError::from_map(names::LISTS_USED.to_string(), e, None))?,
            )
        } else {
            None
        };
        Ok(AllowLookup {
            trie,
            pin_path: pin_path.to_owned(),
            lists_used,
            used: UsedFlag::new(Instant::now()),
        })
    }

    /// Reads the list's "used" flag again at the next look-up: for the
    /// agent's own writes (a reload's sync), which then count at once.
    pub fn recheck(&self) {
        self.used.recheck();
    }

    /// May the allow list hold entries? See [`UsedFlag`].
    fn may_hold(&self) -> bool {
        let Some(flags) = &self.lists_used else {
            return true;
        };
        self.used.may_hold(Instant::now(), || {
            flags.get(&names::LIST_USED_ALLOW, 0).ok().map(|v| v != 0)
        })
    }

    /// Is `ip` on the allow list now? The longest matching prefix decides;
    /// only when that one has expired (not swept yet) is the whole list
    /// consulted, so a shorter active prefix still counts.
    pub fn contains(&self, ip: IpAddr) -> Result<bool, KernelError> {
        if !self.may_hold() {
            return Ok(false);
        }
        let key = Key::new(PREFIX_BITS, IpAddrKey::from(ip.to_canonical()).octets);
        match self.trie.get(&key, 0) {
            Ok(e) => {
                let e_exp = e.expires_ns();
                if e_exp == 0 || BootInstant::now().0 < e_exp {
                    return Ok(true);
                }
                Ok(KernelMaps::open(&self.pin_path)?.allow_match(ip)?.is_some())
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) if super::error::map_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(KernelError::from_map("read the allow list", e, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// The flag as the kernel holds it, counting reads.
    struct Kernel {
        flag: Cell<Option<bool>>,
        reads: Cell<u32>,
    }

    impl Kernel {
        fn new(flag: Option<bool>) -> Kernel {
            Kernel {
                flag: Cell::new(flag),
                reads: Cell::new(0),
            }
        }

        fn ask(&self, f: &UsedFlag, at: Instant) -> bool {
            f.may_hold(at, || {
                self.reads.set(self.reads.get() + 1);
                self.flag.get()
            })
        }
    }

    #[test]
    fn a_list_that_became_used_counts_within_the_recheck_bound() {
        let t0 = Instant::now();
        let f = UsedFlag::new(t0);
        let k = Kernel::new(Some(false));
        assert!(!k.ask(&f, t0));
        // Within the bound the clear flag is not read again...
        assert!(!k.ask(&f, t0 + RECHECK / 2));
        assert_eq!(k.reads.get(), 1);
        // ... even when a writer set it meanwhile (`tarpit allow add`),
        k.flag.set(Some(true));
        assert!(!k.ask(&f, t0 + RECHECK - Duration::from_nanos(1)));
        // but never for longer than the bound.
        assert!(k.ask(&f, t0 + RECHECK));
        assert_eq!(k.reads.get(), 2);

        // After a write of the agent's own, at once.
        let f = UsedFlag::new(t0);
        k.flag.set(Some(false));
        assert!(!k.ask(&f, t0));
        k.flag.set(Some(true));
        f.recheck();
        assert!(k.ask(&f, t0));
    }

    #[test]
    fn a_set_flag_is_never_read_again_and_an_unreadable_one_counts_as_set() {
        let t0 = Instant::now();
        let f = UsedFlag::new(t0);
        let k = Kernel::new(Some(true));
        assert!(k.ask(&f, t0));
        k.flag.set(Some(false));
        assert!(k.ask(&f, t0 + RECHECK * 10));
        assert_eq!(k.reads.get(), 1);

        let f = UsedFlag::new(t0);
        let k = Kernel::new(None);
        assert!(k.ask(&f, t0));
        // Not remembered: read again next time.
        k.flag.set(Some(false));
        assert!(!k.ask(&f, t0));
        assert_eq!(k.reads.get(), 2);
    }
}
