//! The Postfix test instance (tests/peers, a copy of ../shared/peers),
//! templated into a temp dir and run inside a bench's server namespace.
//!
//! The template's loopback listeners are replaced by port-only services,
//! which Postfix binds on every address of the namespace, IPv4 and IPv6,
//! in ONE process per service (so postscreen's memory is one process's).
use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use anyhow::{Result, bail};
use testkit::postfix::Instance;

use super::netns::{BenchNet, SERVER_V4};
use super::{procstat, signal};

/// Plain smtpd: good mail delivered directly.
pub const DIRECT: u16 = 2525;
/// smtpd expecting a PROXY v1/v2 header: the agent's backend.
pub const PROXY: u16 = 2535;
/// The PROXY smtpd on a Unix socket (`tarpit-smtpd unix` in the
/// template's master.cf), relative to the instance's directory.
pub const PROXY_UNIX: &str = "queue/public/tarpit-smtpd";
/// postscreen for good mail (greet wait 1 s, pass cached for a day).
pub const PS_PASS: u16 = 2526;
/// postscreen holding clients in its greet wait (enforce).
pub const PS_HOLD: u16 = 2527;
/// postscreen with `postscreen_greet_action = drop` (pre-greet flood).
pub const PS_DROP: u16 = 2528;

/// Plain smtpd on loopback only: the listener the agent's kernel bypass
/// (sk_lookup) steers allow-listed clients to; its log name tells how
/// many connections really took that path.
pub const BYPASS: u16 = 2546;
pub const BYPASS_LOG: &str = "postfix/bypass/smtpd";

/// How long the holding postscreen waits: longer than any hold phase.
pub const PS_HOLD_WAIT: Duration = Duration::from_secs(300);

/// A running instance: the fields and methods of [`Instance`] (`dir`,
/// `log()`, ...); Drop stops it and removes its directory.
pub struct Postfix(Instance);

impl Deref for Postfix {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        &self.0
    }
}

/// Appended to main.cf.
const MAIN_CF_OVERRIDES: &str = "\
# --- bench overrides ---
# many clients share a few source addresses: no per-client caps
smtpd_client_connection_count_limit = 0
postscreen_client_connection_count_limit = 0
# postscreen refuses (421) clients beyond this many in triage; the
# hold scenario keeps up to 15,000 there
postscreen_pre_queue_limit = 30000
default_process_limit = 100
";

/// Keeps the template's internal services, replaces its listeners.
fn master_cf(template: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in template.lines() {
        if line.starts_with(' ') || line.starts_with('\t') {
            if !skipping {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let service = line.split_whitespace().next().unwrap_or("");
        skipping = service.contains(':') || service.starts_with('[');
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    let hold_wait = PS_HOLD_WAIT.as_secs();
    let services: [(u16, &str, &[String]); 5] = [
        (DIRECT, "smtpd", &["syslog_name=postfix/direct".into()]),
        (
            PROXY,
            "smtpd",
            &[
                "syslog_name=postfix/proxied".into(),
                "smtpd_upstream_proxy_protocol=haproxy".into(),
                "smtpd_upstream_proxy_timeout=5s".into(),
            ],
        ),
        (
            PS_PASS,
            "postscreen",
            &[
                "syslog_name=postfix/ps-pass".into(),
                "postscreen_greet_wait=1s".into(),
                "postscreen_greet_ttl=1d".into(),
                "postscreen_cache_map=btree:$data_directory/psc_pass".into(),
            ],
        ),
        (
            PS_HOLD,
            "postscreen",
            &[
                "syslog_name=postfix/ps-hold".into(),
                format!("postscreen_greet_wait={hold_wait}s"),
                "postscreen_cache_map=btree:$data_directory/psc_hold".into(),
            ],
        ),
        (
            PS_DROP,
            "postscreen",
            &[
                "syslog_name=postfix/ps-drop".into(),
                "postscreen_greet_action=drop".into(),
                "postscreen_greet_wait=5s".into(),
                "postscreen_cache_map=btree:$data_directory/psc_drop".into(),
            ],
        ),
    ];
    for addr in ["127.0.0.1", "[::1]"] {
        out.push_str(&format!(
            "{addr}:{BYPASS} inet n - n - - smtpd\n  -o syslog_name=postfix/bypass\n"
        ));
    }
    out.push_str("# --- bench listeners (every address of the namespace) ---\n");
    for (port, daemon, opts) in services {
        // postscreen is one process per service (maxproc 1), as shipped.
        let maxproc = if daemon == "postscreen" { "1" } else { "-" };
        out.push_str(&format!("{port} inet n - n - {maxproc} {daemon}\n"));
        for o in opts {
            out.push_str(&format!("  -o {o}\n"));
        }
    }
    out
}

impl Postfix {
    pub fn start(net: &BenchNet) -> Result<Postfix> {
        let dir = std::env::temp_dir().join(format!("tarpit-bench-postfix-{}", net.id));
        let pf = Postfix(Instance::start(
            dir,
            &net.server_ns,
            MAIN_CF_OVERRIDES,
            master_cf,
        )?);
        let direct = SocketAddr::from((SERVER_V4, DIRECT));
        if !signal::wait_until(Duration::from_secs(20), || pf.accepts(direct))? {
            bail!("Postfix did not start listening; log:\n{}", pf.log());
        }
        Ok(pf)
    }

    /// Occurrences of `needle` in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits (bounded) until the log holds at least `n` times `needle`;
    /// returns the count seen.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> Result<usize> {
        let mut seen = 0;
        signal::wait_until(timeout, || {
            seen = self.log_count(needle);
            seen >= n
        })?;
        Ok(seen)
    }

    /// Pids of live processes of this instance with the given name
    /// (`postscreen`, `smtpd`, ...), found among the namespace's processes.
    pub fn pids_named(&self, net: &BenchNet, name: &str) -> Vec<u32> {
        procstat::ns_pids(&net.server_ns)
            .into_iter()
            .filter(|&p| procstat::comm(p).as_deref() == Some(name))
            .collect()
    }

    /// The postscreen process serving `port` (it gets the listening socket
    /// from master, so the one whose fds include a socket bound there).
    pub fn postscreen_for(&self, net: &BenchNet, port: u16) -> Option<u32> {
        let inodes = listening_inodes(net, port);
        self.pids_named(net, "postscreen").into_iter().find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_link(e.path())
                            .map(|l| {
                                inodes
                                    .iter()
                                    .any(|i| l.to_string_lossy() == format!("socket:[{i}]"))
                            })
                            .unwrap_or(false)
                    })
                })
                .unwrap_or(false)
        })
    }
}

/// Inodes of the listening sockets on `port` in the server namespace.
fn listening_inodes(net: &BenchNet, port: u16) -> Vec<String> {
    let out = net
        .server_cmd("ss")
        .args(["-Htlne", &format!("( sport = :{port} )")])
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("ino:").map(str::to_string))
        .collect()
}
