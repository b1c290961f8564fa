//! Bounds-checked packet parsing, written once for every hook (the kernel
//! programs use it; it lives here so the host can unit-test it).
//!
//! Each accessor proves to the verifier that the bytes it reads lie between
//! `data` and `data_end`. Lengths come from the IP headers and are checked
//! against the real packet length, never taken from the frame size (a
//! short frame is padded to 60 bytes; that padding is not TCP payload).
//! What cannot be parsed safely (truncated or inconsistent headers, IHL
//! below 5, a TCP data offset below 5 or past the end, too many IPv6
//! extension headers) yields `None` and the caller passes the packet
//! untouched: the kernel's own stack drops what is really broken.
use crate::IpAddrKey;

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

/// The network layer of a packet. The addresses are not copied while
/// parsing (most packets need neither, and 32 address bytes held across a
/// program cost more than the rest of the parse): [`Ip::src`] and
/// [`Ip::dst`] read them from the packet when they are needed.
pub struct Ip {
    /// IPv6 (else IPv4).
    pub v6: bool,
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

impl Ip {
    /// The source address (IPv4 mapped), read from the packet. `data` and
    /// `data_end` are the packet's bounds now (re-read after anything that
    /// may move the packet, such as a pull); `None` only when the packet no
    /// longer holds the header that was parsed.
    #[inline(always)]
    pub fn src(&self, data: usize, data_end: usize) -> Option<IpAddrKey> {
        let mut a = core::mem::MaybeUninit::<IpAddrKey>::uninit();
        // SAFETY: `a` is ours to write; it is read only when all of it was.
        unsafe {
            self.src_into(data, data_end, a.as_mut_ptr())
                .then(|| a.assume_init())
        }
    }

    /// The destination address (IPv4 mapped), read as [`Ip::src`] is.
    #[inline(always)]
    pub fn dst(&self, data: usize, data_end: usize) -> Option<IpAddrKey> {
        let mut a = core::mem::MaybeUninit::<IpAddrKey>::uninit();
        // SAFETY: as in `src`.
        unsafe {
            self.dst_into(data, data_end, a.as_mut_ptr())
                .then(|| a.assume_init())
        }
    }

    /// [`Ip::src`] written straight into `out` (a map key being built):
    /// no copy of the address is held across the program, and every one of
    /// the 16 bytes is written, so the key needs no zeroing first. Byte by
    /// byte and volatile: otherwise the compiler turns the writes into
    /// calls of its `memset`/`memcpy` (byte loops in eBPF, dearer than the
    /// 16 stores) or merges the two families' bytes in ways older verifiers
    /// refuse. False (and `out` untouched) as `None`.
    ///
    /// # Safety
    /// `out` must be valid for writes of an `IpAddrKey`.
    #[inline(always)]
    pub unsafe fn src_into(&self, data: usize, data_end: usize, out: *mut IpAddrKey) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { self.addr_into(data, data_end, ETH_HLEN + 12, ETH_HLEN + 8, out) }
    }

    /// [`Ip::dst`] written straight into `out`, as [`Ip::src_into`].
    ///
    /// # Safety
    /// `out` must be valid for writes of an `IpAddrKey`.
    #[inline(always)]
    pub unsafe fn dst_into(&self, data: usize, data_end: usize, out: *mut IpAddrKey) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { self.addr_into(data, data_end, ETH_HLEN + 16, ETH_HLEN + 24, out) }
    }

    /// # Safety
    /// `out` must be valid for writes of an `IpAddrKey`.
    #[inline(always)]
    unsafe fn addr_into(
        &self,
        data: usize,
        data_end: usize,
        v4_off: usize,
        v6_off: usize,
        out: *mut IpAddrKey,
    ) -> bool {
        let o = out as *mut u8;
        // SAFETY (every `put`): `i` < 16 and `out` is valid for writes of
        // the 16 bytes of an `IpAddrKey` (the caller's promise).
        let put = |i: usize, b: u8| unsafe { core::ptr::write_volatile(o.add(i), b) };
        if self.v6 {
            let Some(p) = ptr_at::<[u8; 16]>(data, data_end, v6_off) else {
                return false;
            };
            let p = p as *const u8;
            for i in 0..16 {
                // SAFETY: `ptr_at` checked that the 16 bytes are in the packet.
                put(i, unsafe { *p.add(i) });
            }
        } else {
            let Some(p) = ptr_at::<[u8; 4]>(data, data_end, v4_off) else {
                return false;
            };
            let p = p as *const u8;
            for i in 0..10 {
                put(i, 0);
            }
            put(10, 0xff);
            put(11, 0xff);
            for i in 0..4 {
                // SAFETY: `ptr_at` checked that the 4 bytes are in the packet.
                put(12 + i, unsafe { *p.add(i) });
            }
        }
        true
    }
}

/// A TCP segment's header fields and payload extent.
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Sequence number (host order).
    pub seq: u32,
    /// Acknowledgment number (host order; meaningful with `TCP_ACK`).
    pub ack: u32,
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
    // SAFETY: `ptr_at` checked that all N bytes lie before `data_end`
    // (the packet's end, or the end of a host buffer in the tests); a
    // byte array has no alignment to violate.
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
        v6: false,
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
        v6: true,
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
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        payload_off: ip.l4_off + doff,
        payload_len: ip.l4_len - doff,
    })
}

/// Builds frames for the unit tests below.
#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = std::vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(l3);
        f
    }

    fn tcp_hdr(sport: u16, dport: u16, flags: u8, doff_words: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0; 8]);
        t.push(doff_words << 4);
        t.push(flags);
        t.extend_from_slice(&[0; 6]);
        t.extend_from_slice(payload);
        t
    }

    fn v4(ihl: u8, frag: u16, total: Option<u16>, options: &[u8], l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let total = total.unwrap_or((hlen + l4.len()) as u16);
        let mut h = std::vec![0x40 | ihl, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, 6, 0, 0, 198, 51, 100, 2, 198, 51, 100, 1]);
        h.extend_from_slice(options);
        h.extend_from_slice(l4);
        eth(ETH_P_IP, &h)
    }

    fn v6(first: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
        let mut h = std::vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        h.push(first);
        h.push(64);
        h.extend_from_slice(&[0xfd, 0x5b, 0x1e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        h.extend_from_slice(&[0xfd, 0x5b, 0x1e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h.extend_from_slice(ext);
        h.extend_from_slice(l4);
        eth(ETH_P_IPV6, &h)
    }

    fn parse(f: &[u8]) -> Option<(Ip, Option<Tcp>)> {
        let (d, e) = (f.as_ptr() as usize, f.as_ptr() as usize + f.len());
        let ip = ip(d, e, f.len())?;
        let t = tcp(d, e, &ip);
        Some((ip, t))
    }

    #[test]
    fn plain_ipv4_tcp_with_payload() {
        let f = v4(
            5,
            0,
            None,
            &[],
            &tcp_hdr(40000, 25, TCP_ACK, 5, b"EHLO x\r\n"),
        );
        let (ip, t) = parse(&f).unwrap();
        let t = t.unwrap();
        let (d, e) = (f.as_ptr() as usize, f.as_ptr() as usize + f.len());
        assert_eq!(
            ip.src(d, e),
            Some(IpAddrKey::from_v4_octets([198, 51, 100, 2]))
        );
        assert_eq!(
            ip.dst(d, e),
            Some(IpAddrKey::from_v4_octets([198, 51, 100, 1]))
        );
        assert_eq!((t.sport, t.dport, t.flags), (40000, 25, TCP_ACK));
        assert_eq!(t.payload_len, 8);
        assert_eq!(t.payload_off, ETH_HLEN + 20 + 20);
        assert!(!ip.fragment);
    }

    #[test]
    fn sequence_and_acknowledgment_numbers_are_read() {
        let mut seg = tcp_hdr(40000, 25, TCP_ACK, 5, b"x");
        seg[4..8].copy_from_slice(&0xfedc_ba98u32.to_be_bytes());
        seg[8..12].copy_from_slice(&7u32.to_be_bytes());
        let f = v4(5, 0, None, &[], &seg);
        let t = parse(&f).unwrap().1.unwrap();
        assert_eq!((t.seq, t.ack), (0xfedc_ba98, 7));
    }

    #[test]
    fn ipv4_options_and_frame_padding_are_not_payload() {
        let mut f = v4(6, 0, None, &[1, 1, 1, 1], &tcp_hdr(1, 25, TCP_SYN, 5, b""));
        f.extend_from_slice(&[0u8; 6]); // Ethernet padding to 60 bytes
        let (_, t) = parse(&f).unwrap();
        let t = t.unwrap();
        assert_eq!(t.payload_len, 0);
        assert_eq!(t.payload_off, ETH_HLEN + 24 + 20);
    }

    #[test]
    fn broken_ipv4_is_not_parsed() {
        let seg = tcp_hdr(1, 25, TCP_ACK, 5, b"talk");
        // IHL < 5
        assert!(parse(&v4(4, 0, None, &[], &seg)).is_none());
        // total length past the frame
        assert!(parse(&v4(5, 0, Some(400), &[], &seg)).is_none());
        // truncated header
        let f = v4(5, 0, None, &[], &seg);
        assert!(parse(&f[..ETH_HLEN + 10]).is_none());
        // not IP at all
        assert!(parse(&eth(0x0806, &[0u8; 28])).is_none());
        assert!(!is_ip(
            f[..12].as_ptr() as usize,
            f[..12].as_ptr() as usize + 12
        ));
    }

    #[test]
    fn broken_tcp_is_not_parsed() {
        for doff in [0u8, 4, 15] {
            let f = v4(5, 0, None, &[], &tcp_hdr(1, 25, TCP_ACK, doff, b"talk"));
            let (_, t) = parse(&f).unwrap();
            assert!(t.is_none(), "data offset {doff} accepted");
        }
        // TCP header cut short (IP length says so too).
        let seg = tcp_hdr(1, 25, TCP_ACK, 5, b"");
        let f = v4(5, 0, None, &[], &seg[..12]);
        assert!(parse(&f).unwrap().1.is_none());
    }

    #[test]
    fn ipv4_fragments() {
        let seg = tcp_hdr(1, 25, TCP_ACK, 5, b"talk");
        let (ip, t) = parse(&v4(5, 0x2000, None, &[], &seg)).unwrap();
        assert!(ip.fragment && !ip.later_fragment);
        assert!(t.is_some(), "a first fragment has a TCP header");
        let (ip, t) = parse(&v4(5, 8, None, &[], &seg)).unwrap();
        assert!(ip.fragment && ip.later_fragment);
        assert!(t.is_none(), "a later fragment has no TCP header");
    }

    #[test]
    fn ipv6_extension_headers_are_followed() {
        let seg = tcp_hdr(2, 587, TCP_SYN, 5, b"");
        let mut ext = Vec::new();
        ext.extend_from_slice(&[43, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop -> routing
        ext.extend_from_slice(&[60, 2, 0, 0, 0, 0, 0, 0]); // routing (24 bytes) -> dst opts
        ext.extend_from_slice(&[0u8; 16]);
        ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // dst opts -> TCP
        let (ip, t) = parse(&v6(0, &ext, &seg)).unwrap();
        let t = t.unwrap();
        assert_eq!(ip.proto, IPPROTO_TCP);
        assert_eq!(t.dport, 587);
        assert_eq!(t.payload_len, 0);
        assert_eq!(ip.l4_off, ETH_HLEN + 40 + 40);
    }

    #[test]
    fn ipv6_fragments_and_too_many_headers() {
        let seg = tcp_hdr(2, 25, TCP_ACK, 5, b"talk");
        let first = [6u8, 0, 0, 1, 0, 0, 0, 1]; // offset 0, M=1
        let (ip, t) = parse(&v6(44, &first, &seg)).unwrap();
        assert!(ip.fragment && !ip.later_fragment && t.is_some());
        let later = [6u8, 0, 0, 0x18, 0, 0, 0, 1]; // offset 3
        let (ip, t) = parse(&v6(44, &later, &seg)).unwrap();
        assert!(ip.later_fragment && t.is_none());
        let mut many = Vec::new();
        for _ in 0..7 {
            many.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
        }
        assert!(parse(&v6(60, &many, &seg)).is_none());
        // An extension header longer than the payload length says.
        assert!(parse(&v6(0, &[6, 9, 0, 0, 0, 0, 0, 0], &seg)).is_none());
    }
}
