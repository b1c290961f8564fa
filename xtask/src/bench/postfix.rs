//! The Postfix test instance (tests/peers, a copy of ../shared/peers),
//! templated into a temp dir and run inside a bench's server namespace.
//!
//! The template's loopback listeners are replaced by port-only services,
//! which Postfix binds on every address of the namespace, IPv4 and IPv6,
//! in ONE process per service (so postscreen's memory is one process's).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::{BenchNet, SERVER_V4};
use super::{procstat, signal};
use crate::paths;

/// Plain smtpd: good mail delivered directly.
pub const DIRECT: u16 = 2525;
/// smtpd expecting a PROXY v1/v2 header: the agent's backend.
pub const PROXY: u16 = 2535;
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

pub struct Postfix {
    pub dir: PathBuf,
    conf: PathBuf,
}

fn peers_dir() -> PathBuf {
    let repo = paths::root().join("tests/peers");
    if repo.join("main.cf").is_file() {
        repo
    } else {
        PathBuf::from("/work/shared/peers")
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn main_cf(template: &str, dir: &Path) -> String {
    let mut text = template
        .replace("@DIR@", &dir.display().to_string())
        .replace("inet_interfaces = loopback-only", "inet_interfaces = all");
    text.push_str(
        "\n# --- bench overrides ---\n\
         # many clients share a few source addresses: no per-client caps\n\
         smtpd_client_connection_count_limit = 0\n\
         postscreen_client_connection_count_limit = 0\n\
         # postscreen refuses (421) clients beyond this many in triage; the\n\
         # hold scenario keeps up to 15,000 there\n\
         postscreen_pre_queue_limit = 30000\n\
         default_process_limit = 100\n",
    );
    text
}

/// Keeps the template's internal services, replaces its listeners.
fn master_cf(template: &str, dir: &Path) -> String {
    let text = template.replace("@DIR@", &dir.display().to_string());
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
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
        let conf = dir.join("conf");
        // From here on Drop stops the instance and removes the directory.
        let pf = Postfix {
            dir: dir.clone(),
            conf: conf.clone(),
        };
        std::fs::create_dir_all(&conf)?;
        let peers = peers_dir();
        let main = std::fs::read_to_string(peers.join("main.cf"))
            .with_context(|| format!("no Postfix template in {}", peers.display()))?;
        let master = std::fs::read_to_string(peers.join("master.cf"))?;
        std::fs::write(conf.join("main.cf"), main_cf(&main, &dir))?;
        std::fs::write(conf.join("master.cf"), master_cf(&master, &dir))?;
        for sub in ["queue/etc", "data", "mail"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        run(Command::new("chown").arg("postfix").arg(dir.join("data")))?;
        run(Command::new("chown")
            .arg("65534:65534")
            .arg(dir.join("mail")))?;
        std::fs::write(dir.join("queue/etc/resolv.conf"), "nameserver 127.0.0.1\n")?;
        let c = conf.display().to_string();
        run(net.server_cmd("postfix").args(["-c", &c, "check"]))?;
        run(net.server_cmd("postfix").args(["-c", &c, "start"]))?;
        let ready = signal::wait_until(Duration::from_secs(20), || {
            net.in_server(|| {
                std::net::TcpStream::connect_timeout(
                    &(SERVER_V4, DIRECT).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
            .unwrap_or(false)
        })?;
        if !ready {
            bail!("Postfix did not start listening; log:\n{}", pf.log());
        }
        Ok(pf)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
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

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .args(["-c", &self.conf.display().to_string(), "stop"])
            .output();
        // postfix stop returns before master has exited; the namespace's
        // Drop kills what is left, the directory can go now.
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
