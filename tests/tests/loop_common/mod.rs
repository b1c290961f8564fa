//! Shared pieces of the kernel-agent loop tests (`loop_*.rs`): the agent's
//! config with the loop's keys, raw connection attempts, metrics sums.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use socket2::{Domain, Socket, Type};
use tarpit::kernel::KernelMaps;
use tarpit_tests::smtp_client::{SmtpClient, agent_v4, agent_v6, scrape_metrics};
use tarpit_tests::{Agent, PinDir, ServiceNet, TestCgroup, TestNet, tarpit_bin};

/// An agent config on the server veth (v4 and v6) in front of Postfix's
/// PROXY listener. `detach_on_exit = false` keeps programs and pins after
/// the agent (restarts, kill -9); the test's PinDir removes them.
pub fn config(
    net: &TestNet,
    pins: &PinDir,
    cgroup: Option<&TestCgroup>,
    detach_on_exit: bool,
    rest: &str,
) -> String {
    let cgroup = cgroup
        .map(|c| format!("cgroup = \"{}\"\n", c.path.display()))
        .unwrap_or_default();
    format!(
        r#"
[listen]
addrs = ["{v4}", "{v6}"]
[backend]
addr = "127.0.0.1:{proxy}"
client_address = "proxy-v2"
[kernel]
interfaces = ["{iface}"]
pin_path = "{pins}"
detach_on_exit = {detach_on_exit}
{cgroup}
[state]
file = "{state}"
{rest}
"#,
        v4 = agent_v4(),
        v6 = agent_v6(),
        proxy = tarpit_tests::postfix::PROXY,
        iface = net.server_if,
        pins = pins.path.display(),
        state = state_file(pins).display(),
    )
}

/// Removes a test agent's state file (and its lock) when dropped, also
/// when the test fails: `tarpit allow add` writes it outside the pins.
pub struct StateFileGuard(std::path::PathBuf);

impl StateFileGuard {
    pub fn new(pins: &PinDir) -> StateFileGuard {
        StateFileGuard(state_file(pins))
    }
}

impl Drop for StateFileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("json.lock"));
    }
}

/// One MX host of a test with several: its namespaces, pins and agent
/// state file (fields drop in this order, as separate guards would).
pub struct MxHost {
    _state: StateFileGuard,
    pub pins: PinDir,
    pub net: TestNet,
}

impl MxHost {
    pub fn new(name: &str) -> MxHost {
        let net = TestNet::new().unwrap_or_else(|e| panic!("net {name}: {e:#}"));
        let pins = PinDir::new().unwrap_or_else(|e| panic!("pins {name}: {e:#}"));
        MxHost {
            _state: StateFileGuard::new(&pins),
            pins,
            net,
        }
    }
}

/// Two MX hosts, mx1 and mx2, and a namespace of their shared service
/// (Redis), which both reach over veths of their own
/// ([`tarpit_tests::ServiceNet`]).
pub fn mx_pair() -> (MxHost, MxHost, ServiceNet) {
    let (mx1, mx2) = (MxHost::new("mx1"), MxHost::new("mx2"));
    let service = ServiceNet::new(&[&mx1.net, &mx2.net]).expect("the service namespace");
    (mx1, mx2, service)
}

/// The state file of a test's agent (run-time allow and block entries).
pub fn state_file(pins: &PinDir) -> std::path::PathBuf {
    let name = pins.path.file_name().unwrap_or_default().to_string_lossy();
    std::env::temp_dir().join(format!("{name}-state.json"))
}

/// The agent's address for a client of the same family.
pub fn agent_for(src: IpAddr) -> SocketAddr {
    if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    }
}

/// How a bare TCP connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Connected,
    /// No answer to the SYN within the time given (dropped).
    TimedOut,
    Refused,
    Other(String),
}

/// One TCP connection attempt from `src` in the client namespace.
pub fn attempt(net: &TestNet, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Attempt {
    net.in_client(|| {
        let domain = if src.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = match Socket::new(domain, Type::STREAM, None) {
            Ok(s) => s,
            Err(e) => return Attempt::Other(e.to_string()),
        };
        if let Err(e) = s.bind(&SocketAddr::new(src, 0).into()) {
            return Attempt::Other(e.to_string());
        }
        match s.connect_timeout(&dst.into(), timeout) {
            Ok(()) => Attempt::Connected,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Attempt::TimedOut,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Attempt::TimedOut,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Attempt::Refused,
            Err(e) => Attempt::Other(e.to_string()),
        }
    })
    .unwrap_or_else(|e| Attempt::Other(e.to_string()))
}

/// A client that talks before the banner: it must get the 554 and a
/// closed connection.
pub fn talk_first(net: &TestNet, src: IpAddr) -> Result<()> {
    let mut c = SmtpClient::connect(net, src, agent_for(src))?;
    c.send(b"EHLO bot.example\r\n")?;
    let r = c.reply()?;
    anyhow::ensure!(r.code == 554, "pre-greet talk got {:?}", r.text);
    anyhow::ensure!(c.closed_within(Duration::from_secs(10)), "not closed");
    Ok(())
}

/// Sum of every sample of a metric family (all label sets), from the
/// agent's endpoint in the server namespace; `None` when unreachable.
pub fn metric_sum(net: &TestNet, family: &str) -> Option<f64> {
    let text = scrape_metrics(net).ok()?;
    let mut sum = 0.0;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum += v;
        }
    }
    Some(sum)
}

/// Polls until `f` holds (10 s at most).
#[track_caller]
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    tarpit_tests::wait::eventually(what, Duration::from_secs(10), f)
}

/// Runs `tarpit -c <the agent's config> ARGS` (a run-time list change,
/// a look-up) and returns its output; the test fails unless it succeeds.
#[track_caller]
pub fn cli(agent: &Agent, args: &[&str]) -> String {
    run_cli(std::process::Command::new(tarpit_bin()), agent, args)
}

/// [`cli`] run inside `net`'s server namespace, as an admin on that host
/// does (a command that asks the host's Redis: `tarpit ip`, `stats`).
#[track_caller]
pub fn cli_at(net: &TestNet, agent: &Agent, args: &[&str]) -> String {
    run_cli(
        net.server_cmd(&tarpit_bin().display().to_string()),
        agent,
        args,
    )
}

#[track_caller]
fn run_cli(mut cmd: std::process::Command, agent: &Agent, args: &[&str]) -> String {
    let out = cmd
        .arg("-c")
        .arg(&agent.config)
        .args(args)
        .output()
        .expect("run tarpit");
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `addr` is on the kernel block list behind `pins`.
pub fn blocked(pins: &PinDir, addr: &str) -> bool {
    let addr: IpAddr = addr.parse().expect("an address");
    maps(pins).block_match(addr).unwrap().is_some()
}

pub fn maps(pins: &PinDir) -> KernelMaps {
    KernelMaps::open(&pins.path).expect("pinned maps")
}

/// Sends a message of `body_len` bytes through an open session that has
/// seen its banner; returns how long the body (DATA to the final 250) took.
pub fn send_body(c: &mut SmtpClient, body_len: usize) -> Result<Duration> {
    c.expect("EHLO client.example", 250)?;
    c.expect("MAIL FROM:<sender@client.example>", 250)?;
    c.expect("RCPT TO:<sink@tarpit.test>", 250)?;
    c.expect("DATA", 354)?;
    let line = "x".repeat(76) + "\r\n";
    let mut body = String::from("Subject: slow\r\n\r\n");
    while body.len() < body_len {
        body.push_str(&line);
    }
    let t = Instant::now();
    c.send(body.as_bytes())?;
    c.expect(".", 250)?;
    Ok(t.elapsed())
}

/// Waits until both hosts of [`mx_pair`] (by their IPv6 addresses towards
/// the service) are clients of `server`'s port (`laddr=`: the TLS port of
/// a TLS-only one).
pub fn assert_hosts_are_clients(server: &tarpit_tests::redis::RedisProc) {
    // As Redis writes them: `[v6]:port`.
    let laddr = format!("laddr={}", server.addr);
    let mut list = String::new();
    let ok = tarpit_tests::wait::until(Duration::from_secs(5), || {
        list = server.cli(&["CLIENT", "LIST"]).unwrap_or_default();
        [1, 2].iter().all(|&n| {
            let from = format!(" addr=[{}]:", ServiceNet::host_v6(n));
            list.lines()
                .any(|l| l.contains(&from) && l.contains(&laddr))
        })
    });
    assert!(ok, "both hosts not clients of {laddr}: {list}");
}

/// A TLS-only Redis server: its plain port is off (`port 0`).
pub fn assert_no_plain_port(server: &tarpit_tests::redis::RedisProc) {
    let port = server.cli(&["CONFIG", "GET", "port"]).unwrap_or_default();
    assert_eq!(
        port.lines().collect::<Vec<_>>(),
        ["port", "0"],
        "a plain port is open at {}",
        server.addr
    );
}
