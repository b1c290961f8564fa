//! Exim behind the tarpit, set up as docs/mta-setup.md describes it
//! (`hosts_proxy`, PROXY v2 and v1 from the agent): Exim's own log shows
//! the real client address, relaying stays refused for the real client,
//! and each message lands in Exim's Maildir exactly once. IPv4 and IPv6.
//!
//! XCLIENT is not tested with Exim: it came with Exim 4.97, and Debian 12
//! has 4.96 (the doc says so).
use std::net::IpAddr;
use std::time::Duration;

use tarpit_tests::exim::{self, Exim};
use tarpit_tests::smtp_client::{SmtpClient, agent_config, agent_v4, agent_v6, message};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, TestNet, require_root};

/// A short greeting delay: the session goes through a real hold.
const REST: &str = "[greeting]\ndelay = \"1s\"\n";

fn skip_without_exim() -> bool {
    if exim::available() {
        return false;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "no Exim at {}: run scripts/install-test-deps.sh",
            exim::exim_root().display()
        );
    }
    eprintln!(
        "skipped: no Exim at {} (scripts/install-test-deps.sh)",
        exim::exim_root().display()
    );
    true
}

#[test]
fn exim_behind_the_tarpit_sees_the_real_client_refuses_relay_and_delivers_once() {
    if !require_root() || skip_without_exim() {
        return;
    }
    for version in ["proxy-v2", "proxy-v1"] {
        let net = TestNet::new().expect("test network");
        let pins = PinDir::new().expect("pin dir");
        let exim = Exim::start(&net, "").expect("exim");
        let backend = format!(
            "[backend]\naddr = \"127.0.0.1:{}\"\nclient_address = \"{version}\"\n",
            exim::PORT
        );
        let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, REST)).expect("agent");
        let clients = [
            (IpAddr::from(CLIENT_V4), agent_v4()),
            (IpAddr::from(CLIENT_V6), agent_v6()),
        ];
        for (src, dst) in clients {
            let mut c = SmtpClient::connect(&net, src, dst).unwrap();
            let banner = c.reply().unwrap();
            assert!(
                banner
                    .text
                    .starts_with("220 exim.tarpit.test ESMTP Exim 4."),
                "{version}: the banner is Exim's, relayed: {}",
                banner.text
            );
            c.expect("EHLO client.example", 250).unwrap();
            c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
            // Relaying: refused, and for the real client, not for 127.0.0.1.
            let (r, _) = c.cmd("RCPT TO:<victim@elsewhere.example>").unwrap();
            assert_eq!(
                r.code, 550,
                "{version} {src}: relay must be refused: {}",
                r.text
            );
            assert!(r.text.contains("Relay access denied"), "{}", r.text);
            c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
            c.expect("DATA", 354).unwrap();
            c.send(message(&format!("exim {version} via {src}")).as_bytes())
                .unwrap();
            c.expect(".", 250).unwrap();
            c.expect("QUIT", 221).unwrap();

            // Exim's log: the arrival from the client's own address, the
            // agent only as the proxy (PRX=), and the refused relay.
            let arrival = format!("<= sender@client.example H=(client.example) [{src}]");
            assert!(
                exim.wait_log(&arrival, Duration::from_secs(10)),
                "{version}: Exim did not log {arrival:?}:\n{}",
                exim.log()
            );
            let line = exim
                .log()
                .lines()
                .find(|l| l.contains(&arrival))
                .unwrap_or_default()
                .to_string();
            assert!(
                line.contains("PRX=127.0.0.1") || line.contains("PRX=::1"),
                "{line}"
            );
            let refused = format!("[{src}]");
            assert!(
                exim.rejectlog().lines().any(|l| l.contains(&refused)
                    && l.contains("rejected RCPT <victim@elsewhere.example>")),
                "{version}: Exim's reject log lacks the refused relay from {src}:\n{}",
                exim.rejectlog()
            );
        }
        assert!(
            exim.wait_delivered(2, Duration::from_secs(20)),
            "{version}: not delivered:\n{}",
            exim.log()
        );
        std::thread::sleep(Duration::from_secs(1));
        let messages = exim.messages();
        assert_eq!(messages.len(), 2, "{version}: exactly once each");
        for (src, _) in clients {
            let subject = format!("Subject: exim {version} via {src}");
            assert_eq!(
                messages.iter().filter(|m| m.contains(&subject)).count(),
                1,
                "{version}: {subject} delivered once"
            );
            assert!(
                messages
                    .iter()
                    .any(|m| m.contains(&subject) && m.contains(&format!("[{src}]"))),
                "{version}: Exim's Received header names {src}"
            );
        }
        assert!(
            !exim.log().contains("H=(client.example) [127.0.0.1]"),
            "a client looked local:\n{}",
            exim.log()
        );
        drop(agent);
    }
}
