//! Steering trusted clients straight to the MTA (`sk_lookup`), and the
//! fail-open path when the agent is gone.
//!
//! The sk_lookup program runs when a TCP SYN looks for a listening socket
//! on one of the steered ports. It picks a socket from the [`STEER`]
//! sockmap: the MTA's plain listener for allow-listed (and, when switched
//! on, authenticated) clients, the agent's listener for everyone else. The
//! agent's slots empty themselves when its process dies (a closed socket
//! leaves every sockmap), so the program then falls back to the MTA: a
//! crashed agent never stops mail.

/// Listening sockets by slot (sockmap: u32 slot -> socket).
pub const STEER: &str = "STEER";
/// [`SteerSettings`] in slot 0 (array).
pub const STEER_SETTINGS: &str = "STEER_SETTINGS";
/// Per-CPU counters of the steering decisions (per-CPU array of u64,
/// indexed by `STEER_C_*`).
pub const STEER_COUNTERS: &str = "STEER_COUNTERS";

/// The MTA's plain IPv4 (or dual-stack) listener.
pub const SLOT_MTA_V4: u32 = 0;
/// The MTA's plain IPv6 listener.
pub const SLOT_MTA_V6: u32 = 1;
/// The agent's IPv4 (or dual-stack) listener.
pub const SLOT_AGENT_V4: u32 = 2;
/// The agent's IPv6 listener.
pub const SLOT_AGENT_V6: u32 = 3;
pub const STEER_SLOTS: u32 = 4;

/// Steer allow-listed clients to the MTA.
pub const STEER_F_ALLOWED: u32 = 1 << 0;
/// Steer clients in the authenticated map to the MTA.
pub const STEER_F_AUTHENTICATED: u32 = 1 << 1;
/// With no agent listener in the map, steer every client to the MTA.
pub const STEER_F_FAIL_OPEN: u32 = 1 << 2;

/// Connections steered to the MTA because the client is allow-listed.
pub const STEER_C_ALLOWED: u32 = 0;
/// ... because the client authenticated recently.
pub const STEER_C_AUTHENTICATED: u32 = 1;
/// Connections handed to the agent's listener.
pub const STEER_C_AGENT: u32 = 2;
/// Connections steered to the MTA because no agent listener was there.
pub const STEER_C_FAIL_OPEN: u32 = 3;
/// Connections left to the kernel's own lookup (no usable socket in the map).
pub const STEER_C_PASSED: u32 = 4;
pub const STEER_COUNTERS_LEN: u32 = 8;

/// How many ports can be steered.
pub const MAX_STEER_PORTS: usize = 4;

/// Live settings of the sk_lookup program. All zero = steer nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerSettings {
    /// Local ports whose connections are steered (host order; 0 = unused).
    pub ports: [u16; MAX_STEER_PORTS],
    /// `STEER_F_*`.
    pub flags: u32,
    pub reserved: u32,
}

impl SteerSettings {
    #[inline(always)]
    pub fn steers(&self, port: u16) -> bool {
        crate::maps::port_listed(&self.ports, port)
    }

    #[inline(always)]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), u16/u32 fields only, no padding, every bit pattern valid.
unsafe impl aya::Pod for SteerSettings {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_ports() {
        assert_eq!(core::mem::size_of::<SteerSettings>(), 16);
        let s = SteerSettings {
            ports: [25, 0, 0, 0],
            flags: STEER_F_ALLOWED,
            reserved: 0,
        };
        assert!(s.steers(25));
        assert!(!s.steers(0));
        assert!(!s.steers(587));
        assert!(s.has(STEER_F_ALLOWED) && !s.has(STEER_F_FAIL_OPEN));
    }
}
