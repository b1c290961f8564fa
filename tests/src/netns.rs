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
