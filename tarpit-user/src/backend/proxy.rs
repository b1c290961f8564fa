//! The client's real address for the MTA: PROXY protocol headers and the
//! XCLIENT command line.
use std::net::{IpAddr, SocketAddr};

use ppp::v2::{Builder, Command, Protocol, Version};

/// Both ends as the MTA should see them; an IPv4 client on a dual-stack
/// socket (`::ffff:a.b.c.d`) is IPv4.
pub fn canonical(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let c = SocketAddr::new(client.ip().to_canonical(), client.port());
    let mut l = SocketAddr::new(local.ip().to_canonical(), local.port());
    // A family mismatch cannot be expressed in a PROXY header; the client's
    // family wins and the destination becomes that family's unspecified
    // address (only reachable with odd socket setups).
    if c.is_ipv4() != l.is_ipv4() {
        let ip: IpAddr = if c.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        l = SocketAddr::new(ip, l.port());
    }
    (c, l)
}

/// A PROXY protocol v2 header (binary, `PROXY` command, TCP).
pub fn v2_header(client: SocketAddr, local: SocketAddr) -> std::io::Result<Vec<u8>> {
    let (c, l) = canonical(client, local);
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (c, l)).build()
}

/// A PROXY protocol v2 header with the `LOCAL` command: the connection is
/// the agent's own (a health check, the probe), not a relayed client's.
pub fn v2_local_header() -> std::io::Result<Vec<u8>> {
    Builder::with_addresses(
        Version::Two | Command::Local,
        Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
}

/// PROXY v1's word for "not a relayed client" (the agent's own connection).
pub const V1_UNKNOWN: &[u8] = b"PROXY UNKNOWN\r\n";

/// A PROXY protocol v1 header (`PROXY TCP4 src dst sport dport\r\n`).
pub fn v1_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = canonical(client, local);
    ppp::v1::Addresses::from((c, l)).to_string().into_bytes()
}

/// The XCLIENT command for `client`, with the attributes the MTA
/// announced (`XCLIENT NAME ADDR PORT ...` in its EHLO reply). The client
/// name is `[UNAVAILABLE]`: the agent does no reverse lookup, and the MTA
/// must not believe a name it did not check.
pub fn xclient_line(client: SocketAddr, local: SocketAddr, offered: &[String]) -> String {
    let (c, l) = canonical(client, local);
    let has = |a: &str| offered.iter().any(|o| o.eq_ignore_ascii_case(a));
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    };
    let mut line = String::from("XCLIENT");
    if has("ADDR") {
        line.push_str(&format!(" ADDR={}", addr(c.ip())));
    }
    if has("PORT") {
        line.push_str(&format!(" PORT={}", c.port()));
    }
    if has("NAME") {
        line.push_str(" NAME=[UNAVAILABLE]");
    }
    if has("DESTADDR") {
        line.push_str(&format!(" DESTADDR={}", addr(l.ip())));
    }
    if has("DESTPORT") {
        line.push_str(&format!(" DESTPORT={}", l.port()));
    }
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_headers() {
        assert_eq!(
            v1_header(sa("198.51.100.2:40000"), sa("198.51.100.1:25")),
            b"PROXY TCP4 198.51.100.2 198.51.100.1 40000 25\r\n"
        );
        assert_eq!(
            v1_header(
                sa("[::ffff:198.51.100.2]:40000"),
                sa("[::ffff:198.51.100.1]:25")
            ),
            b"PROXY TCP4 198.51.100.2 198.51.100.1 40000 25\r\n"
        );
        assert_eq!(
            v1_header(sa("[fd5b:1e00::2]:40000"), sa("[fd5b:1e00::1]:25")),
            b"PROXY TCP6 fd5b:1e00::2 fd5b:1e00::1 40000 25\r\n"
        );
    }

    #[test]
    fn v2_header_round_trips() {
        let h = v2_header(sa("[fd5b:1e00::2]:40000"), sa("[fd5b:1e00::1]:25")).unwrap();
        let parsed = ppp::v2::Header::try_from(&h[..]).unwrap();
        match parsed.addresses {
            ppp::v2::Addresses::IPv6(a) => {
                assert_eq!(
                    a.source_address,
                    "fd5b:1e00::2".parse::<std::net::Ipv6Addr>().unwrap()
                );
                assert_eq!(a.source_port, 40000);
                assert_eq!(a.destination_port, 25);
            }
            other => panic!("{other:?}"),
        }
        let h = v2_header(sa("[::ffff:198.51.100.2]:1"), sa("[::]:25")).unwrap();
        let parsed = ppp::v2::Header::try_from(&h[..]).unwrap();
        assert!(matches!(parsed.addresses, ppp::v2::Addresses::IPv4(_)));
    }

    #[test]
    fn xclient_uses_only_offered_attributes() {
        let offered: Vec<String> = ["NAME", "ADDR", "PORT", "PROTO", "HELO"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            xclient_line(sa("198.51.100.2:4000"), sa("198.51.100.1:25"), &offered),
            "XCLIENT ADDR=198.51.100.2 PORT=4000 NAME=[UNAVAILABLE]\r\n"
        );
        assert_eq!(
            xclient_line(
                sa("[fd5b:1e00::2]:4000"),
                sa("[fd5b:1e00::1]:25"),
                &["ADDR".to_string()]
            ),
            "XCLIENT ADDR=IPV6:fd5b:1e00::2\r\n"
        );
    }
}
