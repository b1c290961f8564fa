//! The greylisting logic, pure: two bounded tables of fixed-size keys and
//! the clock passed in (unix seconds).
//!
//! - **pending**: first attempts waiting for their retry. At most
//!   `max_pending`; at most `per_network` of one client network at once
//!   (a network at its cap gets the same 451, unrecorded). When full, the
//!   oldest first attempts are evicted.
//! - **known**: keys whose retry passed, each until its expiry (renewed by
//!   every pass). At most `max_known`; when full, the least recently
//!   renewed go first.
//!
//! A full table never lets anyone pass: that would turn greylisting off
//! for everyone exactly when somebody floods it.
use std::collections::HashMap;

/// A key: a 128-bit keyed hash of what is greylisted (see `super::SiteKey`).
pub type Id = [u8; 16];
/// A client network: a 64-bit keyed hash of the /24 or /64.
pub type NetId = u64;

/// A first attempt waiting for its retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Unix seconds of the first attempt.
    pub first: u64,
    /// The client network, for the per-network cap.
    pub net: NetId,
}

/// One change, as the store writes it: fixed size, no strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Pending { id: Id, p: Pending },
    Known { id: Id, until: u64 },
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
pub struct GreyCheck {
    pub verdict: GreyVerdict,
    /// The key's new state, when it must be written down.
    pub write: Option<Record>,
    /// The client's network was at its cap: refused, not recorded.
    pub capped: bool,
    /// Entries evicted to make room (pending, known).
    pub evicted: (usize, usize),
}

impl GreyCheck {
    fn new(verdict: GreyVerdict, write: Option<Record>) -> Self {
        GreyCheck {
            verdict,
            write,
            capped: false,
            evicted: (0, 0),
        }
    }
}

/// The greylisting windows, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub min_wait: u64,
    pub retry_window: u64,
    pub pass_ttl: u64,
}

/// The bounds of the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub windows: Windows,
    pub max_pending: usize,
    pub max_known: usize,
    pub per_network: usize,
}

/// Renewing a pass is written to the store only when it moves the expiry
/// by at least this much, so a busy sender does not write on every mail.
pub const RENEW_WRITE_STEP: u64 = 3600;

/// Expired entries are swept at most this often (seconds) outside of
/// eviction: each sweep walks the whole table.
const SWEEP_EVERY: u64 = 60;

/// One eviction frees this share of a full table (at least one entry), so
/// the walk it takes is paid once per that many insertions.
const EVICT_SHARE: usize = 64;

/// Both tables and the per-network counts.
#[derive(Debug)]
pub struct GreyTable {
    pending: HashMap<Id, Pending>,
    known: HashMap<Id, u64>,
    /// Pending entries per network (no zero counts are kept), so its size
    /// is at most that of `pending`.
    per_net: HashMap<NetId, u32>,
    limits: Limits,
    last_sweep: u64,
}

impl GreyTable {
    pub fn new(limits: Limits) -> Self {
        GreyTable {
            pending: HashMap::new(),
            known: HashMap::new(),
            per_net: HashMap::new(),
            limits: Self::sane(limits),
            last_sweep: 0,
        }
    }

    fn sane(mut l: Limits) -> Limits {
        l.max_pending = l.max_pending.max(1);
        l.max_known = l.max_known.max(1);
        l.per_network = l.per_network.max(1);
        l
    }

    /// Forgets every entry (the site key changed: they hash under the old
    /// one and would never match again).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.known.clear();
        self.per_net.clear();
    }

    /// New windows and bounds (a reload): they apply to every later check,
    /// also of keys recorded before (a pending key's first attempt and a
    /// known key's expiry stay as they were written). Smaller bounds are
    /// enforced at once.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = Self::sane(limits);
        self.enforce_bounds();
    }

    fn pending_live(&self, p: &Pending, now: u64) -> bool {
        now <= p.first.saturating_add(self.limits.windows.retry_window)
    }

    fn remove_pending(&mut self, id: &Id) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        if let Some(c) = self.per_net.get_mut(&p.net) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.per_net.remove(&p.net);
            }
        }
        Some(p)
    }

    fn insert_pending(&mut self, id: Id, p: Pending) {
        if let Some(old) = self.pending.insert(id, p)
            && let Some(c) = self.per_net.get_mut(&old.net)
        {
            // Replaced: the old entry's count goes, the new one's comes.
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.per_net.remove(&old.net);
            }
        }
        *self.per_net.entry(p.net).or_insert(0) += 1;
    }

    /// Decides one attempt at `now` for key `id` from network `net`.
    pub fn check(&mut self, id: &Id, net: NetId, now: u64) -> GreyCheck {
        let w = self.limits.windows;
        if now >= self.last_sweep.saturating_add(SWEEP_EVERY) {
            self.sweep(now);
        }
        if let Some(until) = self.known.get_mut(id) {
            if now <= *until {
                let old = *until;
                let renewed = now.saturating_add(w.pass_ttl).max(old);
                *until = renewed;
                let write =
                    (renewed >= old.saturating_add(RENEW_WRITE_STEP)).then_some(Record::Known {
                        id: *id,
                        until: renewed,
                    });
                return GreyCheck::new(GreyVerdict::Pass, write);
            }
            self.known.remove(id);
        }
        if let Some(p) = self.pending.get(id).copied() {
            if self.pending_live(&p, now) {
                let ready = p.first.saturating_add(w.min_wait);
                if now < ready {
                    return GreyCheck::new(
                        GreyVerdict::TempFail {
                            retry_in: ready - now,
                        },
                        None,
                    );
                }
                // The retry came in time: the key becomes known.
                self.remove_pending(id);
                let mut out = GreyCheck::new(GreyVerdict::Pass, None);
                out.evicted.1 = self.make_room_known(now);
                let until = now.saturating_add(w.pass_ttl);
                self.known.insert(*id, until);
                out.write = Some(Record::Known { id: *id, until });
                return out;
            }
            // Too late: starts over as a first attempt.
            self.remove_pending(id);
        }
        let fail = GreyVerdict::TempFail {
            retry_in: w.min_wait,
        };
        let at_cap =
            |t: &Self| t.per_net.get(&net).copied().unwrap_or(0) as usize >= t.limits.per_network;
        if at_cap(self) {
            // Its own expired entries may still count: look once more.
            self.sweep(now);
            if at_cap(self) {
                let mut out = GreyCheck::new(fail, None);
                out.capped = true;
                return out;
            }
        }
        let mut out = GreyCheck::new(fail, None);
        out.evicted.0 = self.make_room_pending(now);
        let p = Pending { first: now, net };
        self.insert_pending(*id, p);
        out.write = Some(Record::Pending { id: *id, p });
        out
    }

    /// Frees one slot in a full pending table: expired entries first, then
    /// the oldest first attempts. Returns how many live ones went.
    fn make_room_pending(&mut self, now: u64) -> usize {
        if self.pending.len() < self.limits.max_pending {
            return 0;
        }
        self.sweep(now);
        let over = (self.pending.len() + 1).saturating_sub(self.limits.max_pending);
        if over == 0 {
            return 0;
        }
        self.evict_pending(over + self.limits.max_pending / EVICT_SHARE)
    }

    fn make_room_known(&mut self, now: u64) -> usize {
        if self.known.len() < self.limits.max_known {
            return 0;
        }
        self.sweep(now);
        let over = (self.known.len() + 1).saturating_sub(self.limits.max_known);
        if over == 0 {
            return 0;
        }
        self.evict_known(over + self.limits.max_known / EVICT_SHARE)
    }

    /// Drops the `n` oldest first attempts.
    fn evict_pending(&mut self, n: usize) -> usize {
        let victims = oldest(self.pending.iter().map(|(id, p)| (p.first, *id)), n);
        for id in &victims {
            self.remove_pending(id);
        }
        victims.len()
    }

    /// Drops the `n` known keys that expire first (least recently renewed).
    fn evict_known(&mut self, n: usize) -> usize {
        let victims = oldest(self.known.iter().map(|(id, until)| (*until, *id)), n);
        for id in &victims {
            self.known.remove(id);
        }
        victims.len()
    }

    /// Brings both tables within their bounds (after a load or a reload
    /// that shrank them); returns the evictions (pending, known).
    pub fn enforce_bounds(&mut self) -> (usize, usize) {
        let p = self.pending.len().saturating_sub(self.limits.max_pending);
        let k = self.known.len().saturating_sub(self.limits.max_known);
        (
            if p > 0 { self.evict_pending(p) } else { 0 },
            if k > 0 { self.evict_known(k) } else { 0 },
        )
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now: u64) {
        self.last_sweep = now;
        let retry_window = self.limits.windows.retry_window;
        let before = self.pending.len();
        self.pending
            .retain(|_, p| now <= p.first.saturating_add(retry_window));
        if self.pending.len() != before {
            self.per_net.clear();
            for p in self.pending.values() {
                *self.per_net.entry(p.net).or_insert(0) += 1;
            }
        }
        self.known.retain(|_, until| now <= *until);
    }

    /// Sets a key's state as read from the store (the later record of a
    /// key wins; bounds are enforced by [`GreyTable::enforce_bounds`]).
    pub fn restore(&mut self, r: Record) {
        match r {
            Record::Pending { id, p } => {
                self.known.remove(&id);
                self.insert_pending(id, p);
            }
            Record::Known { id, until } => {
                self.remove_pending(&id);
                self.known.insert(id, until);
            }
        }
    }

    /// Takes in a key's state as another MX host recorded it (the
    /// cluster): a pass beats a first attempt, a later pass expiry beats an
    /// earlier one, and an earlier first attempt beats a later one (so the
    /// minimum wait counts from the first try anywhere). Expired records
    /// change nothing. True when the table changed (the local store must
    /// then write the key too).
    pub fn merge(&mut self, r: Record, now: u64) -> bool {
        match r {
            Record::Known { id, until } => {
                if until < now || self.known.get(&id).is_some_and(|u| *u >= until) {
                    return false;
                }
                self.remove_pending(&id);
                if !self.known.contains_key(&id) {
                    self.make_room_known(now);
                }
                self.known.insert(id, until);
                true
            }
            Record::Pending { id, p } => {
                if !self.pending_live(&p, now)
                    || self.known.get(&id).is_some_and(|u| now <= *u)
                    || self.pending.get(&id).is_some_and(|q| q.first <= p.first)
                {
                    return false;
                }
                if self.pending.contains_key(&id) {
                    self.remove_pending(&id);
                } else {
                    self.make_room_pending(now);
                }
                self.insert_pending(id, p);
                true
            }
        }
    }

    /// Every entry, for a compaction.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.len());
        out.extend(
            self.pending
                .iter()
                .map(|(id, p)| Record::Pending { id: *id, p: *p }),
        );
        out.extend(self.known.iter().map(|(id, until)| Record::Known {
            id: *id,
            until: *until,
        }));
        out
    }

    pub fn len(&self) -> usize {
        self.pending.len() + self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn known_len(&self) -> usize {
        self.known.len()
    }

    /// Bytes the three tables hold on the heap now: buckets of entry plus
    /// one control byte (hashbrown keeps at most 7/8 of them full).
    pub fn heap_bytes(&self) -> usize {
        fn table<K, V>(m: &HashMap<K, V>) -> usize {
            if m.capacity() == 0 {
                return 0;
            }
            let buckets = (m.capacity() * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(K, V)>() + 1)
        }
        table(&self.pending) + table(&self.known) + table(&self.per_net)
    }
}

/// The `n` keys with the smallest times (ties broken by key, so the
/// choice does not depend on the hash map's order).
fn oldest(entries: impl Iterator<Item = (u64, Id)>, n: usize) -> Vec<Id> {
    let mut all: Vec<(u64, Id)> = entries.collect();
    if n == 0 {
        return Vec::new();
    }
    if n < all.len() {
        all.select_nth_unstable(n - 1);
        all.truncate(n);
    }
    all.into_iter().map(|(_, id)| id).collect()
}

/// The table's behaviour, one test per rule of the module doc; in a file
/// of their own because they outweigh the logic they check.
#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
