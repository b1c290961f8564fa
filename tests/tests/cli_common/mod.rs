//! A world for the command-line tests: the test network, pins, a cgroup,
//! a state file and a config of the test's own, the real agent (started
//! and stopped at will), and the real `tarpit` binary run as an admin
//! would, inside the server namespace (`nsenter --net` keeps bpffs).
//!
//! Included by the `cli_*` test files with `mod cli_common;`.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tarpit_tests::{
    Agent, PinDir, SERVER_V4, SERVER_V6, TestCgroup, TestNet, tarpit_bin, unique_id,
};

/// The agent's SMTP port, the one port the kernel watches in these tests.
pub const SMTP: u16 = 25;
/// How long a probe waits for a handshake: dropped SYNs never answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);

/// What a client sees when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The handshake completed.
    Connected,
    /// The host answered with RST: it was reached, nothing listens.
    Refused,
    /// No answer at all: the SYN was dropped (block list).
    Dropped,
}

impl Probe {
    /// Reached the server (handshake or RST): not dropped.
    pub fn reached(self) -> bool {
        self != Probe::Dropped
    }
}

pub struct CliWorld {
    // Drop order: agent first, then the rest.
    pub agent: Option<Agent>,
    pub net: TestNet,
    pub pins: PinDir,
    pub cgroup: TestCgroup,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: String,
    pub state_file: PathBuf,
}

/// Options of a world.
pub struct Opts {
    /// `kernel.detach_on_exit`.
    pub detach_on_exit: bool,
    /// Extra lines for `[kernel]`.
    pub kernel: &'static str,
    /// Greeting delay of the agent.
    pub greeting: &'static str,
    /// More config sections, appended as they are.
    pub extra: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            detach_on_exit: false,
            kernel: "",
            greeting: "2s",
            extra: "",
        }
    }
}

impl Opts {
    /// `detach_on_exit = true`: stopping the agent removes programs and
    /// maps, as a reboot would; the rest as by default.
    pub fn detached() -> Opts {
        Opts {
            detach_on_exit: true,
            ..Opts::default()
        }
    }
}

impl CliWorld {
    /// A world with its config written; the agent is not started yet.
    pub fn new(opts: Opts) -> CliWorld {
        let net = TestNet::new().expect("test network");
        let pins = PinDir::new().expect("pin dir");
        let cgroup = TestCgroup::new().expect("cgroup");
        let dir = std::env::temp_dir().join(format!("tarpit-cli-{}", unique_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state_file = dir.join("state/state.json");
        let config = format!(
            r#"
[listen]
addrs = ["{v4}", "{v6}"]
[backend]
# Nothing listens here: these tests never get past the greeting.
addr = "127.0.0.1:2599"
[kernel]
interfaces = ["{iface}"]
smtp_ports = [{SMTP}]
pin_path = "{pins}"
detach_on_exit = {detach}
cgroup = "{cgroup}"
{kernel}
[greeting]
delay = "{greeting}"
[state]
file = "{state}"
[allow]
# Nothing from the configuration in the kernel's allow list: the tests
# own it (the agent would otherwise sync 127.0.0.0/8 and ::1 into it).
internal = []
[metrics]
listen = "127.0.0.1:9325"
{extra}
"#,
            v4 = SocketAddr::from((SERVER_V4, SMTP)),
            v6 = SocketAddr::from((SERVER_V6, SMTP)),
            iface = net.server_if,
            pins = pins.path.display(),
            detach = opts.detach_on_exit,
            cgroup = cgroup.path.display(),
            kernel = opts.kernel,
            greeting = opts.greeting,
            state = state_file.display(),
            extra = opts.extra,
        );
        let config_path = dir.join("tarpit.toml");
        std::fs::write(&config_path, &config).unwrap();
        CliWorld {
            agent: None,
            net,
            pins,
            cgroup,
            dir,
            config_path,
            config,
            state_file,
        }
    }

    /// Starts the agent (inside the test's cgroup, so sock_ops counts its
    /// connections).
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let agent =
            Agent::start_with(&self.net, &self.config, Some(&self.cgroup)).expect("agent starts");
        self.agent = Some(agent);
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) {
        let agent = self.agent.take().expect("agent running");
        let status = agent.stop().expect("agent stops");
        assert!(status.success(), "agent exit status {status}");
    }

    /// Runs `tarpit -c <config> ARGS` in the server namespace.
    pub fn tarpit(&self, args: &[&str]) -> Output {
        let mut cmd = self.net.server_cmd(&tarpit_bin().display().to_string());
        cmd.arg("-c").arg(&self.config_path).args(args);
        cmd.output().expect("run tarpit")
    }

    /// Runs tarpit and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tarpit(args);
        assert!(
            out.status.success(),
            "tarpit {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs tarpit and expects failure with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.tarpit(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "tarpit {args:?}: expected exit status {code}; stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).expect("utf-8 errors")
    }

    /// Runs tarpit with `--json` appended and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("tarpit {all:?}: bad JSON ({e}):\n{text}"))
    }

    /// A TCP handshake from `src` (client namespace) to the server's SMTP
    /// port of the same family.
    pub fn probe(&self, src: IpAddr) -> Probe {
        self.probe_port(src, SMTP)
    }

    pub fn probe_port(&self, src: IpAddr, port: u16) -> Probe {
        let dst = server_for(src, port);
        self.net
            .in_client(|| {
                let domain = if src.is_ipv4() {
                    Domain::IPV4
                } else {
                    Domain::IPV6
                };
                let s = Socket::new(domain, Type::STREAM, None).expect("socket");
                s.bind(&SocketAddr::new(src, 0).into())
                    .expect("bind source");
                match s.connect_timeout(&dst.into(), PROBE_TIMEOUT) {
                    Ok(()) => Probe::Connected,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Refused,
                    // No answer; or, for IPv6 under an all-ports block,
                    // the client's neighbour solicitations were dropped
                    // too (they carry the blocked source address), so it
                    // never learns the server's link address.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::HostUnreachable
                        ) =>
                    {
                        Probe::Dropped
                    }
                    Err(e) => panic!("connect {src} -> {dst}: {e}"),
                }
            })
            .expect("client namespace")
    }

    /// The state file as JSON (panics when missing).
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.state_file).expect("state file exists");
        serde_json::from_str(&text).expect("state file is JSON")
    }
}

/// Checks that `tarpit allow|block list` says what its `--json` says:
/// one row per entry, in the same order, with the same expiry, reason,
/// ports, status and comment.
pub fn assert_list_matches(w: &CliWorld, list: &str) {
    let human = w.ok(&[list, "list"]);
    let json = w.json(&[list, "list"]);
    let entries = json.as_array().unwrap();
    let rows: Vec<&str> = human.lines().skip(1).collect();
    if entries.is_empty() {
        assert_eq!(human.trim(), format!("the {list} list is empty"));
        return;
    }
    assert_eq!(rows.len(), entries.len(), "{human}\n{json}");
    for (row, e) in rows.iter().zip(entries) {
        let cidr = e["cidr"].as_str().unwrap();
        assert!(row.starts_with(&format!("{cidr} ")), "{row} vs {e}");
        let added = e["added_at"]
            .as_str()
            .unwrap()
            .replacen('T', " ", 1)
            .replace('Z', " UTC");
        assert!(row.contains(&added), "{row} vs {e}");
        match e["expires_in_secs"].as_u64() {
            None => assert!(row.contains(" never "), "{row} vs {e}"),
            Some(0) => assert!(row.contains(" expired "), "{row} vs {e}"),
            Some(_) => assert!(row.contains(" in "), "{row} vs {e}"),
        }
        let status = match (e["in_kernel"].as_bool(), e["active"].as_bool()) {
            (Some(false), _) => "pending",
            (_, Some(true)) => "active",
            _ => "expired",
        };
        assert!(row.contains(&format!(" {status}")), "{row} vs {e}");
        let source = e["source"].as_str().unwrap();
        assert!(row.contains(&format!(" {source}")), "{row} vs {e}");
        if let Some(c) = e["comment"].as_str() {
            assert!(row.trim_end().ends_with(c), "{row} vs {e}");
        }
        if list == "block" {
            assert!(
                row.contains(&format!(" {} ", e["reason"].as_str().unwrap())),
                "{row}"
            );
            let ports = if e["all_ports"] == true {
                " all "
            } else {
                " smtp "
            };
            assert!(row.contains(ports), "{row} vs {e}");
        }
    }
}

pub fn server_for(src: IpAddr, port: u16) -> SocketAddr {
    if src.is_ipv4() {
        SocketAddr::from((SERVER_V4, port))
    } else {
        SocketAddr::from((SERVER_V6, port))
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Drop for CliWorld {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill9();
        }
        // Programs, links and pins left by a world without detach_on_exit.
        let _ = tarpit::kernel::detach(&self.pins.path);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
