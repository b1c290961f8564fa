//! `backend.connect = "at-transaction"` (the default) in front of real
//! Postfix: the agent speaks the banner and EHLO itself and connects Postfix
//! only when a client starts a transaction. Proved from Postfix's own log
//! and mailbox: a client that quits, is dropped or goes silent before MAIL never
//! appears there; one that sends mail is logged with its real address and
//! its HELO name, and its message arrives once. AUTH through Dovecot and
//! STARTTLS (terminated by the agent, or passed through to Postfix) work.
use std::net::IpAddr;
use std::time::Duration;

use tarpit_tests::dovecot::{Dovecot, PASSWORD, USER};
use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, message, metric, proxy_backend,
};
use tarpit_tests::tls_cert::make_cert;
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TempDir, TestNet,
    require_root, wait,
};

const LAZY: &str = "connect = \"at-transaction\"\n";
const NO_DELAYS: &str = "[greeting]\ndelay = \"0s\"\n";

/// `[backend]` for Postfix's PROXY listener, at-transaction.
fn lazy_backend() -> String {
    format!("{}{LAZY}", proxy_backend())
}

/// Starts the agent and waits until its probe has learned Postfix's
/// banner (until then sessions connect at once).
fn start_agent(net: &TestNet, pins: &PinDir, backend: &str, rest: &str) -> Agent {
    let agent = Agent::start(net, &agent_config(net, pins, backend, rest)).expect("agent");
    assert!(
        wait::until(Duration::from_secs(20), || agent
            .log()
            .contains("learned the MTA's banner")),
        "no probe:\n{}",
        agent.log()
    );
    agent
}

fn families() -> [(IpAddr, std::net::SocketAddr); 2] {
    [
        (IpAddr::from(CLIENT_V4), agent_v4()),
        (IpAddr::from(CLIENT_V6), agent_v6()),
    ]
}

/// Waits (Postfix logs through postlogd, a moment after it acts) until
/// `src` has `n` connects in the log; false if it never does.
fn connects_reach(pf: &Postfix, src: IpAddr, n: usize) -> bool {
    wait::until(Duration::from_secs(10), || connects_from(pf, src) >= n)
}

fn connects_from(pf: &Postfix, src: IpAddr) -> usize {
    pf.log()
        .matches(&format!(": connect from unknown[{src}]"))
        .count()
}

#[test]
fn only_clients_that_send_mail_reach_postfix_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let _agent = start_agent(&net, &pins, &lazy_backend(), NO_DELAYS);
    for (src, dst) in families() {
        // Quits after EHLO.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        let banner = c.reply().unwrap();
        assert_eq!(banner.text, "220 mx.tarpit.test ESMTP test\r\n");
        let ehlo = c.expect("EHLO quitter.example", 250).unwrap();
        assert!(ehlo.text.contains("PIPELINING"), "{}", ehlo.text);
        assert!(!ehlo.text.contains("XCLIENT"), "{}", ehlo.text);
        c.expect("NOOP", 250).unwrap();
        c.expect("RSET", 250).unwrap();
        c.expect("QUIT", 221).unwrap();
        // Dropped after EHLO.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        c.expect("EHLO dropped.example", 250).unwrap();
        drop(c);
        // Silent after the banner.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        drop(c);
        // Sends mail.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        c.expect("EHLO client.example", 250).unwrap();
        c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
        c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
        c.expect("DATA", 354).unwrap();
        c.send(message(&format!("lazy via {src}")).as_bytes())
            .unwrap();
        c.expect(".", 250).unwrap();
        c.expect("QUIT", 221).unwrap();
        assert!(
            pf.wait_log(
                &format!("connect from unknown[{src}]"),
                Duration::from_secs(10)
            ),
            "{}",
            pf.log()
        );
    }
    assert!(
        pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pf.delivered(), 2, "exactly once each");
    let log = pf.log();
    for (src, _) in families() {
        assert_eq!(connects_from(&pf, src), 1, "only the sender: {log}");
        let literal = match src {
            IpAddr::V4(_) => src.to_string(),
            IpAddr::V6(_) => format!("IPv6:{src}"),
        };
        assert!(
            pf.messages()
                .iter()
                .any(|m| m.contains(&format!("from client.example (unknown [{literal}])"))),
            "real address and HELO name of {src} in Received: {:?}",
            pf.messages()
        );
    }
    for name in ["quitter.example", "dropped.example"] {
        assert!(!log.contains(name), "{name} reached Postfix: {log}");
    }
    assert_eq!(metric(&net, "tarpit_mta_connects_total"), Some(2.0));
    assert_eq!(metric(&net, "tarpit_sessions_unreached_total"), Some(6.0));
}

#[test]
fn relaying_stays_refused_for_the_real_client_through_xclient() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let backend = format!(
        "[backend]\naddr = \"127.0.0.1:{}\"\nclient_address = \"xclient\"\n{LAZY}",
        tarpit_tests::postfix::XCLIENT
    );
    let _agent = start_agent(&net, &pins, &backend, NO_DELAYS);
    for (src, dst) in families() {
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        let ehlo = c.expect("EHLO client.example", 250).unwrap();
        assert!(!ehlo.text.contains("XCLIENT"), "{}", ehlo.text);
        c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
        let (r, _) = c.cmd("RCPT TO:<victim@elsewhere.example>").unwrap();
        assert_eq!(r.code, 554, "relay must be refused: {}", r.text);
        let needle = format!("reject: RCPT from unknown[{src}]");
        assert!(
            pf.wait_log(&needle, Duration::from_secs(10)),
            "{}",
            pf.log()
        );
        assert!(pf.log().contains("helo=<client.example>"), "{}", pf.log());
        c.expect("QUIT", 221).unwrap();
    }
}

#[test]
fn auth_through_dovecot_works() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let dv = Dovecot::start().unwrap();
    let pf = Postfix::start_with(&net, &dv.postfix_main_cf()).unwrap();
    let _agent = start_agent(&net, &pins, &lazy_backend(), NO_DELAYS);
    for (src, dst) in families() {
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        let ehlo = c.expect("EHLO client.example", 250).unwrap();
        assert!(ehlo.text.contains("AUTH"), "{}", ehlo.text);
        let (r, _) = c
            .cmd(&format!("AUTH PLAIN {}", Dovecot::plain(USER, PASSWORD)))
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text);
        c.expect("MAIL FROM:<alice@tarpit.test>", 250).unwrap();
        c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
        c.expect("QUIT", 221).unwrap();
        // A wrong password is the MTA's 535, as before.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        c.expect("EHLO control.example", 250).unwrap();
        let (r, _) = c
            .cmd(&format!("AUTH PLAIN {}", Dovecot::plain(USER, "wrong")))
            .unwrap();
        assert_eq!(r.code, 535, "{}", r.text);
        c.expect("QUIT", 221).unwrap();
        assert!(
            pf.wait_log(
                &format!("client=unknown[{src}], sasl_method=PLAIN, sasl_username={USER}"),
                Duration::from_secs(10)
            ),
            "{}",
            pf.log()
        );
    }
    drop(dv);
}

/// smtplib: EHLO, STARTTLS, EHLO, one message. One line per fact.
const TLS_CLIENT: &str = r#"
import smtplib, ssl, sys
host, src, subject = sys.argv[1:4]
s = smtplib.SMTP(host, 25, source_address=(src, 0), timeout=30)
s.ehlo("pre.example")
print("before", "starttls" in s.esmtp_features)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
code, _ = s.starttls(context=ctx)
print("starttls", code)
s.ehlo("client.example")
s.mail("tls@client.example")
s.rcpt("sink@tarpit.test")
code, _ = s.data(("Subject: %s\r\n\r\nover TLS\r\n" % subject).encode())
print("data", code)
s.quit()
"#;

fn tls_client(net: &TestNet, host: &str, src: &str, subject: &str) -> Vec<String> {
    let out = net
        .client_cmd("python3")
        .args(["-c", TLS_CLIENT, host, src, subject])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_string).collect()
}

#[test]
fn starttls_terminated_by_the_agent_and_passed_through() {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("lazytls");
    let (cert, key) = make_cert(&tmp.path, "mx.tarpit.test");
    let hosts = [
        (SERVER_V4.to_string(), CLIENT_V4.to_string()),
        (SERVER_V6.to_string(), CLIENT_V6.to_string()),
    ];
    // Terminated by the agent: Postfix never hears of STARTTLS or of
    // pre.example, only of the EHLO inside TLS and the transaction.
    {
        let net = TestNet::new().unwrap();
        let pins = PinDir::new().unwrap();
        let pf = Postfix::start(&net).unwrap();
        let rest = format!("{NO_DELAYS}[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
        let _agent = start_agent(&net, &pins, &lazy_backend(), &rest);
        for (host, src) in &hosts {
            let lines = tls_client(&net, host, src, "terminated");
            assert_eq!(lines, ["before True", "starttls 220", "data 250"]);
        }
        assert!(
            pf.wait_delivered(2, Duration::from_secs(20)),
            "{}",
            pf.log()
        );
        let log = pf.log();
        assert!(!log.contains("pre.example"), "{log}");
        assert!(!log.contains("STARTTLS"), "{log}");
    }
    // Passed through: the agent has no certificate, Postfix has one.
    {
        let net = TestNet::new().unwrap();
        let pins = PinDir::new().unwrap();
        let pf = Postfix::start_with(
            &net,
            &format!(
                "smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
            ),
        )
        .unwrap();
        let agent = start_agent(&net, &pins, &lazy_backend(), NO_DELAYS);
        for (host, src) in &hosts {
            let lines = tls_client(&net, host, src, "passed through");
            assert_eq!(lines, ["before True", "starttls 220", "data 250"]);
        }
        assert!(
            pf.wait_delivered(2, Duration::from_secs(20)),
            "{}",
            pf.log()
        );
        // Postfix's own STARTTLS, after the replayed EHLO, and a second
        // EHLO inside TLS.
        for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
            let needle = format!("disconnect from unknown[{src}] ehlo=2 starttls=1 mail=1");
            assert!(
                pf.wait_log(&needle, Duration::from_secs(10)),
                "{}",
                pf.log()
            );
        }
        assert_eq!(
            metric(&net, "tarpit_starttls_passthrough_total"),
            Some(2.0),
            "{}",
            agent.log()
        );
    }
}

/// Raw STARTTLS with a command pipelined behind it in clear, then a
/// message inside TLS. One line per reply code.
const INJECTION: &str = r#"
import socket, ssl, sys
host, src = sys.argv[1:3]
s = socket.create_connection((host, 25), source_address=(src, 0), timeout=30)
f = s.makefile("rb")
def reply():
    first = None
    while True:
        l = f.readline()
        first = first or l
        if l[3:4] != b"-":
            return first[:3].decode()
def cmd(line):
    conn.sendall(line + b"\r\n")
    return reply()
print("banner", reply())
conn = s
print("ehlo", cmd(b"EHLO client.example"))
s.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
print("starttls", reply())
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
conn = ctx.wrap_socket(s, server_hostname="mx.tarpit.test")
f = conn.makefile("rb")
print("ehlo", cmd(b"EHLO client.example"))
print("mail", cmd(b"MAIL FROM:<good@client.example>"))
print("rcpt", cmd(b"RCPT TO:<sink@tarpit.test>"))
print("data", cmd(b"DATA"))
print("end", cmd(b"Subject: inside\r\n\r\nafter STARTTLS\r\n."))
print("quit", cmd(b"QUIT"))
"#;

#[test]
fn plaintext_pipelined_after_starttls_never_reaches_postfix() {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("lazyinject");
    let (cert, key) = make_cert(&tmp.path, "mx.tarpit.test");
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let rest = format!("{NO_DELAYS}[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
    let agent = start_agent(&net, &pins, &lazy_backend(), &rest);
    for (host, src) in [
        (SERVER_V4.to_string(), CLIENT_V4.to_string()),
        (SERVER_V6.to_string(), CLIENT_V6.to_string()),
    ] {
        let out = net
            .client_cmd("python3")
            .args(["-c", INJECTION, &host, &src])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "banner 220",
                "ehlo 250",
                "starttls 220",
                "ehlo 250",
                "mail 250",
                "rcpt 250",
                "data 354",
                "end 250",
                "quit 221"
            ]
        );
    }
    assert!(
        pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        pf.log()
    );
    assert!(!pf.log().contains("evil@x.example"), "{}", pf.log());
    assert!(
        agent
            .log()
            .contains("dropped bytes pipelined after STARTTLS"),
        "{}",
        agent.log()
    );
}

#[test]
fn max_sessions_makes_a_transaction_wait_for_a_slot_not_fail() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let backend = format!("{}max_sessions = 1\n", lazy_backend());
    let _agent = start_agent(&net, &pins, &backend, NO_DELAYS);
    let mut a = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    let mut b = SmtpClient::connect(&net, CLIENT_V6.into(), agent_v6()).unwrap();
    a.reply().unwrap();
    b.reply().unwrap();
    a.expect("EHLO a.example", 250).unwrap();
    b.expect("EHLO b.example", 250).unwrap();
    a.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    b.send(b"MAIL FROM:<b@client.example>\r\n").unwrap();
    assert!(
        wait::until(Duration::from_secs(10), || metric(
            &net,
            "tarpit_mta_waiting"
        ) == Some(1.0)),
        "b waits for the one MTA slot"
    );
    a.expect("QUIT", 221).unwrap();
    assert_eq!(b.reply().unwrap().code, 250);
    b.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    b.expect("QUIT", 221).unwrap();
    assert_eq!(metric(&net, "tarpit_mta_waiting"), Some(0.0));
    assert!(
        connects_reach(&pf, IpAddr::from(CLIENT_V6), 1),
        "{}",
        pf.log()
    );
}

#[test]
fn a_refusing_late_banner_from_postfix_answers_the_mail_command() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    // One connection per client address at a time: the second gets
    // Postfix's "421 4.7.0 ... too many connections" in place of a banner.
    let pf = Postfix::start_with(&net, "smtpd_client_connection_count_limit = 1\n").unwrap();
    let _agent = start_agent(&net, &pins, &lazy_backend(), NO_DELAYS);
    let mut a = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    let mut b = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    // Both were greeted by the agent.
    assert_eq!(a.reply().unwrap().code, 220);
    assert_eq!(b.reply().unwrap().code, 220);
    a.expect("EHLO a.example", 250).unwrap();
    b.expect("EHLO b.example", 250).unwrap();
    a.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    let (r, _) = b.cmd("MAIL FROM:<b@client.example>").unwrap();
    assert_eq!(r.code, 421, "{}", r.text);
    assert!(r.text.contains("too many connections"), "{}", r.text);
    assert!(b.closed_within(Duration::from_secs(5)));
    a.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    a.expect("QUIT", 221).unwrap();
    assert!(
        pf.wait_log(
            "Connection concurrency limit exceeded: 2 from unknown[198.51.100.2]",
            Duration::from_secs(10)
        ),
        "{}",
        pf.log()
    );
}

#[test]
fn a_reload_switches_new_sessions_to_at_transaction_and_keeps_those_in_flight() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let backend = format!("{}connect = \"at-connect\"\n", proxy_backend());
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, NO_DELAYS)).unwrap();
    // At-connect: the MTA greets, and a session stays open across the reload.
    let mut inflight = SmtpClient::connect(&net, CLIENT_V6.into(), agent_v6()).unwrap();
    inflight.reply().unwrap();
    inflight.expect("EHLO inflight.example", 250).unwrap();
    assert!(
        connects_reach(&pf, IpAddr::from(CLIENT_V6), 1),
        "{}",
        pf.log()
    );

    let backend = format!("{}banner = \"custom.tarpit.test ESMTP\"\n", lazy_backend());
    std::fs::write(
        &agent.config,
        agent_config(&net, &pins, &backend, NO_DELAYS),
    )
    .unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    assert!(
        wait::until(Duration::from_secs(20), || agent
            .log()
            .contains("learned the MTA's banner")),
        "{}",
        agent.log()
    );
    let mut c = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    assert_eq!(c.reply().unwrap().text, "220 custom.tarpit.test ESMTP\r\n");
    c.expect("EHLO quitter.example", 250).unwrap();
    c.expect("QUIT", 221).unwrap();

    inflight
        .expect("MAIL FROM:<sender@client.example>", 250)
        .unwrap();
    inflight.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    inflight.expect("QUIT", 221).unwrap();
    // (Postfix logs a moment after it acts: give a connect time to show.)
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        connects_from(&pf, IpAddr::from(CLIENT_V4)),
        0,
        "{}",
        pf.log()
    );
    assert_eq!(
        connects_from(&pf, IpAddr::from(CLIENT_V6)),
        1,
        "{}",
        pf.log()
    );
}

#[test]
fn a_blacklisted_client_reaches_postfix_only_after_its_mail_hold() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let rest = format!("{NO_DELAYS}[blacklist]\ndelay = \"3s\"\nips = [\"{CLIENT_V4}/32\"]\n");
    let _agent = start_agent(&net, &pins, &lazy_backend(), &rest);
    let mut c = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    c.reply().unwrap();
    c.expect("EHLO bot.example", 250).unwrap();
    c.send(b"MAIL FROM:<bot@client.example>\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        connects_from(&pf, IpAddr::from(CLIENT_V4)),
        0,
        "connected during the hold: {}",
        pf.log()
    );
    let (r, took) = c.timed_reply().unwrap();
    assert_eq!(r.code, 250, "{}", r.text);
    assert!(
        took >= Duration::from_millis(1000),
        "the MAIL reply came {took:?} after the check: the hold was cut short"
    );
    assert!(
        connects_reach(&pf, IpAddr::from(CLIENT_V4), 1),
        "{}",
        pf.log()
    );
    // A bot that leaves during the hold costs Postfix nothing.
    let mut c2 = SmtpClient::connect(&net, CLIENT_V4.into(), agent_v4()).unwrap();
    c2.reply().unwrap();
    c2.expect("EHLO bot.example", 250).unwrap();
    c2.send(b"MAIL FROM:<bot@client.example>\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(c2);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        connects_from(&pf, IpAddr::from(CLIENT_V4)),
        1,
        "{}",
        pf.log()
    );
}
