//! XDP hold: a zero-window TCP peer with no socket, for block entries that
//! say `hold` (see `tarpit_common::hold`).
//!
//! Reached only by a tail call from `tarpit_xdp`, which has decided that
//! the source is held, not allow-listed, and that the segment goes to an
//! SMTP port. Its own program so that a kernel without the raw SYN-cookie
//! helpers (before 6.0) refuses only this program: the slot stays empty,
//! the tail call falls through and held addresses are dropped.
//!
//! What it answers, as xt_TARPIT and LaBrea do:
//! - SYN: a SYN-ACK with a SYN cookie as its sequence number (nothing is
//!   stored), a zero window, the MSS option (the value the cookie encodes,
//!   as Linux's own SYN cookies do) and the timestamp option echoed when
//!   the SYN had one. No window scaling, no SACK: both are optional.
//!   The cookie always encodes the top MSS of the kernel's cookie table
//!   (the helper is shown the SYN with MSS 65535): a window probe's
//!   sequence number is one below the handshake ACK's, and checked as a
//!   handshake ACK it shifts the cookie's MSS index up by one. With the
//!   top index that lands outside the table, so a probe can never pass for
//!   the handshake's ACK (and go unanswered until the bot gives up). We
//!   accept no data, so the MSS we advertise does not matter.
//! - The handshake's ACK (valid cookie, no payload): nothing to answer.
//! - Data and window probes: an ACK with a zero window that acknowledges
//!   nothing new (the sender's first unacknowledged byte), so the bot's
//!   stack resets its probe count and keeps its socket and data.
//! - FIN: ignored (the bot spends its own retries); RST: nothing.
//!
//! Every reply passes a per-source and a per-CPU cap first (forged SYNs
//! must not make a reflector of us); what cannot be answered is dropped,
//! never passed to the MTA. Headers are read into the stack and the reply
//! is written back with `bpf_xdp_store_bytes`, so no packet pointer
//! survives the tail adjustment.
use aya_ebpf::{
    bindings::{iphdr, ipv6hdr, tcphdr, xdp_action},
    helpers::generated::{
        bpf_ktime_get_ns, bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
        bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    macros::xdp,
    programs::XdpContext,
};
use tarpit_common::{
    Counter, IpAddrKey,
    hold::{HOLD_PROG_INDEX, gcra_admit},
    parse::{self, ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::maps::{
    HOLD_CPU_RATE, HOLD_PROGS, HOLD_RATE, HOLD_SCRATCH, HOLD_SETTINGS, count, count_add, now_ns,
};

const ETH_P_IP: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Longest TCP header read (data offset 15 words), rounded up to a power
/// of two so every index can be masked into the buffer.
const TCP_BUF: usize = 64;
/// Longest TCP header written: 20 + MSS (4) + NOP NOP timestamps (12).
const TCP_OUT: usize = 36;
const TCP_OPT_MSS: u8 = 2;
const TCP_OPT_TS: u8 = 8;
const TCP_OPT_NOP: u8 = 1;
const TTL: u8 = 64;

/// The headers read and written, in a per-CPU map: together they do not
/// fit the 512-byte BPF stack next to the helpers' frames.
#[repr(C)]
pub struct HoldScratch {
    eth: [u8; ETH_HLEN],
    out_eth: [u8; ETH_HLEN],
    iph: [u8; IPV6_HLEN],
    ip: [u8; IPV6_HLEN],
    th: [u8; TCP_BUF],
    tcp: [u8; TCP_OUT],
    /// The SYN as the cookie helper sees it: the fixed header with one
    /// option, MSS 65535.
    syn: [u8; SYN_FOR_COOKIE],
}

/// Length of [`HoldScratch::syn`]: 20 bytes of header and the MSS option.
const SYN_FOR_COOKIE: usize = 24;

/// Hands the packet to the hold program. Returns only when there is none
/// (empty slot): the caller drops.
#[inline(always)]
pub fn enter(ctx: &XdpContext) {
    // SAFETY: a tail call with the context we were given; on success it
    // does not return, on failure (empty slot) nothing has changed.
    unsafe { HOLD_PROGS.tail_call(ctx, HOLD_PROG_INDEX) };
}

#[xdp]
pub fn tarpit_hold(ctx: XdpContext) -> u32 {
    match hold(&ctx) {
        Some(action) => action,
        None => {
            count(Counter::HoldDropped);
            xdp_action::XDP_DROP
        }
    }
}

/// The reply to build: sequence and acknowledgment numbers, flags, and the
/// options.
struct Reply {
    flags: u8,
    seq: u32,
    ack: u32,
    /// MSS option (SYN-ACK only).
    mss: u16,
    /// Timestamp option: (our TSval, the echoed TSecr); sent when `ts`.
    ts: bool,
    tsval: u32,
    tsecr: u32,
}

/// `None`: drop and count as [`Counter::HoldDropped`]; `Some(action)`:
/// everything else is counted already.
#[inline(always)]
fn hold(ctx: &XdpContext) -> Option<u32> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let frame_len = data_end - data;
    let ip = parse::ip(data, data_end, frame_len)?;
    let t = parse::tcp(data, data_end, &ip)?;
    if ip.fragment {
        return None;
    }
    let src = ip.src(data, data_end)?;
    // SAFETY: this CPU's own slot of a per-CPU array; XDP does not nest on
    // a CPU, so nothing else touches it while this runs.
    let sc = unsafe { &mut *HOLD_SCRATCH.get_ptr_mut(0)? };
    load(ctx, 0, &mut sc.eth, ETH_HLEN as u32)?;
    let v4 = u16::from_be_bytes([sc.eth[12], sc.eth[13]]) == ETH_P_IP;
    // IPv4 options and IPv6 extension headers: not worth a reply.
    let l4 = ETH_HLEN + if v4 { IPV4_HLEN } else { IPV6_HLEN };
    if ip.l4_off != l4 {
        return None;
    }
    let doff = t.payload_off - l4;
    if v4 {
        load(ctx, ETH_HLEN as u32, &mut sc.iph, IPV4_HLEN as u32)?;
    } else {
        load(ctx, ETH_HLEN as u32, &mut sc.iph, IPV6_HLEN as u32)?;
    }
    if !(20..=60).contains(&doff) {
        return None;
    }
    // The fixed header, then the options one 32-bit word at a time: every
    // load has a constant size (kernels before about 6.8 lose the bounds
    // of a variable size the compiler spilled to the stack, and
    // bpf_xdp_load_bytes refuses a size that might be zero).
    load(ctx, l4 as u32, &mut sc.th, 20)?;
    let mut w = 20usize;
    for _ in 0..10 {
        if w >= doff {
            break;
        }
        load_word(ctx, (l4 + w) as u32, &mut sc.th, w)?;
        w += 4;
    }
    let (ts, tsecr) = find_timestamp(&sc.th, doff);
    // SAFETY: a helper without arguments.
    let tsval = (unsafe { bpf_ktime_get_ns() } / 1_000_000) as u32;

    let flags = t.flags;
    if flags & (TCP_RST | TCP_FIN) != 0 {
        return None;
    }
    let reply = if flags & TCP_SYN != 0 {
        if flags & TCP_ACK != 0 {
            return None;
        }
        if !admit(&src) {
            count(Counter::HoldRateLimited);
            return Some(xdp_action::XDP_DROP);
        }
        // The fixed header with one option, MSS 65535, and the data offset
        // to match: the helper then encodes the top index of its MSS table
        // whatever the bot asked for (see the module's doc).
        let mut i = 0;
        while i < 20 {
            sc.syn[i] = sc.th[i];
            i += 1;
        }
        sc.syn[12] = (((SYN_FOR_COOKIE / 4) as u8) << 4) | (sc.th[12] & 0x0f);
        sc.syn[20] = TCP_OPT_MSS;
        sc.syn[21] = 4;
        sc.syn[22] = 0xff;
        sc.syn[23] = 0xff;
        let iphp = sc.iph.as_mut_ptr();
        let thp = sc.syn.as_mut_ptr() as *mut tcphdr;
        // SAFETY: both pointers are into the per-CPU scratch value, which
        // holds a full IP header and SYN_FOR_COOKIE bytes of TCP header.
        let r = unsafe {
            if v4 {
                bpf_tcp_raw_gen_syncookie_ipv4(iphp as *mut iphdr, thp, SYN_FOR_COOKIE as u32)
            } else {
                bpf_tcp_raw_gen_syncookie_ipv6(iphp as *mut ipv6hdr, thp, SYN_FOR_COOKIE as u32)
            }
        };
        if r < 0 {
            return None;
        }
        Reply {
            flags: TCP_SYN | TCP_ACK,
            seq: r as u32,
            ack: t.seq.wrapping_add(1),
            mss: (r >> 32) as u16,
            ts,
            tsval,
            tsecr,
        }
    } else {
        if flags & TCP_ACK == 0 {
            return None;
        }
        if t.payload_len == 0 {
            let iphp = sc.iph.as_mut_ptr();
            let thp = sc.th.as_mut_ptr() as *mut tcphdr;
            // SAFETY: pointers into the per-CPU scratch value, which holds
            // a full IP header and a TCP header of at least 20 bytes.
            let r = unsafe {
                if v4 {
                    bpf_tcp_raw_check_syncookie_ipv4(iphp as *mut iphdr, thp)
                } else {
                    bpf_tcp_raw_check_syncookie_ipv6(iphp as *mut ipv6hdr, thp)
                }
            };
            if r == 0 {
                // The handshake's ACK: the bot is ESTABLISHED, we are not.
                count(Counter::HoldHandshakes);
                return Some(xdp_action::XDP_DROP);
            }
        } else {
            count_add(Counter::HoldBytesVoid, t.payload_len as u64);
        }
        if !admit(&src) {
            count(Counter::HoldRateLimited);
            return Some(xdp_action::XDP_DROP);
        }
        // A zero-window probe carries the byte before the first
        // unacknowledged one (or nothing); data starts at it. Either way
        // the answer acknowledges exactly up to that first byte.
        let ack = if t.payload_len == 0 {
            t.seq.wrapping_add(1)
        } else {
            t.seq
        };
        Reply {
            flags: TCP_ACK,
            seq: t.ack,
            ack,
            mss: 0,
            ts,
            tsval,
            tsecr,
        }
    };
    let syn = reply.flags & TCP_SYN != 0;
    let action = send(ctx, v4, frame_len, sc, &reply)?;
    count(if syn {
        Counter::HoldSynAnswered
    } else {
        Counter::HoldProbesAnswered
    });
    Some(action)
}

/// Copies `len` bytes at `off` into `buf` (`len` at most the buffer's).
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, off: u32, buf: &mut [u8; N], len: u32) -> Option<()> {
    if len as usize > N {
        return None;
    }
    // SAFETY: `len <= N` was checked above, so the helper writes inside
    // `buf`; it checks `off + len` against the packet itself.
    let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, off, buf.as_mut_ptr() as *mut _, len) };
    (r == 0).then_some(())
}

/// Copies the 4 bytes at `off` into `buf[at..at + 4]`.
#[inline(always)]
fn load_word(ctx: &XdpContext, off: u32, buf: &mut [u8; TCP_BUF], at: usize) -> Option<()> {
    if at > TCP_BUF - 4 {
        return None;
    }
    // SAFETY: `at + 4 <= TCP_BUF` was checked above: the word is inside
    // `buf`, and the helper writes exactly 4 bytes there.
    let p = unsafe { buf.as_mut_ptr().add(at) };
    // SAFETY: as above; the helper checks `off` against the packet.
    let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, off, p as *mut _, 4) };
    (r == 0).then_some(())
}

#[inline(always)]
fn store<const N: usize>(ctx: &XdpContext, off: u32, buf: &mut [u8; N], len: u32) -> Option<()> {
    if len as usize > N {
        return None;
    }
    // SAFETY: `len <= N` was checked above; the helper reads `len` bytes of
    // `buf` and checks `off + len` against the packet.
    let r = unsafe { bpf_xdp_store_bytes(ctx.ctx, off, buf.as_mut_ptr() as *mut _, len) };
    (r == 0).then_some(())
}

/// The timestamp option of a TCP header: (present, its TSval).
#[inline(always)]
fn find_timestamp(th: &[u8; TCP_BUF], doff: usize) -> (bool, u32) {
    let m = TCP_BUF - 1;
    let mut i = 20usize;
    // Eight options (NOPs count) cover every stack's SYN and segment
    // layout (Linux: MSS, SACK-permitted, TS; BSD/macOS: MSS, NOP, WS,
    // NOP, NOP, TS; segments: NOP, NOP, TS). Each step can fork the
    // verifier's paths, so the walk stays short: a timestamp further back
    // is not echoed, and the peer then just runs without timestamps.
    // Bounds are compared against precomputed limits, never as `i + k`:
    // the 6.12 verifier mistracks a register linked to another by a
    // constant offset here ("REG INVARIANTS VIOLATION") and then refuses
    // the read that follows.
    let last_kind = doff - 1; // kind and length both fit before doff
    let last_ts = doff - 10; // the whole timestamp option fits
    for _ in 0..8 {
        let at = i & m;
        if at >= last_kind {
            break;
        }
        let kind = th[at];
        if kind == 0 {
            break;
        }
        if kind == TCP_OPT_NOP {
            i = at + 1;
            continue;
        }
        let len = th[(at + 1) & m] as usize;
        if len < 2 {
            break;
        }
        if kind == TCP_OPT_TS && len == 10 && at <= last_ts {
            let v = u32::from_be_bytes([
                th[(at + 2) & m],
                th[(at + 3) & m],
                th[(at + 4) & m],
                th[(at + 5) & m],
            ]);
            return (true, v);
        }
        i = at + len;
    }
    (false, 0)
}

/// Both caps: the source's own, then this CPU's share of the total. The
/// source's comes first so that one loud source cannot spend the total.
#[inline(always)]
fn admit(src: &IpAddrKey) -> bool {
    let Some(s) = HOLD_SETTINGS.get(0) else {
        return false;
    };
    let now = now_ns();
    match HOLD_RATE.get_ptr_mut(src) {
        Some(tat) => {
            // SAFETY: a value of the LRU hash; a concurrent update from
            // another CPU can only make the rate a little loose, never
            // unsound (plain u64 stores).
            if !gcra_admit(
                unsafe { &mut *tat },
                now,
                s.per_source_rate,
                s.per_source_burst,
            ) {
                return false;
            }
        }
        None => {
            let mut tat = 0u64;
            if !gcra_admit(&mut tat, now, s.per_source_rate, s.per_source_burst) {
                return false;
            }
            // A full LRU recycles; a failure here only forgets the source.
            if HOLD_RATE.insert(src, tat, 0).is_err() {
                return false;
            }
        }
    }
    match HOLD_CPU_RATE.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        Some(tat) => gcra_admit(unsafe { &mut *tat }, now, s.cpu_rate, s.cpu_burst),
        None => false,
    }
}

/// One's-complement sum of big-endian 16-bit words (constant-length
/// slices after inlining: the loop unrolls).
#[inline(always)]
fn sum16(b: &[u8], mut acc: u64) -> u64 {
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u16::from_be_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Turns the packet into the reply: addresses and ports swapped, new IP
/// and TCP headers, checksums, the frame cut to its new length; XDP_TX.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    v4: bool,
    frame_len: usize,
    sc: &mut HoldScratch,
    r: &Reply,
) -> Option<u32> {
    let (eth, iph, th) = (&sc.eth, &sc.iph, &sc.th);
    let out_eth = &mut sc.out_eth;
    out_eth[0..6].copy_from_slice(&eth[6..12]);
    out_eth[6..12].copy_from_slice(&eth[0..6]);
    out_eth[12] = eth[12];
    out_eth[13] = eth[13];

    // TCP header; options beyond `tcp_len` stay zero and so add nothing
    // to the checksum, which can then run over the whole buffer.
    let tcp = &mut sc.tcp;
    *tcp = [0u8; TCP_OUT];
    tcp[0..2].copy_from_slice(&th[2..4]);
    tcp[2..4].copy_from_slice(&th[0..2]);
    tcp[4..8].copy_from_slice(&r.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&r.ack.to_be_bytes());
    let syn = r.flags & TCP_SYN != 0;
    let mut tcp_len = 20usize;
    if syn {
        tcp[20] = TCP_OPT_MSS;
        tcp[21] = 4;
        tcp[22..24].copy_from_slice(&r.mss.to_be_bytes());
        tcp_len = 24;
        if r.ts {
            tcp[24] = TCP_OPT_NOP;
            tcp[25] = TCP_OPT_NOP;
            tcp[26] = TCP_OPT_TS;
            tcp[27] = 10;
            tcp[28..32].copy_from_slice(&r.tsval.to_be_bytes());
            tcp[32..36].copy_from_slice(&r.tsecr.to_be_bytes());
            tcp_len = 36;
        }
    } else if r.ts {
        tcp[20] = TCP_OPT_NOP;
        tcp[21] = TCP_OPT_NOP;
        tcp[22] = TCP_OPT_TS;
        tcp[23] = 10;
        tcp[24..28].copy_from_slice(&r.tsval.to_be_bytes());
        tcp[28..32].copy_from_slice(&r.tsecr.to_be_bytes());
        tcp_len = 32;
    }
    tcp[12] = ((tcp_len / 4) as u8) << 4;
    tcp[13] = r.flags;
    // window (14..16) zero, urgent pointer zero

    let ip = &mut sc.ip;
    *ip = [0u8; IPV6_HLEN];
    let ip_len;
    let mut pseudo;
    if v4 {
        ip_len = IPV4_HLEN;
        let total = (IPV4_HLEN + tcp_len) as u16;
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = TTL;
        ip[9] = parse::IPPROTO_TCP;
        ip[12..16].copy_from_slice(&iph[16..20]);
        ip[16..20].copy_from_slice(&iph[12..16]);
        let c = fold(sum16(&ip[0..IPV4_HLEN], 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        pseudo = sum16(&ip[12..20], 0);
    } else {
        ip_len = IPV6_HLEN;
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        ip[6] = parse::IPPROTO_TCP;
        ip[7] = TTL;
        ip[8..24].copy_from_slice(&iph[24..40]);
        ip[24..40].copy_from_slice(&iph[8..24]);
        pseudo = sum16(&ip[8..40], 0);
    }
    pseudo += parse::IPPROTO_TCP as u64 + tcp_len as u64;
    let c = fold(sum16(&tcp[..], pseudo));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let new_len = ETH_HLEN + ip_len + tcp_len;
    let delta = new_len as i64 - frame_len as i64;
    // SAFETY: the helper checks the new length against the buffer; no
    // packet pointer is held across it (the reply is written with
    // bpf_xdp_store_bytes afterwards).
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return None;
    }
    store(ctx, 0, &mut sc.out_eth, ETH_HLEN as u32)?;
    if v4 {
        store(ctx, ETH_HLEN as u32, &mut sc.ip, IPV4_HLEN as u32)?;
    } else {
        store(ctx, ETH_HLEN as u32, &mut sc.ip, IPV6_HLEN as u32)?;
    }
    let off = (ETH_HLEN + ip_len) as u32;
    // Constant sizes again (see the loads).
    match tcp_len {
        20 => store(ctx, off, &mut sc.tcp, 20)?,
        24 => store(ctx, off, &mut sc.tcp, 24)?,
        32 => store(ctx, off, &mut sc.tcp, 32)?,
        _ => store(ctx, off, &mut sc.tcp, 36)?,
    }
    Some(xdp_action::XDP_TX)
}
