//! Two network namespaces joined by a veth pair: the server side (agent,
//! MTA, kernel programs) and the client side (bots and good senders).
//!
//! Processes enter a namespace with `nsenter --net=` (never `ip netns
//! exec`, which remounts /sys and hides bpffs and cgroups); sockets a test
//! or the bench opens itself are made on a thread that `setns()`ed into it.
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, Result, bail};

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 2);

/// True for the addresses the network rule allows tests and benchmarks to
/// use on their own veths: 198.51.100.0/24 and fd5b:1e00::/64.
pub fn is_test_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.octets()[..3] == [198, 51, 100],
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd5b, 0x1e00, 0, 0],
    }
}

/// Runs `ip` (iproute2); an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
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

/// A command that runs `program` inside the named namespace; an empty
/// name means the caller's own namespace (`cargo xtask run`'s demo).
/// TCP sockets in use in namespace `ns`: `inuse` of the `TCP:` line of
/// /proc/net/sockstat plus the `TCP6:` line of sockstat6 (IPv6 sockets are
/// counted only there). Every socket the kernel holds there, of any state,
/// listeners included.
pub fn tcp_sockets_in_use(ns: &str) -> Result<u64> {
    let out = nsenter(ns, "cat")
        .args(["/proc/net/sockstat", "/proc/net/sockstat6"])
        .output()
        .with_context(|| format!("cannot read /proc/net/sockstat in {ns}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v4 = sockstat_inuse(&text, "TCP:").context("no TCP inuse in sockstat")?;
    let v6 = sockstat_inuse(&text, "TCP6:").context("no TCP6 inuse in sockstat6")?;
    Ok(v4 + v6)
}

/// `inuse` of the sockstat line that starts with `tag`.
fn sockstat_inuse(text: &str, tag: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(tag))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "inuse" {
            return words.next()?.parse().ok();
        }
    }
    None
}

pub fn nsenter(ns: &str, program: &str) -> Command {
    if ns.is_empty() {
        return Command::new(program);
    }
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `f` on a thread that joined the named namespace (sockets it
/// creates live there); the caller's thread stays where it is. An empty
/// name runs `f` right here, in the caller's namespace.
pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> Result<T> {
    if ns.is_empty() {
        return Ok(f());
    }
    let file =
        File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("no namespace {ns}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            // SAFETY: setns on a valid namespace fd affects only this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {ns}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("closure in namespace {ns} panicked"))?
    })
}

/// Kills every process still running in a namespace, then deletes it
/// (which also deletes its end of the veth pair and every program
/// attached there).
pub fn delete_ns(ns: &str) -> Result<()> {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a pid that lives in that namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    ip(&["netns", "del", ns])
}

/// A server and a client namespace joined by a veth pair, lo up in both:
/// server [`SERVER_V4`]/24 and [`SERVER_V6`]/64 on `server_if`, client
/// [`CLIENT_V4`] and [`CLIENT_V6`] on `client_if`. The names are the
/// caller's (each user has its own prefixes); dropping it deletes both
/// namespaces, by name.
pub struct NetPair {
    pub id: String,
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

impl NetPair {
    /// Creates the namespaces and the veth pair these names describe.
    /// `self` is dropped on failure, which deletes what was made so far.
    pub fn create(self) -> Result<NetPair> {
        ip(&["netns", "add", &self.server_ns])?;
        ip(&["netns", "add", &self.client_ns])?;
        ip(&[
            "link",
            "add",
            &self.server_if,
            "netns",
            &self.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &self.client_if,
            "netns",
            &self.client_ns,
        ])?;
        for (ns, dev, v4, v6) in [
            (&self.server_ns, &self.server_if, SERVER_V4, SERVER_V6),
            (&self.client_ns, &self.client_if, CLIENT_V4, CLIENT_V6),
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
        Ok(self)
    }

    /// A command that runs inside the server namespace.
    pub fn server_cmd(&self, program: &str) -> Command {
        nsenter(&self.server_ns, program)
    }

    /// A command that runs inside the client namespace.
    pub fn client_cmd(&self, program: &str) -> Command {
        nsenter(&self.client_ns, program)
    }

    /// Runs `f` on a thread inside the server namespace.
    pub fn in_server<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_ns(&self.server_ns, f)
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn in_client<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_ns(&self.client_ns, f)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            // A namespace that `create` never made is not an error worth
            // a line; one that exists and cannot be deleted is.
            if std::path::Path::new(&format!("/var/run/netns/{ns}")).exists()
                && let Err(e) = delete_ns(ns)
            {
                eprintln!("cannot delete namespace {ns}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inuse_of_sockstat_lines() {
        let text = "sockets: used 12\nTCP: inuse 7 orphan 0 tw 0 alloc 9 mem 1\n\
                    UDP: inuse 0 mem 0\nTCP6: inuse 5\nUDP6: inuse 1\n";
        assert_eq!(sockstat_inuse(text, "TCP:"), Some(7));
        assert_eq!(sockstat_inuse(text, "TCP6:"), Some(5));
        assert_eq!(sockstat_inuse("UDP: inuse 3\n", "TCP:"), None);
    }

    #[test]
    fn only_the_test_networks_are_test_addresses() {
        for ok in [
            "198.51.100.1",
            "198.51.100.254",
            "fd5b:1e00::1",
            "fd5b:1e00::ffff",
        ] {
            assert!(is_test_address(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "192.0.2.1",
            "198.51.101.1",
            "127.0.0.1",
            "::1",
            "fd5b:1e00:0:1::1",
        ] {
            assert!(!is_test_address(bad.parse().unwrap()), "{bad}");
        }
        for c in [SERVER_V4, CLIENT_V4] {
            assert!(is_test_address(c.into()));
        }
        for c in [SERVER_V6, CLIENT_V6] {
            assert!(is_test_address(c.into()));
        }
    }
}
