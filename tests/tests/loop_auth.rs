//! Authenticated addresses in the kernel's AUTH map: a real AUTH PLAIN
//! (Postfix with Dovecot SASL and a passwd-file, behind the agent) puts
//! the client's address there for 24 h; with a 5 s HELO delay and
//! `authenticated_once_per_day` on, its next connections pay no HELO delay
//! while a control client still pays 5 s, also after an agent restart; a
//! failed AUTH records nothing; with the flag off the delay is back.
//! IPv4 and IPv6.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{agent_for, maps};
use tarpit_tests::dovecot::{self, Dovecot};
use tarpit_tests::smtp_client::SmtpClient;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

const HELO_DELAY: Duration = Duration::from_secs(5);
const SLACK: Duration = Duration::from_secs(2);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn rest(once_per_day: bool) -> String {
    format!(
        "[greeting]\ndelay = \"1s\"\n[helo]\ndelay = \"5s\"\nauthenticated_once_per_day = {once_per_day}\n"
    )
}

const GREETING: Duration = Duration::from_secs(1);

/// Connects, reads the banner and times the EHLO reply; also says whether
/// the banner came without the greeting delay.
fn session(net: &TestNet, src: IpAddr) -> (SmtpClient, Duration, bool) {
    let t = std::time::Instant::now();
    let mut c = SmtpClient::connect(net, src, agent_for(src)).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let fast_banner = t.elapsed() < GREETING;
    let (r, took) = c.cmd("EHLO client.example").unwrap();
    assert_eq!(r.code, 250, "{}", r.text);
    (c, took, fast_banner)
}

fn ehlo_time(net: &TestNet, src: IpAddr) -> (SmtpClient, Duration) {
    let (c, took, _) = session(net, src);
    (c, took)
}

fn auth(c: &mut SmtpClient, password: &str) -> u16 {
    let (r, _) = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            Dovecot::plain(dovecot::USER, password)
        ))
        .unwrap();
    r.code
}

fn assert_pays(took: Duration, who: &str) {
    assert!(
        took >= HELO_DELAY && took < HELO_DELAY + SLACK,
        "{who}: EHLO took {took:?}, expected the 5 s HELO delay"
    );
}

fn assert_free(took: Duration, who: &str) {
    assert!(took < SLACK, "{who}: EHLO took {took:?}, expected no delay");
}

#[test]
fn auth_success_is_remembered_in_the_kernel_for_a_day_across_restarts_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let dv = Dovecot::start().expect("dovecot");
    let pf = Postfix::start_with(&net, &dv.postfix_main_cf()).expect("postfix");
    let control_v4: IpAddr = "198.51.100.30".parse().unwrap();
    let control_v6: IpAddr = "fd5b:1e00::30".parse().unwrap();
    for a in [control_v4, control_v6] {
        net.add_client_addr(a).unwrap();
    }
    let users = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    let controls = [control_v4, control_v6];
    let cfg = |once: bool| common::config(&net, &pins, None, false, &rest(once));

    let agent = Agent::start(&net, &cfg(true)).expect("agent");
    // The users authenticate (paying the HELO delay this first time);
    // the controls try a wrong password.
    std::thread::scope(|s| {
        for (user, control) in users.into_iter().zip(controls) {
            let net = &net;
            s.spawn(move || {
                let (mut c, took) = ehlo_time(net, user);
                assert_pays(took, "first EHLO");
                assert_eq!(auth(&mut c, dovecot::PASSWORD), 235);
                c.expect("QUIT", 221).unwrap();
            });
            s.spawn(move || {
                let (mut c, _) = ehlo_time(net, control);
                assert_eq!(auth(&mut c, "wrong"), 535);
                c.expect("QUIT", 221).unwrap();
            });
        }
    });
    for (user, control) in users.into_iter().zip(controls) {
        let item = maps(&pins).auth_get(user).unwrap().expect("auth entry");
        let ttl = Duration::from_nanos(item.expires.expect("expiry").0 - item.added.0);
        assert!(
            ttl > DAY - Duration::from_secs(1) && ttl < DAY + Duration::from_secs(1),
            "{ttl:?}"
        );
        assert!(
            maps(&pins).auth_get(control).unwrap().is_none(),
            "failed AUTH from {control} was recorded"
        );
    }
    assert!(
        pf.log().contains("SASL PLAIN authentication failed"),
        "Postfix did not refuse the wrong password itself:\n{}",
        pf.log()
    );

    // Next connections: the users pay nothing, the controls 5 s.
    let check = |expect_free: bool| {
        std::thread::scope(|s| {
            for (user, control) in users.into_iter().zip(controls) {
                let net = &net;
                s.spawn(move || {
                    let (mut c, took, fast_banner) = session(net, user);
                    if expect_free {
                        assert_free(took, &format!("authenticated {user}"));
                        assert!(fast_banner, "{user}: authenticated, yet held at the banner");
                    } else {
                        assert_pays(took, &format!("{user} with the flag off"));
                        assert!(!fast_banner, "{user}: flag off, yet no greeting delay");
                    }
                    c.expect("QUIT", 221).unwrap();
                });
                s.spawn(move || {
                    let (mut c, took, fast_banner) = session(net, control);
                    assert_pays(took, &format!("control {control}"));
                    assert!(!fast_banner, "control {control}: no greeting delay");
                    c.expect("QUIT", 221).unwrap();
                });
            }
        })
    };
    check(true);

    // The entry survives a restart of the agent, and so does the rule.
    agent.stop().expect("agent stops");
    let agent = Agent::start(&net, &cfg(true)).expect("agent again");
    for user in users {
        assert!(maps(&pins).auth_get(user).unwrap().is_some(), "{user}");
    }
    check(true);

    // With the flag off the same users pay the delay again.
    agent.stop().expect("agent stops");
    let _agent = Agent::start(&net, &cfg(false)).expect("agent, flag off");
    check(false);
}
