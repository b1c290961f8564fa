//! One 16-byte address form for IPv4 and IPv6.
//!
//! IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so that every
//! map, every code path and every comparison handles both families the same
//! way; there is no second IPv4-only map to keep in step.

/// An IP address as a map key: 16 bytes in network order, IPv4 mapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct IpAddrKey {
    pub octets: [u8; 16],
}

impl IpAddrKey {
    /// The IPv4-mapped form of an IPv4 address given in network byte order
    /// as it sits in a packet.
    #[inline(always)]
    pub const fn from_v4_octets(o: [u8; 4]) -> Self {
        IpAddrKey {
            octets: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
            ],
        }
    }

    #[inline(always)]
    pub const fn from_v6_octets(octets: [u8; 16]) -> Self {
        IpAddrKey { octets }
    }

    /// The address of a socket as BPF socket contexts (sock_ops,
    /// sk_lookup) give it: `family` AF_INET or AF_INET6, the IPv4 address
    /// or the four IPv6 words, each in network order as a native u32.
    #[inline(always)]
    pub fn from_sock_words(family: u32, v4: u32, v6: [u32; 4]) -> Self {
        const AF_INET: u32 = 2;
        if family == AF_INET {
            return IpAddrKey::from_v4_octets(v4.to_ne_bytes());
        }
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = v6[i].to_ne_bytes();
            o[i * 4] = b[0];
            o[i * 4 + 1] = b[1];
            o[i * 4 + 2] = b[2];
            o[i * 4 + 3] = b[3];
            i += 1;
        }
        IpAddrKey::from_v6_octets(o)
    }

    /// True when this is an IPv4-mapped address.
    #[inline(always)]
    pub fn is_v4_mapped(&self) -> bool {
        let o = &self.octets;
        o[0..10] == [0u8; 10] && o[10] == 0xff && o[11] == 0xff
    }
}

#[cfg(feature = "user")]
mod user {
    extern crate std;
    use super::IpAddrKey;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    impl From<IpAddr> for IpAddrKey {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => IpAddrKey::from_v4_octets(v4.octets()),
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddrKey::from_v4_octets(v4.octets()),
                    None => IpAddrKey::from_v6_octets(v6.octets()),
                },
            }
        }
    }

    impl From<IpAddrKey> for IpAddr {
        fn from(k: IpAddrKey) -> Self {
            let v6 = Ipv6Addr::from(k.octets);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    }

    impl From<Ipv4Addr> for IpAddrKey {
        fn from(v4: Ipv4Addr) -> Self {
            IpAddrKey::from_v4_octets(v4.octets())
        }
    }

    // SAFETY: repr(C), 16 bytes of u8, no padding, every bit pattern valid.
    unsafe impl aya::Pod for IpAddrKey {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::IpAddrKey;
    use std::net::IpAddr;

    #[test]
    fn v4_and_mapped_v6_are_one_key() {
        let a: IpAddr = "198.51.100.9".parse().unwrap();
        let b: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(IpAddrKey::from(a), IpAddrKey::from(b));
        assert!(IpAddrKey::from(a).is_v4_mapped());
        assert_eq!(IpAddr::from(IpAddrKey::from(a)), a);
    }

    #[test]
    fn socket_words_in_network_order_make_the_same_key() {
        let v4 = u32::from_ne_bytes([198, 51, 100, 9]);
        let k = IpAddrKey::from_sock_words(2, v4, [0; 4]);
        assert_eq!(IpAddr::from(k), "198.51.100.9".parse::<IpAddr>().unwrap());
        let o: [u8; 16] = "fd5b:1e00::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        let k = IpAddrKey::from_sock_words(10, 0, [w(0), w(4), w(8), w(12)]);
        assert_eq!(IpAddr::from(k), "fd5b:1e00::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn v6_round_trips() {
        let a: IpAddr = "fd5b:1e00::2".parse().unwrap();
        let k = IpAddrKey::from(a);
        assert!(!k.is_v4_mapped());
        assert_eq!(IpAddr::from(k), a);
    }
}
