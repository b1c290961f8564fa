//! Reputation settings apply on reload: a DNSBL zone added to the config
//! with action `reject` rejects the next session of a client it lists
//! after SIGHUP (although the same client passed every list just before,
//! and sat in the allow cache), and taking it out again serves that client
//! again. A reload whose lists are invalid is refused as a whole and the
//! running lists stay; a session that started before a reload keeps the
//! checks it started with; the DNSBL metrics count on across the rebuilds.
//! Greylisting's wait applies on reload, its mode and store stay until a
//! restart. Real agent, real Postfix, rbldnsd inside the test's server
//! namespace, swaks as the client.
mod ops_common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ops_common::{config, sample, scrape};
use tarpit_tests::smtp_client::{SmtpClient, agent_v4};
use tarpit_tests::swaks::Swaks;
use tarpit_tests::{Agent, CLIENT_V4, PinDir, Postfix, Rbldnsd, TempDir, TestNet, require_root};

/// On 198.51.100.130 and fd5b:1e00::130 the reject zones answer 127.0.0.2.
const LISTED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 130));
const LISTED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x130));

const REJECT: &str = "554 5.7.1 Service unavailable; client blocked using reject.test";

/// The agent's sections: a greeting delay, a short blacklist delay, the
/// test's rbldnsd, and `dnsbl` (the `[dnsbl]` section and what follows).
fn rest(dnsbl: &str) -> String {
    format!(
        r#"
[greeting]
delay = "1s"
[blacklist]
delay = "1s"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
{dnsbl}"#
    )
}

/// Only bl.test, which lists neither client.
const CLEAN: &str = "[dnsbl]\nsites = [\"bl.test\"]\n";

/// bl.test plus the reject zones, with action reject.
const WITH_REJECT: &str = r#"[dnsbl]
sites = ["bl.test", "reject.test*3", "reject6.test*3"]
threshold = 3
[dnsbl.actions]
"reject.test" = "reject"
"reject6.test" = "reject"
"#;

/// One swaks session from `src` to the agent, up to RCPT.
fn swaks(net: &TestNet, src: IpAddr) -> Swaks {
    swaks_to(net, src, "sink@tarpit.test")
}

fn swaks_to(net: &TestNet, src: IpAddr, rcpt: &str) -> Swaks {
    tarpit_tests::swaks::swaks(net, src, &["--to", rcpt, "--quit-after", "RCPT"])
}

/// Both clients at once.
fn both(net: &TestNet) -> [Swaks; 2] {
    std::thread::scope(|s| {
        let v4 = s.spawn(|| swaks(net, LISTED_V4));
        let v6 = s.spawn(|| swaks(net, LISTED_V6));
        [v4.join().unwrap(), v6.join().unwrap()]
    })
}

#[track_caller]
fn assert_served(s: &Swaks, what: &str) {
    assert!(s.ok, "{what}: {}", s.out);
    assert!(s.out.contains("<-  250"), "{what}: {}", s.out);
    assert!(!s.out.contains("554"), "{what}: {}", s.out);
}

fn wait_log_count(agent: &Agent, needle: &str, n: usize) -> bool {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if agent.log().matches(needle).count() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn reload_adds_and_removes_a_dnsbl_reject_zone_for_new_sessions() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    net.add_client_addr(LISTED_V4).unwrap();
    net.add_client_addr(LISTED_V6).unwrap();
    let _rbl = Rbldnsd::start(
        &net,
        &[
            "bl.test:ip4set:bl.zone",
            "reject.test:ip4set:reject.zone",
            "reject6.test:ip6trie:reject6.zone",
        ],
        &[
            ("bl.zone", "198.51.100.200\n"),
            ("reject.zone", "198.51.100.130\n"),
            ("reject6.zone", ":127.0.0.2:listed\nfd5b:1e00::130\n"),
        ],
    )
    .expect("rbldnsd");
    let pins = PinDir::new().unwrap();
    let _pf = Postfix::start(&net).expect("postfix");
    let agent = Agent::start(&net, &config(&net, &pins, &rest(CLEAN))).expect("agent");
    let reload = |dnsbl: &str| {
        std::fs::write(&agent.config, config(&net, &pins, &rest(dnsbl))).expect("config");
        agent.signal(Signal::SIGHUP).expect("SIGHUP");
    };

    // Not listed by the running lists: served (and now in the allow cache).
    for (s, what) in both(&net).iter().zip(["v4 before", "v6 before"]) {
        assert_served(s, what);
    }
    // A session that starts now keeps these checks across the reloads.
    let mut inflight = SmtpClient::connect(&net, LISTED_V4, agent_v4()).expect("connect");
    inflight.set_read_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(inflight.reply().expect("banner").code, 220);

    // The new lists come with an action for a list that is not there: the
    // whole file is refused, the clients are still served.
    reload(&format!("{WITH_REJECT}\"nolist.test\" = \"drop\"\n"));
    assert!(
        wait_log_count(&agent, "configuration reload refused", 1),
        "{}",
        agent.log()
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reload refused"))
        .unwrap();
    assert!(line.contains("dnsbl.actions.nolist.test"), "{line}");
    assert_served(&swaks(&net, LISTED_V4), "after the refused reload");

    // The zones that list them, action reject: the next sessions get 554.
    reload(WITH_REJECT);
    assert!(
        wait_log_count(&agent, "reputation checks rebuilt", 1),
        "{}",
        agent.log()
    );
    let [v4, v6] = both(&net);
    assert!(!v4.ok && v4.out.contains(REJECT), "v4 listed: {}", v4.out);
    assert!(
        !v6.ok
            && v6
                .out
                .contains("554 5.7.1 Service unavailable; client blocked using reject6.test"),
        "v6 listed: {}",
        v6.out
    );

    // The session from before the reload is judged by what it started with.
    inflight.expect("EHLO client.example", 250).unwrap();
    inflight
        .expect("MAIL FROM:<sender@client.example>", 250)
        .unwrap();
    inflight.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    inflight.expect("QUIT", 221).unwrap();

    // Out again: served again.
    reload(CLEAN);
    assert!(
        wait_log_count(&agent, "reputation checks rebuilt", 2),
        "{}",
        agent.log()
    );
    for (s, what) in both(&net).iter().zip(["v4 after", "v6 after"]) {
        assert_served(s, what);
    }
    assert!(!agent.log().contains("takes effect at the next restart"));

    // The families counted on across both rebuilds: bl.test was asked for
    // both clients by the first checks (the in-flight session and the
    // client after the refused reload were served by the allow cache),
    // and again by each rebuilt set, which starts with empty caches.
    let text = scrape(&net);
    let m = |name: &str| sample(&text, name).unwrap_or(-1.0);
    assert_eq!(
        m("tarpit_dnsbl_verdicts_total{outcome=\"reject\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        m("tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"not_listed\"}"),
        6.0,
        "{text}"
    );
    assert_eq!(
        m("tarpit_dnsbl_queries_total{list=\"reject.test\",result=\"listed\"}"),
        1.0,
        "a removed list keeps its counts: {text}"
    );
    assert_eq!(
        m("tarpit_config_reloads_total{result=\"applied\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(
        m("tarpit_config_reloads_total{result=\"refused\"}"),
        1.0,
        "{text}"
    );
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn reload_applies_the_greylist_wait_and_keeps_mode_and_store() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let _pf = Postfix::start(&net).expect("postfix");
    let dir = TempDir::new("reload-grey");
    let store = dir.path.join("greylist.db");
    let other_store = dir.path.join("other.db");
    let greylist = |mode: &str, min_wait: &str, store: &std::path::Path| {
        format!(
            "[greeting]\ndelay = \"0s\"\n[greylist]\nmode = \"{mode}\"\n\
             min_wait = \"{min_wait}\"\nretry_window = \"2h\"\nstore = \"{}\"\n",
            store.display()
        )
    };
    let agent = Agent::start(
        &net,
        &config(&net, &pins, &greylist("triplet", "1h", &store)),
    )
    .expect("agent");
    let s = swaks(&net, CLIENT_V4.into());
    let first = Instant::now();
    assert!(!s.ok && s.out.contains("451 4.7.1 Greylisted"), "{}", s.out);

    // An hour's wait becomes two seconds; the mode and the store change too.
    std::fs::write(
        &agent.config,
        config(&net, &pins, &greylist("connect", "2s", &other_store)),
    )
    .unwrap();
    agent.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait_log_count(&agent, "configuration reloaded", 1),
        "{}",
        agent.log()
    );
    let log = agent.log();
    for key in ["greylist.mode changed", "greylist.store changed"] {
        assert!(log.contains(key), "{key}: {log}");
    }
    assert!(!log.contains("greylist.min_wait changed"), "{log}");

    // The retry passes after the new wait, counted from the first attempt.
    std::thread::sleep(Duration::from_millis(2300).saturating_sub(first.elapsed()));
    let s = swaks(&net, CLIENT_V4.into());
    assert!(s.ok, "retry after the reloaded wait: {}", s.out);
    // Still per triplet (not at connect): a new recipient gets 451 at RCPT,
    // after the banner.
    let s = swaks_to(&net, CLIENT_V4.into(), "other@tarpit.test");
    assert!(s.out.contains("<-  220"), "{}", s.out);
    assert!(s.out.contains("451 4.7.1 Greylisted"), "{}", s.out);
    // And the store is the one opened at start: the first triplet's first
    // attempt and pass, the new recipient's first attempt (hashed keys).
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
    assert!(!other_store.exists());
    let text = std::fs::read_to_string(&store).unwrap();
    assert!(text.starts_with("tarpit-greylist 2 "), "{text}");
    let lines = |kind: &str| text.lines().filter(|l| l.starts_with(kind)).count();
    assert_eq!((lines("P "), lines("A ")), (2, 1), "{text}");
}
