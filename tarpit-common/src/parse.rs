//! Bounds-checked packet parsing, written once for every hook.
//!
//! Each accessor proves to the verifier that the bytes it reads lie between
//! `data` and `data_end`. Lengths come from the IP headers and are checked
//! against the real packet length, never taken from the frame size (a
//! short frame is padded to 60 bytes; that padding is not TCP payload).
//! What cannot be parsed safely - truncated or inconsistent headers, IHL <
//! 5, TCP data offset < 5 or past the end, too many IPv6 extension headers
//! - yields `None` and the caller passes the packet untouched: the kernel's
//! own stack drops what is really broken.
use tarpit_common::IpAddrKey;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;

/// The TCP flags tarpit looks at.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers we step over (more than this: not parsed).
const MAX_EXT_HEADERS: usize = 6;
/// Offsets past this are not followed (keeps the verifier's ranges small).
const MAX_L4_OFFSET: usize = 512;

/// The network layer of a packet.
pub struct Ip {
    pub src: IpAddrKey,
    pub dst: IpAddrKey,
    /// The upper-layer protocol after any IPv6 extension headers.
    pub proto: u8,
    /// Offset of the upper-layer header from the start of the frame.
    pub l4_off: usize,
    /// Bytes of upper-layer header + payload, from the IP length fields.
    pub l4_len: usize,
    /// A fragment other than the first: it carries no upper-layer header.
    pub later_fragment: bool,
    /// Any fragment (first or later): its payload is not what the socket
    /// will see (reassembly happens after us, or never).
    pub fragment: bool,
}

/// A TCP segment's header fields and payload extent.
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Offset of the payload from the start of the frame.
    pub payload_off: usize,
    pub payload_len: usize,
}

#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    let start = data + offset;
    if start + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

#[inline(always)]
fn bytes_at<const N: usize>(data: usize, data_end: usize, offset: usize) -> Option<[u8; N]> {
    ptr_at::<[u8; N]>(data, data_end, offset).map(|p| unsafe { *p })
}

/// Parses the IP header of an Ethernet frame. `frame_len` is the length of
/// the whole frame (skb->len, or data_end - data for XDP): IP lengths that
/// claim more than that are malformed.
#[inline(always)]
pub fn ip(data: usize, data_end: usize, frame_len: usize) -> Option<Ip> {
    let eth = bytes_at::<14>(data, data_end, 0)?;
    match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => ipv4(data, data_end, frame_len),
        ETH_P_IPV6 => ipv6(data, data_end, frame_len),
        _ => None,
    }
}

/// True when the frame says it carries IPv4 or IPv6 (whether or not the
/// header that follows makes sense).
#[inline(always)]
pub fn is_ip(data: usize, data_end: usize) -> bool {
    match bytes_at::<2>(data, data_end, 12) {
        Some(t) => matches!(u16::from_be_bytes(t), ETH_P_IP | ETH_P_IPV6),
        None => false,
    }
}

#[inline(always)]
fn ipv4(data: usize, data_end: usize, frame_len: usize) -> Option<Ip> {
    let h = bytes_at::<20>(data, data_end, ETH_HLEN)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total < ihl || ETH_HLEN + total > frame_len {
        return None;
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    Some(Ip {
        src: IpAddrKey::from_v4_octets([h[12], h[13], h[14], h[15]]),
        dst: IpAddrKey::from_v4_octets([h[16], h[17], h[18], h[19]]),
        proto: h[9],
        l4_off: ETH_HLEN + ihl,
        l4_len: total - ihl,
        later_fragment: frag & 0x1fff != 0,
        // MF set or an offset: part of a fragmented datagram
        fragment: frag & 0x3fff != 0,
    })
}

#[inline(always)]
fn ipv6(data: usize, data_end: usize, frame_len: usize) -> Option<Ip> {
    let h = bytes_at::<40>(data, data_end, ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut l4_len = u16::from_be_bytes([h[4], h[5]]) as usize;
    if ETH_HLEN + 40 + l4_len > frame_len {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = ETH_HLEN + 40;
    let mut later_fragment = false;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match next {
            // hop-by-hop, routing, destination options: (len + 1) * 8
            0 | 43 | 60 => {
                let e = bytes_at::<2>(data, data_end, off)?;
                next = e[0];
                (e[1] as usize + 1) * 8
            }
            // authentication header: (len + 2) * 4
            51 => {
                let e = bytes_at::<2>(data, data_end, off)?;
                next = e[0];
                (e[1] as usize + 2) * 4
            }
            // fragment header: 8 bytes; offset != 0 means no TCP header here
            44 => {
                let e = bytes_at::<4>(data, data_end, off)?;
                next = e[0];
                fragment = true;
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    later_fragment = true;
                }
                8
            }
            _ => break,
        };
        if len > l4_len {
            return None;
        }
        l4_len -= len;
        off += len;
        if off > MAX_L4_OFFSET {
            return None;
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) {
        // More extension headers than we follow: not parsed, not guessed.
        return None;
    }
    Some(Ip {
        src: IpAddrKey::from_v6_octets(src),
        dst: IpAddrKey::from_v6_octets(dst),
        proto: next,
        l4_off: off,
        l4_len,
        later_fragment,
        fragment,
    })
}

/// The TCP header of a packet whose network layer is parsed. `None` for
/// other protocols, later fragments and malformed headers.
#[inline(always)]
pub fn tcp(data: usize, data_end: usize, ip: &Ip) -> Option<Tcp> {
    if ip.proto != IPPROTO_TCP || ip.later_fragment || ip.l4_off > MAX_L4_OFFSET {
        return None;
    }
    let t = bytes_at::<20>(data, data_end, ip.l4_off)?;
    let doff = ((t[12] >> 4) as usize) * 4;
    if doff < 20 || doff > ip.l4_len {
        return None;
    }
    Some(Tcp {
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        flags: t[13],
        payload_off: ip.l4_off + doff,
        payload_len: ip.l4_len - doff,
    })
}
