//! Hand-built packets for raw-socket tests: Ethernet, IPv4 (options,
//! fragments, broken lengths), IPv6 (extension headers), TCP (broken data
//! offsets). Checksums are right unless a test breaks something on purpose.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;
pub const FIN: u8 = 0x01;

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment. `doff_words` overrides the data offset (normally 5).
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub doff_words: u8,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Tcp {
        Tcp {
            sport,
            dport,
            seq: 1000,
            ack: if flags & ACK != 0 { 1 } else { 0 },
            flags,
            doff_words: 5,
            payload: payload.to_vec(),
        }
    }

    /// Header (20 bytes; `doff_words` may claim otherwise) + payload,
    /// checksum zero.
    fn bytes(&self) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&self.seq.to_be_bytes());
        t.extend_from_slice(&self.ack.to_be_bytes());
        t.push(self.doff_words << 4);
        t.push(self.flags);
        t.extend_from_slice(&65535u16.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        t.extend_from_slice(&self.payload);
        t
    }

    pub fn v4_bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut t = self.bytes();
        let mut sum = 0u32;
        let mut ph = Vec::new();
        ph.extend_from_slice(&src.octets());
        ph.extend_from_slice(&dst.octets());
        ph.extend_from_slice(&[0, 6]);
        ph.extend_from_slice(&(t.len() as u16).to_be_bytes());
        for c in ph.chunks(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        let c = csum(&t, sum);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }

    pub fn v6_bytes(&self, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let mut t = self.bytes();
        let mut ph = Vec::new();
        ph.extend_from_slice(&src.octets());
        ph.extend_from_slice(&dst.octets());
        ph.extend_from_slice(&(t.len() as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 6]);
        let mut sum = 0u32;
        for c in ph.chunks(2) {
            sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        }
        let c = csum(&t, sum);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    }
}

/// An IPv4 header around `payload`. Overrides break it on purpose.
#[derive(Clone, Debug, Default)]
pub struct V4 {
    pub options: Vec<u8>,
    /// Overrides the IHL field (words).
    pub ihl: Option<u8>,
    /// Overrides the total length field.
    pub total_len: Option<u16>,
    /// Flags + fragment offset field (0x2000 = MF; low 13 bits = offset/8).
    pub frag: u16,
    pub proto: Option<u8>,
}

impl V4 {
    pub fn packet(&self, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let ihl = self.ihl.unwrap_or((hlen / 4) as u8);
        let total = self.total_len.unwrap_or((hlen + payload.len()) as u16);
        let mut h = vec![0x40 | (ihl & 0x0f), 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&0x1234u16.to_be_bytes());
        h.extend_from_slice(&self.frag.to_be_bytes());
        h.push(64);
        h.push(self.proto.unwrap_or(6));
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h.extend_from_slice(&self.options);
        let c = csum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// An IPv6 packet; `ext` is a list of (header type, header bytes without
/// the next-header byte filled in) placed before `upper` (protocol `proto`).
pub fn v6_packet(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ext: &[(u8, Vec<u8>)],
    proto: u8,
    upper: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map(|(t, _)| *t).unwrap_or(proto);
        let mut b = bytes.clone();
        b[0] = next;
        body.extend_from_slice(&b);
    }
    body.extend_from_slice(upper);
    let first = ext.first().map(|(t, _)| *t).unwrap_or(proto);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.push(first);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&body);
    h
}

/// An 8-byte options header (hop-by-hop 0 or destination options 60): PadN.
pub fn ext_options(kind: u8) -> (u8, Vec<u8>) {
    (kind, vec![0, 0, 1, 4, 0, 0, 0, 0])
}

/// A routing header type 0 with no addresses left (8 bytes + 16).
pub fn ext_routing() -> (u8, Vec<u8>) {
    let mut b = vec![0, 2, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&[0u8; 16]);
    (43, b)
}

/// A fragment header: offset in 8-byte units, more-fragments flag.
pub fn ext_fragment(offset_units: u16, more: bool) -> (u8, Vec<u8>) {
    let field = (offset_units << 3) | u16::from(more);
    let mut b = vec![0, 0];
    b.extend_from_slice(&field.to_be_bytes());
    b.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
    (44, b)
}

/// An Ethernet frame.
pub fn ether(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;

/// The Ethernet frame of TCP segment `t` from `src` to `dst` (one family),
/// between the MACs `dst_mac` and `src_mac`: what a forging client writes
/// to its veth.
pub fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    t: &Tcp,
) -> Vec<u8> {
    use std::net::IpAddr;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ether(
            dst_mac,
            src_mac,
            ETH_IPV4,
            &V4::default().packet(s, d, &t.v4_bytes(s, d)),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => ether(
            dst_mac,
            src_mac,
            ETH_IPV6,
            &v6_packet(s, d, &[], 6, &t.v6_bytes(s, d)),
        ),
        _ => panic!("tcp_frame: {src} and {dst} are of two families"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = V4::default().packet(
            Ipv4Addr::new(198, 51, 100, 2),
            Ipv4Addr::new(198, 51, 100, 1),
            &[],
        );
        assert_eq!(csum(&p[..20], 0), 0);
    }
}
