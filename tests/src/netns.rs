//! Two network namespaces joined by a veth pair: the server side (agent,
//! MTA, kernel programs) and the client side (bots and good senders).
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::env::unique_id;

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 2);

/// A test's own little network. Dropping it deletes both namespaces, which
/// also removes the veth pair and every program attached to it.
pub struct TestNet {
    pub id: String,
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Checks that an address is one tests may use (the network rule).
fn check_test_address(addr: IpAddr) -> Result<()> {
    let ok = match addr {
        IpAddr::V4(v4) => v4.octets()[..3] == [198, 51, 100],
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd5b, 0x1e00, 0, 0],
    };
    if !ok {
        bail!("{addr} is outside the test networks 198.51.100.0/24 and fd5b:1e00::/64");
    }
    Ok(())
}

impl TestNet {
    pub fn new() -> Result<TestNet> {
        let id = unique_id();
        let net = TestNet {
            server_ns: format!("tps-{id}"),
            client_ns: format!("tpc-{id}"),
            server_if: format!("ts{id}"),
            client_if: format!("tc{id}"),
            id,
        };
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &net.server_ns])?;
        ip(&["netns", "add", &net.client_ns])?;
        ip(&[
            "link",
            "add",
            &net.server_if,
            "netns",
            &net.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &net.client_if,
            "netns",
            &net.client_ns,
        ])?;
        for (ns, dev, v4, v6) in [
            (&net.server_ns, &net.server_if, SERVER_V4, SERVER_V6),
            (&net.client_ns, &net.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(net)
    }

    /// Adds another source address on the client side.
    pub fn add_client_addr(&self, addr: IpAddr) -> Result<()> {
        check_test_address(addr)?;
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

    fn nsenter(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        cmd
    }

    /// A command that runs inside the server namespace.
    pub fn server_cmd(&self, program: &str) -> Command {
        Self::nsenter(&self.server_ns, program)
    }

    /// A command that runs inside the client namespace.
    pub fn client_cmd(&self, program: &str) -> Command {
        Self::nsenter(&self.client_ns, program)
    }

    fn in_ns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> Result<T> {
        let file = File::open(format!("/var/run/netns/{ns}"))
            .with_context(|| format!("no namespace {ns}"))?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("closure in namespace {ns} panicked"))?
        })
    }

    /// Runs `f` on a thread inside the server namespace.
    pub fn in_server<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        Self::in_ns(&self.server_ns, f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        Self::in_ns(&self.client_ns, f)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            // Kill anything still running in the namespace, then delete it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("harness: cannot delete namespace {ns}: {e}");
            }
        }
    }
}
