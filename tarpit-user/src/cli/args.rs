//! Parsers for the values people type: addresses, networks, durations.
//! Each error says what was wrong and what would be right; clap prints it
//! with the argument's name and exits with status 2.
use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};

use super::kernel_glue::canonical;

/// The longest TTL accepted: beyond it "never expires" (no `--ttl`) is meant.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// An address or a network in CIDR form, IPv4 or IPv6. A bare address is a
/// host (/32, /128); IPv4-mapped IPv6 becomes IPv4; host bits set are
/// refused with the network that was probably meant.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = if s.contains('/') {
        s.parse::<IpNet>().map_err(|_| {
            format!("{s:?} is not an address or a network in CIDR form (e.g. 198.51.100.0/24, 2001:db8::/48)")
        })?
    } else {
        let ip: IpAddr = s.parse().map_err(|_| {
            format!("{s:?} is not an IP address or a network in CIDR form (e.g. 198.51.100.7, 198.51.100.0/24)")
        })?;
        IpNet::from(ip)
    };
    if net.trunc() != net {
        return Err(format!(
            "{net} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    // ::ffff:a.b.c.d/104 and friends are IPv4 networks in disguise.
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        return Ipv4Net::new(v4, v6.prefix_len() - 96)
            .map(IpNet::V4)
            .map_err(|e| e.to_string());
    }
    Ok(net)
}

/// One IP address, IPv4 or IPv6 (IPv4-mapped IPv6 becomes IPv4).
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .map(canonical)
        .map_err(|_| format!("{s:?} is not an IP address (e.g. 198.51.100.7 or 2001:db8::25)"))
}

/// A time to live: `90s`, `30m`, `12h`, `7d`, `1h 30m`. Zero is refused
/// (use `del`), and so is anything over ten years (omit `--ttl` instead).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. 90s, 30m, 12h, 7d, \"1h 30m\"")
    })?;
    if d.is_zero() {
        return Err("a TTL of zero would expire at once; use `del` to remove an entry".into());
    }
    if d > MAX_TTL {
        return Err(
            "TTLs are limited to 10 years; omit --ttl for an entry that never expires".into(),
        );
    }
    Ok(d)
}

/// A refresh interval: at least 100 ms.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 1s, 500ms"))?;
    if d < Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_hosts() {
        assert_eq!(
            parse_net("198.51.100.0/24").unwrap().to_string(),
            "198.51.100.0/24"
        );
        assert_eq!(
            parse_net("198.51.100.7").unwrap().to_string(),
            "198.51.100.7/32"
        );
        assert_eq!(
            parse_net("fd5b:1e00::/64").unwrap().to_string(),
            "fd5b:1e00::/64"
        );
        assert_eq!(
            parse_net("fd5b:1e00::2").unwrap().to_string(),
            "fd5b:1e00::2/128"
        );
        assert_eq!(
            parse_net("::ffff:198.51.100.0/120").unwrap().to_string(),
            "198.51.100.0/24"
        );
        assert_eq!(parse_net(" 0.0.0.0/0 ").unwrap().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn bad_networks_say_why() {
        let e = parse_net("198.51.100.7/24").unwrap_err();
        assert!(
            e.contains("host bits") && e.contains("198.51.100.0/24"),
            "{e}"
        );
        assert!(parse_net("198.51.100.0/33").unwrap_err().contains("CIDR"));
        assert!(
            parse_net("300.1.2.3")
                .unwrap_err()
                .contains("not an IP address")
        );
        assert!(parse_net("mail.example.com").is_err());
        assert!(parse_net("").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_ip("::ffff:198.51.100.9").unwrap().to_string(),
            "198.51.100.9"
        );
        assert!(parse_ip("198.51.100.0/24").is_err());
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse_ttl("0s").unwrap_err().contains("zero"));
        assert!(parse_ttl("soon").unwrap_err().contains("not a duration"));
        assert!(parse_ttl("-5m").is_err());
        assert!(parse_ttl("11years").unwrap_err().contains("10 years"));
        assert!(parse_interval("10ms").is_err());
        assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
    }
}
