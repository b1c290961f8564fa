//! XDP: the first look at every packet, before a socket exists.
//!
//! - Block lists: sources on them are dropped on the SMTP ports (or on
//!   every port when the entry says so) unless the allow list also
//!   matches; the allow list is consulted only then. The admin's list is
//!   looked up first, the agent's automatic blocks only when it has no
//!   entry, so an ordinary packet costs two prefix lookups, and none for
//!   a list that never held an entry (`LISTS_USED`); the lookups share
//!   one key, built once per packet. With no block list ever used, a
//!   packet that is not a SYN to a watched port leaves before its address
//!   is even read.
//! - Held sources (block entries with the hold flag) are handed to the
//!   hold program (`hold`) on the SMTP ports by a tail call.
//! - Counts connection attempts (SYN without ACK) to a watched SMTP port per
//!   source address. Counting SYNs rather than packets keeps the figure
//!   deterministic: ACKs, retransmits and GRO make packet counts vary.
//!   Only SYNs that pass are counted: a dropped packet costs the list
//!   look-ups and no per-source state, so a forged flood from a blocked
//!   prefix (a new source address per packet) cannot churn the LRU maps
//!   that hold real clients' history, and a drop stays cheaper than
//!   nftables' (issue 19's 3x).
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use tarpit_common::{
    Counter, IpAddrKey, ListEntry,
    counters::drop_reason_index,
    events::EVENT_BLOCK_HIT,
    maps::{LIST_USED_ALLOW, LIST_USED_AUTO_BLOCK, LIST_USED_BLOCK, SETTING_BLOCK, SETTING_EVENTS},
    parse::{self, TCP_ACK, TCP_SYN},
};

use crate::maps::{
    ALLOW, AUTO_BLOCK, BLOCK, EventArgs, SYN_COUNT, count, count_index, emit, list_key,
    list_lookup, list_used, now_ns, settings,
};

#[xdp]
pub fn tarpit_xdp(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(ip) = parse::ip(data, data_end, data_end - data) else {
        if parse::is_ip(data, data_end) {
            count(Counter::Unparsed);
        }
        return xdp_action::XDP_PASS;
    };
    let Some(settings) = settings() else {
        return xdp_action::XDP_PASS;
    };
    // Plain scalars, written on every path: older verifiers (5.10) refuse
    // a read of a stack slot that only one branch initialised, which is
    // what an Option<Tcp> held across the function can compile to.
    let mut sport = 0u16;
    let mut dport = 0u16;
    let mut syn = false;
    let mut smtp_port = false;
    if let Some(t) = parse::tcp(data, data_end, &ip) {
        sport = t.sport;
        dport = t.dport;
        syn = t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        smtp_port = settings.is_smtp_port(t.dport);
    } else if ip.later_fragment {
        count(Counter::Fragments);
    }
    // The common case, a packet that passes: no SYN to count and no block
    // list that ever held an entry. It leaves before its address is read.
    if !(smtp_port && syn) && !list_used(LIST_USED_BLOCK) && !list_used(LIST_USED_AUTO_BLOCK) {
        count(Counter::XdpPass);
        return xdp_action::XDP_PASS;
    }
    // The source address, read once into the LPM key that every list
    // lookup shares; `addr` is the same 16 bytes as a map key.
    let Some(src) = ip.src(data, data_end) else {
        return xdp_action::XDP_PASS;
    };
    let key = list_key(&src);
    // SAFETY: `IpAddrKey` is a repr(C) struct of one `[u8; 16]`, the type
    // of `key.data`, so the cast pointer is valid for reads, aligned (to
    // 1) and lives as long as `key`.
    let addr: &IpAddrKey = unsafe { &*(&raw const key.data as *const IpAddrKey) };
    // The admin's entry first; the automatic list only when the admin's
    // has none that applies to this port (an all-ports offender inside an
    // admin's SMTP-only prefix is still dropped on every port).
    // Plain variables, always initialised (see above, 5.10).
    let mut block = ListEntry::default();
    let mut found = false;
    if let Some(b) = list_lookup(&BLOCK, LIST_USED_BLOCK, &key, Counter::XdpBlockExpired) {
        block = b;
        found = true;
    }
    if !(found && applies(&block, smtp_port))
        && let Some(a) = list_lookup(
            &AUTO_BLOCK,
            LIST_USED_AUTO_BLOCK,
            &key,
            Counter::XdpBlockExpired,
        )
        && (!found || applies(&a, smtp_port))
    {
        block = a;
        found = true;
    }
    // Why the packet passes after all; none: it is dropped (or held).
    let passes = if !found {
        Some(Counter::XdpPass)
    } else if !applies(&block, smtp_port) {
        Some(Counter::XdpBlockOtherPort)
    } else if list_lookup(&ALLOW, LIST_USED_ALLOW, &key, Counter::XdpAllowExpired).is_some() {
        Some(Counter::XdpAllowed)
    } else if !settings.has(SETTING_BLOCK) {
        Some(Counter::XdpBlockDisabled)
    } else {
        None
    };
    if let Some(c) = passes {
        if smtp_port && syn {
            count_syn(addr);
        }
        count(c);
        return xdp_action::XDP_PASS;
    }
    // Held addresses: the hold program answers on the SMTP ports (it does
    // not come back). No hold program (kernel before 6.0, XDP_TX not
    // possible): dropped as any block.
    if block.hold() && smtp_port {
        crate::hold::enter(&ctx);
        count(Counter::HoldUnavailable);
    }
    count(Counter::XdpDrop);
    let n = count_index(drop_reason_index(block.reason));
    // A sample, not one event per dropped packet.
    if n & 1023 == 1 && settings.has(SETTING_EVENTS) {
        emit(EventArgs {
            now: now_ns(),
            kind: EVENT_BLOCK_HIT,
            flags: block.reason,
            addr,
            client_port: sport,
            server_port: dport,
            server: None,
            value: n,
        });
    }
    xdp_action::XDP_DROP
}

/// One more SYN from `addr` to a watched port.
#[inline(always)]
fn count_syn(addr: &IpAddrKey) {
    match SYN_COUNT.get_ptr_mut(addr) {
        // SAFETY: a value pointer of this map, valid for this run; a lost
        // increment under a race only makes the count approximate.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = SYN_COUNT.insert(addr, 1u64, 0);
        }
    }
}

/// Whether a block entry covers this packet's port.
#[inline(always)]
fn applies(b: &ListEntry, smtp_port: bool) -> bool {
    b.all_ports() || smtp_port
}
