//! Per-flow and per-address state, written by the kernel programs.
use crate::IpAddrKey;

/// A TCP connection to a watched port, always seen from the server: the
/// client's address and port, the server's address and port. 36 bytes,
/// no padding (every field is 2-byte aligned).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: IpAddrKey,
    pub server: IpAddrKey,
    /// Host byte order.
    pub client_port: u16,
    /// Host byte order.
    pub server_port: u16,
}

/// The greeting has not been seen yet: client payload now is pre-greet.
pub const FLOW_AWAIT_GREETING: u32 = 0;
/// The server sent a `220-` line and not yet the final `220 ` line.
pub const FLOW_TEASER: u32 = 1;
/// The server's greeting is complete (or it sent something else first).
pub const FLOW_GREETED: u32 = 2;

/// `FlowState::flags`: the client talked before the greeting.
pub const FLOW_F_PREGREET: u32 = 1 << 0;
/// ... and it did so after a `220-` teaser.
pub const FLOW_F_TEASER: u32 = 1 << 1;
/// The client's first payload has been judged (pre-greet, clean or
/// unseen); later client and server segments need no more work.
pub const FLOW_F_CLIENT_SPOKE: u32 = 1 << 2;
/// The server sent payload at least once (seen by tc egress).
pub const FLOW_F_SERVER_SPOKE: u32 = 1 << 3;
/// The client acknowledged server bytes that tc egress never saw (the
/// replies leave through an interface without the egress program, or
/// egress missed them): the greeting state of this flow is not known, so
/// the flow is "unknown", never a strike.
pub const FLOW_F_UNSEEN: u32 = 1 << 4;

/// What the kernel knows about one flow. Entries are made only for
/// connections the kernel accepted (sock_ops `PASSIVE_ESTABLISHED`, which
/// also gives both sides' sequence numbers) and removed when that socket
/// closes: a forged SYN or segment can neither make nor remove one.
/// 32 bytes, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Boot-clock ns of the connection's establishment.
    pub created_ns: u64,
    /// `FLOW_AWAIT_GREETING`, `FLOW_TEASER` or `FLOW_GREETED`.
    pub state: u32,
    /// `FLOW_F_*`.
    pub flags: u32,
    /// The server's first data sequence number (its ISN + 1).
    pub server_start: u32,
    /// The sequence number after the last server byte tc egress saw
    /// (`server_start` until the teaser or banner goes out).
    pub server_next: u32,
    /// The sequence number the client's first payload byte must carry
    /// (its ISN + 1).
    pub client_next: u32,
    /// Zero.
    pub reserved: u32,
}

/// How a client segment with payload relates to a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSegment {
    /// Not the client's next byte, or no ACK: forged, stray or out of
    /// order. Ignored: never a strike, never a state change.
    OutOfWindow,
    /// In sequence, but it acknowledges server bytes tc egress never
    /// saw: the flow's greeting state is unknown.
    Unseen,
    /// In sequence, acknowledging only server bytes egress saw: the
    /// flow's greeting state decides.
    InWindow,
}

impl FlowState {
    /// A flow the kernel just accepted: `server_start` is the server's
    /// ISN + 1, `client_next` the client's.
    #[inline(always)]
    pub fn established(now_ns: u64, server_start: u32, client_next: u32) -> FlowState {
        FlowState {
            created_ns: now_ns,
            state: FLOW_AWAIT_GREETING,
            flags: 0,
            server_start,
            server_next: server_start,
            client_next,
            reserved: 0,
        }
    }

    /// Classifies a client segment carrying payload (serial-number
    /// arithmetic: wraps around 2^32). One subtraction and two compares.
    #[inline(always)]
    pub fn client_segment(&self, has_ack: bool, seq: u32, ack: u32) -> ClientSegment {
        if !has_ack || seq != self.client_next {
            return ClientSegment::OutOfWindow;
        }
        // ack in [server_start, server_next], as offsets from the start.
        let acked = ack.wrapping_sub(self.server_start);
        let sent = self.server_next.wrapping_sub(self.server_start);
        if acked > sent {
            // Below the start (old or forged) wraps to a huge offset too:
            // only an ack past what egress saw is plausible for a real
            // client, so tell the two apart.
            if (ack.wrapping_sub(self.server_next) as i32) > 0 {
                return ClientSegment::Unseen;
            }
            return ClientSegment::OutOfWindow;
        }
        ClientSegment::InWindow
    }

    /// A server segment of `len` payload bytes at `seq` went out: the
    /// server's next sequence number moves forward (never back).
    #[inline(always)]
    pub fn server_sent(&mut self, seq: u32, len: u32) {
        let end = seq.wrapping_add(len);
        if (end.wrapping_sub(self.server_next) as i32) > 0 {
            self.server_next = end;
        }
    }
}

/// `IpState::flags`: seen matching the allow list (sock_ops, per connection).
pub const IP_F_ALLOWED: u32 = 1 << 0;
/// Seen in the authenticated map (sock_ops).
pub const IP_F_AUTHENTICATED: u32 = 1 << 1;
/// Dropped by the block list at least once: set by agents before issue 19's
/// drop path, which keeps no per-source state for a dropped packet (the
/// block lists and the drop counters say what is blocked). Still shown
/// when an older agent's pins carry it.
pub const IP_F_BLOCKED: u32 = 1 << 2;
/// Its TCP window was clamped (sock_ops).
pub const IP_F_SLOWED: u32 = 1 << 3;
/// Talked before a greeting at least once (tc).
pub const IP_F_PREGREET: u32 = 1 << 4;

/// Per-address history, kept across connections in an LRU map: the oldest
/// addresses make room for new ones, so the map never refuses an update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpState {
    /// Boot-clock ns of the first SYN (or connection) seen.
    pub first_seen_ns: u64,
    /// Boot-clock ns of the latest SYN, connection or strike.
    pub last_seen_ns: u64,
    /// Boot-clock ns of the latest pre-greet strike (0 = none).
    pub last_strike_ns: u64,
    /// Connections established to a watched port (sock_ops).
    pub conns_total: u64,
    /// Connections established now (sock_ops; atomic adds). Read it with
    /// [`IpState::live`], which saturates a transiently negative count.
    pub live_conns: u64,
    /// Pre-greet strikes.
    pub strikes: u32,
    /// `IP_F_*`.
    pub flags: u32,
}

impl IpState {
    /// Live connections, never negative: two racing closes can push the
    /// raw counter below zero for a moment, which reads as 0.
    #[inline(always)]
    pub fn live(&self) -> u64 {
        if self.live_conns > i64::MAX as u64 {
            0
        } else {
            self.live_conns
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), no padding (checked by the tests below), every bit
    // pattern valid.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for IpState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<FlowState>(), 32);
        assert_eq!(size_of::<IpState>(), 5 * 8 + 4 + 4);
    }

    #[test]
    fn client_segments_are_judged_by_sequence_and_ack() {
        // Server ISN + 1 near the wrap, so every comparison crosses it.
        let start = u32::MAX - 5;
        let mut f = FlowState::established(1, start, 1000);
        // Nothing sent yet: only an ack of ISN + 1 is in the window.
        assert_eq!(f.client_segment(true, 1000, start), ClientSegment::InWindow);
        assert_eq!(
            f.client_segment(true, 1001, start),
            ClientSegment::OutOfWindow
        );
        assert_eq!(
            f.client_segment(false, 1000, start),
            ClientSegment::OutOfWindow
        );
        assert_eq!(
            f.client_segment(true, 1000, start.wrapping_sub(1)),
            ClientSegment::OutOfWindow
        );
        // A client that acknowledges a banner egress never saw.
        assert_eq!(
            f.client_segment(true, 1000, start.wrapping_add(30)),
            ClientSegment::Unseen
        );
        // A 12-byte teaser goes out across the wrap.
        f.server_sent(start, 12);
        assert_eq!(f.server_next, start.wrapping_add(12));
        for ack in [start, start.wrapping_add(5), start.wrapping_add(12)] {
            assert_eq!(f.client_segment(true, 1000, ack), ClientSegment::InWindow);
        }
        assert_eq!(
            f.client_segment(true, 1000, start.wrapping_add(13)),
            ClientSegment::Unseen
        );
        // A retransmission never moves it back.
        f.server_sent(start, 4);
        assert_eq!(f.server_next, start.wrapping_add(12));
        // A guessed ack far away is not "unseen" but ignored.
        assert_eq!(
            f.client_segment(true, 1000, start.wrapping_sub(1 << 30)),
            ClientSegment::OutOfWindow
        );
    }

    #[test]
    fn live_count_saturates_at_zero() {
        let s = IpState {
            live_conns: u64::MAX,
            ..Default::default()
        };
        assert_eq!(s.live(), 0);
        let s = IpState {
            live_conns: 3,
            ..Default::default()
        };
        assert_eq!(s.live(), 3);
    }
}
