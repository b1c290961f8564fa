//! sock_ops on a cgroup: the flows tc judges, live connections per
//! address, and the TCP window clamp for slowed addresses.
//!
//! Flows: when the kernel accepts a connection to a watched port (never
//! 465), the passive-established callback makes its flow entry with the
//! server's ISN + 1 and the client's next sequence number, and the close
//! callback removes it. Only a completed handshake makes an entry, so
//! forged SYNs neither strike nor push real flows out of the LRU map.
//!
//! Connections are counted once per socket: the passive-established
//! callback marks the socket in socket-local storage and asks for state
//! callbacks; the close callback decrements only marked sockets. Sockets
//! older than the program were never marked and are never decremented; a
//! socket counted by an earlier copy of the program (same pinned maps) is
//! decremented correctly after a restart. Counts use atomic adds and
//! saturate at zero.
use aya_ebpf::{
    bindings::{
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_setsockopt, bpf_sk_storage_get},
    macros::sock_ops,
    programs::SockOpsContext,
};
use tarpit_common::{
    Counter, FlowKey, FlowState, IpAddrKey,
    events::EVENT_FLOW_TABLE_FULL,
    maps::{
        LIST_USED_ALLOW, SETTING_CONNS, SETTING_EVENTS, SETTING_PREGREET, SETTING_SLOWDOWN,
        SMTPS_PORT, Settings,
    },
    state::{IP_F_ALLOWED, IP_F_AUTHENTICATED, IP_F_SLOWED},
};

use crate::maps::{
    ALLOW, AUTH, EventArgs, FLOWS, IP_STATE, SLOW, SOCK_MARK, atomic_add_u64, count, emit,
    ip_state, list_key, list_lookup, now_ns, settings,
};

const SOL_SOCKET: i32 = 1;
const SO_RCVBUF: i32 = 8;
const SOL_TCP: i32 = 6;
const TCP_WINDOW_CLAMP: i32 = 10;
const MARK_COUNTED: u32 = 1;
const MARK_CLOSED: u32 = 2;

#[sock_ops]
pub fn tarpit_sockops(ctx: SockOpsContext) -> u32 {
    handle(&ctx);
    1
}

#[inline(always)]
fn handle(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
        return;
    }
    // Read every ctx field unconditionally: the verifier refuses ctx
    // accesses that depend on the family branch.
    let family = ctx.family();
    let r4 = ctx.remote_ip4();
    let r6 = ctx.remote_ip6();
    let l4 = ctx.local_ip4();
    let l6 = ctx.local_ip6();
    let local_port = ctx.local_port() as u16;
    let remote_port = ctx.remote_port();
    // SAFETY: plain reads of the context the kernel hands in.
    let (snd_nxt, rcv_nxt) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).rcv_nxt) };
    let Some(settings) = settings() else { return };
    let conns = settings.has(SETTING_CONNS);
    let flows = settings.has(SETTING_PREGREET) && local_port != SMTPS_PORT;
    if !(conns || flows) || !settings.is_smtp_port(local_port) {
        return;
    }
    // SAFETY: a plain read of the context the kernel hands in (checked
    // for null below).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    let addr = IpAddrKey::from_sock_words(family, r4, r6);
    let key = FlowKey {
        client: addr,
        server: IpAddrKey::from_sock_words(family, l4, l6),
        client_port: client_port(remote_port),
        server_port: local_port,
    };
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // State callbacks: the close removes the flow and the count.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        if flows {
            flow_open(&key, snd_nxt, rcv_nxt, settings);
        }
        if conns {
            established(ctx, sk, &addr, settings);
        }
    } else if ctx.arg(1) == BPF_TCP_CLOSE {
        if flows && FLOWS.remove(&key).is_ok() {
            count(Counter::TcFlowClosed);
        }
        if conns {
            closed(sk, &addr);
        }
    }
}

/// The client's port from sock_ops' `remote_port`: the port in network
/// order, in the upper 16 bits on little-endian kernels (the lower ones
/// elsewhere); a connected socket's port is never 0.
#[inline(always)]
fn client_port(raw: u32) -> u16 {
    let p = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(p as u16)
}

/// Makes the flow entry of a connection the kernel just accepted.
/// `snd_nxt` is the server's ISN + 1 (the SYN-ACK is acknowledged, no data
/// sent yet), `rcv_nxt` the client's next sequence number.
#[inline(always)]
fn flow_open(key: &FlowKey, snd_nxt: u32, rcv_nxt: u32, settings: &Settings) {
    let now = now_ns();
    match FLOWS.insert(key, FlowState::established(now, snd_nxt, rcv_nxt), 0) {
        Ok(()) => count(Counter::TcFlowNew),
        Err(e) => {
            count(Counter::TcFlowInsertFailed);
            if settings.has(SETTING_EVENTS) {
                emit(EventArgs {
                    now,
                    kind: EVENT_FLOW_TABLE_FULL,
                    flags: 0,
                    addr: &key.client,
                    client_port: key.client_port,
                    server_port: key.server_port,
                    server: Some(&key.server),
                    value: e as i64 as u64,
                });
            }
        }
    }
}

#[inline(always)]
fn mark(sk: *mut aya_ebpf::bindings::bpf_sock, create: bool) -> Option<*mut u32> {
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: the map is a socket-storage map, `sk` the non-null socket of
    // this callback, no initial value.
    let p = unsafe {
        bpf_sk_storage_get(
            &raw const SOCK_MARK as *mut _,
            sk as *mut _,
            core::ptr::null_mut(),
            flags,
        )
    } as *mut u32;
    if p.is_null() { None } else { Some(p) }
}

#[inline(always)]
fn established(
    ctx: &SockOpsContext,
    sk: *mut aya_ebpf::bindings::bpf_sock,
    addr: &IpAddrKey,
    settings: &Settings,
) {
    // Without a mark the socket is not counted at all: never decrement
    // what was not counted.
    let Some(m) = mark(sk, true) else { return };
    // SAFETY: this socket's storage, valid while the program runs.
    unsafe {
        if *m != 0 {
            return;
        }
        *m = MARK_COUNTED;
    }
    count(Counter::SockEstablished);
    let now = now_ns();
    let Some(s) = ip_state(addr, now) else { return };
    // SAFETY: a map value pointer the helper returned for this run: valid,
    // aligned and live until the program returns.
    unsafe {
        let live = (*s).live_conns;
        if live > i64::MAX as u64 {
            // Two racing closes went below zero: start again from one.
            (*s).live_conns = 1;
        } else {
            atomic_add_u64(&raw mut (*s).live_conns, 1);
        }
        atomic_add_u64(&raw mut (*s).conns_total, 1);
    }
    let mut flags = 0;
    if list_lookup(
        &ALLOW,
        LIST_USED_ALLOW,
        &list_key(addr),
        Counter::XdpAllowExpired,
    )
    .is_some()
    {
        flags |= IP_F_ALLOWED;
    }
    // SAFETY: the values are only read, in this run, while the maps hold them.
    if let Some(a) = unsafe { AUTH.get(addr) } {
        if a.is_active(now) {
            flags |= IP_F_AUTHENTICATED;
        }
    }
    let slowed = match unsafe { SLOW.get(addr) } {
        Some(e) => e.is_active(now),
        None => false,
    };
    if slowed && settings.has(SETTING_SLOWDOWN) && settings.window_clamp > 0 {
        // A fixed receive buffer first: it turns off receive-buffer
        // autotuning, which would otherwise raise the clamp again.
        let mut rcvbuf = settings.window_clamp as i32;
        let mut clamp = settings.window_clamp as i32;
        // SAFETY: the callback's own context and a 4-byte value on our stack,
        // as the helper expects.
        let rc_buf = unsafe {
            bpf_setsockopt(
                ctx.ops as *mut _,
                SOL_SOCKET,
                SO_RCVBUF,
                &raw mut rcvbuf as *mut _,
                4,
            )
        };
        // TCP_WINDOW_CLAMP is settable from BPF only since 5.19; before it
        // the small receive buffer alone keeps the advertised window down.
        // SAFETY: as above.
        let rc_clamp = unsafe {
            bpf_setsockopt(
                ctx.ops as *mut _,
                SOL_TCP,
                TCP_WINDOW_CLAMP,
                &raw mut clamp as *mut _,
                4,
            )
        };
        if rc_buf == 0 || rc_clamp == 0 {
            flags |= IP_F_SLOWED;
            count(Counter::SockClamped);
        }
    }
    // SAFETY: the IP_STATE value looked up above, valid for this run.
    unsafe {
        if (*s).flags & flags != flags {
            (*s).flags |= flags;
        }
    }
}

#[inline(always)]
fn closed(sk: *mut aya_ebpf::bindings::bpf_sock, addr: &IpAddrKey) {
    let Some(m) = mark(sk, false) else { return };
    // SAFETY: this socket's storage, valid while the program runs.
    unsafe {
        if *m != MARK_COUNTED {
            return;
        }
        *m = MARK_CLOSED;
    }
    count(Counter::SockClosed);
    if let Some(s) = IP_STATE.get_ptr_mut(addr) {
        // SAFETY: a map value pointer the helper returned for this run: valid,
        // aligned and live until the program returns.
        unsafe {
            let live = (*s).live_conns;
            if live > 0 && live <= i64::MAX as u64 {
                atomic_add_u64(&raw mut (*s).live_conns, u64::MAX);
            }
        }
    }
}
