//! CIDR prefixes as LPM trie keys. IPv4 prefixes are stored IPv4-mapped
//! (`a.b.c.0/24` is `::ffff:a.b.c.0/120`), like every address in the maps.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tarpit_common::{IpAddrKey, lists::V4_MAPPED_PREFIX};

/// The trie key of a prefix (host bits cleared, so add and delete agree).
pub fn key_of(net: &IpNet) -> Key<[u8; 16]> {
    match net.trunc() {
        IpNet::V4(v4) => Key::new(
            V4_MAPPED_PREFIX + u32::from(v4.prefix_len()),
            IpAddrKey::from(v4.network()).octets,
        ),
        IpNet::V6(v6) => match v6.network().to_ipv4_mapped() {
            // ::ffff:a.b.c.d/n (n >= 96) is an IPv4 prefix: one form only.
            Some(v4) if v6.prefix_len() >= 96 => {
                Key::new(u32::from(v6.prefix_len()), IpAddrKey::from(v4).octets)
            }
            _ => Key::new(u32::from(v6.prefix_len()), v6.network().octets()),
        },
    }
}

/// The prefix a trie key stands for.
pub fn net_of(key: &Key<[u8; 16]>) -> IpNet {
    let len = key.prefix_len().min(128);
    let data = key.data();
    let k = IpAddrKey::from_v6_octets(data);
    if len >= V4_MAPPED_PREFIX && k.is_v4_mapped() {
        let v4 = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
        IpNet::V4(Ipv4Net::new(v4, (len - V4_MAPPED_PREFIX) as u8).expect("<= 32"))
    } else {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(data), len as u8).expect("<= 128"))
    }
}

/// Whether `net` contains `ip`, treating IPv4 and IPv4-mapped IPv6 alike.
pub fn contains(net: &IpNet, ip: IpAddr) -> bool {
    let ip = IpAddr::from(IpAddrKey::from(ip));
    net.contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_prefix_is_mapped_and_truncated() {
        let net: IpNet = "198.51.100.77/24".parse().unwrap();
        let k = key_of(&net);
        assert_eq!(k.prefix_len(), 120);
        assert_eq!(&k.data()[10..], &[0xff, 0xff, 198, 51, 100, 0]);
        assert_eq!(net_of(&k), "198.51.100.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn v6_prefix_round_trips() {
        let net: IpNet = "fd5b:1e00::/64".parse().unwrap();
        let k = key_of(&net);
        assert_eq!(k.prefix_len(), 64);
        assert_eq!(net_of(&k), net);
    }

    #[test]
    fn mapped_v6_prefix_is_the_v4_prefix() {
        let a: IpNet = "::ffff:198.51.100.0/120".parse().unwrap();
        let b: IpNet = "198.51.100.0/24".parse().unwrap();
        let (ka, kb) = (key_of(&a), key_of(&b));
        assert_eq!(ka.prefix_len(), kb.prefix_len());
        assert_eq!(ka.data(), kb.data());
    }

    #[test]
    fn mapped_address_is_in_v4_prefix() {
        assert!(contains(
            &"198.51.100.0/24".parse().unwrap(),
            "::ffff:198.51.100.2".parse().unwrap()
        ));
    }
}
