//! Every map of the kernel programs, declared in one place. Names are the
//! constants of `tarpit_common::maps`; sizes given here are defaults that
//! the loader overrides from the agent's configuration.
use aya_ebpf::{
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SkStorage,
        SockMap, lpm_trie::Key,
    },
    helpers::bpf_ktime_get_boot_ns,
    macros::btf_map,
};
use tarpit_common::{
    AttachKey, Counter, Event, FlowKey, FlowState, IpAddrKey, IpState, ListEntry, TimedEntry,
    counters::COUNTERS_LEN,
    events::EVENT_IP_TABLE_FULL,
    hold::{HOLD_RATE_ENTRIES, HoldSettings},
    maps::{
        ALLOW_ENTRIES, ATTACHMENTS_ENTRIES, AUTH_ENTRIES, AUTO_BLOCK_ENTRIES, BLOCK_ENTRIES,
        EVENTS_BYTES, FLOWS_ENTRIES, IP_STATE_ENTRIES, LISTS_USED_LEN, SETTING_EVENTS,
        SLOW_ENTRIES, SYN_COUNT_ENTRIES, Settings,
    },
    steer::{STEER_COUNTERS_LEN, STEER_SLOTS, SteerSettings},
};

#[btf_map]
pub static SYN_COUNT: LruHashMap<IpAddrKey, u64, { SYN_COUNT_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowState, { FLOWS_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static IP_STATE: LruHashMap<IpAddrKey, IpState, { IP_STATE_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static ALLOW: LpmTrie<[u8; 16], ListEntry, { ALLOW_ENTRIES as usize }> = LpmTrie::new();

#[btf_map]
pub static BLOCK: LpmTrie<[u8; 16], ListEntry, { BLOCK_ENTRIES as usize }> = LpmTrie::new();

/// The agent's automatic blocks (see `tarpit_common::maps::AUTO_BLOCK`).
#[btf_map]
pub static AUTO_BLOCK: LpmTrie<[u8; 16], ListEntry, { AUTO_BLOCK_ENTRIES as usize }> =
    LpmTrie::new();

/// Which prefix lists ever held an entry (see
/// `tarpit_common::maps::LISTS_USED`): a list that never did is not
/// looked up.
#[btf_map]
pub static LISTS_USED: Array<u32, { LISTS_USED_LEN as usize }> = Array::new();

#[btf_map]
pub static AUTH: LruHashMap<IpAddrKey, TimedEntry, { AUTH_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static SLOW: LruHashMap<IpAddrKey, TimedEntry, { SLOW_ENTRIES as usize }> = LruHashMap::new();

#[btf_map]
pub static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTERS_LEN as usize }> = PerCpuArray::new();

/// 1 = counted at establishment, 2 = counted and closed.
#[btf_map]
pub static SOCK_MARK: SkStorage<u32> = SkStorage::new();

/// The tail of a server segment, copied out of the packet for scanning.
#[btf_map]
pub static SCRATCH: PerCpuArray<[u8; tarpit_common::greeting::GREETING_BUF], 1> =
    PerCpuArray::new();
/// Bytes copied into it (the greeting window).
pub const SCRATCH_LEN: usize = tarpit_common::greeting::GREETING_WINDOW;

/// Written by the loader, read by userspace only; declared here so it is
/// created and pinned with the others.
#[btf_map]
pub static LAYOUT: Array<u64, 1> = Array::new();

/// Written and read by userspace only (see `tarpit_common::maps::ATTACHMENTS`).
#[btf_map]
pub static ATTACHMENTS: HashMap<AttachKey, u32, { ATTACHMENTS_ENTRIES as usize }> = HashMap::new();

/// sk_lookup (see `tarpit_common::steer`): the MTA's and the agent's
/// listening sockets, the steering settings and counters.
#[btf_map]
pub static STEER: SockMap<{ STEER_SLOTS as usize }> = SockMap::new();

#[btf_map]
pub static STEER_SETTINGS: Array<SteerSettings, 1> = Array::new();

#[btf_map]
pub static STEER_COUNTERS: PerCpuArray<u64, { STEER_COUNTERS_LEN as usize }> = PerCpuArray::new();

/// The kernel hold (see `tarpit_common::hold`): the hold program's slot,
/// its reply caps and the state of the caps.
#[btf_map]
pub static HOLD_PROGS: ProgramArray<1> = ProgramArray::new();

#[btf_map]
pub static HOLD_SETTINGS: Array<HoldSettings, 1> = Array::new();

#[btf_map]
pub static HOLD_RATE: LruHashMap<IpAddrKey, u64, { HOLD_RATE_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static HOLD_CPU_RATE: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The hold program's header buffers (kernel only).
#[btf_map]
pub static HOLD_SCRATCH: PerCpuArray<crate::hold::HoldScratch, 1> = PerCpuArray::new();

/// The live settings; all-zero (no SMTP port watched) until the loader
/// writes them, which makes a freshly loaded program a no-op.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

#[inline(always)]
pub fn count(c: Counter) {
    count_index(c.index());
}

/// Adds `n` to this CPU's slot of a counter.
#[inline(always)]
pub fn count_add(c: Counter, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(c.index()) {
        // SAFETY: this CPU's slot of a per-CPU array (valid for this run;
        // nothing else on this CPU runs the program meanwhile).
        unsafe { *p += n };
    }
}

/// Adds one to this CPU's slot of a counter and returns the new value.
#[inline(always)]
pub fn count_index(index: u32) -> u64 {
    match COUNTERS.get_ptr_mut(index) {
        // SAFETY: as in `count_add`: this CPU's own slot, valid for this run.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// The full-length LPM key of an address: built once per packet and
/// shared by every list lookup of that packet.
pub type ListKey = Key<[u8; 16]>;

#[inline(always)]
pub fn list_key(addr: &IpAddrKey) -> ListKey {
    Key::new(128, addr.octets)
}

/// Whether the list with this `LISTS_USED` index ever held an entry. A
/// list that never did cannot match, and its lookup (the dearest step of
/// a packet that passes) is skipped. Unreadable counts as used.
#[inline(always)]
pub fn list_used(index: u32) -> bool {
    match LISTS_USED.get(index) {
        Some(v) => *v != 0,
        None => true,
    }
}

/// Looks an address (its [`list_key`]) up in a prefix list and returns
/// the longest prefix that is still active. An expired entry is counted
/// and deleted, and the lookup repeats, so an expired longer prefix never
/// hides a shorter active one (bounded: at most `MAX_SWEEP` nested
/// prefixes per lookup). `used` is the list's `LISTS_USED` index: a list
/// that never held an entry is not looked up.
#[inline(always)]
pub fn list_lookup<const N: usize>(
    map: &LpmTrie<[u8; 16], ListEntry, N>,
    used: u32,
    key: &ListKey,
    expired: Counter,
) -> Option<ListEntry> {
    const MAX_SWEEP: usize = 4;
    if !list_used(used) {
        return None;
    }
    let mut now = 0u64;
    for _ in 0..MAX_SWEEP {
        let entry = *map.get(key)?;
        let expires = entry.expires_ns();
        if expires == 0 {
            return Some(entry);
        }
        if now == 0 {
            now = now_ns();
        }
        if now < expires {
            return Some(entry);
        }
        count(expired);
        let stale = Key::new(entry.prefix_len, key.data);
        if map.remove(&stale).is_err() {
            // Someone else swept it, or it is gone: look again.
        }
    }
    None
}

/// The per-address record, created on first sight. Returns `None` only
/// when the LRU map refuses the entry (counted).
#[inline(always)]
pub fn ip_state(addr: &IpAddrKey, now: u64) -> Option<*mut IpState> {
    if let Some(p) = IP_STATE.get_ptr_mut(addr) {
        // SAFETY: a map value pointer the helper returned for this run: valid,
        // aligned and live until the program returns.
        unsafe { (*p).last_seen_ns = now };
        return Some(p);
    }
    let fresh = IpState {
        first_seen_ns: now,
        last_seen_ns: now,
        ..IpState::default()
    };
    // BPF_NOEXIST: a racing CPU that created it first keeps its record.
    let _ = IP_STATE.insert(addr, fresh, 1);
    let p = IP_STATE.get_ptr_mut(addr);
    if p.is_none() {
        count(Counter::IpStateFailed);
        if settings().is_some_and(|s| s.has(SETTING_EVENTS)) {
            emit(EventArgs {
                now,
                kind: EVENT_IP_TABLE_FULL,
                flags: 0,
                addr,
                client_port: 0,
                server_port: 0,
                server: None,
                value: 0,
            });
        }
    }
    p
}

/// Atomic add on a shared counter (`lock xadd`; no CAS on all kernels).
#[inline(always)]
pub fn atomic_add_u64(p: *mut u64, v: u64) {
    // SAFETY: callers pass a pointer into a map value they looked up in
    // this run (valid, 8-byte aligned); the add is atomic.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
}

#[inline(always)]
pub fn atomic_add_u32(p: *mut u32, v: u32) {
    // SAFETY: as `atomic_add_u64`, a 4-byte aligned field of a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
}

/// The fields of one event; the record is written straight into the ring
/// buffer (no 64-byte copy on the 512-byte BPF stack).
pub struct EventArgs<'a> {
    pub now: u64,
    pub kind: u32,
    pub flags: u32,
    pub addr: &'a IpAddrKey,
    pub client_port: u16,
    pub server_port: u16,
    pub server: Option<&'a IpAddrKey>,
    pub value: u64,
}

/// Sends an event to the agent; a full ring buffer is counted, not fatal.
#[inline(always)]
pub fn emit(a: EventArgs) {
    let Some(mut entry) = EVENTS.reserve(0) else {
        count(Counter::EventsLost);
        return;
    };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: the reserved ring-buffer record, sized for one `Event` and
    // ours until it is submitted below.
    unsafe {
        (*e).ts_ns = a.now;
        (*e).kind = a.kind;
        (*e).flags = a.flags;
        (*e).addr = *a.addr;
        (*e).client_port = a.client_port;
        (*e).server_port = a.server_port;
        (*e).server = match a.server {
            Some(s) => *s,
            None => IpAddrKey::default(),
        };
        (*e).reserved = 0;
        (*e).value = a.value;
    }
    entry.submit(0);
}
