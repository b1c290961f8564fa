//! What is greylisted ([`GreyKey`]: a triplet of client network, sender
//! and recipient, or a client address) and how it becomes a fixed-size id
//! under the site key. Apart from the table and the store because it is
//! the one place that decides which attempts count as "the same": the
//! normalisation of addresses and the widening of clients to networks.
use std::net::IpAddr;

use ipnet::IpNet;

use super::site_key::SiteKey;
use super::table::{Id, NetId};

/// What is greylisted, as the session sees it; only its keyed hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GreyKey {
    Triplet {
        net: IpNet,
        sender: String,
        rcpt: String,
    },
    Client(IpAddr),
}

/// Lower case, without the angle brackets; the null sender is empty.
fn normalize_address(a: &str) -> String {
    let a = a.trim();
    let a = a
        .strip_prefix('<')
        .and_then(|x| x.strip_suffix('>'))
        .unwrap_or(a);
    a.to_lowercase()
}

/// `ip` widened to its /`v4_prefix` or /`v6_prefix` network.
fn network(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpNet {
    let ip = ip.to_canonical();
    let prefix = if ip.is_ipv4() { v4_prefix } else { v6_prefix };
    IpNet::new(ip, prefix)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// A network as bytes: family, address, prefix length.
fn net_bytes(net: &IpNet) -> Vec<u8> {
    let mut b = Vec::with_capacity(18);
    match net.addr() {
        IpAddr::V4(a) => {
            b.push(4);
            b.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            b.push(6);
            b.extend_from_slice(&a.octets());
        }
    }
    b.push(net.prefix_len());
    b
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => [&[4u8][..], &a.octets()].concat(),
        IpAddr::V6(a) => [&[6u8][..], &a.octets()].concat(),
    }
}

impl GreyKey {
    /// The triplet of a delivery attempt; the client address is widened to
    /// its /`v4_prefix` or /`v6_prefix` network.
    pub fn triplet(client: IpAddr, sender: &str, rcpt: &str, v4_prefix: u8, v6_prefix: u8) -> Self {
        GreyKey::Triplet {
            net: network(client, v4_prefix, v6_prefix),
            sender: normalize_address(sender),
            rcpt: normalize_address(rcpt),
        }
    }

    pub fn client(ip: IpAddr) -> Self {
        GreyKey::Client(ip.to_canonical())
    }

    /// The key's id under the site key, and its client network's (the
    /// triplet's own network; a client address widened by the prefixes).
    pub(super) fn hashed(&self, key: &SiteKey, v4_prefix: u8, v6_prefix: u8) -> (Id, NetId) {
        let (id, net) = match self {
            GreyKey::Triplet { net, sender, rcpt } => (
                key.hash128(b't', &[&net_bytes(net), sender.as_bytes(), rcpt.as_bytes()]),
                *net,
            ),
            GreyKey::Client(ip) => (
                key.hash128(b'c', &[&ip_bytes(ip)]),
                network(*ip, v4_prefix, v6_prefix),
            ),
        };
        (id, key.hash64(b'n', &[&net_bytes(&net)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, from: &str, to: &str) -> GreyKey {
        GreyKey::triplet(ip.parse().unwrap(), from, to, 24, 64)
    }

    #[test]
    fn triplet_uses_the_client_network_and_normalized_addresses() {
        let a = key("198.51.100.9", "<A@X.example>", "b@tarpit.test");
        let b = key("198.51.100.200", "a@x.example", "<B@TARPIT.test>");
        assert_eq!(a, b);
        let c = key("198.51.101.9", "a@x.example", "b@tarpit.test");
        assert_ne!(a, c);
        let v6a = key("fd5b:1e00::2", "<>", "b@tarpit.test");
        let v6b = key("fd5b:1e00::ffff:1", "", "b@tarpit.test");
        assert_eq!(v6a, v6b);
        let mapped = key("::ffff:198.51.100.1", "a@x.example", "b@tarpit.test");
        assert_eq!(mapped, a);
        assert_ne!(a, key("198.51.100.9", "a@x.example", "c@tarpit.test"));
    }

    #[test]
    fn hashes_are_fixed_size_keyed_and_unambiguous() {
        let k1 = SiteKey::from_bytes([1; 16]);
        let k2 = SiteKey::from_bytes([2; 16]);
        let a = key("198.51.100.9", "a@x", "b@y");
        assert_eq!(a.hashed(&k1, 24, 64), a.hashed(&k1, 24, 64));
        assert_ne!(a.hashed(&k1, 24, 64).0, a.hashed(&k2, 24, 64).0);
        // The boundary between sender and recipient is part of the hash.
        let b = key("198.51.100.9", "a@xb", "@y");
        assert_ne!(a.hashed(&k1, 24, 64).0, b.hashed(&k1, 24, 64).0);
        // Same network, same network id; a client's network follows the
        // prefixes.
        let (_, n1) = a.hashed(&k1, 24, 64);
        let (_, n2) = GreyKey::client("198.51.100.77".parse().unwrap()).hashed(&k1, 24, 64);
        assert_eq!(n1, n2);
        let (_, n3) = GreyKey::client("198.51.100.77".parse().unwrap()).hashed(&k1, 32, 64);
        assert_ne!(n1, n3);
    }
}
