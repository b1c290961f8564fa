//! What this node changed while Redis was gone, kept for replay: the
//! latest change per block and per greylist key (an outage of hours is
//! many changes of few keys), bounded in size.
use std::collections::HashMap;

use ipnet::IpNet;

use super::record::{BlockRecord, GreyState, SharedList};
use crate::reputation::greylist::Id;

/// Changes kept while Redis is gone, per kind; beyond, new keys are
/// counted as lost (and reach the others only if made again).
pub const MAX_BACKLOG: usize = 100_000;

#[derive(Debug)]
pub struct Backlog {
    blocks: HashMap<(SharedList, IpNet), BlockRecord>,
    grey: HashMap<Id, GreyState>,
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
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len() + self.grey.len()
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
