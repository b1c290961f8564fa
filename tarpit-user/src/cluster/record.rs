//! What one node tells the others, as stored in Redis and sent on the
//! channel: a block (or its deletion) and a greylist key's state. JSON,
//! so an operator can read it with `redis-cli` and a newer node can add
//! fields without breaking an older one.
//!
//! Conflicts are settled by the time of the change (`at`, Unix
//! milliseconds, then the node name): the later change wins everywhere,
//! so every node ends with the same answer whatever order messages came
//! in, and a deletion (a tombstone) beats the addition it deleted, also
//! when the adding node replays it after an outage.
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::reputation::GreyRecord;
use crate::reputation::greylist::Pending;

/// Which of the kernel's lists a shared entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedList {
    /// The block list (XDP drops or holds).
    #[default]
    Block,
    /// Authenticated addresses (the once-per-day HELO rule, the sk_lookup
    /// bypass); `net` is a single address.
    Auth,
    /// The run-time allow list (`tarpit allow add`; never `allow.ips`,
    /// which is each host's own configuration).
    Allow,
}

impl SharedList {
    pub fn as_str(self) -> &'static str {
        match self {
            SharedList::Block => "block",
            SharedList::Auth => "auth",
            SharedList::Allow => "allow",
        }
    }
}

/// One entry of a kernel list as shared (a block, or an authenticated
/// address): who made it, when, until when, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// The list; absent = the block list (the first version's only one).
    #[serde(default, skip_serializing_if = "is_block")]
    pub list: SharedList,
    pub net: IpNet,
    /// The node that made the change.
    pub node: String,
    /// Unix milliseconds of the change (the later change wins).
    pub at: u64,
    /// Unix seconds when the block ends; `None` = until deleted.
    pub expires_at: Option<u64>,
    /// The block-list reason code (`tarpit_common::BlockReason`).
    pub reason: u32,
    /// The agent's automatic block (an offender), not an admin's entry.
    pub automatic: bool,
    #[serde(default)]
    pub all_ports: bool,
    #[serde(default)]
    pub hold: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// A tombstone: the block was deleted at `at`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

fn is_block(l: &SharedList) -> bool {
    *l == SharedList::Block
}

/// The longest comment shown from another node (characters).
pub const MAX_COMMENT: usize = 200;

/// A comment from Redis as it may be shown on an admin's terminal:
/// control characters (escape sequences a Redis writer could plant) made
/// spaces, at most [`MAX_COMMENT`] characters, `None` when empty.
pub fn shown_comment(c: Option<&str>) -> Option<String> {
    let text: String = c?
        .chars()
        .map(|ch| if ch.is_control() { ' ' } else { ch })
        .take(MAX_COMMENT)
        .collect();
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

impl BlockRecord {
    /// Does this change win over `other` (the same network)?
    pub fn supersedes(&self, other: &BlockRecord) -> bool {
        (self.at, &self.node) > (other.at, &other.node)
    }

    /// The tombstone of this block, deleted by `node` at `at`.
    pub fn tombstone(&self, node: &str, at: u64) -> BlockRecord {
        BlockRecord {
            node: node.to_string(),
            at,
            deleted: true,
            comment: None,
            ..self.clone()
        }
    }

    /// Still in force at `now` (Unix seconds)? Tombstones never are.
    pub fn active(&self, now: u64) -> bool {
        !self.deleted && self.expires_at.is_none_or(|e| now < e)
    }

    /// The Redis key's TTL at `now`: a block lives as long as it blocks
    /// (no TTL for one without expiry), a tombstone `tombstone_ttl`.
    /// `None` in the outer option: already over, nothing to write.
    pub fn ttl(&self, now: u64, tombstone_ttl: Duration) -> Option<Option<Duration>> {
        if self.deleted {
            return Some(Some(tombstone_ttl));
        }
        match self.expires_at {
            None => Some(None),
            Some(e) if e > now => Some(Some(Duration::from_secs(e - now))),
            Some(_) => None,
        }
    }
}

/// A greylist key's state as shared (the hash, never the triplet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GreyState {
    /// First attempt at `first` (Unix seconds) from network hash `net`.
    Pending { first: u64, net: u64 },
    /// Passed; known until `until` (Unix seconds).
    Known { until: u64 },
}

impl GreyState {
    pub fn of(r: &GreyRecord) -> GreyState {
        match *r {
            GreyRecord::Pending { p, .. } => GreyState::Pending {
                first: p.first,
                net: p.net,
            },
            GreyRecord::Known { until, .. } => GreyState::Known { until },
        }
    }

    pub fn record(self, id: [u8; 16]) -> GreyRecord {
        match self {
            GreyState::Pending { first, net } => GreyRecord::Pending {
                id,
                p: Pending { first, net },
            },
            GreyState::Known { until } => GreyRecord::Known { id, until },
        }
    }

    /// The Redis key's TTL at `now`: a first attempt until its retry
    /// window closes, a pass until it expires; `None` = over.
    pub fn ttl(self, now: u64, retry_window: u64) -> Option<Duration> {
        let end = match self {
            GreyState::Pending { first, .. } => first.saturating_add(retry_window),
            GreyState::Known { until } => until,
        };
        (end > now).then(|| Duration::from_secs(end - now))
    }
}

/// One message on the channel: an [`Event`] and the agent process that
/// sent it. A node knows its own messages by `from`, not by its name: two
/// hosts given the same name (the same host name in two containers) must
/// still hear each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sending agent's random id, made at its start.
    pub from: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Block(BlockRecord),
    Grey {
        node: String,
        /// The key's hash, hex.
        id: String,
        #[serde(flatten)]
        state: GreyState,
    },
    /// One strike (`Offence::code`) by `ip` at `node`: it counts at every
    /// node toward a block. Only announced, never stored in Redis: a node
    /// that was away misses it. One made while Redis was gone is kept by
    /// its node and announced when Redis returns, with its own time `at`,
    /// unless it left the strike window meanwhile.
    Offence {
        node: String,
        ip: std::net::IpAddr,
        offence: String,
        /// Unix milliseconds of the strike; absent from older nodes (now).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<u64>,
        /// The strike's number at the sending agent: with the envelope's
        /// `from`, its name, so it counts once however it arrives.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(at: u64, node: &str) -> BlockRecord {
        BlockRecord {
            list: SharedList::Block,
            net: "198.51.100.7/32".parse().unwrap(),
            node: node.into(),
            at,
            expires_at: Some(2_000),
            reason: 1,
            automatic: true,
            all_ports: false,
            hold: false,
            comment: None,
            deleted: false,
        }
    }

    #[test]
    fn comments_from_elsewhere_are_shown_without_control_characters() {
        assert_eq!(
            shown_comment(Some("botnet\x1b[2J C&C\n")).as_deref(),
            Some("botnet [2J C&C")
        );
        assert_eq!(shown_comment(Some(" \t ")), None);
        assert_eq!(shown_comment(None), None);
        let long = "é".repeat(500);
        assert_eq!(
            shown_comment(Some(&long)).unwrap().chars().count(),
            MAX_COMMENT
        );
    }

    #[test]
    fn the_later_change_wins_and_the_node_breaks_ties() {
        let a = block(1_000, "mx1");
        let b = block(1_001, "mx1");
        assert!(b.supersedes(&a) && !a.supersedes(&b));
        let c = block(1_000, "mx2");
        assert!(c.supersedes(&a) && !a.supersedes(&c));
        assert!(!a.supersedes(&a.clone()));
        // A deletion after the block wins; a replay of the old block does not.
        let gone = a.tombstone("mx2", 1_500);
        assert!(gone.supersedes(&a));
        assert!(!a.supersedes(&gone));
    }

    #[test]
    fn ttls_follow_the_block_and_tombstones_keep_theirs() {
        let week = Duration::from_secs(7 * 86400);
        let a = block(1_000, "mx1");
        assert_eq!(a.ttl(1_500, week), Some(Some(Duration::from_secs(500))));
        assert_eq!(a.ttl(2_000, week), None);
        let forever = BlockRecord {
            expires_at: None,
            ..a.clone()
        };
        assert_eq!(forever.ttl(1_500, week), Some(None));
        let gone = a.tombstone("mx1", 3_000);
        assert_eq!(gone.ttl(9_999, week), Some(Some(week)));
        assert!(!gone.active(1_500) && a.active(1_999) && !a.active(2_000));
    }

    #[test]
    fn events_read_back_as_written() {
        let e = Event::Block(block(1, "mx1"));
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains("\"kind\":\"block\""), "{text}");
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
        let g = Event::Grey {
            node: "mx2".into(),
            id: "ab".repeat(16),
            state: GreyState::Pending { first: 5, net: 9 },
        };
        let text = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), g);
    }

    #[test]
    fn a_record_without_a_list_is_a_block_and_auth_says_so() {
        let text = r#"{"net":"198.51.100.7/32","node":"mx1","at":1,"expires_at":null,"reason":0,"automatic":false}"#;
        let r: BlockRecord = serde_json::from_str(text).unwrap();
        assert_eq!(r.list, SharedList::Block);
        assert!(!serde_json::to_string(&r).unwrap().contains("list"));
        let auth = BlockRecord {
            list: SharedList::Auth,
            ..r
        };
        let text = serde_json::to_string(&auth).unwrap();
        assert!(text.contains("\"list\":\"auth\""), "{text}");
        assert_eq!(serde_json::from_str::<BlockRecord>(&text).unwrap(), auth);
    }

    #[test]
    fn offences_travel_by_their_code() {
        use crate::policy::ports::Offence;
        for o in [
            Offence::PreGreet,
            Offence::Rejected,
            Offence::UnknownRecipient,
        ] {
            let e = Event::Offence {
                node: "mx1".into(),
                ip: "fd5b:1e00::2".parse().unwrap(),
                offence: o.code().into(),
                at: Some(1_700_000_000_123),
                seq: Some(7),
            };
            let text = serde_json::to_string(&e).unwrap();
            let Event::Offence {
                offence, at, seq, ..
            } = serde_json::from_str(&text).unwrap()
            else {
                panic!("{text}");
            };
            assert_eq!(Offence::from_code(&offence), Some(o));
            assert_eq!((at, seq), (Some(1_700_000_000_123), Some(7)));
        }
        // From a node that does not say when: now.
        let old = r#"{"kind":"offence","node":"mx1","ip":"198.51.100.2","offence":"pregreet"}"#;
        let Event::Offence { at, .. } = serde_json::from_str(old).unwrap() else {
            panic!("{old}");
        };
        assert_eq!(at, None);
        assert_eq!(Offence::from_code("spam"), None);
    }

    #[test]
    fn an_envelope_carries_its_sender_beside_the_event() {
        let env = Envelope {
            from: "0123456789abcdef".into(),
            event: Event::Block(block(1, "mx1")),
        };
        let text = serde_json::to_string(&env).unwrap();
        assert!(text.contains("\"from\":\"0123456789abcdef\""), "{text}");
        assert!(text.contains("\"kind\":\"block\""), "{text}");
        assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), env);
    }

    #[test]
    fn greylist_ttls_end_with_the_window_or_the_pass() {
        assert_eq!(
            GreyState::Pending { first: 100, net: 1 }.ttl(150, 300),
            Some(Duration::from_secs(250))
        );
        assert_eq!(
            GreyState::Pending { first: 100, net: 1 }.ttl(400, 300),
            None
        );
        assert_eq!(
            GreyState::Known { until: 1_000 }.ttl(400, 300),
            Some(Duration::from_secs(600))
        );
        let r = GreyState::Known { until: 7 }.record([1; 16]);
        assert_eq!(GreyState::of(&r), GreyState::Known { until: 7 });
    }
}
