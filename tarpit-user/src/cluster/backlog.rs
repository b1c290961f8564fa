//! What this node changed while Redis was gone, kept for replay: the
//! latest change per block and per greylist key (an outage of hours is
//! many changes of few keys), and the strikes seen here, with their time;
//! bounded in size.
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;

use super::record::{BlockRecord, GreyState, SharedList};
use crate::policy::ports::Offence;
use crate::reputation::greylist::Id;

/// A strike seen here while Redis was gone: who, what, when (Unix ms),
/// and its number among this agent's strikes (its name, with the agent's
/// id: two strikes of one address in one millisecond are two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptOffence {
    pub ip: IpAddr,
    pub offence: Offence,
    pub at_ms: u64,
    pub seq: u64,
}

/// Changes kept while Redis is gone, per kind; beyond, new keys are
/// counted as lost (and reach the others only if made again).
pub const MAX_BACKLOG: usize = 100_000;

#[derive(Debug)]
pub struct Backlog {
    blocks: HashMap<(SharedList, IpNet), BlockRecord>,
    grey: HashMap<Id, GreyState>,
    /// In the order they were seen.
    offences: VecDeque<KeptOffence>,
    max: usize,
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog::new(MAX_BACKLOG)
    }
}

impl Backlog {
    pub fn new(max: usize) -> Backlog {
        Backlog {
            blocks: HashMap::new(),
            grey: HashMap::new(),
            offences: VecDeque::new(),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len() + self.grey.len() + self.offences.len()
    }

    /// Keeps a strike; false when it could not be kept (full).
    pub fn keep_offence(&mut self, o: KeptOffence) -> bool {
        if self.offences.len() >= self.max {
            return false;
        }
        self.offences.push_back(o);
        true
    }

    /// The oldest kept strike still inside the strike window (`window_ms`
    /// before `now_ms`), after dropping the older ones, which would count
    /// for nothing anywhere; how many were dropped.
    pub fn next_fresh_offence(
        &mut self,
        now_ms: u64,
        window_ms: u64,
    ) -> (Option<KeptOffence>, usize) {
        let mut dropped = 0;
        while let Some(o) = self.offences.front() {
            if now_ms.saturating_sub(o.at_ms) < window_ms {
                return (Some(*o), dropped);
            }
            self.offences.pop_front();
            dropped += 1;
        }
        (None, dropped)
    }

    /// The oldest kept strike was announced (or dropped as too old).
    pub fn done_offence(&mut self) {
        self.offences.pop_front();
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps a block change (the later one of a network replaces the
    /// earlier); false when it could not be kept (full).
    pub fn keep_block(&mut self, rec: BlockRecord) -> bool {
        let key = (rec.list, rec.net);
        if self.blocks.len() >= self.max && !self.blocks.contains_key(&key) {
            return false;
        }
        match self.blocks.get(&key) {
            Some(old) if old.supersedes(&rec) => {}
            _ => {
                self.blocks.insert(key, rec);
            }
        }
        true
    }

    /// Keeps a greylist change the way the table merges them: a pass
    /// beats a first attempt, the earliest first attempt and the latest
    /// pass win. False when it could not be kept (full).
    pub fn keep_grey(&mut self, id: Id, state: GreyState) -> bool {
        let Some(old) = self.grey.get(&id).copied() else {
            if self.grey.len() >= self.max {
                return false;
            }
            self.grey.insert(id, state);
            return true;
        };
        let newer = match (old, state) {
            (GreyState::Known { until: a }, GreyState::Known { until: b }) => b > a,
            (GreyState::Known { .. }, GreyState::Pending { .. }) => false,
            (GreyState::Pending { .. }, GreyState::Known { .. }) => true,
            (GreyState::Pending { first: a, .. }, GreyState::Pending { first: b, .. }) => b < a,
        };
        if newer {
            self.grey.insert(id, state);
        }
        true
    }

    pub fn blocks(&self) -> Vec<BlockRecord> {
        self.blocks.values().cloned().collect()
    }

    pub fn grey(&self) -> Vec<(Id, GreyState)> {
        self.grey.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// A kept entry was written (or lost to a later change elsewhere).
    pub fn done_block(&mut self, rec: &BlockRecord) {
        self.blocks.remove(&(rec.list, rec.net));
    }

    pub fn done_grey(&mut self, id: &Id) {
        self.grey.remove(id);
    }

    /// Forgets the greylist part (the site keys differ: not shared).
    pub fn clear_grey(&mut self) {
        self.grey.clear();
    }
}

/// Strikes of other nodes already counted here, by their name (the
/// sending agent's id and the strike's number), while in the strike window: a strike of an
/// outage reaches a node both on the channel and from Redis at its
/// catch-up, and must count once. Bounded: beyond [`MAX_BACKLOG`], the
/// oldest half is forgotten.
#[derive(Debug, Default)]
pub struct SeenStrikes {
    seen: HashMap<String, u64>,
}

impl SeenStrikes {
    /// True the first time a strike is seen.
    pub fn first(&mut self, id: String, at_ms: u64) -> bool {
        if self.seen.len() >= MAX_BACKLOG && !self.seen.contains_key(&id) {
            let mut ats: Vec<u64> = self.seen.values().copied().collect();
            ats.sort_unstable();
            let cut = ats[ats.len() / 2];
            self.seen.retain(|_, at| *at > cut);
        }
        self.seen.insert(id, at_ms).is_none()
    }

    /// Forgets strikes out of the window (`window_ms` before `now_ms`).
    pub fn prune(&mut self, now_ms: u64, window_ms: u64) {
        self.seen
            .retain(|_, at| now_ms.saturating_sub(*at) < window_ms);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(net: &str, at: u64, deleted: bool) -> BlockRecord {
        BlockRecord {
            list: SharedList::Block,
            net: net.parse().unwrap(),
            node: "mx1".into(),
            at,
            expires_at: None,
            reason: 0,
            automatic: false,
            all_ports: false,
            hold: false,
            comment: None,
            deleted,
        }
    }

    #[test]
    fn the_latest_change_of_a_block_is_kept_and_the_size_is_bounded() {
        let mut b = Backlog::new(2);
        assert!(b.keep_block(block("198.51.100.1/32", 1, false)));
        assert!(b.keep_block(block("198.51.100.1/32", 2, true)));
        // An older change arriving late does not replace the deletion.
        assert!(b.keep_block(block("198.51.100.1/32", 1, false)));
        assert_eq!(b.blocks().len(), 1);
        assert!(b.blocks()[0].deleted);
        assert!(b.keep_block(block("198.51.100.2/32", 3, false)));
        assert!(!b.keep_block(block("198.51.100.3/32", 4, false)), "full");
        // A network already kept still takes its newer change.
        assert!(b.keep_block(block("198.51.100.2/32", 5, true)));
        b.done_block(&block("198.51.100.1/32", 0, false));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn strikes_are_kept_in_order_and_bounded() {
        let mut b = Backlog::new(2);
        let o = |at_ms| KeptOffence {
            ip: "198.51.100.2".parse().unwrap(),
            offence: Offence::PreGreet,
            at_ms,
            seq: at_ms,
        };
        assert!(b.keep_offence(o(1)) && b.keep_offence(o(2)));
        assert!(!b.keep_offence(o(3)), "full");
        assert_eq!(b.len(), 2);
        let next = |b: &mut Backlog| b.next_fresh_offence(0, u64::MAX).0;
        assert_eq!(next(&mut b), Some(o(1)));
        b.done_offence();
        assert_eq!(next(&mut b), Some(o(2)));
        b.done_offence();
        assert!(b.is_empty() && next(&mut b).is_none());
        // Replayed after an outage: those out of the window are dropped,
        // the others come with their own time, oldest first.
        let mut b = Backlog::new(10);
        for at in [1_000, 2_000, 9_000] {
            b.keep_offence(o(at));
        }
        assert_eq!(b.next_fresh_offence(10_000, 7_500), (Some(o(9_000)), 2));
        b.done_offence();
        assert_eq!(b.next_fresh_offence(10_000, 7_500), (None, 0));
        assert!(b.is_empty());
    }

    #[test]
    fn a_strike_counts_once_however_it_arrives() {
        let mut s = SeenStrikes::default();
        assert!(s.first("0123456789abcdef:7".into(), 1_000));
        assert!(!s.first("0123456789abcdef:7".into(), 1_000));
        // Another strike in the same millisecond is another strike.
        assert!(s.first("0123456789abcdef:8".into(), 1_001));
        s.prune(1_500, 600);
        assert_eq!(s.len(), 2);
        s.prune(1_700, 600);
        assert!(s.is_empty());
    }

    #[test]
    fn greylist_changes_merge_as_the_table_does() {
        let mut b = Backlog::new(10);
        let id = [7u8; 16];
        b.keep_grey(id, GreyState::Pending { first: 100, net: 1 });
        b.keep_grey(id, GreyState::Pending { first: 50, net: 1 });
        b.keep_grey(id, GreyState::Pending { first: 80, net: 1 });
        assert_eq!(
            b.grey(),
            vec![(id, GreyState::Pending { first: 50, net: 1 })]
        );
        b.keep_grey(id, GreyState::Known { until: 900 });
        b.keep_grey(id, GreyState::Pending { first: 10, net: 1 });
        b.keep_grey(id, GreyState::Known { until: 800 });
        assert_eq!(b.grey(), vec![(id, GreyState::Known { until: 900 })]);
        let mut full = Backlog::new(1);
        assert!(full.keep_grey([1; 16], GreyState::Known { until: 1 }));
        assert!(!full.keep_grey([2; 16], GreyState::Known { until: 1 }));
        full.clear_grey();
        assert!(full.is_empty());
    }
}
