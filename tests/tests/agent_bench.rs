//! Measurements, not assertions (run with `--ignored --nocapture`):
//! legitimate mail throughput through the agent with every delay at 0
//! against the same Postfix directly, and the agent's resident memory per
//! session held in the greeting delay.
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tarpit_tests::smtp_client::{agent_config, agent_v4, proxy_backend};
use tarpit_tests::{Agent, CLIENT_V4, PinDir, Postfix, SERVER_V4, TestNet, require_root};

fn smtp_source(net: &TestNet, target: SocketAddr, messages: u32) -> Duration {
    let t = Instant::now();
    let out = net
        .client_cmd("smtp-source")
        .args([
            "-s",
            "20",
            "-m",
            &messages.to_string(),
            "-f",
            "bench@client.example",
        ])
        .args(["-t", "sink@discard.test", &target.to_string()])
        .output()
        .expect("smtp-source");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn throughput_with_zero_delays_vs_postfix_direct() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let _agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            "[greeting]\ndelay = \"0s\"\n[rcpt]\ndelay = \"0s\"\n[blacklist]\ndelay = \"0s\"\n[limits]\nper_ip = 1000\n",
        ),
    )
    .unwrap();
    let direct_addr = SocketAddr::from((SERVER_V4, tarpit_tests::postfix::PLAIN));
    let n = 2000;
    // warm-up, then alternate to share the noise
    smtp_source(&net, direct_addr, 200);
    smtp_source(&net, agent_v4(), 200);
    let mut direct = Duration::ZERO;
    let mut agent = Duration::ZERO;
    for _ in 0..3 {
        direct += smtp_source(&net, direct_addr, n);
        agent += smtp_source(&net, agent_v4(), n);
    }
    let rate = |d: Duration| f64::from(3 * n) / d.as_secs_f64();
    println!(
        "BENCH throughput: Postfix direct {:.0} msg/s, through the agent {:.0} msg/s, ratio {:.2}",
        rate(direct),
        rate(agent),
        direct.as_secs_f64() / agent.as_secs_f64()
    );
    drop(pf);
}

#[test]
#[ignore = "benchmark: run by hand with --ignored --nocapture"]
fn memory_per_session_in_the_greeting_delay() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _pf = Postfix::start(&net).unwrap();
    let agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            "[greeting]\ndelay = \"120s\"\n[limits]\nper_ip = 20000\nsessions = 20000\n",
        ),
    )
    .unwrap();
    let pid = agent.pid().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);
    let n = 10_000;
    let conns: Vec<TcpStream> = net
        .in_client(|| {
            (0..n)
                .map(|_| {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    s.bind(&SocketAddr::from((CLIENT_V4, 0)).into()).unwrap();
                    s.connect(&agent_v4().into()).unwrap();
                    s.into()
                })
                .collect()
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(pid);
    println!(
        "BENCH memory: {n} sessions in the greeting delay: RSS {before} KiB -> {after} KiB, {:.2} KiB per session",
        (after.saturating_sub(before)) as f64 / f64::from(n)
    );
    drop(conns);
}
