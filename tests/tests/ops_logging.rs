//! Under a flood of bad sessions the log stays within its rate limit and
//! says how many lines it dropped; the agent's own lines are never lost.
mod ops_common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ops_common::{World, sample, scrape};
use socket2::{Domain, Socket, Type};
use tarpit_tests::require_root;
use tarpit_tests::smtp_client::{agent_v4, agent_v6};

const RATE: u64 = 10;
/// Sessions per source address: below the offender threshold (3 pre-greet
/// strikes), so no address gets blocked and every session is a bad one.
const PER_ADDR: usize = 2;
const ADDRS: u8 = 100;

/// Connects from `src`, talks before the banner, reads until the close.
fn bad_session(src: IpAddr, dst: SocketAddr) -> bool {
    let domain = if src.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let Ok(s) = Socket::new(domain, Type::STREAM, None) else {
        return false;
    };
    if s.bind(&SocketAddr::new(src, 0).into()).is_err()
        || s.connect_timeout(&dst.into(), Duration::from_secs(2))
            .is_err()
    {
        return false;
    }
    let mut s: std::net::TcpStream = s.into();
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(b"EHLO bot.example\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"554")
}

#[test]
fn flood_of_bad_sessions_stays_within_the_log_rate_limit() {
    if !require_root() {
        return;
    }
    let w = World::new(&format!(
        "[greeting]\ndelay = \"5s\"\n[log]\nformat = \"json\"\nrate_limit = {RATE}\n"
    ));
    let mut sources = Vec::new();
    for i in 0..ADDRS {
        let v4 = IpAddr::from(Ipv4Addr::new(198, 51, 100, 100 + i));
        let v6 = IpAddr::from(Ipv6Addr::new(
            0xfd5b,
            0x1e00,
            0,
            0,
            0,
            0,
            0,
            0x100 + u16::from(i),
        ));
        w.net.add_client_addr(v4).unwrap();
        w.net.add_client_addr(v6).unwrap();
        sources.push((v4, agent_v4()));
        sources.push((v6, agent_v6()));
    }
    let start = Instant::now();
    // 8 threads, each its share of the sources, every source PER_ADDR times
    let chunks: Vec<Vec<(IpAddr, SocketAddr)>> = sources
        .chunks(sources.len() / 8)
        .map(<[_]>::to_vec)
        .collect();
    let dropped_554: usize = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let net = &w.net;
                s.spawn(move || {
                    net.in_client(|| {
                        let mut n = 0;
                        for _ in 0..PER_ADDR {
                            for (src, dst) in &chunk {
                                n += usize::from(bad_session(*src, *dst));
                            }
                        }
                        n
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let flood = start.elapsed();
    let sessions = sources.len() * PER_ADDR;
    assert!(
        dropped_554 * 10 >= sessions * 9,
        "only {dropped_554} of {sessions} got 554"
    );
    // the drop notices go out at most once a second: let the last one out
    std::thread::sleep(Duration::from_millis(2500));

    let log = w.agent().log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(lines.len() > 5, "JSON log lines:\n{log}");
    let target = |v: &serde_json::Value| v["target"].as_str().unwrap_or("").to_string();
    let exempt = |t: &str| {
        [
            "tarpit::ops",
            "tarpit::run",
            "tarpit::config",
            "tarpit::cli",
            "tarpit::logging",
        ]
        .iter()
        .any(|e| t == *e || t.starts_with(&format!("{e}::")))
    };
    let limited: Vec<&serde_json::Value> = lines.iter().filter(|v| !exempt(&target(v))).collect();
    let notices: Vec<u64> = lines
        .iter()
        .filter(|v| target(v) == "tarpit::logging")
        .filter_map(|v| v["fields"]["dropped"].as_u64())
        .collect();
    let dropped: u64 = notices.iter().sum();
    let session_lines = lines
        .iter()
        .filter(|v| target(v) == "tarpit::session")
        .count() as u64;
    eprintln!(
        "{sessions} bad sessions in {flood:?}: {} rate-limited lines written, {dropped} dropped in {} notices",
        limited.len(),
        notices.len()
    );
    // Within the limit: the burst (RATE) plus RATE a second over the whole
    // run of the agent so far (start-up included).
    let window = (start.elapsed() + Duration::from_secs(40)).as_secs();
    assert!(
        (limited.len() as u64) <= RATE + RATE * window,
        "{} limited lines in a {window}s window",
        limited.len()
    );
    // ... and tighter: the flood itself could write at most its own share
    let during = (flood.as_secs_f64().ceil() as u64 + 3) * RATE + RATE;
    assert!(
        session_lines <= during,
        "{session_lines} session lines during a {flood:?} flood"
    );
    assert!(
        !notices.is_empty() && dropped > 0,
        "no drop notice in:\n{log}"
    );
    // every pre-greet session would have logged at least one line
    assert!(
        session_lines + dropped >= dropped_554 as u64,
        "{session_lines} written + {dropped} dropped < {dropped_554} sessions"
    );
    // the metric counts the same drops the notices reported
    let text = scrape(&w.net);
    assert_eq!(
        sample(&text, "tarpit_log_lines_dropped_total"),
        Some(dropped as f64),
        "{text}"
    );
    // life-cycle lines are never dropped: the ready line is there, and a
    // reload right after the flood is logged
    assert!(log.contains("tarpit agent running"));
    w.agent().signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(w.wait_log_count("configuration reloaded", 1, Duration::from_secs(10)));
}

/// `[log]` changes live: a reload switches JSON to human lines and a
/// stricter level silences the per-session summary lines. (RUST_LOG would
/// win over `log.level`: the agent runs without it here.)
#[test]
fn log_format_and_level_change_on_reload() {
    if !require_root() {
        return;
    }
    let net = tarpit_tests::TestNet::new().expect("test network");
    let pins = tarpit_tests::PinDir::new().expect("pin dir");
    let pf = tarpit_tests::Postfix::start(&net).expect("postfix");
    let conf = |rest: &str| ops_common::config(&net, &pins, rest);
    let mut agent = ops_common::OwnAgent::start(
        &net,
        &conf("[greeting]\ndelay = \"0s\"\n[log]\nformat = \"json\"\n"),
        &[],
        true,
    );
    let src = IpAddr::from(tarpit_tests::CLIENT_V4);
    assert!(ops_common::send_message(&net, src, agent_v4(), 1, "json").unwrap());
    let summary_json = |log: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tarpit::session" && v["fields"]["message"] == "session")
            .count()
    };
    let end = Instant::now() + Duration::from_secs(10);
    while summary_json(&agent.log()) < 1 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(summary_json(&agent.log()), 1, "{}", agent.log());

    std::fs::write(
        &agent.config,
        conf("[greeting]\ndelay = \"0s\"\n[log]\nformat = \"human\"\nlevel = \"warn,tarpit::ops=info\"\n"),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(agent.wait_log_count("configuration reloaded", 1, Duration::from_secs(10)));
    let log = agent.log();
    let reloaded = log
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(
        reloaded.contains(" INFO tarpit::ops::reload: configuration reloaded"),
        "a human line after the reload: {reloaded}"
    );
    let before = log.lines().count();
    assert!(ops_common::send_message(&net, src, agent_v4(), 1, "quiet").unwrap());
    std::thread::sleep(Duration::from_secs(1));
    let log = agent.log();
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert!(
        !new.iter().any(|l| l.contains("tarpit::session")),
        "INFO session lines after level = warn: {new:#?}"
    );
    assert!(pf.wait_delivered(2, Duration::from_secs(20)));
    assert!(agent.stop().success());
}
