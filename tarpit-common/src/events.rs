//! Events from the kernel to the agent over the ring buffer: rare things
//! only (a pre-greet talker, a sample of block-list drops, map pressure),
//! never one per packet.
use crate::IpAddrKey;

/// A client sent payload before the server's greeting.
pub const EVENT_PREGREET: u32 = 1;
/// A sample of block-list drops (the first and every 1024th per CPU and
/// reason); `value` is the per-CPU drop count of that reason so far.
pub const EVENT_BLOCK_HIT: u32 = 2;
/// The flow table refused an entry (`value` = error code); pre-greet
/// detection degrades to "unknown" for new flows.
pub const EVENT_FLOW_TABLE_FULL: u32 = 3;
/// The per-address map refused an entry.
pub const EVENT_IP_TABLE_FULL: u32 = 4;

/// `Event::flags` of a pre-greet: the talk came after a `220-` teaser.
pub const EVENT_F_TEASER: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Boot-clock ns.
    pub ts_ns: u64,
    /// `EVENT_*`.
    pub kind: u32,
    /// Block reason code for block hits, `EVENT_F_*` for pre-greets.
    pub flags: u32,
    /// The client's address.
    pub addr: IpAddrKey,
    /// The client's port (host order; 0 when not known).
    pub client_port: u16,
    /// The server's port (host order; 0 when not known).
    pub server_port: u16,
    /// The server's address (pre-greets; zero otherwise).
    pub server: IpAddrKey,
    pub reserved: u32,
    /// Kind-specific number.
    pub value: u64,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (checked below), every bit pattern valid.
unsafe impl aya::Pod for Event {}

#[cfg(test)]
mod tests {
    #[test]
    fn event_has_no_padding() {
        assert_eq!(
            core::mem::size_of::<super::Event>(),
            8 + 4 + 4 + 16 + 2 + 2 + 16 + 4 + 8
        );
    }
}
