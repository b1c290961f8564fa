//! Map names and sizes. The loader pins every map under the configured pin
//! directory by exactly these names, and the CLI opens them by these names.

/// SYNs to an SMTP port seen per source address (LRU hash: IpAddrKey -> u64).
pub const SYN_COUNT: &str = "SYN_COUNT";
/// Default capacity of [`SYN_COUNT`].
pub const SYN_COUNT_ENTRIES: u32 = 65_536;

/// Settings the agent changes live (array: u32 index -> [`Settings`]).
pub const SETTINGS: &str = "SETTINGS";

/// How many SMTP ports the kernel programs can watch at once.
pub const MAX_SMTP_PORTS: usize = 8;

/// Live settings of the kernel programs, slot 0 of the [`SETTINGS`] array.
/// Ports are in host byte order; 0 marks an unused slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub smtp_ports: [u16; MAX_SMTP_PORTS],
}

impl Settings {
    #[inline(always)]
    pub fn is_smtp_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_SMTP_PORTS {
            if self.smtp_ports[i] != 0 && self.smtp_ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u16 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for Settings {}
