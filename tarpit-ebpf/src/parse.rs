//! Bounds-checked packet parsing, written once for every hook.
//!
//! Each accessor proves to the verifier that the bytes it reads lie between
//! `data` and `data_end`. Only what tarpit needs is parsed: Ethernet, IPv4
//! (with options), IPv6 (skipping a bounded number of extension headers)
//! and the TCP header.
use tarpit_common::IpAddrKey;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;

/// The TCP flags tarpit looks at.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What a parsed TCP segment tells us.
pub struct TcpSegment {
    pub src: IpAddrKey,
    pub dst: IpAddrKey,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

/// Reads a `T` at `offset` if it lies wholly inside the packet.
#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    let start = data + offset;
    if start + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

#[inline(always)]
fn u8_at(data: usize, data_end: usize, offset: usize) -> Option<u8> {
    ptr_at::<u8>(data, data_end, offset).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16_at(data: usize, data_end: usize, offset: usize) -> Option<u16> {
    ptr_at::<[u8; 2]>(data, data_end, offset).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// Parses an Ethernet frame carrying TCP over IPv4 or IPv6. Returns `None`
/// for anything else, and for every header that is truncated or malformed,
/// so callers pass what they do not understand.
#[inline(always)]
pub fn tcp_from_ethernet(data: usize, data_end: usize) -> Option<TcpSegment> {
    let proto = be16_at(data, data_end, 12)?;
    let (src, dst, l4) = match proto {
        ETH_P_IP => {
            let vihl = u8_at(data, data_end, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            if u8_at(data, data_end, ETH_HLEN + 9)? != IPPROTO_TCP {
                return None;
            }
            // Non-first fragments carry no TCP header.
            let frag = be16_at(data, data_end, ETH_HLEN + 6)?;
            if frag & 0x1fff != 0 {
                return None;
            }
            let s = ptr_at::<[u8; 4]>(data, data_end, ETH_HLEN + 12)?;
            let d = ptr_at::<[u8; 4]>(data, data_end, ETH_HLEN + 16)?;
            let (s, d) = unsafe { (*s, *d) };
            (
                IpAddrKey::from_v4_octets(s),
                IpAddrKey::from_v4_octets(d),
                ETH_HLEN + ihl,
            )
        }
        ETH_P_IPV6 => {
            if u8_at(data, data_end, ETH_HLEN)? >> 4 != 6 {
                return None;
            }
            if u8_at(data, data_end, ETH_HLEN + 6)? != IPPROTO_TCP {
                return None;
            }
            let s = ptr_at::<[u8; 16]>(data, data_end, ETH_HLEN + 8)?;
            let d = ptr_at::<[u8; 16]>(data, data_end, ETH_HLEN + 24)?;
            let (s, d) = unsafe { (*s, *d) };
            (
                IpAddrKey::from_v6_octets(s),
                IpAddrKey::from_v6_octets(d),
                ETH_HLEN + 40,
            )
        }
        _ => return None,
    };
    // One bounds check for the fixed TCP header, then plain reads from it.
    let tcp = unsafe { *ptr_at::<[u8; 20]>(data, data_end, l4)? };
    let doff = ((tcp[12] >> 4) as usize) * 4;
    if doff < 20 {
        return None;
    }
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let flags = tcp[13];
    Some(TcpSegment {
        src,
        dst,
        sport,
        dport,
        flags,
    })
}
