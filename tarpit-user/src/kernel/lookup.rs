//! One-address lookups in the kernel's allow list, cheap enough for every
//! new connection: the kernel's own longest-prefix match, not a scan.
//!
//! The agent asks this when a client connects, so an entry added at run
//! time (`tarpit allow add`) or synced from the config spares the client
//! in the agent exactly as it does in XDP and sk_lookup: one list.
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use tarpit_common::{IpAddrKey, ListEntry, lists::PREFIX_BITS, maps as names};

use super::{KernelMaps, clock::BootInstant, error::KernelError};

pub struct AllowLookup {
    trie: LpmTrie<MapData, [u8; 16], ListEntry>,
    pin_path: std::path::PathBuf,
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
        Ok(AllowLookup {
            trie,
            pin_path: pin_path.to_owned(),
        })
    }

    /// Is `ip` on the allow list now? The longest matching prefix decides;
    /// only when that one has expired (not swept yet) is the whole list
    /// consulted, so a shorter active prefix still counts.
    pub fn contains(&self, ip: IpAddr) -> Result<bool, KernelError> {
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
