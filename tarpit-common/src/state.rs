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
/// The client sent payload at least once.
pub const FLOW_F_CLIENT_SPOKE: u32 = 1 << 2;
/// The server sent payload at least once.
pub const FLOW_F_SERVER_SPOKE: u32 = 1 << 3;

/// What the kernel knows about one flow. Entries are made on the client's
/// SYN only and removed on FIN/RST.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Boot-clock ns of the SYN.
    pub created_ns: u64,
    /// `FLOW_AWAIT_GREETING`, `FLOW_TEASER` or `FLOW_GREETED`.
    pub state: u32,
    /// `FLOW_F_*`.
    pub flags: u32,
}

/// `IpState::flags`: seen matching the allow list (sock_ops, per connection).
pub const IP_F_ALLOWED: u32 = 1 << 0;
/// Seen in the authenticated map (sock_ops).
pub const IP_F_AUTHENTICATED: u32 = 1 << 1;
/// Dropped by the block list at least once (XDP).
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
        assert_eq!(size_of::<FlowState>(), 16);
        assert_eq!(size_of::<IpState>(), 5 * 8 + 4 + 4);
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
