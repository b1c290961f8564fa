//! Allow and block lists, authenticated and slowed addresses: written by
//! userspace, read by the kernel programs.
//!
//! Expiry times are on the kernel's boot clock (`bpf_ktime_get_boot_ns`,
//! `CLOCK_BOOTTIME` in userspace) so they keep counting across suspend and
//! need no wall-clock agreement; 0 means "never expires".

/// Bits of an LPM key: IPv4 prefixes are stored IPv4-mapped, so an IPv4
/// `/24` is a `/120` here.
pub const PREFIX_BITS: u32 = 128;
/// Prefix length offset of an IPv4 prefix inside the mapped form.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// `ListEntry::flags`: a block entry that drops every port, not only SMTP.
pub const LIST_F_ALL_PORTS: u32 = 1 << 0;
/// `ListEntry::flags`: a block entry whose TCP connections to the SMTP
/// ports are held in the kernel with a zero window instead of dropped
/// (see [`crate::hold`]). Kernels or programs that know nothing of it
/// drop, which is what the entry did before.
pub const LIST_F_HOLD: u32 = 1 << 1;

/// Value of an allow or block list entry. Only 4-byte fields: an LPM trie
/// stores the value right after its 20-byte key, so it must not need
/// 8-byte alignment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    expires_lo: u32,
    expires_hi: u32,
    added_lo: u32,
    added_hi: u32,
    /// A [`BlockReason`] code (block list); 0 on the allow list.
    pub reason: u32,
    /// `LIST_F_*`.
    pub flags: u32,
    /// Prefix length of the entry's own key (LPM lookups return the value,
    /// not the key that matched; the kernel needs it to sweep the entry).
    pub prefix_len: u32,
    pub reserved: u32,
}

impl ListEntry {
    #[inline(always)]
    pub const fn new(
        prefix_len: u32,
        added_ns: u64,
        expires_ns: u64,
        reason: u32,
        flags: u32,
    ) -> Self {
        ListEntry {
            prefix_len,
            reserved: 0,
            expires_lo: expires_ns as u32,
            expires_hi: (expires_ns >> 32) as u32,
            added_lo: added_ns as u32,
            added_hi: (added_ns >> 32) as u32,
            reason,
            flags,
        }
    }

    /// Boot-clock ns after which the entry no longer applies; 0 = never.
    #[inline(always)]
    pub fn expires_ns(&self) -> u64 {
        ((self.expires_hi as u64) << 32) | self.expires_lo as u64
    }

    /// Boot-clock ns when the entry was written.
    #[inline(always)]
    pub fn added_ns(&self) -> u64 {
        ((self.added_hi as u64) << 32) | self.added_lo as u64
    }

    #[inline(always)]
    pub fn is_active(&self, now_ns: u64) -> bool {
        let e = self.expires_ns();
        e == 0 || now_ns < e
    }

    #[inline(always)]
    pub fn all_ports(&self) -> bool {
        self.flags & LIST_F_ALL_PORTS != 0
    }

    /// Held in the kernel rather than dropped (SMTP ports only).
    #[inline(always)]
    pub fn hold(&self) -> bool {
        self.flags & LIST_F_HOLD != 0
    }
}

/// Value of the authenticated and slowed maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimedEntry {
    /// Boot-clock ns after which the entry no longer applies; 0 = never.
    pub expires_ns: u64,
    /// Boot-clock ns when the entry was written.
    pub added_ns: u64,
}

impl TimedEntry {
    #[inline(always)]
    pub fn is_active(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// Why an address is on the block list; also the index of its XDP drop
/// counter. Codes are part of the map layout: never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// Added by an administrator.
    Manual = 0,
    /// Repeated pre-greet talk.
    Pregreet = 1,
    /// Listed on a DNSBL.
    Dnsbl = 2,
    /// Other SMTP protocol violations.
    Protocol = 3,
    /// Directory harvest (runs of unknown recipients).
    Harvest = 4,
    /// Too many connections or commands.
    Rate = 5,
    /// Sessions that ended in a 5xx drop.
    Rejected = 6,
}

/// How many reason codes have their own counter (codes at or above share
/// the last one).
pub const MAX_REASONS: u32 = 16;

impl BlockReason {
    pub const ALL: [BlockReason; 7] = [
        BlockReason::Manual,
        BlockReason::Pregreet,
        BlockReason::Dnsbl,
        BlockReason::Protocol,
        BlockReason::Harvest,
        BlockReason::Rate,
        BlockReason::Rejected,
    ];

    pub const fn code(self) -> u32 {
        self as u32
    }

    pub fn from_code(code: u32) -> Option<BlockReason> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u32 == code {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Stable lower-case name (CLI, JSON, metrics labels).
    pub const fn name(self) -> &'static str {
        match self {
            BlockReason::Manual => "manual",
            BlockReason::Pregreet => "pregreet",
            BlockReason::Dnsbl => "dnsbl",
            BlockReason::Protocol => "protocol",
            BlockReason::Harvest => "harvest",
            BlockReason::Rate => "rate",
            BlockReason::Rejected => "rejected",
        }
    }

    pub fn from_name(name: &str) -> Option<BlockReason> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Key of the attachment registry: a network namespace name (empty = the
/// loader's own) and an interface name, both NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttachKey {
    pub netns: [u8; 48],
    pub ifname: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), only u32/u64/u8 fields laid out without padding
    // (checked by the tests below), every bit pattern valid.
    unsafe impl aya::Pod for ListEntry {}
    unsafe impl aya::Pod for TimedEntry {}
    unsafe impl aya::Pod for AttachKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn list_entry_fits_after_an_lpm_key() {
        assert_eq!(size_of::<ListEntry>(), 32);
        assert!(align_of::<ListEntry>() <= 4);
        assert_eq!(size_of::<TimedEntry>(), 16);
        assert_eq!(size_of::<AttachKey>(), 64);
    }

    #[test]
    fn expiry_round_trips_and_zero_never_expires() {
        let e = ListEntry::new(120, 5, 0x1_2345_6789, 1, LIST_F_ALL_PORTS);
        assert_eq!(e.expires_ns(), 0x1_2345_6789);
        assert_eq!(e.added_ns(), 5);
        assert!(e.is_active(0x1_2345_6788));
        assert!(!e.is_active(0x1_2345_6789));
        assert!(e.all_ports());
        let forever = ListEntry::new(128, 1, 0, 0, 0);
        assert!(forever.is_active(u64::MAX));
        assert!(!forever.all_ports());
    }

    #[test]
    fn reasons_round_trip() {
        for r in BlockReason::ALL {
            assert_eq!(BlockReason::from_code(r.code()), Some(r));
            assert_eq!(BlockReason::from_name(r.name()), Some(r));
            assert!(r.code() < MAX_REASONS);
        }
        assert_eq!(BlockReason::from_code(99), None);
    }
}
