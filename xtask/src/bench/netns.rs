//! The benchmark's own little network: a server and a client namespace
//! joined by a veth pair, in 198.51.100.0/24 and fd5b:1e00::/64 only.
//!
//! Processes enter a namespace with `nsenter --net=` (never `ip netns
//! exec`, which remounts /sys and hides bpffs); sockets the bench opens
//! itself are made on a thread that `setns()`ed into the namespace.
//! Namespace names carry our pid, so a later run deletes what a killed
//! run left behind (`sweep_stale`).
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 2);

const PREFIX: &str = "tpb-";

pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}-{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
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

/// Feeds `ip -batch -` (one process for hundreds of addresses).
fn ip_batch(ns: &str, lines: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run ip -batch")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(lines.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// True for the addresses the project rule allows a benchmark to use.
pub fn is_test_address(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.octets()[..3] == [198, 51, 100],
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd5b, 0x1e00, 0, 0],
    }
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

pub struct BenchNet {
    pub id: String,
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
}

impl BenchNet {
    pub fn new() -> Result<BenchNet> {
        let id = unique_id();
        let compact = id.replace('-', "");
        let net = BenchNet {
            server_ns: format!("{PREFIX}s-{id}"),
            client_ns: format!("{PREFIX}c-{id}"),
            server_if: format!("tbs{compact}"),
            client_if: format!("tbc{compact}"),
            id,
        };
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

    pub fn server_cmd(&self, program: &str) -> Command {
        nsenter(&self.server_ns, program)
    }

    pub fn client_cmd(&self, program: &str) -> Command {
        nsenter(&self.client_ns, program)
    }

    pub fn in_server<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_ns(&self.server_ns, f)
    }

    pub fn in_client<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_ns(&self.client_ns, f)
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

pub fn nsenter(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `f` on a thread that joined the namespace.
pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> Result<T> {
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
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
    })
}

/// Kills every process in a namespace and deletes it.
fn delete_ns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a pid that lives in our namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

impl Drop for BenchNet {
    fn drop(&mut self) {
        // Deleting the namespaces also deletes the veth pair and any XDP
        // program attached to it.
        delete_ns(&self.client_ns);
        delete_ns(&self.server_ns);
    }
}

/// Deletes namespaces, temp dirs and pin dirs of earlier bench runs
/// whose process is gone (a run killed with SIGKILL cannot clean up after
/// itself). Every name carries the run's pid in hex.
pub fn sweep_stale() {
    sweep_stale_namespaces();
    let tmp = std::env::temp_dir();
    for (dir, prefix) in [
        (tmp.as_path(), "tarpit-bench-postfix-"),
        (tmp.as_path(), "tarpit-bench-agent-"),
        (tmp.as_path(), "tarpit-bench-xtask-"),
        (std::path::Path::new("/sys/fs/bpf"), "tarpit-bench-"),
    ] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            let pid = rest
                .split('-')
                .next()
                .and_then(|p| u32::from_str_radix(p, 16).ok());
            if let Some(pid) = pid
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                eprintln!("bench: removing stale {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn sweep_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // tpb-s-<pid hex>-<n>
        let pid = rest
            .get(2..)
            .and_then(|r| r.split('-').next())
            .and_then(|p| u32::from_str_radix(p, 16).ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!("bench: removing stale namespace {name}");
            delete_ns(&name);
        }
    }
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
