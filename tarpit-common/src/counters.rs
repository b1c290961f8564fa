//! Per-CPU counters of the kernel programs: indices into the `COUNTERS`
//! per-CPU array. Userspace sums the CPUs. Indices are part of the map
//! layout: append, never renumber.
use crate::lists::MAX_REASONS;

/// One counter slot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// XDP: packets passed with no list entry involved.
    XdpPass = 0,
    /// XDP: packets dropped by the block list (all reasons).
    XdpDrop = 1,
    /// XDP: block-listed sources passed because the allow list matched.
    XdpAllowed = 2,
    /// XDP: block entries found expired (passed, then swept).
    XdpBlockExpired = 3,
    /// XDP: allow entries found expired (ignored, then swept).
    XdpAllowExpired = 4,
    /// XDP: block-listed sources passed because the port is not covered.
    XdpBlockOtherPort = 5,
    /// XDP: block-listed sources passed because blocking is switched off.
    XdpBlockDisabled = 6,
    /// Flows tracked: connections to a watched port the kernel accepted
    /// (sock_ops; the name stays for continuity).
    TcFlowNew = 7,
    /// tc: flow entries that could not be created.
    TcFlowInsertFailed = 8,
    /// tc: client payload on a flow with no entry ("unknown", never a
    /// strike): forged, evicted, older than the programs, or not accepted.
    TcFlowUnknown = 9,
    /// tc: pre-greet talkers flagged.
    TcPregreet = 10,
    /// tc: ... of which after a `220-` teaser.
    TcPregreetTeaser = 11,
    /// tc: greetings completed.
    TcGreeted = 12,
    /// Flows removed when their socket closed (sock_ops).
    TcFlowClosed = 13,
    /// Events dropped because the ring buffer was full.
    EventsLost = 14,
    /// sock_ops: connections counted at establishment.
    SockEstablished = 15,
    /// sock_ops: counted connections closed.
    SockClosed = 16,
    /// sock_ops: windows clamped.
    SockClamped = 17,
    /// Per-address map updates that failed.
    IpStateFailed = 18,
    /// Packets whose headers could not be parsed (passed untouched).
    Unparsed = 19,
    /// Non-first fragments (no TCP header; passed unless an all-ports block).
    Fragments = 20,
    /// tc: flows whose client acknowledged server bytes tc egress never
    /// saw (replies routed around the egress program): unknown, no strike.
    TcFlowUnseen = 21,
    /// tc: client payload on a tracked flow with the wrong sequence number
    /// or acknowledgment (forged or stray): ignored.
    TcOutOfWindow = 22,
    /// XDP hold: SYNs from held addresses answered with a zero-window
    /// SYN-ACK (a SYN cookie; no socket).
    HoldSynAnswered = 23,
    /// XDP hold: handshakes completed (the ACK carried a valid cookie).
    HoldHandshakes = 24,
    /// XDP hold: data segments and window probes answered with a
    /// zero-window ACK that acknowledges nothing new.
    HoldProbesAnswered = 25,
    /// XDP hold: payload bytes held bots sent into the void (every
    /// segment, retransmissions too).
    HoldBytesVoid = 26,
    /// XDP hold: replies refused by the per-source or total cap (the
    /// packet is dropped).
    HoldRateLimited = 27,
    /// XDP hold: packets of held addresses dropped because the hold
    /// program is not there (kernel before 6.0, or XDP_TX cannot work on
    /// an interface).
    HoldUnavailable = 28,
    /// XDP hold: packets of held addresses dropped without a reply: FIN,
    /// RST, IP options or IPv6 extension headers, fragments, failures.
    HoldDropped = 29,
}

/// Drop counters per block reason start here (`DROP_REASON_BASE + code`).
pub const DROP_REASON_BASE: u32 = 32;
/// Size of the counters array.
pub const COUNTERS_LEN: u32 = DROP_REASON_BASE + MAX_REASONS;

impl Counter {
    pub const ALL: [Counter; 30] = [
        Counter::XdpPass,
        Counter::XdpDrop,
        Counter::XdpAllowed,
        Counter::XdpBlockExpired,
        Counter::XdpAllowExpired,
        Counter::XdpBlockOtherPort,
        Counter::XdpBlockDisabled,
        Counter::TcFlowNew,
        Counter::TcFlowInsertFailed,
        Counter::TcFlowUnknown,
        Counter::TcPregreet,
        Counter::TcPregreetTeaser,
        Counter::TcGreeted,
        Counter::TcFlowClosed,
        Counter::EventsLost,
        Counter::SockEstablished,
        Counter::SockClosed,
        Counter::SockClamped,
        Counter::IpStateFailed,
        Counter::Unparsed,
        Counter::Fragments,
        Counter::TcFlowUnseen,
        Counter::TcOutOfWindow,
        Counter::HoldSynAnswered,
        Counter::HoldHandshakes,
        Counter::HoldProbesAnswered,
        Counter::HoldBytesVoid,
        Counter::HoldRateLimited,
        Counter::HoldUnavailable,
        Counter::HoldDropped,
    ];

    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name (CLI, JSON, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Counter::XdpPass => "xdp_pass",
            Counter::XdpDrop => "xdp_drop",
            Counter::XdpAllowed => "xdp_allowed",
            Counter::XdpBlockExpired => "xdp_block_expired",
            Counter::XdpAllowExpired => "xdp_allow_expired",
            Counter::XdpBlockOtherPort => "xdp_block_other_port",
            Counter::XdpBlockDisabled => "xdp_block_disabled",
            Counter::TcFlowNew => "tc_flow_new",
            Counter::TcFlowInsertFailed => "tc_flow_insert_failed",
            Counter::TcFlowUnknown => "tc_flow_unknown",
            Counter::TcPregreet => "tc_pregreet",
            Counter::TcPregreetTeaser => "tc_pregreet_teaser",
            Counter::TcGreeted => "tc_greeted",
            Counter::TcFlowClosed => "tc_flow_closed",
            Counter::EventsLost => "events_lost",
            Counter::SockEstablished => "sock_established",
            Counter::SockClosed => "sock_closed",
            Counter::SockClamped => "sock_clamped",
            Counter::IpStateFailed => "ip_state_failed",
            Counter::Unparsed => "unparsed",
            Counter::Fragments => "fragments",
            Counter::TcFlowUnseen => "tc_flow_unseen",
            Counter::TcOutOfWindow => "tc_out_of_window",
            Counter::HoldSynAnswered => "hold_syn_answered",
            Counter::HoldHandshakes => "hold_handshakes",
            Counter::HoldProbesAnswered => "hold_probes_answered",
            Counter::HoldBytesVoid => "hold_bytes_void",
            Counter::HoldRateLimited => "hold_rate_limited",
            Counter::HoldUnavailable => "hold_unavailable",
            Counter::HoldDropped => "hold_dropped",
        }
    }
}

/// Index of the drop counter of a block reason code.
#[inline(always)]
pub const fn drop_reason_index(code: u32) -> u32 {
    if code < MAX_REASONS {
        DROP_REASON_BASE + code
    } else {
        DROP_REASON_BASE + MAX_REASONS - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_below_the_reason_block() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i as u32);
            assert!(c.index() < DROP_REASON_BASE);
        }
        assert_eq!(drop_reason_index(0), DROP_REASON_BASE);
        assert_eq!(drop_reason_index(1000), COUNTERS_LEN - 1);
    }
}
