//! Two network namespaces joined by a veth pair: the server side (agent,
//! MTA, kernel programs) and the client side (bots and good senders). The
//! namespaces themselves are `testkit`'s (the bench uses the same); the
//! names are the tests' own: `tps-<id>`/`tpc-<id>`, which the suite's leak
//! check (xtask/src/leaks.rs) looks for.
use std::net::IpAddr;
use std::ops::Deref;

use anyhow::{Result, bail};
use testkit::netns::{NetPair, ip};

use crate::env::unique_id;

pub use testkit::netns::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6};

/// The server's address in the family of `client`.
pub fn server_for(client: IpAddr) -> IpAddr {
    if client.is_ipv4() {
        SERVER_V4.into()
    } else {
        SERVER_V6.into()
    }
}

/// A test's own little network: the fields and methods of [`NetPair`]
/// (`server_ns`, `client_if`, `server_cmd`, `in_client`, ...). Dropping it
/// deletes both namespaces, which also removes the veth pair and every
/// program attached to it.
pub struct TestNet(NetPair);

impl Deref for TestNet {
    type Target = NetPair;
    fn deref(&self) -> &NetPair {
        &self.0
    }
}

impl TestNet {
    pub fn new() -> Result<TestNet> {
        let id = unique_id();
        let pair = NetPair {
            server_ns: format!("tps-{id}"),
            client_ns: format!("tpc-{id}"),
            server_if: format!("ts{id}"),
            client_if: format!("tc{id}"),
            id,
        };
        Ok(TestNet(pair.create()?))
    }

    /// Adds another source address on the client side; refuses any
    /// outside the test networks (the network rule).
    pub fn add_client_addr(&self, addr: IpAddr) -> Result<()> {
        if !testkit::is_test_address(addr) {
            bail!("{addr} is outside the test networks 198.51.100.0/24 and fd5b:1e00::/64");
        }
        let cidr = match addr {
            IpAddr::V4(_) => format!("{addr}/24"),
            IpAddr::V6(_) => format!("{addr}/64"),
        };
        let mut args = vec![
            "-n",
            &self.client_ns,
            "addr",
            "add",
            &cidr,
            "dev",
            &self.client_if,
        ];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args)
    }
}

/// A network namespace of its own for a service several MX hosts share
/// (Redis, its Sentinels, a Redis Cluster), as on a site's own LAN: a
/// bridge in it, and a veth from each host's server namespace into the
/// bridge. The service is at [`ServiceNet::V4`] and [`ServiceNet::V6`];
/// host `i` (from 1) has 198.51.100.(200+i) and fd5b:1e00:ff::`i` on its
/// end. The host's IPv4 address is a /32 with a route to the service
/// only, since 198.51.100.0/24 is already the host's client side.
///
/// Named `tps-<id>` like a server namespace, so the suite's leak check
/// knows it; dropping it kills whatever still runs in it and deletes it,
/// which deletes the bridge and every veth with it (their ends in the
/// hosts' namespaces too).
pub struct ServiceNet {
    pub ns: String,
}

impl ServiceNet {
    /// The service's addresses (on the bridge).
    pub const V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 200);
    pub const V6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0xfd5b, 0x1e00, 0xff, 0, 0, 0, 0, 0x100);

    /// The namespace, joined to the server namespace of each of `hosts`.
    pub fn new(hosts: &[&TestNet]) -> Result<ServiceNet> {
        let id = unique_id();
        let s = ServiceNet {
            ns: format!("tps-{id}"),
        };
        // From here on, a failure drops `s`, which deletes what was made.
        ip(&["netns", "add", &s.ns])?;
        let br = "tbr0";
        ip(&["-n", &s.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &s.ns, "link", "add", br, "type", "bridge"])?;
        ip(&[
            "-n",
            &s.ns,
            "addr",
            "add",
            &format!("{}/24", Self::V4),
            "dev",
            br,
        ])?;
        ip(&[
            "-n",
            &s.ns,
            "addr",
            "add",
            &format!("{}/64", Self::V6),
            "dev",
            br,
            "nodad",
        ])?;
        ip(&["-n", &s.ns, "link", "set", br, "up"])?;
        for (i, host) in hosts.iter().enumerate() {
            let n = i + 1;
            let (here, there) = (format!("tq{id}{n}"), format!("tr{id}{n}"));
            if there.len() > 15 {
                bail!("interface name {there} too long");
            }
            ip(&[
                "link",
                "add",
                &there,
                "netns",
                &host.server_ns,
                "type",
                "veth",
                "peer",
                "name",
                &here,
                "netns",
                &s.ns,
            ])?;
            ip(&["-n", &s.ns, "link", "set", &here, "master", br])?;
            ip(&["-n", &s.ns, "link", "set", &here, "up"])?;
            let ns = &host.server_ns;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/32", Self::host_v4(n)),
                "dev",
                &there,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/64", Self::host_v6(n)),
                "dev",
                &there,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", &there, "up"])?;
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("{}/32", Self::V4),
                "dev",
                &there,
                "src",
                &Self::host_v4(n).to_string(),
            ])?;
        }
        Ok(s)
    }

    /// Host `n`'s (from 1) IPv4 address towards the service.
    pub fn host_v4(n: usize) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(198, 51, 100, 200 + n as u8)
    }

    /// Host `n`'s (from 1) IPv6 address towards the service.
    pub fn host_v6(n: usize) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd5b, 0x1e00, 0xff, 0, 0, 0, 0, n as u16)
    }

    /// A command that runs inside the service's namespace.
    pub fn cmd(&self, program: &str) -> std::process::Command {
        testkit::netns::nsenter(&self.ns, program)
    }

    /// Runs `f` on a thread inside the service's namespace.
    pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        testkit::netns::in_ns(&self.ns, f)
    }
}

impl Drop for ServiceNet {
    fn drop(&mut self) {
        if std::path::Path::new(&format!("/var/run/netns/{}", self.ns)).exists()
            && let Err(e) = testkit::netns::delete_ns(&self.ns)
        {
            eprintln!("cannot delete namespace {}: {e}", self.ns);
        }
    }
}
