//! sk_lookup: trusted clients straight to the MTA, and fail-open.
//!
//! Runs when a SYN to a steered port looks for a listener in the network
//! namespace the program is attached to. Allow-listed clients (and
//! recently authenticated ones, when the settings say so) are assigned the
//! MTA's plain listener: the MTA sees their real address natively and the
//! agent never sees the connection. Everyone else is assigned the agent's
//! listener. When the agent's slot is empty (its process died: a closed
//! socket leaves every sockmap), the MTA's listener takes every client, so
//! mail keeps flowing; the XDP block list still applies before this.
//!
//! Whatever cannot be steered (no settings, no socket for the family, an
//! assignment the kernel refuses) is passed to the kernel's own lookup:
//! this program never drops a connection.
use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use tarpit_common::{
    Counter, IpAddrKey,
    maps::LIST_USED_ALLOW,
    steer::{
        SLOT_AGENT_V4, SLOT_AGENT_V6, SLOT_MTA_V4, SLOT_MTA_V6, STEER_C_AGENT, STEER_C_ALLOWED,
        STEER_C_AUTHENTICATED, STEER_C_FAIL_OPEN, STEER_C_PASSED, STEER_F_ALLOWED,
        STEER_F_AUTHENTICATED, STEER_F_FAIL_OPEN,
    },
};

use crate::maps::{
    ALLOW, AUTH, STEER, STEER_COUNTERS, STEER_SETTINGS, list_key, list_lookup, now_ns,
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn tarpit_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    SK_PASS
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = STEER_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this run.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn steer(ctx: &SkLookupContext) {
    let l: *const bpf_sk_lookup = ctx.lookup;
    // Read every field up front, whatever the family.
    // SAFETY: plain reads of the context the kernel hands in.
    let (family, protocol, local_port, r4, r6) = unsafe {
        (
            (*l).family,
            (*l).protocol,
            (*l).local_port,
            (*l).remote_ip4,
            (*l).remote_ip6,
        )
    };
    if protocol != IPPROTO_TCP {
        return;
    }
    let Some(settings) = STEER_SETTINGS.get(0) else {
        return;
    };
    if !settings.steers(local_port as u16) {
        return;
    }
    let v4 = family == AF_INET;
    let addr = IpAddrKey::from_sock_words(family, r4, r6);
    let (mta, agent) = if v4 {
        (SLOT_MTA_V4, SLOT_AGENT_V4)
    } else {
        (SLOT_MTA_V6, SLOT_AGENT_V6)
    };
    if settings.has(STEER_F_ALLOWED)
        && list_lookup(
            &ALLOW,
            LIST_USED_ALLOW,
            &list_key(&addr),
            Counter::XdpAllowExpired,
        )
        .is_some()
        && STEER.redirect_sk_lookup(ctx, mta, 0).is_ok()
    {
        bump(STEER_C_ALLOWED);
        return;
    }
    if settings.has(STEER_F_AUTHENTICATED) {
        // SAFETY: the value is only read, in this run, while the map holds it.
        let active = match unsafe { AUTH.get(&addr) } {
            Some(e) => e.is_active(now_ns()),
            None => false,
        };
        if active && STEER.redirect_sk_lookup(ctx, mta, 0).is_ok() {
            bump(STEER_C_AUTHENTICATED);
            return;
        }
    }
    if STEER.redirect_sk_lookup(ctx, agent, 0).is_ok() {
        bump(STEER_C_AGENT);
        return;
    }
    if settings.has(STEER_F_FAIL_OPEN) && STEER.redirect_sk_lookup(ctx, mta, 0).is_ok() {
        bump(STEER_C_FAIL_OPEN);
        return;
    }
    bump(STEER_C_PASSED);
}
