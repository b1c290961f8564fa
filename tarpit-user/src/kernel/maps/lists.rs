//! The allow and block lists: prefixes in LPM tries, the block list in
//! two parts (the admin's and the agent's automatic blocks) so that a
//! flood of offenders never fills the admin's list. Here because the
//! eviction rules of the automatic part are the subtle part of the maps.
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use tarpit_common::{
    BlockReason, ListEntry,
    lists::{LIST_F_ALL_PORTS, LIST_F_HOLD},
    maps as names,
};

use aya::maps::{Array, MapData};

use super::{KernelMaps, Trie, layout_errno};
use crate::kernel::{
    clock::{BootInstant, expiry_from_ttl, expiry_to_instant},
    error::KernelError,
    prefix,
};

/// One allow or block list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListItem {
    pub net: IpNet,
    pub added: BootInstant,
    /// `None` = never expires.
    pub expires: Option<BootInstant>,
    /// Reason code (block list; 0 on the allow list).
    pub reason_code: u32,
    /// Block entry for every port, not only SMTP.
    pub all_ports: bool,
    /// An automatic block (the agent's [`names::AUTO_BLOCK`] part), not
    /// the admin's; always false on the allow list.
    pub automatic: bool,
    /// Held in the kernel (zero window, no socket) rather than dropped.
    pub hold: bool,
}

impl ListItem {
    pub fn reason(&self) -> Option<BlockReason> {
        BlockReason::from_code(self.reason_code)
    }

    pub fn is_active_at(&self, now: BootInstant) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

/// What to put on the block list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// `None` = until removed.
    pub ttl: Option<Duration>,
    pub reason: BlockReason,
    /// Drop every port, not only the SMTP ports.
    pub all_ports: bool,
    /// Hold TCP connections to the SMTP ports in the kernel (zero window,
    /// no socket) instead of dropping them (`tarpit_common::hold`).
    pub hold: bool,
}

/// What [`KernelMaps::auto_block_add`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoBlockAdded {
    /// False when an active admin entry for exactly this prefix is there
    /// already (it stands; a second row would only confuse).
    pub added: bool,
    /// Automatic entries removed to make room, oldest first.
    pub evicted: Vec<IpNet>,
}

/// Automatic blocks moved out of the admin's list by
/// [`KernelMaps::migrate_automatic_blocks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateReport {
    pub moved: usize,
    /// Expired, or no room left: not moved, removed.
    pub dropped: usize,
}

/// How many automatic entries one eviction removes at once: a scan of a
/// full list costs about a second per million entries, so a flood pays it
/// once per 1/64 of the list, not once per block.
pub const fn evict_batch(capacity: u32) -> usize {
    let n = (capacity / 64) as usize;
    if n == 0 { 1 } else { n }
}

/// Which automatic entries make room for `want` new ones: every expired
/// entry (the kernel ignores them already), then the oldest active ones by
/// the time they were added (ties by prefix, so the choice is stable).
/// `keep` (the prefix being written) is never chosen.
pub fn eviction_victims(
    items: &[ListItem],
    now: BootInstant,
    want: usize,
    keep: Option<IpNet>,
) -> Vec<IpNet> {
    let mut candidates: Vec<&ListItem> = items.iter().filter(|i| Some(i.net) != keep).collect();
    candidates.sort_by_key(|i| (i.is_active_at(now), i.added, i.net));
    let expired = candidates
        .iter()
        .take_while(|i| !i.is_active_at(now))
        .count();
    candidates
        .into_iter()
        .take(expired.max(want))
        .map(|i| i.net)
        .collect()
}

impl KernelMaps {
    /// Marks a list as used (`names::LISTS_USED`) before an entry goes in:
    /// the kernel does not look up a list that never held one. Set to 1,
    /// never back to 0; absent on pins whose programs look every list up.
    fn mark_used(used: &mut Option<Array<MapData, u32>>, index: u32) -> Result<(), KernelError> {
        match used {
            Some(a) => a
                .set(index, 1, 0)
                .map_err(|e| KernelError::from_map(format!("mark list {index} used"), e, None)),
            None => Ok(()),
        }
    }

    /// Marks every list that holds entries as used: pins kept from an
    /// earlier run (or made before `names::LISTS_USED` existed) may hold
    /// entries no writer of this run has marked. The loader calls this
    /// before it attaches the programs.
    pub fn mark_lists_in_use(&mut self) -> Result<(), KernelError> {
        // Unreadable counts as holding entries: an extra lookup, never a
        // missed entry.
        let holds = |t: &Trie| t.keys().next().is_some();
        if holds(&self.allow) {
            Self::mark_used(&mut self.lists_used, names::LIST_USED_ALLOW)?;
        }
        if holds(&self.block) {
            Self::mark_used(&mut self.lists_used, names::LIST_USED_BLOCK)?;
        }
        if self.auto_block.as_ref().is_some_and(holds) {
            Self::mark_used(&mut self.lists_used, names::LIST_USED_AUTO_BLOCK)?;
        }
        Ok(())
    }

    pub(super) fn list_add(
        trie: &mut Trie,
        map: &'static str,
        key: &'static str,
        cap: u32,
        net: IpNet,
        entry: ListEntry,
    ) -> Result<(), KernelError> {
        let k = prefix::key_of(&net);
        let err =
            |e| KernelError::from_map(format!("add {net} to {map}"), e, Some((map, key, cap)));
        match trie.insert(&k, entry, 0) {
            Ok(()) => Ok(()),
            // Kernels before 6.13 check a full trie before looking for the
            // key, so replacing an entry of a full list fails with ENOSPC.
            // Make room by removing the old entry, then put it back if the
            // new one still cannot go in (a racing add took the slot).
            Err(e) if layout_errno(&e) == Some(libc::ENOSPC) => {
                let Ok(old) = trie.get(&k, 0) else {
                    return Err(err(e));
                };
                if trie.remove(&k).is_err() {
                    return Err(err(e));
                }
                trie.insert(&k, entry, 0).map_err(|e| {
                    let _ = trie.insert(&k, old, 0);
                    err(e)
                })
            }
            Err(e) => Err(err(e)),
        }
    }

    pub(super) fn list_del(trie: &mut Trie, map: &str, net: IpNet) -> Result<bool, KernelError> {
        match trie.remove(&prefix::key_of(&net)) {
            Ok(()) => Ok(true),
            Err(e) if layout_errno(&e) == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(KernelError::from_map(
                format!("remove {net} from {map}"),
                e,
                None,
            )),
        }
    }

    pub(super) fn list_all(
        trie: &Trie,
        map: &str,
        automatic: bool,
    ) -> Result<Vec<ListItem>, KernelError> {
        let mut out = Vec::new();
        for item in trie.iter() {
            let (k, v) = item.map_err(|e| KernelError::from_map(format!("read {map}"), e, None))?;
            out.push(ListItem {
                net: prefix::net_of(&k),
                added: BootInstant(v.added_ns()),
                expires: expiry_to_instant(v.expires_ns()),
                reason_code: v.reason,
                all_ports: v.all_ports(),
                hold: v.hold(),
                automatic,
            });
        }
        out.sort_by_key(|a| a.net);
        Ok(out)
    }

    /// The longest active entry containing `ip`, as the kernel would pick
    /// it (expired entries are skipped, as the kernel sweeps them).
    pub(super) fn list_match(items: Vec<ListItem>, ip: IpAddr) -> Option<ListItem> {
        let now = BootInstant::now();
        items
            .into_iter()
            .filter(|i| i.is_active_at(now) && prefix::contains(&i.net, ip))
            .max_by_key(|i| i.net.prefix_len() as u32 + if i.net.addr().is_ipv4() { 96 } else { 0 })
    }

    /// Adds (or replaces) an allow-list prefix.
    pub fn allow_add(&mut self, net: IpNet, ttl: Option<Duration>) -> Result<(), KernelError> {
        let k = prefix::key_of(&net);
        let entry = ListEntry::new(
            k.prefix_len(),
            BootInstant::now().0,
            expiry_from_ttl(ttl),
            0,
            0,
        );
        Self::mark_used(&mut self.lists_used, names::LIST_USED_ALLOW)?;
        Self::list_add(
            &mut self.allow,
            names::ALLOW,
            "allow_entries",
            self.capacity_allow,
            net,
            entry,
        )
    }

    /// Removes an allow-list prefix; `false` when it was not there.
    pub fn allow_del(&mut self, net: IpNet) -> Result<bool, KernelError> {
        Self::list_del(&mut self.allow, names::ALLOW, net)
    }

    pub fn allow_list(&self) -> Result<Vec<ListItem>, KernelError> {
        Self::list_all(&self.allow, names::ALLOW, false)
    }

    /// The allow-list entry that covers `ip` now, if any.
    pub fn allow_match(&self, ip: IpAddr) -> Result<Option<ListItem>, KernelError> {
        Ok(Self::list_match(self.allow_list()?, ip))
    }

    /// Adds (or replaces) a block-list prefix. The admin's entries
    /// ([`BlockReason::Manual`]) go to the admin's list and fail only when
    /// that list is full; every other reason is an automatic block
    /// ([`Self::auto_block_add`]), which makes its own room.
    pub fn block_add(&mut self, net: IpNet, spec: BlockSpec) -> Result<(), KernelError> {
        if spec.reason != BlockReason::Manual && self.auto_block.is_some() {
            return self.auto_block_add(net, spec).map(|_| ());
        }
        let entry = Self::block_entry(&net, BootInstant::now(), spec);
        Self::mark_used(&mut self.lists_used, names::LIST_USED_BLOCK)?;
        Self::list_add(
            &mut self.block,
            names::BLOCK,
            "block_entries",
            self.capacity_block,
            net,
            entry,
        )?;
        // The admin's word stands: an automatic entry for the same prefix
        // would only show twice.
        if let Some(auto) = &mut self.auto_block {
            Self::list_del(auto, names::AUTO_BLOCK, net)?;
        }
        Ok(())
    }

    pub(super) fn block_entry(net: &IpNet, now: BootInstant, spec: BlockSpec) -> ListEntry {
        ListEntry::new(
            prefix::key_of(net).prefix_len(),
            now.0,
            expiry_from_ttl(spec.ttl),
            spec.reason.code(),
            if spec.all_ports { LIST_F_ALL_PORTS } else { 0 }
                | if spec.hold { LIST_F_HOLD } else { 0 },
        )
    }

    /// Puts an automatic block on the agent's part of the block list. When
    /// that part is full, its expired and then its oldest entries make
    /// room ([`eviction_victims`], [`evict_batch`] at a time); the admin's
    /// list is never touched, so `tarpit block add` never fails because of
    /// a flood of offenders.
    pub fn auto_block_add(
        &mut self,
        net: IpNet,
        spec: BlockSpec,
    ) -> Result<AutoBlockAdded, KernelError> {
        let now = BootInstant::now();
        let entry = Self::block_entry(&net, now, spec);
        if self.admin_holds(&net, now) {
            return Ok(AutoBlockAdded::default());
        }
        let evicted = self.auto_insert(net, entry, now)?;
        Ok(AutoBlockAdded {
            added: true,
            evicted,
        })
    }

    /// Whether the admin's list has an active entry for exactly `net`.
    pub(super) fn admin_holds(&self, net: &IpNet, now: BootInstant) -> bool {
        let k = prefix::key_of(net);
        // An LPM lookup returns the longest match: exact when its own
        // prefix length is the key's.
        self.block.get(&k, 0).is_ok_and(|e| {
            e.prefix_len == k.prefix_len() && (e.expires_ns() == 0 || now.0 < e.expires_ns())
        })
    }

    /// Inserts into the automatic part, evicting when it is full; returns
    /// what was evicted.
    pub(super) fn auto_insert(
        &mut self,
        net: IpNet,
        entry: ListEntry,
        now: BootInstant,
    ) -> Result<Vec<IpNet>, KernelError> {
        let cap = self.capacity_auto_block;
        if self.auto_block.is_some() {
            Self::mark_used(&mut self.lists_used, names::LIST_USED_AUTO_BLOCK)?;
        }
        let Some(auto) = &mut self.auto_block else {
            return Err(KernelError::Invalid(format!(
                "no {} map at {}: start the agent once to create it",
                names::AUTO_BLOCK,
                self.pin_path.display()
            )));
        };
        let add = |auto: &mut Trie| {
            Self::list_add(
                auto,
                names::AUTO_BLOCK,
                "auto_block_entries",
                cap,
                net,
                entry,
            )
        };
        match add(auto) {
            Ok(()) => return Ok(Vec::new()),
            Err(KernelError::MapFull { .. }) => {}
            Err(e) => return Err(e),
        }
        let items = Self::list_all(auto, names::AUTO_BLOCK, true)?;
        let mut evicted = Vec::new();
        for victim in eviction_victims(&items, now, evict_batch(cap), Some(net)) {
            // Noted first: whoever sees it gone knows it was no deletion.
            super::evictions::note(victim, now);
            if Self::list_del(auto, names::AUTO_BLOCK, victim)? {
                evicted.push(victim);
            }
        }
        add(auto)?;
        Ok(evicted)
    }

    /// Removes a block-list prefix from both parts; `false` when it was in
    /// neither.
    pub fn block_del(&mut self, net: IpNet) -> Result<bool, KernelError> {
        let admin = Self::list_del(&mut self.block, names::BLOCK, net)?;
        let auto = match &mut self.auto_block {
            Some(auto) => Self::list_del(auto, names::AUTO_BLOCK, net)?,
            None => false,
        };
        Ok(admin || auto)
    }

    /// Both parts of the block list, sorted by prefix (automatic entries
    /// say so in [`ListItem::automatic`]).
    pub fn block_list(&self) -> Result<Vec<ListItem>, KernelError> {
        let mut out = Self::list_all(&self.block, names::BLOCK, false)?;
        if let Some(auto) = &self.auto_block {
            out.extend(Self::list_all(auto, names::AUTO_BLOCK, true)?);
            out.sort_by_key(|a| a.net);
        }
        Ok(out)
    }

    /// The block-list entry that covers `ip` now, if any.
    pub fn block_match(&self, ip: IpAddr) -> Result<Option<ListItem>, KernelError> {
        Ok(Self::list_match(self.block_list()?, ip))
    }

    /// Moves automatic blocks (any reason but manual) out of the admin's
    /// list into the automatic part: pins of an older tarpit kept both in
    /// one list. Admin entries stay where they are; expired ones, and any
    /// the automatic part has no room for, are removed.
    pub fn migrate_automatic_blocks(&mut self) -> Result<MigrateReport, KernelError> {
        let mut report = MigrateReport::default();
        if self.auto_block.is_none() {
            return Ok(report);
        }
        let now = BootInstant::now();
        let manual = BlockReason::Manual.code();
        for item in Self::list_all(&self.block, names::BLOCK, false)? {
            if item.reason_code == manual {
                continue;
            }
            let moved = item.is_active_at(now) && {
                let entry = ListEntry::new(
                    prefix::key_of(&item.net).prefix_len(),
                    item.added.0,
                    item.expires.map_or(0, |e| e.0),
                    item.reason_code,
                    if item.all_ports { LIST_F_ALL_PORTS } else { 0 }
                        | if item.hold { LIST_F_HOLD } else { 0 },
                );
                self.auto_insert(item.net, entry, now).is_ok()
            };
            Self::list_del(&mut self.block, names::BLOCK, item.net)?;
            if moved {
                report.moved += 1;
            } else {
                report.dropped += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_active_prefix_wins_and_expired_is_skipped() {
        let now = BootInstant::now();
        let item = |net: &str, expires: Option<BootInstant>| ListItem {
            net: net.parse().unwrap(),
            added: now,
            expires,
            reason_code: 0,
            all_ports: false,
            hold: false,
            automatic: true,
        };
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let items = vec![
            item("198.51.0.0/16", None),
            item("198.51.100.0/24", Some(BootInstant(1))),
            item("10.0.0.0/8", None),
        ];
        let m = KernelMaps::list_match(items, ip).unwrap();
        assert_eq!(m.net, "198.51.0.0/16".parse::<IpNet>().unwrap());
        let items = vec![
            item("198.51.0.0/16", None),
            item("198.51.100.0/24", Some(now.plus(Duration::from_secs(60)))),
        ];
        let m = KernelMaps::list_match(items, ip).unwrap();
        assert_eq!(m.net, "198.51.100.0/24".parse::<IpNet>().unwrap());
        assert!(KernelMaps::list_match(vec![item("fd5b:1e00::/64", None)], ip).is_none());
    }

    fn auto_item(net: &str, added: u64, expires: Option<u64>) -> ListItem {
        ListItem {
            net: net.parse().unwrap(),
            added: BootInstant(added),
            expires: expires.map(BootInstant),
            reason_code: BlockReason::Pregreet.code(),
            all_ports: false,
            hold: false,
            automatic: true,
        }
    }

    #[test]
    fn eviction_takes_expired_entries_then_the_oldest() {
        let now = BootInstant(1_000);
        let items = vec![
            auto_item("198.51.100.3/32", 300, Some(5_000)),
            auto_item("198.51.100.1/32", 100, Some(5_000)),
            auto_item("fd5b:1e00::/64", 200, None),
            auto_item("198.51.100.9/32", 900, Some(999)), // expired
            auto_item("198.51.100.2/32", 100, Some(5_000)),
        ];
        let nets = |v: Vec<IpNet>| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // The expired one is free room; the oldest by added time next, ties
        // by prefix.
        assert_eq!(
            nets(eviction_victims(&items, now, 3, None)),
            ["198.51.100.9/32", "198.51.100.1/32", "198.51.100.2/32"]
        );
        // Every expired entry goes, even beyond the batch.
        assert_eq!(
            nets(eviction_victims(&items, now, 0, None)),
            ["198.51.100.9/32"]
        );
        // The prefix being written is never its own victim.
        let keep = "198.51.100.1/32".parse().ok();
        assert_eq!(
            nets(eviction_victims(&items, now, 2, keep)),
            ["198.51.100.9/32", "198.51.100.2/32"]
        );
        assert_eq!(eviction_victims(&items, now, 99, None).len(), 5);
        assert!(eviction_victims(&[], now, 1, None).is_empty());
    }

    #[test]
    fn eviction_batches_are_a_sixty_fourth_and_at_least_one() {
        assert_eq!(evict_batch(1), 1);
        assert_eq!(evict_batch(8), 1);
        assert_eq!(evict_batch(128), 2);
        assert_eq!(evict_batch(65_536), 1024);
    }
}
