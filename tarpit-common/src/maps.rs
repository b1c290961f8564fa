//! Map names, default sizes and the live settings. The loader pins every
//! map under the configured pin directory by exactly these names, and the
//! CLI opens them by these names.

/// SYNs to an SMTP port seen per source address (LRU hash: IpAddrKey -> u64);
/// SYNs XDP drops are not counted (no per-source state on the drop path).
pub const SYN_COUNT: &str = "SYN_COUNT";
/// Default capacity of [`SYN_COUNT`].
pub const SYN_COUNT_ENTRIES: u32 = 65_536;

/// Settings the agent changes live (array: u32 index -> [`Settings`]).
pub const SETTINGS: &str = "SETTINGS";

/// Per-flow SMTP state (LRU hash: [`crate::FlowKey`] -> [`crate::FlowState`]).
pub const FLOWS: &str = "FLOWS";
pub const FLOWS_ENTRIES: u32 = 65_536;

/// Per-address history (LRU hash: [`crate::IpAddrKey`] -> [`crate::IpState`]).
pub const IP_STATE: &str = "IP_STATE";
pub const IP_STATE_ENTRIES: u32 = 262_144;

/// Allow list (LPM trie: prefix -> [`crate::ListEntry`]); always passes XDP.
pub const ALLOW: &str = "ALLOW";
pub const ALLOW_ENTRIES: u32 = 16_384;

/// Block list of the administrator (LPM trie: prefix -> [`crate::ListEntry`]);
/// dropped in XDP. Only `tarpit block add` (and the state file it keeps)
/// writes here, so a flood of offenders can never fill it.
pub const BLOCK: &str = "BLOCK";
pub const BLOCK_ENTRIES: u32 = 65_536;

/// Automatic blocks (LPM trie: prefix -> [`crate::ListEntry`]): repeat
/// offenders the agent blocked, checked by XDP after [`BLOCK`]. Apart from
/// the admin's list so that offenders (or forged strikes) fill only their
/// own room; when it is full the agent evicts its oldest entries, never an
/// admin entry. A trie rather than an LRU hash: any prefix (a /64 of
/// aggregated strikes) and the same eviction on every kernel (an LRU hash
/// before 6.16 can recycle its newest entries long before it is full).
pub const AUTO_BLOCK: &str = "AUTO_BLOCK";
pub const AUTO_BLOCK_ENTRIES: u32 = 65_536;

/// Which prefix lists have ever held an entry (array: list index -> u32,
/// 0 = never): the kernel skips the lookup in a list that never had one,
/// the common case of an empty admin list, and the one that makes a
/// passing packet cheap. One element per list, so that writers never
/// read-modify-write a value another writer shares. Every writer sets its
/// list's element (to 1, never back to 0) before it inserts, and the
/// loader sets it for every list that has entries, so a flag can be stale
/// only towards "used": an extra lookup, never a missed entry.
pub const LISTS_USED: &str = "LISTS_USED";
/// Elements of [`LISTS_USED`] (one per list, room for one more).
pub const LISTS_USED_LEN: u32 = 4;
/// [`LISTS_USED`] index of [`ALLOW`].
pub const LIST_USED_ALLOW: u32 = 0;
/// [`LISTS_USED`] index of [`BLOCK`].
pub const LIST_USED_BLOCK: u32 = 1;
/// [`LISTS_USED`] index of [`AUTO_BLOCK`].
pub const LIST_USED_AUTO_BLOCK: u32 = 2;

/// Authenticated addresses (LRU hash: IpAddrKey -> [`crate::TimedEntry`]),
/// written by the agent on AUTH success.
pub const AUTH: &str = "AUTH";
pub const AUTH_ENTRIES: u32 = 65_536;

/// Addresses whose TCP window is clamped (LRU hash: IpAddrKey ->
/// [`crate::TimedEntry`]), written by the agent.
pub const SLOW: &str = "SLOW";
pub const SLOW_ENTRIES: u32 = 65_536;

/// Rare events for the agent (ring buffer of [`crate::Event`]).
pub const EVENTS: &str = "EVENTS";
/// Default ring buffer size in bytes (a power of two, at least a page).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Per-CPU counters (per-CPU array: [`crate::Counter`] index -> u64).
pub const COUNTERS: &str = "COUNTERS";

/// Socket-local mark of the sockets sock_ops counted (sk storage: u32).
pub const SOCK_MARK: &str = "SOCK_MARK";

/// Scratch buffer for the tc program (per-CPU array, kernel only).
pub const SCRATCH: &str = "SCRATCH";

/// The map-layout marker (array of one u64: [`LAYOUT_MAGIC`]). The first
/// thing a loader or the CLI reads: maps from another layout are refused,
/// never misread.
pub const LAYOUT: &str = "LAYOUT";
/// Bump on every change of a map's key, value or type. A new map is no
/// such change: a loader creates its pin next to the old ones, and readers
/// treat it as absent until then ([`AUTO_BLOCK`] came this way).
pub const LAYOUT_VERSION: u32 = 2;
/// "TRPT" in the high half, [`LAYOUT_VERSION`] in the low half.
pub const LAYOUT_MAGIC: u64 = (0x5452_5054u64 << 32) | LAYOUT_VERSION as u64;

/// What the loader attached and must undo on detach that no pinned link
/// records: netlink tc filters and clsact qdiscs it created (hash:
/// [`crate::AttachKey`] -> u32 `ATTACH_*` flags). Userspace only.
pub const ATTACHMENTS: &str = "ATTACHMENTS";
pub const ATTACHMENTS_ENTRIES: u32 = 64;
/// The clsact qdisc on this interface was created by tarpit.
pub const ATTACH_QDISC_CREATED: u32 = 1;
/// tc programs on this interface are attached through netlink (no link).
pub const ATTACH_TC_NETLINK: u32 = 2;

/// How many SMTP ports the kernel programs can watch at once.
pub const MAX_SMTP_PORTS: usize = 8;
/// SMTP over implicit TLS: the client always speaks first, so it is never
/// checked for pre-greet talk.
pub const SMTPS_PORT: u16 = 465;

/// Settings toggles (`Settings::flags`).
/// Flag clients that talk before the greeting (tc).
pub const SETTING_PREGREET: u32 = 1 << 0;
/// Drop block-listed sources in XDP (off: count only).
pub const SETTING_BLOCK: u32 = 1 << 1;
/// Send events to the ring buffer.
pub const SETTING_EVENTS: u32 = 1 << 2;
/// Kernel log lines (aya-log) for rare events.
pub const SETTING_LOG: u32 = 1 << 3;
/// Clamp the TCP window of addresses in [`SLOW`] (sock_ops).
pub const SETTING_SLOWDOWN: u32 = 1 << 4;
/// Count live connections per address (sock_ops).
pub const SETTING_CONNS: u32 = 1 << 5;
pub const SETTINGS_DEFAULT_FLAGS: u32 = SETTING_PREGREET
    | SETTING_BLOCK
    | SETTING_EVENTS
    | SETTING_LOG
    | SETTING_SLOWDOWN
    | SETTING_CONNS;

/// Live settings of the kernel programs, slot 0 of the [`SETTINGS`] array.
/// Ports are in host byte order; 0 marks an unused slot. All zero (the
/// state right after a load, before the loader writes it) means "watch
/// nothing": a freshly loaded program is a no-op.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub smtp_ports: [u16; MAX_SMTP_PORTS],
    /// `SETTING_*` toggles.
    pub flags: u32,
    /// TCP window clamp in bytes for slowed addresses (0 = off). The
    /// kernel raises anything below its floor (about 1 KiB) to that floor.
    pub window_clamp: u32,
    /// Reserved for later settings; zero.
    pub reserved: [u32; 6],
}

/// Whether `port` is one of `ports`, where 0 marks an unused slot (so
/// port 0 is never listed). A fixed-size array and a plain counted loop, so
/// that every kernel's verifier sees the bound.
#[inline(always)]
pub fn port_listed<const N: usize>(ports: &[u16; N], port: u16) -> bool {
    let mut i = 0;
    while i < N {
        if ports[i] != 0 && ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

impl Settings {
    #[inline(always)]
    pub fn is_smtp_port(&self, port: u16) -> bool {
        port_listed(&self.smtp_ports, port)
    }

    #[inline(always)]
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only u16/u32 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for Settings {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_layout_has_no_padding() {
        assert_eq!(core::mem::size_of::<Settings>(), 16 + 4 + 4 + 24);
    }

    #[test]
    fn port_zero_is_never_smtp() {
        let s = Settings {
            smtp_ports: [25, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        assert!(s.is_smtp_port(25));
        assert!(!s.is_smtp_port(0));
        assert!(!s.is_smtp_port(587));
    }

    #[test]
    fn layout_magic_carries_version() {
        assert_eq!(LAYOUT_MAGIC as u32, LAYOUT_VERSION);
        assert_eq!((LAYOUT_MAGIC >> 32) as u32, 0x5452_5054);
    }
}
