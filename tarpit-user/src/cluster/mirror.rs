//! What this node has shared of its block list, and what it took in from
//! the others: the pure bookkeeping between the kernel's block list and
//! Redis (no I/O; `link` reads the kernel and talks to Redis).
//!
//! Local changes are found by comparing the kernel's block list with the
//! mirror every tick, whoever made them: an offender blocked by the agent,
//! `tarpit block add|del` run by an admin (the command line writes the
//! kernel directly, with or without an agent), a block that ran out. So
//! there is one path for every change, and a change made while the agent
//! was stopped is found at its next start.
use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::keys::Keys;
use super::record::{BlockRecord, SharedList};

/// A block-list entry as the kernel holds it, in wall-clock terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBlock {
    pub net: IpNet,
    /// When the kernel entry was written (boot-clock nanoseconds): a new
    /// value means the entry was written again.
    pub written: u64,
    /// Unix milliseconds of that write.
    pub written_ms: u64,
    pub expires_at: Option<u64>,
    pub reason: u32,
    pub automatic: bool,
    pub all_ports: bool,
    pub hold: bool,
}

/// Entries end this long (seconds) before their recorded expiry without
/// counting as deleted: the kernel's expiry and the record's are rounded
/// apart.
const EXPIRY_SLACK: u64 = 2;

#[derive(Debug, Clone)]
struct Entry {
    rec: BlockRecord,
    /// The kernel entry's write time as last seen; `None` until the next
    /// scan after this node wrote a record of another node.
    seen: Option<u64>,
}

/// What the state file says of an admin's entry (`tarpit allow|block
/// add`): when it was added and the admin's comment, both shared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Saved {
    /// Unix milliseconds of the `add`.
    pub at_ms: u64,
    pub comment: Option<String>,
}

/// What to do with a record read from Redis or the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remote {
    /// Put it on the kernel's block list.
    Apply,
    /// Take the network off the kernel's block list.
    Remove,
    /// Nothing; why, for the log and the metrics.
    Ignore(&'static str),
}

/// The shared entries of one kernel list this node knows (live and
/// deleted).
#[derive(Debug, Default)]
pub struct Mirror {
    list: SharedList,
    entries: HashMap<IpNet, Entry>,
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// The mirror of another list than the block list.
    pub fn of(list: SharedList) -> Mirror {
        Mirror {
            list,
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, net: IpNet) -> Option<&BlockRecord> {
        self.entries.get(&Keys::canonical(net)).map(|e| &e.rec)
    }

    /// Compares the kernel's active block list with what was shared and
    /// returns this node's changes since, as records to publish (new or
    /// rewritten blocks, and tombstones of blocks deleted before their
    /// end). `now_ms` is Unix milliseconds. `saved` gives what the state
    /// file says of an admin's entry (`tarpit block add`): its time, since
    /// the agent writes saved entries into the kernel again at every
    /// start, and that rewrite must not count as a new change that would
    /// beat a deletion made elsewhere; and its comment, shared with it.
    /// `evicted` says whether an entry (its network, and its kernel write
    /// time) left the kernel by an eviction of this host (room made in the
    /// full automatic part, `kernel::evictions`): forgotten, no deletion.
    pub fn scan(
        &mut self,
        kernel: &[KernelBlock],
        me: &str,
        now_ms: u64,
        saved: impl Fn(IpNet) -> Option<Saved>,
        evicted: impl Fn(IpNet, u64) -> bool,
    ) -> Vec<BlockRecord> {
        let now = now_ms / 1000;
        let mut out = Vec::new();
        let mut present = std::collections::HashSet::new();
        for k in kernel {
            let net = Keys::canonical(k.net);
            present.insert(net);
            let fresh = match self.entries.get_mut(&net) {
                Some(e) if !e.rec.deleted => match e.seen {
                    // Written by this node for another's record: note it.
                    None => {
                        e.seen = Some(k.written);
                        false
                    }
                    Some(s) => s != k.written,
                },
                // New, or added again after a deletion.
                _ => true,
            };
            if fresh {
                let saved = match k.automatic {
                    false => saved(net),
                    true => None,
                };
                let (at, comment) = match saved {
                    // The state file keeps the add to the second; the
                    // kernel's entry written in that second has its
                    // millisecond (so other hosts' propagation lag is not
                    // read up to a second long).
                    Some(s) if k.written_ms / 1000 == s.at_ms / 1000 => (k.written_ms, s.comment),
                    Some(s) => (s.at_ms, s.comment),
                    None => (k.written_ms, None),
                };
                let rec = BlockRecord {
                    list: self.list,
                    net,
                    node: me.to_string(),
                    at,
                    expires_at: k.expires_at,
                    reason: k.reason,
                    automatic: k.automatic,
                    all_ports: k.all_ports,
                    hold: k.hold,
                    comment,
                    deleted: false,
                };
                self.entries.insert(
                    net,
                    Entry {
                        rec: rec.clone(),
                        seen: Some(k.written),
                    },
                );
                out.push(rec);
            }
        }
        let gone: Vec<IpNet> = self
            .entries
            .iter()
            .filter(|(net, e)| !e.rec.deleted && !present.contains(net))
            .map(|(net, _)| *net)
            .collect();
        for net in gone {
            let Some(e) = self.entries.remove(&net) else {
                continue;
            };
            let ran_out = e
                .rec
                .expires_at
                .is_some_and(|x| now.saturating_add(EXPIRY_SLACK) >= x);
            // Evicted here to make room: this host's housekeeping.
            if e.seen.is_some_and(|w| evicted(net, w)) {
                continue;
            }
            // Not yet written here (the kernel refused it, or the scan
            // came first): nothing was deleted.
            if ran_out || e.seen.is_none() {
                if e.seen.is_none() && !ran_out {
                    self.entries.insert(net, e);
                }
                continue;
            }
            let dead = e.rec.tombstone(me, now_ms.max(e.rec.at + 1));
            self.entries.insert(
                net,
                Entry {
                    rec: dead.clone(),
                    seen: None,
                },
            );
            out.push(dead);
        }
        out
    }

    /// Decides about a record another node (or this one, before a
    /// restart) wrote, and notes it when acted on. `spared` is this
    /// node's verdict on the network (its allow list and internal
    /// networks win over any block from elsewhere).
    pub fn remote(&mut self, rec: &BlockRecord, spared: Option<&'static str>, now: u64) -> Remote {
        let net = Keys::canonical(rec.net);
        let known = self.entries.get(&net);
        if let Some(k) = known
            && !rec.supersedes(&k.rec)
        {
            return Remote::Ignore("not newer");
        }
        if rec.deleted {
            let live = known.is_some_and(|k| !k.rec.deleted);
            self.entries.insert(
                net,
                Entry {
                    rec: rec.clone(),
                    seen: None,
                },
            );
            return if live {
                Remote::Remove
            } else {
                Remote::Ignore("nothing to delete")
            };
        }
        if !rec.active(now) {
            return Remote::Ignore("expired");
        }
        if let Some(why) = spared {
            return Remote::Ignore(why);
        }
        self.entries.insert(
            net,
            Entry {
                rec: rec.clone(),
                seen: None,
            },
        );
        Remote::Apply
    }

    /// Forgets a live entry without a tombstone: it left the kernel for
    /// a reason of this node's own (evicted from a full automatic part to
    /// make room), which is no deletion to share.
    pub fn forget(&mut self, net: IpNet) {
        let net = Keys::canonical(net);
        if self.entries.get(&net).is_some_and(|e| !e.rec.deleted) {
            self.entries.remove(&net);
        }
    }

    /// Forgets tombstones older than `keep_ms` (their Redis keys are gone
    /// too), so the mirror stays as small as the block list.
    pub fn prune(&mut self, now_ms: u64, keep_ms: u64) {
        self.entries
            .retain(|_, e| !e.rec.deleted || now_ms.saturating_sub(e.rec.at) < keep_ms);
    }
}

/// The widest remote blocks applied (IPv4, IPv6 prefix lengths): a wider
/// one from Redis is refused as a mistake or an attack (a /0 would close
/// every MX to everyone); a host can still block wider networks itself.
pub const WIDEST_REMOTE_BLOCK: (u8, u8) = (8, 16);

/// This node's own networks win: a block from elsewhere that overlaps its
/// internal networks or configured allow list, or whose network this
/// node's kernel allow list covers, is not applied here; nor one wider
/// than [`WIDEST_REMOTE_BLOCK`]. The reason, or `None` when the block may
/// go in.
pub fn spared(
    net: IpNet,
    allow_ips: &[IpNet],
    internal: &[IpNet],
    kernel_allows: impl Fn(IpAddr) -> bool,
) -> Option<&'static str> {
    let net = Keys::canonical(net);
    let widest = match net {
        IpNet::V4(_) => WIDEST_REMOTE_BLOCK.0,
        IpNet::V6(_) => WIDEST_REMOTE_BLOCK.1,
    };
    if net.prefix_len() < widest {
        return Some("too wide");
    }
    let overlaps = |n: &IpNet| {
        let n = Keys::canonical(*n);
        n.contains(&net.network()) || net.contains(&n.network())
    };
    if internal.iter().any(overlaps) {
        return Some("allow.internal");
    }
    if allow_ips.iter().any(overlaps) {
        return Some("allow.ips");
    }
    if kernel_allows(net.network()) {
        return Some("allow list");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000;

    fn none_saved(_: IpNet) -> Option<Saved> {
        None
    }

    fn no_evictions(_: IpNet, _: u64) -> bool {
        false
    }

    fn saved_at(at_ms: u64) -> impl Fn(IpNet) -> Option<Saved> {
        move |_| {
            Some(Saved {
                at_ms,
                comment: None,
            })
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn kb(n: &str, written: u64, expires_at: Option<u64>) -> KernelBlock {
        KernelBlock {
            net: net(n),
            written,
            written_ms: T * 1000,
            expires_at,
            reason: 1,
            automatic: true,
            all_ports: false,
            hold: false,
        }
    }

    fn remote_rec(n: &str, node: &str, at_s: u64, expires_at: Option<u64>) -> BlockRecord {
        BlockRecord {
            list: SharedList::Block,
            net: net(n),
            node: node.into(),
            at: at_s * 1000,
            expires_at,
            reason: 5,
            automatic: false,
            all_ports: false,
            hold: false,
            comment: None,
            deleted: false,
        }
    }

    #[test]
    fn a_new_kernel_block_is_published_once_and_a_deletion_as_a_tombstone() {
        let mut m = Mirror::new();
        let k = [kb("198.51.100.7/32", 1, Some(T + 600))];
        let out = m.scan(&k, "mx1", T * 1000, none_saved, no_evictions);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].node, "mx1");
        assert_eq!(out[0].expires_at, Some(T + 600));
        assert!(
            m.scan(&k, "mx1", T * 1000 + 500, none_saved, no_evictions)
                .is_empty()
        );
        // Written again (a new TTL): published again.
        let k2 = [kb("198.51.100.7/32", 2, Some(T + 900))];
        assert_eq!(
            m.scan(&k2, "mx1", T * 1000 + 600, none_saved, no_evictions)[0].expires_at,
            Some(T + 900)
        );
        // Gone before its end: deleted, a tombstone.
        let out = m.scan(&[], "mx1", (T + 10) * 1000, none_saved, no_evictions);
        assert_eq!(out.len(), 1);
        assert!(out[0].deleted);
        assert!(
            m.scan(&[], "mx1", (T + 11) * 1000, none_saved, no_evictions)
                .is_empty()
        );
    }

    #[test]
    fn an_admin_entry_put_back_at_start_keeps_its_date_and_loses_to_a_later_deletion() {
        let mut m = Mirror::new();
        let saved = remote_rec("198.51.100.9/32", "mx2", T, None);
        assert_eq!(m.remote(&saved, None, T), Remote::Apply);
        let gone = saved.tombstone("mx1", (T + 100) * 1000);
        assert_eq!(m.remote(&gone, None, T + 100), Remote::Remove);
        // mx2's agent restarts: the state file's entry is written into its
        // kernel again (now), dated by the file (T): older than the deletion.
        let mut at_mx2 = Mirror::new();
        let mut k = kb("198.51.100.9/32", 99, None);
        k.automatic = false;
        k.written_ms = (T + 200) * 1000;
        let out = at_mx2.scan(
            &[k],
            "mx2",
            (T + 200) * 1000,
            saved_at(T * 1000),
            no_evictions,
        );
        assert_eq!(out[0].at, T * 1000);
        assert!(gone.supersedes(&out[0]));
        // An automatic block is dated by the kernel.
        let mut m2 = Mirror::new();
        let k = kb("198.51.100.10/32", 5, None);
        let out = m2.scan(&[k], "mx2", (T + 200) * 1000, saved_at(1), no_evictions);
        assert_eq!(out[0].at, T * 1000);
    }

    #[test]
    fn an_admin_entry_is_dated_to_the_millisecond_by_its_kernel_entry() {
        let mut m = Mirror::new();
        let mut admin = kb("198.51.100.22/32", 1, None);
        admin.automatic = false;
        admin.written_ms = T * 1000 + 437;
        // The state file knows the second only.
        let out = m.scan(
            &[admin],
            "mx1",
            T * 1000 + 500,
            saved_at(T * 1000),
            no_evictions,
        );
        assert_eq!(out[0].at, T * 1000 + 437);
        // A kernel entry from another second (restored at a restart) keeps
        // the file's time.
        let mut m = Mirror::new();
        let mut old = kb("198.51.100.23/32", 1, None);
        old.automatic = false;
        let out = m.scan(
            &[old],
            "mx1",
            T * 1000 + 500,
            saved_at(T * 1000 - 60_000),
            no_evictions,
        );
        assert_eq!(out[0].at, T * 1000 - 60_000);
    }

    #[test]
    fn an_admin_entry_is_shared_with_its_comment_and_an_automatic_one_without() {
        let mut m = Mirror::new();
        let mut admin = kb("198.51.100.20/32", 1, None);
        admin.automatic = false;
        let auto = kb("198.51.100.21/32", 1, None);
        let file = |net: IpNet| {
            Some(Saved {
                at_ms: T * 1000 - 5,
                comment: Some(format!("botnet {net}")),
            })
        };
        let out = m.scan(
            &[admin.clone(), auto.clone()],
            "mx1",
            T * 1000,
            file,
            no_evictions,
        );
        let by = |n: &str| out.iter().find(|r| r.net == net(n)).unwrap().clone();
        let a = by("198.51.100.20/32");
        assert_eq!(a.comment.as_deref(), Some("botnet 198.51.100.20/32"));
        assert_eq!(a.at, T * 1000 - 5);
        assert_eq!(by("198.51.100.21/32").comment, None);
        // The comment travels in the record, and back.
        let text = serde_json::to_string(&a).unwrap();
        let back: BlockRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.comment, a.comment);
        // Added again with another comment (the kernel entry is rewritten):
        // shared again, with the new one.
        admin.written = 2;
        let again = |_: IpNet| {
            Some(Saved {
                at_ms: T * 1000 + 50,
                comment: Some("partner asked".into()),
            })
        };
        let out = m.scan(&[admin, auto], "mx1", T * 1000 + 60, again, no_evictions);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].comment.as_deref(), Some("partner asked"));
    }

    #[test]
    fn a_block_that_ran_out_is_not_a_deletion() {
        let mut m = Mirror::new();
        m.scan(
            &[kb("198.51.100.7/32", 1, Some(T + 60))],
            "mx1",
            T * 1000,
            none_saved,
            no_evictions,
        );
        assert!(
            m.scan(&[], "mx1", (T + 59) * 1000, none_saved, no_evictions)
                .is_empty()
        );
        assert!(m.get(net("198.51.100.7/32")).is_none());
    }

    #[test]
    fn a_remote_block_is_applied_not_published_back_and_its_deletion_spreads() {
        let mut m = Mirror::new();
        let r = remote_rec("198.51.100.8/32", "mx2", T, Some(T + 600));
        assert_eq!(m.remote(&r, None, T), Remote::Apply);
        // The same record again (the channel and the catch-up scan).
        assert_eq!(m.remote(&r, None, T), Remote::Ignore("not newer"));
        // The next scan sees it in the kernel: nothing to publish.
        let k = [kb("198.51.100.8/32", 7, Some(T + 600))];
        assert!(
            m.scan(&k, "mx1", (T + 1) * 1000, none_saved, no_evictions)
                .is_empty()
        );
        // An admin here deletes it: the tombstone goes out.
        let out = m.scan(&[], "mx1", (T + 2) * 1000, none_saved, no_evictions);
        assert!(out.len() == 1 && out[0].deleted && out[0].node == "mx1");
    }

    #[test]
    fn a_tombstone_beats_a_replay_of_the_block_it_deleted() {
        let mut m = Mirror::new();
        let r = remote_rec("198.51.100.9/32", "mx2", T, None);
        assert_eq!(m.remote(&r, None, T), Remote::Apply);
        let gone = r.tombstone("mx3", (T + 5) * 1000);
        assert_eq!(m.remote(&gone, None, T + 5), Remote::Remove);
        // mx2 comes back from an outage and replays its block: ignored.
        assert_eq!(m.remote(&r, None, T + 6), Remote::Ignore("not newer"));
        // A block made after the deletion goes in again.
        let again = remote_rec("198.51.100.9/32", "mx2", T + 7, None);
        assert_eq!(m.remote(&again, None, T + 7), Remote::Apply);
        // Tombstones of unknown blocks are kept (a later replay loses).
        let mut fresh = Mirror::new();
        let ts =
            remote_rec("198.51.100.10/32", "mx2", T + 9, None).tombstone("mx2", (T + 9) * 1000);
        assert_eq!(
            fresh.remote(&ts, None, T + 9),
            Remote::Ignore("nothing to delete")
        );
        let old = remote_rec("198.51.100.10/32", "mx2", T + 1, None);
        assert_eq!(fresh.remote(&old, None, T + 9), Remote::Ignore("not newer"));
        fresh.prune((T + 9) * 1000 + 10, 5);
        assert!(fresh.is_empty());
    }

    #[test]
    fn a_block_this_host_evicted_is_no_deletion_but_one_deleted_after_a_new_write_is() {
        let mut m = Mirror::new();
        let n = "198.51.100.7/32";
        m.scan(
            &[kb(n, 10, None)],
            "mx1",
            T * 1000,
            none_saved,
            no_evictions,
        );
        // Gone from the kernel, noted as evicted after its write (10).
        let evicted_at_20 = |net: IpNet, written: u64| net == self::net(n) && written <= 20;
        let out = m.scan(&[], "mx1", (T + 1) * 1000, none_saved, evicted_at_20);
        assert!(out.is_empty(), "{out:?}");
        assert!(m.get(net(n)).is_none());
        // Blocked again (written at 30), then deleted by an admin: the old
        // eviction does not hide the deletion.
        let out = m.scan(
            &[kb(n, 30, None)],
            "mx1",
            (T + 2) * 1000,
            none_saved,
            evicted_at_20,
        );
        assert_eq!(out.len(), 1);
        let out = m.scan(&[], "mx1", (T + 3) * 1000, none_saved, evicted_at_20);
        assert!(out.len() == 1 && out[0].deleted, "{out:?}");
        // A block of another host that this host evicted: forgotten too.
        let r = remote_rec("198.51.100.8/32", "mx2", T, None);
        assert_eq!(m.remote(&r, None, T), Remote::Apply);
        m.scan(
            &[kb("198.51.100.8/32", 40, None)],
            "mx1",
            (T + 4) * 1000,
            none_saved,
            no_evictions,
        );
        let evicted = |_: IpNet, written: u64| written <= 50;
        assert!(
            m.scan(&[], "mx1", (T + 5) * 1000, none_saved, evicted)
                .is_empty()
        );
    }

    #[test]
    fn an_evicted_block_is_forgotten_not_deleted() {
        let mut m = Mirror::new();
        m.scan(
            &[kb("198.51.100.7/32", 1, None)],
            "mx1",
            T * 1000,
            none_saved,
            no_evictions,
        );
        m.forget(net("198.51.100.7/32"));
        assert!(
            m.scan(&[], "mx1", (T + 1) * 1000, none_saved, no_evictions)
                .is_empty()
        );
    }

    #[test]
    fn expired_and_spared_remote_blocks_stay_out() {
        let mut m = Mirror::new();
        let old = remote_rec("198.51.100.11/32", "mx2", T - 100, Some(T - 1));
        assert_eq!(m.remote(&old, None, T), Remote::Ignore("expired"));
        let r = remote_rec("198.51.100.12/32", "mx2", T, None);
        assert_eq!(
            m.remote(&r, Some("allow.ips"), T),
            Remote::Ignore("allow.ips")
        );
        assert!(m.get(r.net).is_none());
    }

    #[test]
    fn the_nodes_own_allow_list_and_internal_networks_win() {
        let internal = [net("10.0.0.0/8"), net("fd5b:1e00:1::/48")];
        let allow = [net("198.51.100.25/32")];
        let none = |_: IpAddr| false;
        assert_eq!(
            spared(net("10.1.2.3/32"), &allow, &internal, none),
            Some("allow.internal")
        );
        // A wide block that covers an internal network is refused whole.
        assert_eq!(
            spared(net("fd5b:1e00::/32"), &allow, &internal, none),
            Some("allow.internal")
        );
        assert_eq!(
            spared(net("198.51.100.0/24"), &allow, &internal, none),
            Some("allow.ips")
        );
        assert_eq!(
            spared(net("::ffff:198.51.100.25/128"), &allow, &internal, none),
            Some("allow.ips")
        );
        let kernel = |ip: IpAddr| ip == "198.51.100.30".parse::<IpAddr>().unwrap();
        assert_eq!(
            spared(net("198.51.100.30/32"), &[], &[], kernel),
            Some("allow list")
        );
        assert_eq!(
            spared(net("198.51.100.31/32"), &allow, &internal, kernel),
            None
        );
        // Nobody closes every MX through Redis.
        assert_eq!(spared(net("0.0.0.0/0"), &[], &[], none), Some("too wide"));
        assert_eq!(spared(net("::/0"), &[], &[], none), Some("too wide"));
        assert_eq!(spared(net("202.0.0.0/7"), &[], &[], none), Some("too wide"));
        assert_eq!(spared(net("203.0.0.0/8"), &[], &[], none), None);
        assert_eq!(spared(net("2000::/15"), &[], &[], none), Some("too wide"));
        assert_eq!(spared(net("2001:db8::/32"), &[], &[], none), None);
    }
}
