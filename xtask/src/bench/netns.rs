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

/// Packets a device dropped on transmit (`ip -s link`): on a veth, a full
/// receive ring of its peer.
pub fn tx_dropped(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v[0]["stats64"]["tx"]["dropped"].as_u64())
        .unwrap_or(0)
}

/// Every counter of /proc/net/snmp and /proc/net/netstat in a namespace,
/// named `Group.Name` (`Tcp.EstabResets`, `TcpExt.TCPAbortOnTimeout`).
pub fn snmp_counters(ns: &str) -> std::collections::BTreeMap<String, u64> {
    let text = nsenter(ns, "cat")
        .args(["/proc/net/snmp", "/proc/net/netstat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_snmp(&text)
}

/// Pairs of lines, "Group: Name Name ..." then "Group: 1 2 ...", each
/// header followed by its values line of the same group.
fn parse_snmp(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let [names, values] = pair else { continue };
        let (Some((group, names)), Some((vgroup, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        let is_header = names
            .split_whitespace()
            .next()
            .is_some_and(|w| w.parse::<i64>().is_err());
        let is_values = values.split_whitespace().all(|w| w.parse::<i64>().is_ok());
        if group != vgroup || !is_header || !is_values {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse::<i64>() {
                out.insert(format!("{group}.{n}"), v.max(0) as u64);
            }
        }
    }
    out
}

/// Counters of /proc/net/netstat as seen inside a namespace.
fn tcp_ext(ns: &str) -> TcpExt {
    TcpExt::from_counters(&snmp_counters(ns))
}

impl TcpExt {
    fn from_counters(c: &std::collections::BTreeMap<String, u64>) -> TcpExt {
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        TcpExt {
            listen_overflows: get("TcpExt.ListenOverflows"),
            syncookies_sent: get("TcpExt.SyncookiesSent"),
            syn_retrans: get("TcpExt.TCPSynRetrans"),
        }
    }
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

/// The client namespace's side of its connections to one server port.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientConns {
    /// ESTABLISHED connections to the port.
    pub established: u64,
    /// Of those, how many have unacknowledged data in their Send-Q.
    pub with_send_q: u64,
    /// Bytes the client has received on them (the banner, if any came).
    pub recv_q_bytes: u64,
    /// Of those, how many probe a zero window (`timer:(persist,...)`).
    pub probing: u64,
    /// Of the probing ones, how many have probes without an answer (the
    /// timer's last field, icsk_probes_out, which every answer resets).
    pub probes_unanswered: u64,
}

impl BenchNet {
    /// TCP sockets in use in the server namespace (sockstat and sockstat6).
    pub fn server_tcp_inuse(&self) -> Result<u64> {
        testkit::netns::tcp_sockets_in_use(&self.server_ns)
    }

    /// What the clients hold towards the server's `port` (`ss` in the
    /// client namespace).
    pub fn client_conns_to(&self, port: u16) -> Result<ClientConns> {
        let out = self
            .client_cmd("ss")
            .args([
                "-Htno",
                "state",
                "established",
                &format!("( dport = :{port} )"),
            ])
            .output()
            .context("cannot run ss in the client namespace")?;
        Ok(parse_client_conns(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// `ss -Htno state established`: "Recv-Q Send-Q Local Peer [timer:(...)]"
/// per line.
fn parse_client_conns(text: &str) -> ClientConns {
    let mut c = ClientConns::default();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let (Some(r), Some(q)) = (f.next(), f.next()) else {
            continue;
        };
        c.established += 1;
        c.recv_q_bytes += r.parse::<u64>().unwrap_or(0);
        if q.parse::<u64>().unwrap_or(0) > 0 {
            c.with_send_q += 1;
        }
        if let Some(t) = l.split("timer:(persist,").nth(1) {
            c.probing += 1;
            let probes = t.split(')').next().and_then(|t| t.rsplit(',').next());
            if probes.and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) > 0 {
                c.probes_unanswered += 1;
            }
        }
    }
    c
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
        (tmp.as_path(), "tarpit-bench-redis-"),
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
    fn parses_client_connections() {
        let ss = "0      21     198.51.100.10:40000  198.51.100.1:25 timer:(persist,1.2sec,0)\n\
                  0      21     198.51.100.12:40000  198.51.100.1:25 timer:(persist,6.4sec,5)\n\
                  0      0      [fd5b:1e00::10]:40001  [fd5b:1e00::1]:25\n\
                  5      0      198.51.100.11:40002  198.51.100.1:25\n";
        let c = parse_client_conns(ss);
        assert_eq!((c.established, c.with_send_q, c.recv_q_bytes), (4, 2, 5));
        assert_eq!((c.probing, c.probes_unanswered), (2, 1));
    }

    #[test]
    fn parses_snmp_pairs() {
        let text =
            "Tcp: RtoAlgorithm EstabResets\nTcp: 1 4\nTcpExt: TCPAbortOnTimeout\nTcpExt: 9\n";
        let c = parse_snmp(text);
        assert_eq!(c.get("Tcp.EstabResets"), Some(&4));
        assert_eq!(c.get("TcpExt.TCPAbortOnTimeout"), Some(&9));
    }

    #[test]
    fn reads_this_hosts_counters() {
        let text = ["/proc/net/snmp", "/proc/net/netstat"]
            .map(|f| std::fs::read_to_string(f).unwrap())
            .concat();
        let c = parse_snmp(&text);
        for key in [
            "Tcp.ActiveOpens",
            "Tcp.OutRsts",
            "TcpExt.ListenOverflows",
            "TcpExt.TCPSynRetrans",
        ] {
            assert!(c.contains_key(key), "{key} missing");
        }
    }

    #[test]
    fn parses_tcp_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows TCPSynRetrans\n\
                    TcpExt: 3 7 11\n\
                    IpExt: InNoRoutes\n\
                    IpExt: 1\n";
        let t = TcpExt::from_counters(&parse_snmp(text));
        assert_eq!(
            (t.syncookies_sent, t.listen_overflows, t.syn_retrans),
            (3, 7, 11)
        );
        let d = TcpExt::default().since(&t);
        assert_eq!(d.listen_overflows, 7, "since() counts from self to later");
    }
}
