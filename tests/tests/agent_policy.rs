//! Each tarpit policy, observed from a real client through the agent to
//! real Postfix: the delay lies between the configured value and that
//! value plus a slack, and clients the rules exempt see none.
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, message, metric, proxy_backend,
};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

/// Scheduling, Postfix and the veth take well under this.
const SLACK: Duration = Duration::from_millis(1500);

/// A second client address that tests put on allow or internal lists.
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

struct World {
    net: TestNet,
    _pins: PinDir,
    pf: Postfix,
    _agent: Agent,
}

fn world(rest: &str) -> World {
    let net = TestNet::new().expect("test network");
    net.add_client_addr(OTHER_V4.into())
        .expect("second address");
    let pins = PinDir::new().expect("pin dir");
    let pf = Postfix::start(&net).expect("postfix");
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    World {
        net,
        _pins: pins,
        pf,
        _agent: agent,
    }
}

#[track_caller]
fn assert_delay(what: &str, observed: Duration, configured: Duration) {
    assert!(
        observed >= configured && observed <= configured + SLACK,
        "{what}: observed {observed:?}, configured {configured:?} (+{SLACK:?} slack)"
    );
}

#[track_caller]
fn assert_no_delay(what: &str, observed: Duration) {
    assert!(
        observed < SLACK,
        "{what}: observed {observed:?}, expected none"
    );
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn connect(w: &World, src: IpAddr) -> SmtpClient {
    let dst = if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    };
    SmtpClient::connect(&w.net, src, dst).expect("connect")
}

#[test]
fn greeting_delay_then_the_mtas_banner_and_allowlisted_clients_skip_it() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"2s\"\n[allow]\nips = [\"198.51.100.3/32\"]\n");
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let t = Instant::now();
        let mut c = connect(&w, src);
        let banner = c.reply().unwrap();
        assert_delay(&format!("greeting {src}"), t.elapsed(), secs(2.0));
        assert_eq!(banner.text, "220 mx.tarpit.test ESMTP test\r\n");
        c.expect("QUIT", 221).unwrap();
    }
    let t = Instant::now();
    let mut c = connect(&w, OTHER_V4.into());
    c.reply().unwrap();
    assert_no_delay("allow-listed greeting", t.elapsed());
    assert_eq!(
        metric(&w.net, "tarpit_delays_total{reason=\"greeting\"}"),
        Some(2.0)
    );
}

#[test]
fn pre_greet_talk_gets_554_and_a_closed_connection_and_never_reaches_the_mta() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"3s\"\n");
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let t = Instant::now();
        let mut c = connect(&w, src);
        c.send(b"EHLO too-early.example\r\n").unwrap();
        let r = c.reply().unwrap();
        assert_eq!(r.text, "554 5.5.1 SMTP protocol violation\r\n");
        assert!(t.elapsed() < secs(3.0), "dropped before the delay ends");
        assert!(c.closed_within(Duration::from_secs(5)), "connection closed");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !w.pf.log().contains("connect from unknown[198.51.100.2]")
            && !w.pf.log().contains("connect from unknown[fd5b:1e00::2]"),
        "the MTA never saw them:\n{}",
        w.pf.log()
    );
    assert_eq!(metric(&w.net, "tarpit_pregreet_total"), Some(2.0));
    // A patient client is served.
    let mut c = connect(&w, CLIENT_V4.into());
    assert_eq!(c.reply().unwrap().code, 220);
}

#[test]
fn teaser_catches_clients_that_answer_the_first_line() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"2s\"\nteaser = \"mx.tarpit.test ESMTP\"\n");
    let t = Instant::now();
    let mut c = connect(&w, CLIENT_V4.into());
    // Bots read "220-" and talk: that is before the final "220 ".
    let first = c.line().unwrap();
    assert_eq!(first, "220-mx.tarpit.test ESMTP\r\n");
    assert!(t.elapsed() < secs(1.0));
    c.send(b"HELO bot\r\n").unwrap();
    let r = c.reply().unwrap();
    assert_eq!(r.code, 554, "{}", r.text);
    // A patient client gets the teaser and then the MTA's banner.
    let mut c = connect(&w, CLIENT_V6.into());
    let t = Instant::now();
    let banner = c.reply().unwrap();
    assert_delay("teaser greeting", t.elapsed(), secs(2.0));
    assert_eq!(
        banner.text,
        "220-mx.tarpit.test ESMTP\r\n220 mx.tarpit.test ESMTP test\r\n"
    );
    c.expect("EHLO ok.example", 250).unwrap();
}

#[test]
fn helo_delay_and_rcpt_tarpit_securitygateway_example() {
    if !require_root() {
        return;
    }
    let w = world(
        "[greeting]\ndelay = \"0s\"\n[helo]\ndelay = \"1s\"\n[rcpt]\nthreshold = 1\ndelay = \"1s\"\nscaling = 1.5\n",
    );
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let mut c = connect(&w, src);
        c.reply().unwrap();
        let (r, d) = c.cmd("EHLO client.example").unwrap();
        assert_eq!(r.code, 250);
        assert_delay("EHLO", d, secs(1.0));
        let (_, d) = c.cmd("MAIL FROM:<a@client.example>").unwrap();
        assert_no_delay("MAIL", d);
        // 1st RCPT free, then 1, 1.5, 2 s (SecurityGateway: 10/15/20 scaled down)
        for (i, want) in [0.0, 1.0, 1.5, 2.0].into_iter().enumerate() {
            let (r, d) = c.cmd(&format!("RCPT TO:<sink{i}@tarpit.test>")).unwrap();
            assert_eq!(r.code, 250);
            if want == 0.0 {
                assert_no_delay("RCPT within threshold", d);
            } else {
                assert_delay(&format!("RCPT {}", i + 1), d, secs(want));
            }
        }
        c.expect("QUIT", 221).unwrap();
    }
}

#[test]
fn total_delay_cap_ends_every_hold_of_the_session() {
    if !require_root() {
        return;
    }
    // 1 s greeting + 1 s EHLO leave 2 s of the 4 s budget: the 2nd RCPT
    // gets 2 s instead of 5, every later one nothing.
    let w = world(
        "[greeting]\ndelay = \"1s\"\n[helo]\ndelay = \"1s\"\n\
         [rcpt]\nthreshold = 1\ndelay = \"5s\"\nscaling = 1.0\n\
         [limits]\nmax_total_delay = \"4s\"\n",
    );
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let t = Instant::now();
        let mut c = connect(&w, src);
        c.reply().unwrap();
        assert_delay("greeting", t.elapsed(), secs(1.0));
        let (_, d) = c.cmd("EHLO client.example").unwrap();
        assert_delay("EHLO", d, secs(1.0));
        c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
        for (i, want) in [0.0, 2.0, 0.0, 0.0].into_iter().enumerate() {
            let (r, d) = c.cmd(&format!("RCPT TO:<sink{i}@tarpit.test>")).unwrap();
            assert_eq!(r.code, 250);
            if want == 0.0 {
                assert_no_delay(&format!("RCPT {} ({src})", i + 1), d);
            } else {
                assert_delay(&format!("RCPT {} ({src}), capped", i + 1), d, secs(want));
            }
        }
        c.expect("QUIT", 221).unwrap();
    }
}

#[test]
fn reject_delay_holds_the_mtas_5xx() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"0s\"\n[reject]\ndelay = \"2s\"\n");
    let mut c = connect(&w, CLIENT_V4.into());
    c.reply().unwrap();
    let (_, d) = c.cmd("EHLO client.example").unwrap();
    assert_no_delay("EHLO", d);
    c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    let (r, d) = c.cmd("RCPT TO:<unknown7@tarpit.test>").unwrap();
    assert_eq!(r.code, 550, "{}", r.text);
    assert!(r.text.contains("User unknown"));
    assert_delay("550 from the MTA", d, secs(2.0));
    let (r, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
    assert_eq!(r.code, 250);
    assert_no_delay("250", d);
    // The agent's own 5xx (a client XCLIENT) is held too.
    let (r, d) = c.cmd("XCLIENT ADDR=127.0.0.1").unwrap();
    assert_eq!(r.code, 550);
    assert_delay("agent's 550", d, secs(2.0));
}

#[test]
fn blacklist_delay_from_mail_from_on_with_callout_and_internal_exceptions() {
    if !require_root() {
        return;
    }
    let w = world(
        "[greeting]\ndelay = \"0s\"\n[blacklist]\ndelay = \"2s\"\nips = [\"198.51.100.0/24\", \"fd5b:1e00::/64\"]\n[allow]\ninternal = [\"198.51.100.3/32\"]\n",
    );
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let mut c = connect(&w, src);
        c.reply().unwrap();
        let (_, d) = c.cmd("EHLO client.example").unwrap();
        assert_no_delay("EHLO of a blacklisted client", d);
        let (r, d) = c.cmd("MAIL FROM:<spam@client.example>").unwrap();
        assert_eq!(r.code, 250);
        assert_delay("MAIL", d, secs(2.0));
        let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        assert_delay("RCPT", d, secs(2.0));
        let (r, d) = c.cmd("DATA").unwrap();
        assert_eq!(r.code, 354);
        assert_delay("DATA", d, secs(2.0));
        c.send(message("blacklisted").as_bytes()).unwrap();
        let (r, d) = c.cmd(".").unwrap();
        assert_eq!(r.code, 250);
        assert_delay("end of data", d, secs(2.0));
        // A callout probe (null sender) is not delayed.
        let (_, d) = c.cmd("MAIL FROM:<>").unwrap();
        assert_no_delay("MAIL FROM:<>", d);
        let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        assert_no_delay("RCPT of a callout", d);
        c.expect("RSET", 250).unwrap();
        let (_, d) = c
            .cmd("MAIL FROM:<double-bounce@mx.client.example>")
            .unwrap();
        assert_no_delay("Postfix double-bounce callout", d);
        c.expect("QUIT", 221).unwrap();
    }
    // The internal host inside the blacklisted range is never delayed.
    let mut c = connect(&w, OTHER_V4.into());
    c.reply().unwrap();
    c.expect("EHLO relay.internal", 250).unwrap();
    let (_, d) = c.cmd("MAIL FROM:<a@internal.example>").unwrap();
    assert_no_delay("internal MAIL", d);
    let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
    assert_no_delay("internal RCPT", d);
    assert!(w.pf.wait_delivered(2, Duration::from_secs(20)));
}

#[test]
fn master_switch_off_is_a_transparent_proxy() {
    if !require_root() {
        return;
    }
    let w = world(
        "enabled = false\n[greeting]\ndelay = \"3s\"\n[rcpt]\nthreshold = 0\ndelay = \"3s\"\n",
    );
    let t = Instant::now();
    let mut c = connect(&w, CLIENT_V4.into());
    c.reply().unwrap();
    assert_no_delay("greeting with the switch off", t.elapsed());
    c.expect("EHLO client.example", 250).unwrap();
    c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
    assert_no_delay("RCPT with the switch off", d);
}

#[test]
fn limits_per_ip_line_length_and_idle() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"0s\"\n[limits]\nper_ip = 2\nline = 512\nidle = \"2s\"\n");
    let mut a = connect(&w, CLIENT_V4.into());
    let mut b = connect(&w, CLIENT_V4.into());
    a.reply().unwrap();
    b.reply().unwrap();
    let mut third = connect(&w, CLIENT_V4.into());
    let r = third.reply().unwrap();
    assert_eq!(r.text, "421 4.7.0 Too many connections\r\n");
    assert!(third.closed_within(Duration::from_secs(5)));
    // Another address is not affected.
    let mut v6 = connect(&w, CLIENT_V6.into());
    assert_eq!(v6.reply().unwrap().code, 220);
    // An over-long line gets 500 5.5.2 and the session goes on.
    let long = format!("EHLO {}", "x".repeat(600));
    let (r, _) = a.cmd(&long).unwrap();
    assert_eq!(r.code, 500, "{}", r.text);
    assert!(r.text.starts_with("500 5.5.2"), "{}", r.text);
    a.expect("EHLO client.example", 250).unwrap();
    // Idle: 421 4.4.2 after 2 s of silence.
    // (timed from before the connection: the agent's clock starts once
    // the banner is out)
    let t = Instant::now();
    let mut idle = connect(&w, CLIENT_V6.into());
    idle.reply().unwrap();
    let r = idle.reply().unwrap();
    assert!(r.text.starts_with("421 4.4.2"), "{}", r.text);
    assert_delay("idle timeout", t.elapsed(), secs(2.0));
    assert!(idle.closed_within(Duration::from_secs(5)));
    drop(b);
    assert!(metric(&w.net, "tarpit_limit_refusals_total{limit=\"per_ip\"}") >= Some(1.0));
}

#[test]
fn total_session_limit_gets_421_at_once() {
    if !require_root() {
        return;
    }
    let w = world("[greeting]\ndelay = \"10s\"\n[limits]\nsessions = 2\n");
    // two sessions held in the greeting delay fill the agent
    let _a = connect(&w, CLIENT_V4.into());
    let _b = connect(&w, CLIENT_V6.into());
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut c = connect(&w, OTHER_V4.into());
    let r = c.reply().unwrap();
    assert!(r.text.starts_with("421 4.3.2"), "{}", r.text);
    assert_no_delay("refusal", t.elapsed());
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_eq!(
        metric(&w.net, "tarpit_limit_refusals_total{limit=\"sessions\"}"),
        Some(1.0)
    );
}
