//! The agent in front of real Postfix: mail goes through exactly once, the
//! MTA sees the real client address (and so still refuses relaying), and a
//! dying MTA never costs a message.
use std::net::IpAddr;
use std::time::Duration;

use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, kill_postfix, message, metric, proxy_backend,
    unix_backend,
};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

/// Greeting delay off: these tests are about relaying.
const NO_DELAYS: &str = "[greeting]\ndelay = \"0s\"\n";

struct World {
    net: TestNet,
    _pins: PinDir,
    pf: Postfix,
    agent: Agent,
}

fn world(backend: &str, rest: &str) -> World {
    world_for(|_| backend.to_string(), rest)
}

/// [`world`] with a `[backend]` that depends on the instance (its Unix
/// socket's path).
fn world_for(backend: impl FnOnce(&Postfix) -> String, rest: &str) -> World {
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let pf = Postfix::start(&net).expect("postfix");
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend(&pf), rest)).expect("agent");
    World {
        net,
        _pins: pins,
        pf,
        agent,
    }
}

/// One message from each family's client through the agent: Postfix logs
/// each client's own address and delivers each message exactly once.
/// Returns the banners the clients got.
fn one_message_per_family(w: &World, subject: &str) -> Vec<String> {
    let mut banners = Vec::new();
    for (src, dst) in [
        (IpAddr::from(CLIENT_V4), agent_v4()),
        (IpAddr::from(CLIENT_V6), agent_v6()),
    ] {
        let mut c = SmtpClient::connect(&w.net, src, dst).unwrap();
        banners.push(c.reply().unwrap().text);
        send_one(&mut c, "sink@tarpit.test", &format!("{subject} {src}"));
        c.expect("QUIT", 221).unwrap();
        assert!(
            w.pf.wait_log(
                &format!("connect from unknown[{src}]"),
                Duration::from_secs(10)
            ),
            "Postfix did not see {src}:\n{}",
            w.pf.log()
        );
    }
    assert!(
        w.pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.pf.delivered(), 2, "exactly once each");
    banners
}

fn send_one(c: &mut SmtpClient, rcpt: &str, subject: &str) {
    c.expect("EHLO client.example", 250).unwrap();
    c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send(message(subject).as_bytes()).unwrap();
    c.expect(".", 250).unwrap();
}

#[test]
fn a_message_arrives_exactly_once_with_the_real_client_address_v4_and_v6() {
    if !require_root() {
        return;
    }
    let w = world(&proxy_backend(), NO_DELAYS);
    for banner in one_message_per_family(&w, "via") {
        // The banner is the MTA's, relayed.
        assert_eq!(banner, "220 mx.tarpit.test ESMTP test\r\n");
    }
    assert_eq!(
        metric(&w.net, "tarpit_sessions_total{outcome=\"quit\"}"),
        Some(2.0)
    );
    drop(w.agent);
}

/// `backend.addr = "unix:/path"`: the same relay over Postfix's Unix
/// socket (no second TCP connection); the MTA still sees each client's own
/// address, from the PROXY header, and still refuses to relay for it.
#[test]
fn a_unix_socket_backend_carries_mail_once_with_the_real_client_address_v4_and_v6() {
    if !require_root() {
        return;
    }
    let w = world_for(unix_backend, NO_DELAYS);
    one_message_per_family(&w, "over unix from");
    let log = w.pf.log();
    let unix_connects: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("postfix/unixproxy/smtpd") && l.contains("]: connect from"))
        .collect();
    // The probe announces itself as not relayed (PROXY LOCAL); every
    // relayed session carries its client's address.
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        assert_eq!(
            unix_connects
                .iter()
                .filter(|l| l.contains(&format!("unknown[{src}]")))
                .count(),
            1,
            "{log}"
        );
    }
    assert!(
        !log.contains("postfix/proxied/smtpd"),
        "the TCP listener was used:\n{log}"
    );
    drop(w.agent);
}

#[test]
fn relaying_stays_refused_for_the_real_client_proxy_v1_v2_and_xclient() {
    if !require_root() {
        return;
    }
    let backends: [fn(&Postfix) -> String; 5] = [
        |_| proxy_backend(),
        |_| "[backend]\naddr = \"127.0.0.1:2535\"\nclient_address = \"proxy-v1\"\n".to_string(),
        |_| "[backend]\naddr = \"127.0.0.1:2545\"\nclient_address = \"xclient\"\n".to_string(),
        unix_backend,
        |pf| unix_backend(pf).replace("proxy-v2", "proxy-v1"),
    ];
    for backend in backends {
        let mut shown = String::new();
        let w = world_for(
            |pf| {
                shown = backend(pf);
                shown.clone()
            },
            NO_DELAYS,
        );
        let backend = shown;
        for (src, dst) in [
            (IpAddr::from(CLIENT_V4), agent_v4()),
            (IpAddr::from(CLIENT_V6), agent_v6()),
        ] {
            let mut c = SmtpClient::connect(&w.net, src, dst).unwrap();
            assert_eq!(c.reply().unwrap().code, 220);
            c.expect("EHLO client.example", 250).unwrap();
            c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
            let (r, _) = c.cmd("RCPT TO:<victim@elsewhere.example>").unwrap();
            assert_eq!(r.code, 554, "{backend}: relay must be refused: {}", r.text);
            assert!(r.text.contains("Relay access denied"), "{}", r.text);
            let needle = format!("reject: RCPT from unknown[{src}]");
            assert!(
                w.pf.wait_log(&needle, Duration::from_secs(10)),
                "{backend}: Postfix log lacks {needle:?}:\n{}",
                w.pf.log()
            );
            c.expect("QUIT", 221).unwrap();
        }
        assert!(
            !w.pf.log().contains("unknown[127.0.0.1]: 554"),
            "a client looked local"
        );
    }
}

#[test]
fn xclient_is_not_accepted_from_clients() {
    if !require_root() {
        return;
    }
    let w = world(
        "[backend]\naddr = \"127.0.0.1:2545\"\nclient_address = \"xclient\"\n",
        NO_DELAYS,
    );
    let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
    c.reply().unwrap();
    let ehlo = c.expect("EHLO client.example", 250).unwrap();
    assert!(!ehlo.text.contains("XCLIENT"), "{}", ehlo.text);
    let (r, _) = c.cmd("XCLIENT ADDR=127.0.0.1").unwrap();
    assert_eq!(r.code, 550, "{}", r.text);
    c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    let (r, _) = c.cmd("RCPT TO:<victim@elsewhere.example>").unwrap();
    assert_eq!(r.code, 554);
}

#[test]
fn mta_killed_mid_data_gives_4xx_and_no_message() {
    if !require_root() {
        return;
    }
    let w = world(&proxy_backend(), NO_DELAYS);
    let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
    c.reply().unwrap();
    c.expect("EHLO client.example", 250).unwrap();
    c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
    c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send(b"Subject: half\r\n\r\nfirst half\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    kill_postfix(&w.net);
    std::thread::sleep(Duration::from_millis(300));
    c.send(b"second half\r\n.\r\n").unwrap();
    let r = c.reply().unwrap();
    assert!(
        (400..500).contains(&r.code),
        "expected a 4xx, got {}",
        r.text
    );
    assert!(c.closed_within(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.pf.delivered(), 0, "no message may exist");
}

/// A 421 at the banner when the MTA is connected there (`at-connect`), or
/// when the agent has never reached it (at-transaction before any probe
/// succeeded: it has no banner of the MTA's to speak).
#[test]
fn mta_down_gives_421_at_the_banner() {
    if !require_root() {
        return;
    }
    for mode in ["at-connect", "at-transaction"] {
        // Nothing listens on 2599.
        let w = world(
            &format!(
                "[backend]\naddr = \"127.0.0.1:2599\"\nconnect_timeout = \"2s\"\nconnect = \"{mode}\"\n"
            ),
            NO_DELAYS,
        );
        let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
        let r = c.reply().unwrap();
        assert_eq!(r.code, 421, "{mode}: {}", r.text);
        assert!(c.closed_within(Duration::from_secs(5)), "{mode}");
        assert_eq!(
            metric(&w.net, "tarpit_backend_errors_total{kind=\"connect\"}"),
            Some(1.0),
            "{mode}"
        );
    }
}

/// The default (`at-transaction`), with an MTA that went down after the
/// probe learned it: the agent greets and answers EHLO itself, and MAIL,
/// the first command that needs the MTA, gets the 421; the session ends.
#[test]
fn mta_down_after_the_probe_gives_421_at_mail() {
    if !require_root() {
        return;
    }
    let w = world(&proxy_backend(), NO_DELAYS);
    assert!(
        tarpit_tests::wait::until(Duration::from_secs(20), || w
            .agent
            .log()
            .contains("learned the MTA's banner")),
        "no probe:\n{}",
        w.agent.log()
    );
    kill_postfix(&w.net);
    let mta = std::net::SocketAddr::from(([127, 0, 0, 1], tarpit_tests::postfix::PROXY));
    assert!(
        tarpit_tests::wait::until(Duration::from_secs(10), || !w.pf.accepts(mta)),
        "Postfix still accepts"
    );
    let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
    let r = c.reply().unwrap();
    assert_eq!(r.code, 220, "the agent's own banner: {}", r.text);
    c.expect("EHLO client.example", 250).unwrap();
    let (r, _) = c.cmd("MAIL FROM:<sender@client.example>").unwrap();
    assert_eq!(r.code, 421, "{}", r.text);
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_eq!(
        metric(&w.net, "tarpit_backend_errors_total{kind=\"connect\"}"),
        Some(1.0)
    );
}

#[test]
fn pipelining_and_chunking_reach_the_mta_in_order() {
    if !require_root() {
        return;
    }
    let w = world(&proxy_backend(), NO_DELAYS);
    let mut c = SmtpClient::connect(&w.net, CLIENT_V6.into(), agent_v6()).unwrap();
    c.reply().unwrap();
    let ehlo = c.expect("EHLO client.example", 250).unwrap();
    assert!(ehlo.text.contains("PIPELINING") && ehlo.text.contains("CHUNKING"));
    // One write: MAIL, three RCPTs (one unknown), BDAT with its chunk.
    let body = message("chunked");
    let batch = format!(
        "MAIL FROM:<sender@client.example> BODY=8BITMIME\r\nRCPT TO:<sink@tarpit.test>\r\nRCPT TO:<unknown1@tarpit.test>\r\nRCPT TO:<sink2@tarpit.test>\r\nBDAT {} LAST\r\n{}",
        body.len(),
        body
    );
    c.send(batch.as_bytes()).unwrap();
    let codes: Vec<u16> = (0..5).map(|_| c.reply().unwrap().code).collect();
    assert_eq!(codes, vec![250, 250, 550, 250, 250]);
    // A second transaction, pipelined with QUIT.
    c.send(b"RSET\r\nMAIL FROM:<>\r\nRCPT TO:<sink@tarpit.test>\r\nDATA\r\n")
        .unwrap();
    let codes: Vec<u16> = (0..4).map(|_| c.reply().unwrap().code).collect();
    assert_eq!(codes, vec![250, 250, 250, 354]);
    c.send(format!("{}.\r\nQUIT\r\n", message("second")).as_bytes())
        .unwrap();
    assert_eq!(c.reply().unwrap().code, 250);
    assert_eq!(c.reply().unwrap().code, 221);
    // two recipients of the first message + one of the second, each once
    assert!(
        w.pf.wait_delivered(3, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.pf.delivered(), 3);
}

#[test]
fn swaks_through_the_agent() {
    if !require_root() {
        return;
    }
    let w = world(&proxy_backend(), NO_DELAYS);
    for (flag, server) in [
        ("-4", agent_v4().to_string()),
        ("-6", agent_v6().to_string()),
    ] {
        let (host, port) = server.rsplit_once(':').unwrap();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let out = w
            .net
            .client_cmd("swaks")
            .args([
                flag,
                "--server",
                host,
                "--port",
                port,
                "--to",
                "sink@tarpit.test",
                "--from",
                "swaks@client.example",
                "--pipeline",
                "--timeout",
                "20",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "swaks {flag}: {text}");
        assert!(text.contains("250 2.0.0 Ok: queued"), "{text}");
    }
    assert!(w.pf.wait_delivered(2, Duration::from_secs(20)));
}
