//! tc ingress + egress: pre-greet detection on connections the kernel
//! accepted.
//!
//! Flow entries are made by sock_ops when the kernel accepts a connection
//! (never for 465, where the client always speaks first) with both sides'
//! sequence numbers, and removed by sock_ops when the socket closes: tc
//! never creates or removes one, so forged SYNs, segments, FINs and RSTs
//! change no flow. Egress advances the server's next sequence number as
//! the teaser or banner goes out and watches where the greeting ends: it
//! is complete once a server segment ends in a line that is not a `220-`
//! continuation. Ingress judges the client's first payload once: it counts
//! only with the client's expected sequence number and an acknowledgment
//! between the server's ISN + 1 and what egress saw go out. Then, if the
//! greeting is not complete, it is a pre-greet strike. A client that
//! acknowledges more than egress saw (replies leaving through another
//! interface) makes the flow "unknown"; payload on a flow with no entry is
//! "unknown" too: counted, never a strike.
//!
//! Egress stops following a flow once the flow's own socket says that the
//! client's bytes reached it and the server's first data segment is out:
//! ingress judged the client's first payload before the socket took it,
//! so the greeting's state matters no more. Every reply after the greeting
//! leaves on that test (the socket is warm in the sender's cache) without
//! a flow-map look-up; only the greeting's segments pay one.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::generated::{bpf_skb_load_bytes, bpf_tcp_sock},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::info;
use tarpit_common::{
    Counter, FlowKey,
    events::{EVENT_F_TEASER, EVENT_PREGREET},
    greeting,
    maps::{SETTING_EVENTS, SETTING_LOG, SETTING_PREGREET, SMTPS_PORT, Settings},
    parse::{self, IPPROTO_TCP, Ip, TCP_ACK, TCP_RST, TCP_SYN, Tcp},
    state::{
        ClientSegment, FLOW_F_CLIENT_SPOKE, FLOW_F_PREGREET, FLOW_F_SERVER_SPOKE, FLOW_F_TEASER,
        FLOW_F_UNSEEN, FLOW_GREETED, FLOW_TEASER, IP_F_PREGREET,
    },
};

use crate::maps::{
    EventArgs, FLOWS, SCRATCH, SCRATCH_LEN, atomic_add_u32, count, emit, ip_state, now_ns, settings,
};

/// Bytes of headers we want in the linear part of the skb.
const PULL_LEN: u32 = 128;

/// What a first parse attempt found.
enum First {
    Tcp(Ip, Tcp),
    /// Not for us: not IP, not TCP, a later fragment.
    Other,
    /// IP claiming TCP that did not parse: maybe only non-linear.
    Retry,
}

#[inline(always)]
fn try_parse(ctx: &TcContext, len: usize) -> First {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    match parse::ip(data, data_end, len) {
        Some(ip) => {
            if ip.proto != IPPROTO_TCP || ip.later_fragment {
                return First::Other;
            }
            match parse::tcp(data, data_end, &ip) {
                Some(t) => First::Tcp(ip, t),
                None => First::Retry,
            }
        }
        None if parse::is_ip(data, data_end) => First::Retry,
        None => First::Other,
    }
}

/// Parses a TCP packet; pulls non-linear headers in once if needed.
/// Malformed IP/TCP headers are counted and passed untouched.
#[inline(always)]
fn parse_tcp(ctx: &TcContext) -> Option<(Ip, Tcp)> {
    let len = ctx.len() as usize;
    match try_parse(ctx, len) {
        First::Tcp(ip, t) => return Some((ip, t)),
        First::Other => return None,
        First::Retry => {}
    }
    let linear = ctx.data_end() - ctx.data();
    let want = if len < PULL_LEN as usize {
        len
    } else {
        PULL_LEN as usize
    };
    if linear < want && ctx.pull_data(want as u32).is_ok() {
        if let First::Tcp(ip, t) = try_parse(ctx, len) {
            return Some((ip, t));
        }
    }
    count(Counter::Unparsed);
    None
}

/// The flow key of a segment, client first: the client is the source
/// on ingress (`from_client`), the destination on egress. Every byte is
/// written in place, with no zeroing first (see `Ip::src_into`).
#[inline(always)]
fn flow_key(
    ctx: &TcContext,
    ip: &Ip,
    from_client: bool,
    client_port: u16,
    server_port: u16,
) -> Option<FlowKey> {
    // The packet as it is now, after any pull.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let mut key = core::mem::MaybeUninit::<FlowKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: `k` points to our own `FlowKey`-sized stack slot; the
    // address writes cover 32 of its bytes and the two port writes the
    // other 4 (no padding), so it is read only once all of it is written.
    unsafe {
        let (c, s) = (&raw mut (*k).client, &raw mut (*k).server);
        let ok = if from_client {
            ip.src_into(data, data_end, c) && ip.dst_into(data, data_end, s)
        } else {
            ip.dst_into(data, data_end, c) && ip.src_into(data, data_end, s)
        };
        if !ok {
            return None;
        }
        (&raw mut (*k).client_port).write(client_port);
        (&raw mut (*k).server_port).write(server_port);
        Some(key.assume_init())
    }
}

#[inline(always)]
fn watched(settings: &Settings, port: u16) -> bool {
    port != SMTPS_PORT && settings.is_smtp_port(port)
}

#[classifier]
pub fn tarpit_tc_in(ctx: TcContext) -> i32 {
    ingress(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn tarpit_tc_out(ctx: TcContext) -> i32 {
    egress(&ctx);
    TC_ACT_UNSPEC
}

/// Client to server.
#[inline(always)]
fn ingress(ctx: &TcContext) {
    let Some(settings) = settings() else { return };
    if !settings.has(SETTING_PREGREET) {
        return;
    }
    let Some((ip, tcp)) = parse_tcp(ctx) else {
        return;
    };
    if !watched(settings, tcp.dport) {
        return;
    }
    if ip.fragment {
        // What a fragment carries reaches the socket only after reassembly
        // (or never): it is not classified.
        return;
    }
    if tcp.payload_len == 0 {
        // Handshakes, pure ACKs, FINs and RSTs: sock_ops makes and removes
        // flows from what the kernel accepted. A SYN only dates the
        // address's history (first and last seen); it earns no flow.
        if tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
            && let Some(src) = ip.src(ctx.data(), ctx.data_end())
        {
            let _ = ip_state(&src, now_ns());
        }
        return;
    }
    // The addresses only now (most packets never need them), from the
    // packet as it is after any pull.
    let Some(key) = flow_key(ctx, &ip, true, tcp.sport, tcp.dport) else {
        return;
    };
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        count(Counter::TcFlowUnknown);
        return;
    };
    // SAFETY: a map value pointer the helper returned for this run: valid,
    // aligned and live until the program returns; no other reference to it
    // exists here.
    let flow = unsafe { &mut *flow };
    if flow.flags & FLOW_F_CLIENT_SPOKE != 0 {
        // Judged already: the one comparison every later segment pays.
        return;
    }
    match flow.client_segment(tcp.flags & TCP_ACK != 0, tcp.seq, tcp.ack) {
        ClientSegment::OutOfWindow => count(Counter::TcOutOfWindow),
        ClientSegment::Unseen => {
            flow.flags |= FLOW_F_CLIENT_SPOKE | FLOW_F_UNSEEN;
            count(Counter::TcFlowUnseen);
        }
        ClientSegment::InWindow => {
            flow.flags |= FLOW_F_CLIENT_SPOKE;
            let state = flow.state;
            if state != FLOW_GREETED {
                let teaser = state == FLOW_TEASER;
                flow.flags |= FLOW_F_PREGREET | if teaser { FLOW_F_TEASER } else { 0 };
                strike(ctx, settings, &key, teaser);
            }
        }
    }
}

/// Records a pre-greet talker: per-address strike, event, log line.
#[inline(always)]
fn strike(ctx: &TcContext, settings: &Settings, key: &FlowKey, teaser: bool) {
    let now = now_ns();
    count(Counter::TcPregreet);
    if teaser {
        count(Counter::TcPregreetTeaser);
    }
    if let Some(s) = ip_state(&key.client, now) {
        // SAFETY: the IP_STATE value `ip_state` returned, valid for this run.
        unsafe {
            atomic_add_u32(&raw mut (*s).strikes, 1);
            (*s).last_strike_ns = now;
            if (*s).flags & IP_F_PREGREET == 0 {
                (*s).flags |= IP_F_PREGREET;
            }
        }
    }
    if settings.has(SETTING_EVENTS) {
        emit(EventArgs {
            now,
            kind: EVENT_PREGREET,
            flags: if teaser { EVENT_F_TEASER } else { 0 },
            addr: &key.client,
            client_port: key.client_port,
            server_port: key.server_port,
            server: Some(&key.server),
            value: 0,
        });
    }
    if settings.has(SETTING_LOG) {
        // Scalars only: string arguments chosen at run time do not pass
        // older verifiers (6.1) in aya-log's copy loop.
        info!(
            ctx,
            "pre-greet talk from [{:i}]:{} to port {} (after a 220- teaser: {})",
            key.client.octets,
            key.client_port,
            key.server_port,
            teaser as u8
        );
    }
}

/// Server to client.
#[inline(always)]
fn egress(ctx: &TcContext) {
    let Some(settings) = settings() else { return };
    if !settings.has(SETTING_PREGREET) {
        return;
    }
    let Some((ip, tcp)) = parse_tcp(ctx) else {
        return;
    };
    if !watched(settings, tcp.sport) || ip.fragment || tcp.payload_len == 0 {
        return;
    }
    if judged_by_socket(ctx) {
        return;
    }
    let Some(key) = flow_key(ctx, &ip, false, tcp.dport, tcp.sport) else {
        return;
    };
    let Some(flow) = FLOWS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a map value pointer the helper returned for this run: valid,
    // aligned and live until the program returns; no other reference to it
    // exists here.
    let flow = unsafe { &mut *flow };
    if flow.state == FLOW_GREETED {
        // The greeting is out: the one comparison every later segment pays.
        return;
    }
    flow.flags |= FLOW_F_SERVER_SPOKE;
    flow.server_sent(tcp.seq, tcp.payload_len as u32);
    let next = greeting_state(ctx, &tcp);
    flow.state = next;
    if next == FLOW_GREETED {
        count(Counter::TcGreeted);
    }
}

/// Whether the sending socket says the flow needs egress no more: the
/// client's bytes reached it (`bytes_received`), so ingress has judged the
/// client's first payload already, and this is not the server's first data
/// segment (`data_segs_out`, counted before the segment reaches tc), so
/// the greeting's first segment, which a pre-greet talker's flow also
/// sends, is still followed. Most server segments (every reply after the
/// greeting) leave here without a flow-map look-up: the socket is hot in
/// the sender's cache, the flow entry is not. Segments without a full TCP
/// socket (SYN-ACKs, resets, other hosts' traffic) say false.
#[inline(always)]
fn judged_by_socket(ctx: &TcContext) -> bool {
    // SAFETY: a read of the program's own `__sk_buff`; the field is the
    // socket pointer or null.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the skb's non-null socket; the helper checks that it
    // is a full TCP socket and returns null otherwise.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return false;
    }
    // SAFETY: a non-null `bpf_tcp_sock` the helper returned for this run.
    unsafe { (*tp).bytes_received > 0 && (*tp).data_segs_out > 1 }
}

/// Where a server segment leaves the greeting: `FLOW_TEASER` when its last
/// line is a `220-` continuation, else `FLOW_GREETED`. Any doubt (a last
/// line longer than the window, a failed copy) counts as greeted: a missed
/// bot is better than a flagged good client.
#[inline(always)]
fn greeting_state(ctx: &TcContext, tcp: &Tcp) -> u32 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return FLOW_GREETED;
    };
    // SAFETY: this CPU's slot of a per-CPU array; tc does not nest on a
    // CPU, so nothing else uses it while this runs.
    let buf = unsafe { &mut *buf };
    let len = tcp.payload_len;
    let n = if len > SCRATCH_LEN { SCRATCH_LEN } else { len };
    if n == 0 || n > SCRATCH_LEN {
        return FLOW_GREETED;
    }
    let off = tcp.payload_off + len - n;
    // n is 1..=128 already; the mask restates it in a form every verifier
    // sees (6.1 loses the bound of a comparison on a spilled copy).
    let n_arg = (core::hint::black_box(n as u32).wrapping_sub(1) & (SCRATCH_LEN as u32 - 1)) + 1;
    // SAFETY: the program's own skb and `n_arg` (1..=SCRATCH_LEN) bytes
    // into the scratch buffer, which holds GREETING_BUF >= SCRATCH_LEN.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            buf.as_mut_ptr() as *mut _,
            n_arg,
        )
    };
    if rc != 0 {
        return FLOW_GREETED;
    }
    greeting::after_segment(buf, n, n == len)
}
