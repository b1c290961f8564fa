//! `[protocol]`: postscreen's after-greeting tests, inline and without a
//! reconnect, in front of real Postfix, with `backend.connect =
//! "at-transaction"` and `"at-connect"`. For each test a client that trips
//! it (554, closed, counted; at-transaction: never seen by Postfix) and one
//! that does not (its mail arrives), IPv4 and IPv6.
use std::net::IpAddr;
use std::time::Duration;

use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, message, metric, proxy_backend,
};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root, wait};

struct World {
    net: TestNet,
    _pins: PinDir,
    pf: Postfix,
    _agent: Agent,
}

fn world(protocol: &str, lazy: bool) -> World {
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let mode = if lazy { "at-transaction" } else { "at-connect" };
    let backend = format!("{}connect = \"{mode}\"\n", proxy_backend());
    let rest = format!("[greeting]\ndelay = \"0s\"\n[protocol]\n{protocol}");
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, &rest)).unwrap();
    assert!(
        !lazy
            || wait::until(Duration::from_secs(20), || agent
                .log()
                .contains("learned the MTA's banner")),
        "{}",
        agent.log()
    );
    World {
        net,
        _pins: pins,
        pf,
        _agent: agent,
    }
}

fn families() -> [(IpAddr, std::net::SocketAddr); 2] {
    [
        (IpAddr::from(CLIENT_V4), agent_v4()),
        (IpAddr::from(CLIENT_V6), agent_v6()),
    ]
}

/// Sends `bytes` and expects, after any 250, the 554 and the close.
fn trips(w: &World, src: IpAddr, dst: std::net::SocketAddr, bytes: &[u8]) {
    let mut c = SmtpClient::connect(&w.net, src, dst).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    c.send(bytes).unwrap();
    let mut r = c.reply().unwrap();
    if r.code == 250 {
        r = c.reply().unwrap();
    }
    assert_eq!(r.text, "554 5.5.1 SMTP protocol violation\r\n");
    assert!(c.closed_within(Duration::from_secs(5)));
}

/// A well-behaved client: EHLO, then MAIL, RCPT, DATA pipelined (PIPELINING
/// was offered), one message.
fn passes(w: &World, src: IpAddr, dst: std::net::SocketAddr, subject: &str) {
    let mut c = SmtpClient::connect(&w.net, src, dst).unwrap();
    c.reply().unwrap();
    let ehlo = c.expect("EHLO client.example", 250).unwrap();
    assert!(ehlo.text.contains("PIPELINING"), "{}", ehlo.text);
    c.send(b"MAIL FROM:<sender@client.example>\r\nRCPT TO:<sink@tarpit.test>\r\nDATA\r\n")
        .unwrap();
    let codes: Vec<u16> = (0..3).map(|_| c.reply().unwrap().code).collect();
    assert_eq!(codes, vec![250, 250, 354]);
    c.send(message(subject).as_bytes()).unwrap();
    c.expect(".", 250).unwrap();
    c.expect("QUIT", 221).unwrap();
}

fn check(w: &World, test: &str, delivered: usize, lazy: bool) {
    assert!(
        w.pf.wait_delivered(delivered, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    assert_eq!(
        metric(
            &w.net,
            &format!("tarpit_protocol_tests_total{{test=\"{test}\",action=\"drop\"}}")
        ),
        Some(2.0)
    );
    let log = w.pf.log();
    assert!(
        !log.contains("bot@x.example"),
        "a tripper's MAIL reached Postfix: {log}"
    );
    // At-transaction only the two clients that sent mail reached Postfix;
    // at-connect the trippers did too (connected at the banner).
    let connects = log.matches(": connect from unknown[198.51.100.2]").count()
        + log.matches(": connect from unknown[fd5b:1e00::2]").count();
    assert_eq!(connects, if lazy { 2 } else { 4 }, "{log}");
}

#[test]
fn pipelining_before_the_ehlo_reply_is_dropped_a_client_that_waits_is_not() {
    if !require_root() {
        return;
    }
    for lazy in [true, false] {
        let w = world("pipelining = \"drop\"\n", lazy);
        for (src, dst) in families() {
            let bytes = b"EHLO tripper.example\r\nMAIL FROM:<bot@x.example>\r\n";
            trips(&w, src, dst, bytes);
            passes(&w, src, dst, "waited for EHLO");
        }
        check(&w, "pipelining", 2, lazy);
    }
}

#[test]
fn non_smtp_commands_are_dropped_smtp_is_not() {
    if !require_root() {
        return;
    }
    for lazy in [true, false] {
        let w = world("non_smtp = \"drop\"\n", lazy);
        for (src, dst) in families() {
            trips(&w, src, dst, b"CONNECT tripper.example:25 HTTP/1.0\r\n");
            passes(&w, src, dst, "smtp only");
        }
        check(&w, "non_smtp", 2, lazy);
    }
}

#[test]
fn bare_newlines_in_commands_are_dropped_crlf_is_not() {
    if !require_root() {
        return;
    }
    for lazy in [true, false] {
        let w = world("bare_newline = \"drop\"\n", lazy);
        for (src, dst) in families() {
            trips(
                &w,
                src,
                dst,
                b"EHLO tripper.example\nMAIL FROM:<bot@x.example>\r\n",
            );
            passes(&w, src, dst, "crlf");
        }
        check(&w, "bare_newline", 2, lazy);
    }
}
