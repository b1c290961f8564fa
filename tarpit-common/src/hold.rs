//! The kernel hold (issue 21): block entries that say `hold` are answered
//! by XDP itself with a zero-window TCP peer that has no socket.
//!
//! For a held address the XDP program answers a SYN to an SMTP port with a
//! SYN-ACK whose sequence number is a SYN cookie (nothing is stored) and
//! whose window is zero; the handshake's ACK is checked against the cookie
//! and needs no answer; data and window probes get an ACK with a zero
//! window that acknowledges nothing new. The bot's stack keeps its socket,
//! its data and its retry timers; we keep nothing.
//!
//! The hold program is a separate XDP program, reached from the main one
//! by a tail call through [`HOLD_PROGS`]: a kernel without the raw
//! SYN-cookie helpers (before 6.0) refuses only that program, the slot
//! stays empty, the tail call falls through, and held addresses are
//! dropped as before.

/// Program array (u32 -> program fd) with the hold program at
/// [`HOLD_PROG_INDEX`]. Pinned: a program array loses its entries when the
/// last user reference goes, and the hold must outlive the agent like the
/// block list does.
pub const HOLD_PROGS: &str = "HOLD_PROGS";
/// Slot of the hold program in [`HOLD_PROGS`].
pub const HOLD_PROG_INDEX: u32 = 0;

/// The reply caps (array of one [`HoldSettings`]), written by the loader.
/// Not pinned: every loader writes it before the programs run.
pub const HOLD_SETTINGS: &str = "HOLD_SETTINGS";
/// Per-source reply budget (LRU hash: [`crate::IpAddrKey`] -> u64, the
/// source's theoretical arrival time of the generic cell rate algorithm).
pub const HOLD_RATE: &str = "HOLD_RATE";
pub const HOLD_RATE_ENTRIES: u32 = 65_536;
/// Per-CPU share of the total reply budget (per-CPU array of one u64).
pub const HOLD_CPU_RATE: &str = "HOLD_CPU_RATE";

/// Caps on what the hold sends, so that forged SYNs with a held source
/// cannot turn the host into a reflector. All zero (a map nobody wrote)
/// means "send nothing": held packets are then dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldSettings {
    /// Replies per second to one source address (SYN-ACKs and ACKs alike).
    pub per_source_rate: u32,
    /// Replies one source may get at once after a quiet spell.
    pub per_source_burst: u32,
    /// Replies per second from each CPU, all sources together (the total
    /// cap divided by the number of CPUs, so no CPU needs another's count).
    pub cpu_rate: u32,
    /// Burst of each CPU's share.
    pub cpu_burst: u32,
    /// Reserved; zero.
    pub reserved: [u32; 4],
}

/// One step of the generic cell rate algorithm: `tat` is the theoretical
/// arrival time of the next reply. Admits when the reply fits within
/// `burst` replies of `1/rate` s each, and then advances `tat`. A single
/// u64 per bucket, no division on the hot path beyond the interval.
#[inline(always)]
pub fn gcra_admit(tat: &mut u64, now_ns: u64, rate: u32, burst: u32) -> bool {
    if rate == 0 || burst == 0 {
        return false;
    }
    let interval = 1_000_000_000u64 / rate as u64;
    let base = if *tat > now_ns { *tat } else { now_ns };
    let next = base + interval;
    if next - now_ns > interval * burst as u64 {
        return false;
    }
    *tat = next;
    true
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u32 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for HoldSettings {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_have_no_padding() {
        assert_eq!(core::mem::size_of::<HoldSettings>(), 32);
    }

    #[test]
    fn a_burst_then_the_rate() {
        let mut tat = 0;
        let t0 = 1_000_000_000;
        // 10/s, burst 3: three at once, the fourth refused.
        for _ in 0..3 {
            assert!(gcra_admit(&mut tat, t0, 10, 3));
        }
        assert!(!gcra_admit(&mut tat, t0, 10, 3));
        // 100 ms later one more fits, not two.
        assert!(gcra_admit(&mut tat, t0 + 100_000_000, 10, 3));
        assert!(!gcra_admit(&mut tat, t0 + 100_000_000, 10, 3));
        // After a long quiet spell, the burst again and no more.
        let later = t0 + 60_000_000_000;
        let admitted = (0..10)
            .filter(|_| gcra_admit(&mut tat, later, 10, 3))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn zero_means_nothing_is_sent() {
        let mut tat = 0;
        assert!(!gcra_admit(&mut tat, 5, 0, 10));
        assert!(!gcra_admit(&mut tat, 5, 10, 0));
    }
}
