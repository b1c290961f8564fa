//! Trusted clients straight to the MTA (sk_lookup), and fail-open.
//!
//! The MTA's plain loopback listeners (Postfix's 2525 on 127.0.0.1 and
//! ::1) are taken from its process with pidfd_getfd(2) and put into the
//! steering sockmap. An allow-listed client's connection to the agent's
//! port reaches Postfix directly: Postfix logs the real address on its
//! plain smtpd (no PROXY), and the agent's session counter does not move.
//! Removed from the allow list, the client goes through the agent again.
//! With the agent killed (-9), every client reaches Postfix and can send;
//! a restarted agent takes the traffic back. IPv4 and IPv6.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Attempt, agent_for, attempt, cli, eventually, maps, metric_sum};
use tarpit::kernel::{BlockSpec, SteerMaps};
use tarpit_common::BlockReason;
use tarpit_tests::smtp_client::{SmtpClient, message};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

/// The agent's greeting delay: what a client going through it waits.
/// Long enough that a direct banner (no delay) stays well under it even
/// in software-emulated qemu on a busy box (2.6 s seen with 2 s).
const GREETING: Duration = Duration::from_secs(5);
const BANNER: &str = "220 mx.tarpit.test ESMTP test\r\n";

fn rest(allow: &[IpAddr]) -> String {
    let allow: Vec<String> = allow
        .iter()
        .map(|a| {
            let bits = if a.is_ipv4() { 32 } else { 128 };
            format!("\"{a}/{bits}\"")
        })
        .collect();
    format!(
        "[greeting]\ndelay = \"5s\"\n[allow]\nips = [{}]\n[bypass]\nenabled = true\n\
         mta_listeners = [\"127.0.0.1:2525\", \"[::1]:2525\"]\n",
        allow.join(", ")
    )
}

/// Connects and reads the banner: (banner text, how long it took).
fn banner(net: &TestNet, src: IpAddr) -> (SmtpClient, String, Duration) {
    let t = Instant::now();
    let mut c = SmtpClient::connect(net, src, agent_for(src)).unwrap();
    let r = c.reply().unwrap();
    assert_eq!(r.code, 220, "{}", r.text);
    (c, r.text, t.elapsed())
}

/// A line of Postfix's log from its plain smtpd (not `postfix/proxied`)
/// naming the client.
fn plain_smtpd_saw(pf: &Postfix, src: IpAddr) -> bool {
    let needle = format!("connect from unknown[{src}]");
    pf.log()
        .lines()
        .any(|l| l.contains(" postfix/smtpd[") && l.contains(&needle))
}

fn sessions(net: &TestNet) -> f64 {
    metric_sum(net, "tarpit_sessions_total").unwrap_or(0.0)
        + metric_sum(net, "tarpit_sessions_active").unwrap_or(0.0)
}

fn send_mail(c: &mut SmtpClient, subject: &str) {
    c.expect("EHLO client.example", 250).unwrap();
    c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
    c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send(message(subject).as_bytes()).unwrap();
    c.expect(".", 250).unwrap();
    c.expect("QUIT", 221).unwrap();
}

#[test]
fn allow_listed_clients_reach_the_mta_directly_until_removed_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    let _state = common::StateFileGuard::new(&pins);
    let trusted = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    let cfg = |allow: &[IpAddr]| common::config(&net, &pins, None, true, &rest(allow));
    let agent = Agent::start(&net, &cfg(&trusted)).expect("agent");
    assert!(
        agent.log().contains("MTA listener 127.0.0.1:2525"),
        "{}",
        agent.log()
    );

    for src in trusted {
        let (mut c, text, took) = banner(&net, src);
        assert_eq!(text, BANNER);
        assert!(took < GREETING, "{src}: banner after {took:?}: not direct");
        send_mail(&mut c, &format!("direct from {src}"));
        assert!(
            pf.wait_log(
                &format!("connect from unknown[{src}]"),
                Duration::from_secs(10)
            ),
            "{}",
            pf.log()
        );
        assert!(
            plain_smtpd_saw(&pf, src),
            "{src}: not on the plain listener"
        );
    }
    assert!(pf.wait_delivered(2, Duration::from_secs(20)));
    let steer = SteerMaps::open(&pins.path).unwrap().counters().unwrap();
    assert_eq!(steer.allowed, 2, "{steer:?}");
    assert_eq!(sessions(&net), 0.0, "the agent saw a steered session");

    // A run-time entry (tarpit allow add) is steered too, and its removal
    // (tarpit allow del) sends the next connection through the agent.
    let extra: IpAddr = "198.51.100.40".parse().unwrap();
    net.add_client_addr(extra).unwrap();
    cli(&agent, &["allow", "add", "198.51.100.40/32"]);
    let (c, _, took) = banner(&net, extra);
    assert!(
        took < GREETING,
        "run-time allow entry not steered: {took:?}"
    );
    drop(c);
    cli(&agent, &["allow", "del", "198.51.100.40/32"]);
    let (mut c, _, took) = banner(&net, extra);
    assert!(took >= GREETING, "{took:?}: not through the agent");
    c.expect("QUIT", 221).unwrap();
    eventually("the agent counted the session", || sessions(&net) >= 1.0);

    // Dropped from allow.ips and reloaded (SIGHUP): the agent takes them
    // out of the kernel's list, and their next connections go through it.
    std::fs::write(&agent.config, cfg(&[])).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    for src in trusted {
        eventually(&format!("{src} left the kernel's allow list"), || {
            maps(&pins).allow_match(src).unwrap().is_none()
        });
        let (mut c, _, took) = banner(&net, src);
        assert!(took >= GREETING, "{src}: {took:?}: not through the agent");
        c.expect("QUIT", 221).unwrap();
    }
    let steer = SteerMaps::open(&pins.path).unwrap().counters().unwrap();
    assert!(steer.agent >= 3, "{steer:?}");
    assert_eq!(steer.allowed, 3, "{steer:?}");
    // The agent's /metrics shows the same counts (read at scrape time).
    let steered = |d: &str| {
        metric_sum(
            &net,
            &format!("tarpit_bypass_steered_total{{decision=\"{d}\"}}"),
        )
    };
    assert_eq!(steered("allowlisted"), Some(3.0));
    assert_eq!(steered("agent"), Some(steer.agent as f64));
    assert_eq!(steered("fail_open"), Some(0.0));
}

/// A client that authenticated (AUTH PLAIN through the agent, Dovecot
/// SASL behind Postfix) is steered straight to the MTA on its next
/// connection when `authenticated_once_per_day` is on; with it off it
/// goes through the agent and pays the HELO delay again.
#[test]
fn authenticated_clients_reach_the_mta_directly_when_once_per_day_is_on_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let dv = tarpit_tests::dovecot::Dovecot::start().expect("dovecot");
    let pf = Postfix::start_with(&net, &dv.postfix_main_cf()).expect("postfix");
    let cfg = |once: bool| {
        let rest = format!(
            "{}[helo]\ndelay = \"3s\"\nauthenticated_once_per_day = {once}\n",
            rest(&[])
        );
        common::config(&net, &pins, None, false, &rest)
    };
    let agent = Agent::start(&net, &cfg(true)).expect("agent");
    let users = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for src in users {
        let (mut c, _, took) = banner(&net, src);
        assert!(
            took >= GREETING,
            "{src}: first connection through the agent"
        );
        c.expect("EHLO client.example", 250).unwrap();
        let plain = tarpit_tests::dovecot::Dovecot::plain(
            tarpit_tests::dovecot::USER,
            tarpit_tests::dovecot::PASSWORD,
        );
        c.expect(&format!("AUTH PLAIN {plain}"), 235).unwrap();
        c.expect("QUIT", 221).unwrap();
    }
    for src in users {
        eventually("the address is in the AUTH map", || {
            maps(&pins).auth_get(src).unwrap().is_some()
        });
        let (mut c, text, took) = banner(&net, src);
        assert_eq!(text, BANNER);
        assert!(took < GREETING, "{src}: {took:?}: not steered");
        let (r, took) = c.cmd("EHLO client.example").unwrap();
        assert_eq!(r.code, 250);
        assert!(took < Duration::from_secs(2), "{src}: EHLO {took:?}");
        c.expect("QUIT", 221).unwrap();
        assert!(
            plain_smtpd_saw(&pf, src),
            "{src}: not on the plain listener"
        );
    }
    let steer = SteerMaps::open(&pins.path).unwrap().counters().unwrap();
    assert_eq!(steer.authenticated, 2, "{steer:?}");

    // Flag off: through the agent again, HELO delay included.
    agent.stop().expect("stop");
    let _agent = Agent::start(&net, &cfg(false)).expect("agent, flag off");
    for src in users {
        let (mut c, _, took) = banner(&net, src);
        assert!(
            took >= GREETING,
            "{src}: {took:?}: steered with the flag off"
        );
        let (_, took) = c.cmd("EHLO client.example").unwrap();
        assert!(took >= Duration::from_secs(3), "{src}: EHLO {took:?}");
        c.expect("QUIT", 221).unwrap();
    }
}

#[test]
fn a_killed_agent_fails_open_to_the_mta_and_a_restarted_one_takes_over_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    let blocked: IpAddr = "198.51.100.50".parse().unwrap();
    net.add_client_addr(blocked).unwrap();
    let cfg = common::config(&net, &pins, None, false, &rest(&[]));
    let mut agent = Agent::start(&net, &cfg).expect("agent");
    let clients = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for src in clients {
        let (mut c, _, took) = banner(&net, src);
        assert!(took >= GREETING, "{src}: {took:?}: agent not in the path");
        c.expect("QUIT", 221).unwrap();
    }
    maps(&pins)
        .block_add(
            format!("{blocked}/32").parse().unwrap(),
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap();

    // Its listeners leave the sockmap with the process.
    agent.kill9();
    for src in clients {
        let (mut c, text, took) = banner(&net, src);
        assert_eq!(text, BANNER, "{src}: the MTA answers");
        assert!(took < GREETING, "{src}: {took:?}");
        send_mail(&mut c, &format!("fail-open from {src}"));
        assert!(
            plain_smtpd_saw(&pf, src) || {
                pf.wait_log(
                    &format!("connect from unknown[{src}]"),
                    Duration::from_secs(5),
                );
                plain_smtpd_saw(&pf, src)
            }
        );
    }
    assert!(
        pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        pf.log()
    );
    // The block list still applies without the agent.
    assert_eq!(
        attempt(&net, blocked, agent_for(blocked), Duration::from_secs(2)),
        Attempt::TimedOut
    );
    let steer = SteerMaps::open(&pins.path).unwrap().counters().unwrap();
    assert!(steer.fail_open >= 2, "{steer:?}");

    // Back: the agent takes the traffic again; nothing else restarted.
    let _agent = Agent::start(&net, &cfg).expect("agent again");
    for src in clients {
        let (mut c, text, took) = banner(&net, src);
        assert_eq!(text, BANNER, "the MTA's banner, relayed");
        assert!(took >= GREETING, "{src}: {took:?}: not through the agent");
        c.expect("QUIT", 221).unwrap();
    }
    eventually("the agent counted both sessions", || sessions(&net) >= 2.0);
}
