//! STARTTLS terminated by the agent, against Postfix with Dovecot SASL
//! that offers AUTH in clear (as many installs do): the agent offers AUTH
//! only inside TLS, answers an AUTH in clear with 538 without passing the
//! password on, and after its STARTTLS the MTA's session starts afresh
//! (a new connection: no HELO name, no transaction of before, RFC 3207
//! 4.2). With the MTA connected at the banner (`at-connect`) it sees two
//! sessions, the one before STARTTLS with EHLO only; connected at the
//! transaction (the default) only the one inside TLS. Driven by Python's
//! smtplib, IPv4 and IPv6.
use std::time::Duration;

use tarpit_tests::dovecot::{Dovecot, PASSWORD, USER};
use tarpit_tests::smtp_client::{agent_config, proxy_backend};
use tarpit_tests::tls_cert::make_cert;
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TempDir, TestNet,
    require_root, wait,
};

/// EHLO pre.example, AUTH in clear, STARTTLS, EHLO post.example, AUTH,
/// one message. One line per fact.
const CLIENT: &str = r#"
import smtplib, ssl, sys
host, src, plain, subject = sys.argv[1:5]
s = smtplib.SMTP(host, 25, source_address=(src, 0), timeout=30)
s.ehlo("pre.example")
print("before", "auth" in s.esmtp_features, "starttls" in s.esmtp_features)
code, msg = s.docmd("AUTH", "PLAIN " + plain)
print("clear-auth", code, msg.decode().split()[0])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
code, _ = s.starttls(context=ctx)
print("starttls", code)
s.ehlo("post.example")
print("after", "auth" in s.esmtp_features)
code, _ = s.docmd("AUTH", "PLAIN " + plain)
print("tls-auth", code)
s.mail("alice@tarpit.test")
s.rcpt("sink@tarpit.test")
code, _ = s.data(("Subject: %s\r\n\r\nafter STARTTLS\r\n" % subject).encode())
print("data", code)
s.quit()
"#;

#[test]
fn auth_only_inside_tls_and_nothing_of_before_starttls_kept_by_the_mta() {
    auth_only_inside_tls("at-transaction");
}

#[test]
fn auth_only_inside_tls_and_nothing_of_before_starttls_kept_by_the_mta_at_connect() {
    auth_only_inside_tls("at-connect");
}

fn auth_only_inside_tls(mode: &str) {
    if !require_root() {
        return;
    }
    let tmp = TempDir::new("tlsauth");
    let (cert, key) = make_cert(&tmp.path, "mx.tarpit.test");
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let dv = Dovecot::start().unwrap();
    let pf = Postfix::start_with(&net, &dv.postfix_main_cf()).unwrap();
    let rest = format!("[greeting]\ndelay = \"0s\"\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n");
    let backend = format!("{}connect = \"{mode}\"\n", proxy_backend());
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, &rest)).unwrap();
    // At-transaction: the agent's EHLO reply comes from the probe.
    assert!(
        mode == "at-connect"
            || wait::until(Duration::from_secs(20), || agent
                .log()
                .contains("learned the MTA's banner")),
        "no probe:\n{}",
        agent.log()
    );
    let plain = Dovecot::plain(USER, PASSWORD);
    for (host, src) in [
        (SERVER_V4.to_string(), CLIENT_V4.to_string()),
        (SERVER_V6.to_string(), CLIENT_V6.to_string()),
    ] {
        let subject = format!("fresh session {src}");
        // How Postfix writes the address in a Received header.
        let tag = if src.contains(':') { "IPv6:" } else { "" };
        let out = net
            .client_cmd("python3")
            .args(["-c", CLIENT, &host, &src, &plain, &subject])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        // In clear: STARTTLS offered, AUTH not; an AUTH anyway gets 538.
        assert_eq!(lines[0], "before False True", "{text}");
        assert_eq!(lines[1], "clear-auth 538 5.7.11", "{text}");
        assert_eq!(lines[2], "starttls 220", "{text}");
        // Inside TLS: the MTA's AUTH, and it works.
        assert_eq!(lines[3], "after True", "{text}");
        assert_eq!(lines[4], "tls-auth 235", "{text}");
        assert_eq!(lines[5], "data 250", "{text}");

        // At-connect the MTA saw two sessions of this client: the one
        // before STARTTLS (EHLO only, no AUTH) and a fresh one inside TLS.
        // At-transaction the one before STARTTLS never reached it.
        let sessions = if mode == "at-connect" { 2 } else { 1 };
        let disconnects = |pf: &Postfix| -> Vec<String> {
            pf.log()
                .lines()
                .filter(|l| l.contains(&format!("disconnect from unknown[{src}]")))
                .map(str::to_string)
                .collect()
        };
        assert!(
            wait::until(Duration::from_secs(10), || disconnects(&pf).len()
                >= sessions),
            "{}",
            pf.log()
        );
        let log = pf.log();
        let connects = log
            .lines()
            .filter(|l| l.contains(&format!(": connect from unknown[{src}]")))
            .count();
        assert_eq!(connects, sessions, "{mode}: MTA connections:\n{log}");
        let d = disconnects(&pf);
        if mode == "at-connect" {
            assert!(
                d[0].contains(" ehlo=1 ") && !d[0].contains("auth=") && !d[0].contains("mail="),
                "the session before STARTTLS: {d:?}"
            );
        }
        assert!(
            d[sessions - 1].contains(" auth=1 ") && d[sessions - 1].contains(" mail=1 "),
            "{d:?}"
        );
        assert!(!log.contains("authentication failed"), "{log}");

        // The message names the HELO of the TLS session only.
        assert!(
            wait::until(Duration::from_secs(20), || pf
                .messages()
                .iter()
                .any(|m| m.contains(&subject))),
            "{}",
            pf.log()
        );
        let msgs: Vec<String> = pf
            .messages()
            .into_iter()
            .filter(|m| m.contains(&subject))
            .collect();
        assert_eq!(msgs.len(), 1, "{msgs:#?}");
        assert!(
            msgs[0].contains(&format!(
                "Received: from post.example (unknown [{tag}{src}])"
            )),
            "{}",
            msgs[0]
        );
        assert!(!msgs[0].contains("pre.example"), "{}", msgs[0]);
    }
    drop(dv);
}
