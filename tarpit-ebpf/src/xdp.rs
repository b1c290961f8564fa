//! XDP: the first look at every packet, before a socket exists.
//!
//! - Block list: sources on it are dropped on the SMTP ports (or on every
//!   port when the entry says so) unless the allow list also matches; the
//!   allow list is consulted only then, so an ordinary packet costs one
//!   prefix lookup.
//! - Counts connection attempts (SYN without ACK) to a watched SMTP port per
//!   source address. Counting SYNs rather than packets keeps the figure
//!   deterministic: ACKs, retransmits and GRO make packet counts vary.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use tarpit_common::{
    Counter,
    counters::drop_reason_index,
    events::EVENT_BLOCK_HIT,
    maps::{SETTING_BLOCK, SETTING_EVENTS},
    parse::{self, TCP_ACK, TCP_SYN},
    state::IP_F_BLOCKED,
};

use crate::maps::{
    ALLOW, BLOCK, EventArgs, IP_STATE, SYN_COUNT, count, count_index, emit, list_lookup, now_ns,
    settings,
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
    let tcp = parse::tcp(data, data_end, &ip);
    let smtp_port = match &tcp {
        Some(t) => settings.is_smtp_port(t.dport),
        None => false,
    };
    if let Some(t) = &tcp {
        if smtp_port && t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            match SYN_COUNT.get_ptr_mut(ip.src) {
                Some(n) => unsafe { *n += 1 },
                None => {
                    let _ = SYN_COUNT.insert(ip.src, 1u64, 0);
                }
            }
        }
    } else if ip.later_fragment {
        count(Counter::Fragments);
    }

    let Some(block) = list_lookup(&BLOCK, &ip.src, Counter::XdpBlockExpired) else {
        count(Counter::XdpPass);
        return xdp_action::XDP_PASS;
    };
    if !(block.all_ports() || smtp_port) {
        count(Counter::XdpBlockOtherPort);
        return xdp_action::XDP_PASS;
    }
    if list_lookup(&ALLOW, &ip.src, Counter::XdpAllowExpired).is_some() {
        count(Counter::XdpAllowed);
        return xdp_action::XDP_PASS;
    }
    if !settings.has(SETTING_BLOCK) {
        count(Counter::XdpBlockDisabled);
        return xdp_action::XDP_PASS;
    }
    count(Counter::XdpDrop);
    let n = count_index(drop_reason_index(block.reason));
    let (client_port, server_port, syn) = match &tcp {
        Some(t) => (t.sport, t.dport, t.flags & (TCP_SYN | TCP_ACK) == TCP_SYN),
        None => (0, 0, false),
    };
    if syn {
        // Once per connection attempt, not per packet: mark the address.
        if let Some(s) = IP_STATE.get_ptr_mut(ip.src) {
            unsafe {
                if (*s).flags & IP_F_BLOCKED == 0 {
                    (*s).flags |= IP_F_BLOCKED;
                }
            }
        }
    }
    // A sample, not one event per dropped packet.
    if n & 1023 == 1 && settings.has(SETTING_EVENTS) {
        emit(EventArgs {
            now: now_ns(),
            kind: EVENT_BLOCK_HIT,
            flags: block.reason,
            addr: &ip.src,
            client_port,
            server_port,
            server: None,
            value: n,
        });
    }
    xdp_action::XDP_DROP
}
