//! Authenticated sessions are not tarpitted once the MTA said 235: real
//! AUTH PLAIN through the agent to Postfix with Dovecot's SASL, in clear
//! (the agent sees the 235), against a control client whose AUTH fails.
use std::net::IpAddr;
use std::time::Duration;

use tarpit_tests::dovecot::{Dovecot, PASSWORD, USER};
use tarpit_tests::smtp_client::{SmtpClient, agent_config, agent_v4, agent_v6, proxy_backend};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

const SLACK: Duration = Duration::from_millis(1500);
const HOLD: Duration = Duration::from_secs(2);

#[track_caller]
fn held(what: &str, d: Duration) {
    assert!(
        d >= HOLD && d <= HOLD + SLACK,
        "{what}: took {d:?}, expected {HOLD:?}"
    );
}

#[track_caller]
fn free(what: &str, d: Duration) {
    assert!(d < SLACK, "{what}: took {d:?}, expected no delay");
}

#[test]
fn no_delay_after_a_successful_auth_and_a_failed_one_changes_nothing() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let dv = Dovecot::start().unwrap();
    let _pf = Postfix::start_with(&net, &dv.postfix_main_cf()).unwrap();
    let _agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 0\ndelay = \"2s\"\n[reject]\ndelay = \"2s\"\n",
        ),
    )
    .unwrap();
    for (src, dst) in [
        (IpAddr::from(CLIENT_V4), agent_v4()),
        (IpAddr::from(CLIENT_V6), agent_v6()),
    ] {
        // The user: tarpitted until the MTA's 235, then not at all.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        let ehlo = c.expect("EHLO client.example", 250).unwrap();
        assert!(ehlo.text.contains("AUTH"), "{}", ehlo.text);
        c.expect("MAIL FROM:<alice@tarpit.test>", 250).unwrap();
        let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        held("RCPT before AUTH", d);
        c.expect("RSET", 250).unwrap();
        let (r, _) = c
            .cmd(&format!("AUTH PLAIN {}", Dovecot::plain(USER, PASSWORD)))
            .unwrap();
        assert_eq!(r.code, 235, "{}", r.text);
        c.expect("MAIL FROM:<alice@tarpit.test>", 250).unwrap();
        for i in 0..3 {
            let (r, d) = c.cmd(&format!("RCPT TO:<sink{i}@tarpit.test>")).unwrap();
            assert_eq!(r.code, 250);
            free("RCPT after AUTH", d);
        }
        // Its 5xx replies are not held either.
        let (r, d) = c.cmd("RCPT TO:<unknown1@tarpit.test>").unwrap();
        assert_eq!(r.code, 550);
        free("550 after AUTH", d);
        c.expect("QUIT", 221).unwrap();

        // The control: a wrong password is a 5xx (held) and changes nothing.
        let mut c = SmtpClient::connect(&net, src, dst).unwrap();
        c.reply().unwrap();
        c.expect("EHLO control.example", 250).unwrap();
        let (r, d) = c
            .cmd(&format!("AUTH PLAIN {}", Dovecot::plain(USER, "wrong")))
            .unwrap();
        assert_eq!(r.code, 535, "{}", r.text);
        held("535", d);
        c.expect("MAIL FROM:<x@client.example>", 250).unwrap();
        let (_, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        held("RCPT after a failed AUTH", d);
        c.expect("QUIT", 221).unwrap();
    }
    drop(dv);
}
