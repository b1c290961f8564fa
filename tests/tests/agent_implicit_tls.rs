//! Port 465 (implicit TLS) end to end, IPv4 and IPv6: with a certificate
//! the agent terminates TLS after the greeting delay and relays to
//! Postfix's plain PROXY listener with its policies; without one it
//! passes the bytes to Postfix's wrapper-mode listener, whose TLS the
//! client then speaks. check-config refuses the one setup that cannot
//! work: XCLIENT (in-band) in front of a TLS handshake. Driven by
//! Python's smtplib, which checks whose certificate it got.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tarpit_tests::postfix::{PROXY, WRAPPER};
use tarpit_tests::smtp_client::{agent_config, agent_v4, agent_v6};
use tarpit_tests::tls_cert::make_cert;
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TempDir, TestNet,
    require_root, tarpit_bin,
};

/// The agent's config, also listening on port 465 (v4 and v6).
fn config(net: &TestNet, pins: &PinDir, backend: &str, rest: &str) -> String {
    let on25 = format!("addrs = [\"{}\", \"{}\"]", agent_v4(), agent_v6());
    let with465 = format!(
        "addrs = [\"{}\", \"{}\", \"{SERVER_V4}:465\", \"[{SERVER_V6}]:465\"]",
        agent_v4(),
        agent_v6()
    );
    let text = agent_config(net, pins, backend, rest);
    assert!(text.contains(&on25), "{text}");
    text.replace(&on25, &with465)
}

/// A TLS-on-connect session to port 465 that trusts only the certificate
/// in `ca` (so the handshake proves who terminated TLS): banner (timed
/// from the TCP connect), EHLO, MAIL, two timed RCPTs, DATA with a
/// Subject. One line per fact.
const CLIENT: &str = r#"
import smtplib, ssl, sys, time
host, src, ca, subject = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
s = smtplib.SMTP_SSL(source_address=(src, 0), timeout=30, context=ctx)
s._host = host  # the TLS server name (connect() does not set it)
t = time.monotonic()
code, msg = s.connect(host, 465)
print("banner", code, round(time.monotonic() - t, 3), s.sock.version())
code, _ = s.ehlo("tls465.example")
print("ehlo", code, "starttls" in s.esmtp_features)
s.mail("tls465@client.example")
for i in range(2):
    t = time.monotonic()
    code, _ = s.rcpt("sink%d@tarpit.test" % i)
    print("rcpt", code, round(time.monotonic() - t, 3))
code, _ = s.data(("Subject: %s\r\n\r\nhello over implicit TLS\r\n" % subject).encode())
print("data", code)
s.quit()
"#;

/// Straight to Postfix's wrapper-mode listener from inside the server
/// namespace (PROXY v1 header, then TLS trusting only `ca`): the banner
/// and the reply to QUIT. Proves the test's MTA side on its own.
const DIRECT: &str = r#"
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.sendall(b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 %d\r\n" % port)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
t = ctx.wrap_socket(s, server_hostname="mx.tarpit.test")
print(t.recv(512).decode().strip())
t.sendall(b"QUIT\r\n")
print(t.recv(512).decode().strip())
"#;

/// The facts the client printed, by first word.
struct Session {
    text: String,
}

impl Session {
    fn words(&self, key: &str) -> Vec<Vec<String>> {
        self.text
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(key))
            .map(|l| l.split_whitespace().skip(1).map(str::to_string).collect())
            .collect()
    }
}

fn session(net: &TestNet, v4: bool, ca: &str, subject: &str) -> Session {
    let (host, src) = if v4 {
        (SERVER_V4.to_string(), CLIENT_V4.to_string())
    } else {
        (SERVER_V6.to_string(), CLIENT_V6.to_string())
    };
    let out = net
        .client_cmd("python3")
        .args(["-c", CLIENT, &host, &src, ca, subject])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{host}: {text}");
    Session { text }
}

/// The delivered message with this Subject, LF line ends: one copy per
/// recipient, `copies` in all.
fn delivered(pf: &Postfix, subject: &str, copies: usize) -> String {
    let found = || -> Vec<String> {
        pf.messages()
            .into_iter()
            .map(|m| m.replace("\r\n", "\n"))
            .filter(|m| m.contains(&format!("Subject: {subject}\n")))
            .collect()
    };
    assert!(
        tarpit_tests::wait::until(Duration::from_secs(20), || found().len() >= copies),
        "{subject} not delivered; log:\n{}",
        pf.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let found = found();
    assert_eq!(found.len(), copies, "{found:#?}");
    found.into_iter().next().unwrap_or_default()
}

/// How Postfix names the client `ip` in a Received header.
fn received_from(ip: &str) -> String {
    let tag = if ip.contains(':') { "IPv6:" } else { "" };
    format!("Received: from tls465.example (unknown [{tag}{ip}])")
}

#[test]
fn port_465_with_a_certificate_the_agent_terminates_tls_and_applies_its_policies() {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("tls465");
    let (cert, key) = make_cert(&tmp.path, "agent.tarpit.test");
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let backend =
        format!("[backend]\naddr = \"127.0.0.1:{PROXY}\"\nclient_address = \"proxy-v2\"\n");
    let rest = format!(
        "[greeting]\ndelay = \"1s\"\n[rcpt]\nthreshold = 1\ndelay = \"1s\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nimplicit_ports = [465]\n"
    );
    let _agent = Agent::start(&net, &config(&net, &pins, &backend, &rest)).unwrap();
    for (v4, ip) in [
        (true, CLIENT_V4.to_string()),
        (false, CLIENT_V6.to_string()),
    ] {
        let subject = format!("implicit tls via the agent {ip}");
        let s = session(&net, v4, &cert, &subject);
        let t = &s.text;
        // The agent's certificate; the MTA's banner inside TLS, after
        // the greeting delay.
        let banner = &s.words("banner")[0];
        assert_eq!(banner[0], "220", "{t}");
        let took: f64 = banner[1].parse().unwrap();
        assert!(took >= 1.0, "greeting delay on 465: {t}");
        assert!(banner[2].starts_with("TLSv1."), "{t}");
        // No STARTTLS inside TLS.
        assert_eq!(s.words("ehlo")[0], ["250", "False"], "{t}");
        // The RCPT tarpit applies inside implicit TLS: free, then 1 s.
        let rcpt = s.words("rcpt");
        assert_eq!(rcpt[0][0], "250", "{t}");
        assert_eq!(rcpt[1][0], "250", "{t}");
        let second: f64 = rcpt[1][1].parse().unwrap();
        assert!(second >= 1.0, "RCPT delay inside implicit TLS: {t}");
        assert_eq!(s.words("data")[0], ["250"], "{t}");
        // Postfix got it in clear over its PROXY listener, with the real
        // client address.
        let m = delivered(&pf, &subject, 2);
        assert!(m.contains(&received_from(&ip)), "{m}");
        assert!(m.contains("with ESMTP id"), "{m}");
    }
    let log = pf.log();
    for ip in [CLIENT_V4.to_string(), CLIENT_V6.to_string()] {
        assert!(
            log.lines().any(|l| l.contains("postfix/proxied/smtpd")
                && l.contains(&format!(": connect from unknown[{ip}]"))),
            "{log}"
        );
    }
}

#[test]
fn port_465_without_a_certificate_is_passed_to_the_mtas_wrapper_mode_listener() {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("tls465");
    let (cert, key) = make_cert(&tmp.path, "wrapper.tarpit.test");
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    pf.install_wrapper_cert(Path::new(&cert), Path::new(&key))
        .unwrap();
    // The MTA side alone: PROXY header, then Postfix's own TLS.
    let out = net
        .server_cmd("python3")
        .args(["-c", DIRECT, &WRAPPER.to_string(), &cert])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.starts_with("220 mx.tarpit.test ESMTP"),
        "Postfix's wrapper-mode listener: {text}\n{}",
        pf.log()
    );
    let backend = format!(
        "[backend]\naddr = \"127.0.0.1:{PROXY}\"\nclient_address = \"proxy-v2\"\n\
         implicit_tls_addr = \"127.0.0.1:{WRAPPER}\"\n"
    );
    let rest = "[greeting]\ndelay = \"1s\"\n[tls]\nimplicit_ports = [465]\n";
    let _agent = Agent::start(&net, &config(&net, &pins, &backend, rest)).unwrap();
    for (v4, ip) in [
        (true, CLIENT_V4.to_string()),
        (false, CLIENT_V6.to_string()),
    ] {
        let subject = format!("implicit tls to postfix {ip}");
        // Trusting only Postfix's certificate: the TLS session is with it.
        let s = session(&net, v4, &cert, &subject);
        let t = &s.text;
        let banner = &s.words("banner")[0];
        assert_eq!(banner[0], "220", "{t}");
        let took: f64 = banner[1].parse().unwrap();
        assert!(took >= 1.0, "greeting delay on 465: {t}");
        assert!(banner[2].starts_with("TLSv1."), "{t}");
        assert_eq!(s.words("data")[0], ["250"], "{t}");
        let m = delivered(&pf, &subject, 2);
        assert!(m.contains(&received_from(&ip)), "{m}");
        assert!(m.contains("with ESMTPS id"), "{m}");
    }
    let log = pf.log();
    for ip in [CLIENT_V4.to_string(), CLIENT_V6.to_string()] {
        assert!(
            log.lines().any(|l| l.contains("postfix/wrapper/smtpd")
                && l.contains(&format!("TLS connection established from unknown[{ip}]"))),
            "{log}"
        );
    }
}

/// `tarpit check-config` on `text`: (exit ok, output).
fn check_config(text: &str) -> (bool, String) {
    let tmp = TempDir::new("tls465cfg");
    let file = tmp.path.join("tarpit.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(tarpit_bin())
        .args(["check-config", "-c"])
        .arg(&file)
        .output()
        .expect("run tarpit");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_refuses_xclient_in_front_of_an_implicit_tls_port_without_a_certificate() {
    let tmp = TempDir::new("tls465cert");
    let (cert, key) = make_cert(&tmp.path, "agent.tarpit.test");
    let listen = "[listen]\naddrs = [\"127.0.0.1:25\", \"127.0.0.1:465\"]\n";
    let xclient = "[backend]\naddr = \"127.0.0.1:2545\"\nclient_address = \"xclient\"\n";
    let proxy = "[backend]\naddr = \"127.0.0.1:2535\"\nclient_address = \"proxy-v2\"\n";
    let with_cert = format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");

    let (ok, out) = check_config(&format!("{listen}{xclient}"));
    assert!(!ok, "accepted XCLIENT with 465 and no certificate: {out}");
    assert!(out.contains("client_address"), "names the key: {out}");
    // What works: PROXY (its header precedes the handshake), or a
    // certificate (the agent terminates TLS and speaks XCLIENT in clear).
    let (ok, out) = check_config(&format!("{listen}{proxy}"));
    assert!(ok, "{out}");
    let (ok, out) = check_config(&format!("{listen}{xclient}{with_cert}"));
    assert!(ok, "{out}");
    // Port 465 not listened on: nothing to refuse.
    let (ok, out) = check_config(&format!("[listen]\naddrs = [\"127.0.0.1:25\"]\n{xclient}"));
    assert!(ok, "{out}");
}
