//! dnsmasq inside a test's server namespace: PTR, A and AAAA records for
//! the host-name allow list, and a query log in front of rbldnsd (which
//! keeps none) to prove when a lookup was, or was not, sent.
//!
//! It never reads /etc/resolv.conf or /etc/hosts (`--no-resolv`,
//! `--no-hosts`) and answers only from its own records or the servers a
//! test names, so no query leaves the namespace.
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::unique_id;
use crate::netns::TestNet;
use crate::wait;

/// What dnsmasq serves.
#[derive(Debug, Clone, Default)]
pub struct DnsmasqConfig {
    /// Port on 127.0.0.1 of the server namespace (not 53 or 5353: rbldnsd's).
    pub port: u16,
    /// PTR records: address -> name.
    pub ptr: Vec<(IpAddr, String)>,
    /// A / AAAA records: name -> address (dnsmasq also answers the PTR of
    /// that address with the name).
    pub addr: Vec<(String, IpAddr)>,
    /// Domains answered only from local records (NXDOMAIN otherwise).
    pub local: Vec<String>,
    /// Domains forwarded to another server, e.g. ("bl.test", 127.0.0.1:5353).
    pub forward: Vec<(String, Ipv4Addr, u16)>,
}

/// A running dnsmasq; Drop stops it and removes its directory.
pub struct Dnsmasq {
    pub dir: PathBuf,
    pub port: u16,
    pid: Option<i32>,
}

/// The reverse-lookup name of an address (`in-addr.arpa` / `ip6.arpa`).
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa");
            s
        }
    }
}

impl Dnsmasq {
    pub fn start(net: &TestNet, cfg: &DnsmasqConfig) -> Result<Dnsmasq> {
        let dir = std::env::temp_dir().join(format!("tarpit-dnsmasq-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let mut conf = String::new();
        conf.push_str(&format!(
            "port={}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n\
             cache-size=0\nlog-queries\nlog-facility={}\npid-file={}\nuser=root\n",
            cfg.port,
            dir.join("query.log").display(),
            dir.join("pid").display()
        ));
        for (ip, name) in &cfg.ptr {
            conf.push_str(&format!("ptr-record={},{name}\n", reverse_name(*ip)));
        }
        for (name, ip) in &cfg.addr {
            // host-record is exact (address=/name/ would also answer below
            // it); it adds a PTR for `ip` too, so tests keep those apart.
            conf.push_str(&format!("host-record={name},{ip}\n"));
        }
        for d in &cfg.local {
            conf.push_str(&format!("local=/{d}/\n"));
        }
        for (d, ip, port) in &cfg.forward {
            conf.push_str(&format!("server=/{d}/{ip}#{port}\n"));
        }
        let conf_path = dir.join("dnsmasq.conf");
        std::fs::write(&conf_path, &conf)?;
        let mut d = Dnsmasq {
            dir: dir.clone(),
            port: cfg.port,
            pid: None,
        };
        let out = net
            .server_cmd("dnsmasq")
            .arg(format!("--conf-file={}", conf_path.display()))
            .output()
            .context("cannot run dnsmasq (apt-get install dnsmasq-base)")?;
        if !out.status.success() {
            bail!(
                "dnsmasq failed to start ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let pidfile = dir.join("pid");
        if !wait::until(Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile).is_ok_and(|s| !s.trim().is_empty())
        }) {
            bail!("dnsmasq wrote no pid file");
        }
        d.pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(d)
    }

    /// The query log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("query.log")).unwrap_or_default()
    }

    /// How many queries for `name` (any type) dnsmasq received.
    pub fn queries_for(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.');
        self.log()
            .lines()
            .filter(|l| {
                l.contains("query[")
                    && l.split_whitespace()
                        .any(|w| w.trim_end_matches('.').eq_ignore_ascii_case(name))
            })
            .count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if std::thread::panicking() {
            eprintln!("--- dnsmasq query log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
