//! XDP: the first look at every packet, before a socket exists.
//!
//! Counts connection attempts (SYN without ACK) to a watched SMTP port per
//! source address. Counting SYNs rather than packets keeps the figure
//! deterministic: ACKs, retransmits and GRO make packet counts vary.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use crate::{
    maps::{SYN_COUNT, settings},
    parse::{TCP_ACK, TCP_SYN, tcp_from_ethernet},
};

#[xdp]
pub fn tarpit_xdp(ctx: XdpContext) -> u32 {
    let Some(seg) = tcp_from_ethernet(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    if seg.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return xdp_action::XDP_PASS;
    }
    let Some(settings) = settings() else {
        return xdp_action::XDP_PASS;
    };
    if !settings.is_smtp_port(seg.dport) {
        return xdp_action::XDP_PASS;
    }
    match SYN_COUNT.get_ptr_mut(seg.src) {
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = SYN_COUNT.insert(seg.src, 1u64, 0);
        }
    }
    xdp_action::XDP_PASS
}
