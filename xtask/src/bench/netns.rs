//! The benchmark's own little network: a server and a client namespace
//! joined by a veth pair, in 198.51.100.0/24 and fd5b:1e00::/64 only.
//!
//! Processes enter a namespace with `nsenter --net=` (never `ip netns
//! exec`, which remounts /sys and hides bpffs); sockets the bench opens
//! itself are made on a thread that `setns()`ed into the namespace.
//! Namespace names carry our pid, so a later run deletes what a killed
//! run left behind (`sweep_stale`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use testkit::netns::{NetPair, delete_ns, nsenter};

pub use testkit::netns::{SERVER_V4, SERVER_V6, is_test_address};

/// Names of everything a bench run makes start with this (the tests use
/// `tps-`/`tpc-`): the stale sweep deletes only these.
const PREFIX: &str = "tpb-";

/// Feeds `ip -batch -` (one process for hundreds of addresses).
fn ip_batch(ns: &str, lines: &str) -> Result<()> {
    testkit::feed(Command::new("ip").args(["-n", ns, "-batch", "-"]), lines)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct TcpExt {
    pub listen_overflows: u64,
    pub syncookies_sent: u64,
    pub syn_retrans: u64,
}

impl TcpExt {
    pub fn since(&self, later: &TcpExt) -> TcpExt {
        TcpExt {
            listen_overflows: later.listen_overflows.saturating_sub(self.listen_overflows),
            syncookies_sent: later.syncookies_sent.saturating_sub(self.syncookies_sent),
            syn_retrans: later.syn_retrans.saturating_sub(self.syn_retrans),
        }
    }
}

/// The bench's network: the fields and methods of [`NetPair`]
/// (`server_ns`, `server_cmd`, `in_client`, ...), named `tpb-s-<id>` and
/// `tpb-c-<id>`. Dropping it deletes both namespaces.
pub struct BenchNet(NetPair);

impl Deref for BenchNet {
    type Target = NetPair;
    fn deref(&self) -> &NetPair {
        &self.0
    }
}

impl BenchNet {
    pub fn new() -> Result<BenchNet> {
        let id = testkit::unique_id();
        let compact = id.replace('-', "");
        let pair = NetPair {
            server_ns: format!("{PREFIX}s-{id}"),
            client_ns: format!("{PREFIX}c-{id}"),
            server_if: format!("tbs{compact}"),
            client_if: format!("tbc{compact}"),
            id,
        };
        Ok(BenchNet(pair.create()?))
    }

    /// Adds client source addresses: 198.51.100.10.. and fd5b:1e00::a..;
    /// returns them, IPv4 and IPv6 interleaved.
    pub fn add_client_addrs(&self, per_family: u32) -> Result<Vec<IpAddr>> {
        let per_family = per_family.clamp(1, 100);
        let mut addrs = Vec::new();
        let mut batch = String::new();
        for i in 0..per_family {
            let v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10 + i as u8));
            let v6 = IpAddr::V6(Ipv6Addr::new(
                0xfd5b,
                0x1e00,
                0,
                0,
                0,
                0,
                0,
                0x10 + i as u16,
            ));
            for a in [v4, v6] {
                debug_assert!(is_test_address(a));
                let (len, extra) = if a.is_ipv4() {
                    (24, "")
                } else {
                    (64, " nodad")
                };
                batch.push_str(&format!(
                    "addr add {a}/{len} dev {}{extra}\n",
                    self.client_if
                ));
                addrs.push(a);
            }
        }
        ip_batch(&self.client_ns, &batch)?;
        Ok(addrs)
    }

    /// TCP trouble counters of the server namespace.
    pub fn server_tcp_ext(&self) -> TcpExt {
        tcp_ext(&self.server_ns)
    }

    /// TCP trouble counters of the client namespace.
    pub fn client_tcp_ext(&self) -> TcpExt {
        tcp_ext(&self.client_ns)
    }
}

/// Counters of /proc/net/netstat as seen inside a namespace.
fn tcp_ext(ns: &str) -> TcpExt {
    let text = nsenter(ns, "cat")
        .arg("/proc/net/netstat")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_tcp_ext(&text)
}

fn parse_tcp_ext(text: &str) -> TcpExt {
    // Pairs of lines: "TcpExt: Name Name ..." then "TcpExt: 1 2 ...".
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut t = TcpExt::default();
    if let [names, values, ..] = lines.as_slice() {
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            let v = v.parse().unwrap_or(0);
            match n {
                "ListenOverflows" => t.listen_overflows = v,
                "SyncookiesSent" => t.syncookies_sent = v,
                "TCPSynRetrans" => t.syn_retrans = v,
                _ => {}
            }
        }
    }
    t
}

impl BenchNet {
    /// True when something listens on `port` in the server namespace.
    pub fn listening_on(&self, port: u16) -> bool {
        self.server_cmd("ss")
            .args(["-Htln", &format!("( sport = :{port} )")])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false)
    }

    /// Established TCP connections on a local port in the server namespace,
    /// counted by the kernel (`ss`): what the server really holds.
    pub fn established_on(&self, port: u16) -> Result<u64> {
        let out = self
            .server_cmd("ss")
            .args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .context("cannot run ss")?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count() as u64)
    }
}

/// The MAC as `ip -br link` prints it, which is reliable across namespaces.
pub fn link_mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", dev])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_mac(text.split_whitespace().nth(2).unwrap_or_default())
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

/// Deletes namespaces, temp dirs and pin dirs of earlier bench runs
/// whose process is gone (a run killed with SIGKILL cannot clean up after
/// itself). Every name carries the run's pid in hex.
pub fn sweep_stale() {
    for (name, id) in prefixed(Path::new("/var/run/netns"), PREFIX) {
        // tpb-s-<pid hex>-<n>: the id follows the side letter.
        if let Some(id) = id.get(2..)
            && testkit::owner_alive(id) == Some(false)
        {
            eprintln!("bench: removing stale namespace {name}");
            if let Err(e) = delete_ns(&name) {
                eprintln!("bench: {e}");
            }
        }
    }
    let tmp = std::env::temp_dir();
    for (dir, prefix) in [
        (tmp.as_path(), "tarpit-bench-postfix-"),
        (tmp.as_path(), "tarpit-bench-agent-"),
        (tmp.as_path(), "tarpit-bench-xtask-"),
        (Path::new("/sys/fs/bpf"), "tarpit-bench-"),
    ] {
        for (name, id) in prefixed(dir, prefix) {
            if testkit::owner_alive(&id) == Some(false) {
                let path = dir.join(name);
                eprintln!("bench: removing stale {}", path.display());
                let _ = std::fs::remove_dir_all(&path);
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Entries of `dir` named `<prefix><rest>`: (name, rest).
fn prefixed(dir: &Path, prefix: &str) -> Vec<(String, String)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(prefix)?.to_string();
            Some((name, rest))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows TCPSynRetrans\n\
                    TcpExt: 3 7 11\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 1\n";
        let t = parse_tcp_ext(text);
        assert_eq!(
            (t.syncookies_sent, t.listen_overflows, t.syn_retrans),
            (3, 7, 11)
        );
        let d = TcpExt::default().since(&t);
        assert_eq!(d.listen_overflows, 7, "since() counts from self to later");
    }
}
