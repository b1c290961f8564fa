//! The reputation checks seen from real clients (swaks) through the agent
//! to real Postfix, with real DNS servers (rbldnsd, dnsmasq) inside the
//! test's server namespace: DNSBL actions and weights change what the
//! client sees, a forward-confirmed host name skips the tarpit, DNS that
//! does not answer delays nobody beyond the timeout, and greylisting
//! defers, passes after the wait, and remembers across a restart.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use tarpit_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use tarpit_tests::smtp_client::{agent_config, metric, proxy_backend};
use tarpit_tests::swaks::{Swaks, swaks};
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, Rbldnsd, TempDir, TestNet, require_root,
};

/// Scheduling, DNS on loopback, Postfix and the veth take well under this.
const SLACK: Duration = Duration::from_millis(2500);

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

#[track_caller]
fn assert_between(what: &str, took: Duration, min: Duration) {
    // swaks starts its banner clock after connect() returned, in perl: on
    // a busy 2-core box that can be a moment after the agent's (accept).
    let early = Duration::from_millis(250);
    assert!(
        took + early >= min && took <= min + SLACK,
        "{what}: took {took:?}, expected {min:?} (+{SLACK:?})"
    );
}

const BLACKLIST_DELAY: Duration = Duration::from_secs(2);

#[test]
fn reputation_agent_dnsbl_listed_weighted_filtered_and_each_action() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    for last in [65, 7, 130, 131, 132, 140, 141] {
        net.add_client_addr(v4(last)).unwrap();
    }
    let v6_listed = IpAddr::V6(Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x66));
    net.add_client_addr(v6_listed).unwrap();
    let _rbl = Rbldnsd::start(
        &net,
        &[
            "bl.test:ip4set:bl.zone",
            "w.test:ip4set:w.zone",
            "w2.test:ip4set:w2.zone",
            "reject.test:ip4set:reject.zone",
            "drop.test:ip4set:drop.zone",
            "log.test:ip4set:log.zone",
            "v6.test:ip6trie:v6.zone",
        ],
        &[
            ("w.zone", "198.51.100.140\n198.51.100.141\n"),
            ("w2.zone", "198.51.100.141\n"),
            ("reject.zone", "198.51.100.130\n"),
            ("drop.zone", "198.51.100.131\n"),
            ("log.zone", "198.51.100.132\n"),
            ("v6.zone", ":127.0.0.2:v6\nfd5b:1e00::66\n"),
        ],
    )
    .expect("rbldnsd");
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).expect("postfix");
    let rest = r#"
[greeting]
delay = "1s"
[blacklist]
delay = "2s"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
[dnsbl]
# bl.zone: 198.51.100.64/26 answers 127.0.0.2, 198.51.100.7 answers 127.0.0.4
sites = ["bl.test=127.0.0.2*3", "w.test*2", "w2.test*1", "reject.test*3",
         "drop.test*3", "log.test*3", "v6.test*3"]
threshold = 3
action = "delay"
[dnsbl.actions]
"reject.test" = "reject"
"drop.test" = "drop"
"log.test" = "log"
"#;
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    let quit_rcpt = ["--quit-after", "RCPT"];
    // Every client runs at once; each session's time is its own.
    let cases: Vec<(IpAddr, &[&str])> = vec![
        (CLIENT_V4.into(), &quit_rcpt),
        (CLIENT_V6.into(), &quit_rcpt),
        (v4(65), &quit_rcpt),
        (v4(7), &quit_rcpt),
        (v4(140), &quit_rcpt),
        (v4(141), &quit_rcpt),
        (v4(130), &quit_rcpt),
        (v4(131), &quit_rcpt),
        (v4(132), &quit_rcpt),
        (v6_listed, &quit_rcpt),
    ];
    let results: Vec<Swaks> = std::thread::scope(|s| {
        let hs: Vec<_> = cases
            .iter()
            .map(|(src, extra)| {
                let net = &net;
                s.spawn(move || swaks(net, *src, extra))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let r = |i: usize| &results[i];
    // The lookups run during the greeting delay; a listed client then
    // waits the blacklist delay at MAIL and at RCPT.
    let greet = Duration::from_secs(1);
    let two = greet + BLACKLIST_DELAY * 2;
    // Unlisted, v4 and v6: the greeting delay only.
    for i in [0, 1] {
        assert!(r(i).ok, "{}", r(i).out);
        assert_between("unlisted", r(i).took, greet);
    }
    // Listed (weight 3): MAIL and RCPT each held the blacklist delay.
    assert!(r(2).ok, "{}", r(2).out);
    assert_between("listed .65", r(2).took, two);
    // Listed with code 4: the reply filter 127.0.0.2 excludes it.
    assert!(r(3).ok, "{}", r(3).out);
    assert_between("filtered .7", r(3).took, greet);
    // Weight 2 alone stays below the threshold; 2 + 1 reaches it.
    assert!(r(4).ok, "{}", r(4).out);
    assert_between("weight 2", r(4).took, greet);
    assert!(r(5).ok, "{}", r(5).out);
    assert_between("weights 2+1", r(5).took, two);
    // reject: held like the delay, then 554 in place of the MTA's answer.
    assert!(
        r(6).out
            .contains("554 5.7.1 Service unavailable; client blocked using reject.test"),
        "{}",
        r(6).out
    );
    assert_between("reject", r(6).took, two);
    // drop: closed after the greeting delay, no banner.
    assert!(!r(7).ok, "{}", r(7).out);
    assert!(!r(7).out.contains("<-  220"), "{}", r(7).out);
    assert!(r(7).wall >= greet, "drop: {:?}", r(7).wall);
    // log: logged only.
    assert!(r(8).ok, "{}", r(8).out);
    assert_between("log", r(8).took, greet);
    // IPv6 client on an ip6trie list.
    assert!(r(9).ok, "{}", r(9).out);
    assert_between("listed v6", r(9).took, two);

    // Neither the dropped client nor the rejected RCPT reached Postfix.
    std::thread::sleep(Duration::from_millis(300));
    let log = pf.log();
    assert!(!log.contains("[198.51.100.131]"), "{log}");
    assert!(
        log.contains("connect from unknown[198.51.100.130]"),
        "{log}"
    );
    assert!(!log.contains("RCPT from unknown[198.51.100.130]"), "{log}");
    assert!(agent.log().contains("client listed"), "{}", agent.log());
    let m = |name: &str| metric(&net, name).unwrap_or(-1.0);
    assert_eq!(m("tarpit_sessions_total{outcome=\"dnsbl_drop\"}"), 1.0);
    assert_eq!(m("tarpit_dnsbl_verdicts_total{outcome=\"delay\"}"), 3.0);
    assert_eq!(m("tarpit_dnsbl_verdicts_total{outcome=\"reject\"}"), 1.0);
    assert_eq!(m("tarpit_dnsbl_verdicts_total{outcome=\"drop\"}"), 1.0);
    assert_eq!(m("tarpit_dnsbl_verdicts_total{outcome=\"log\"}"), 1.0);
    assert_eq!(
        m("tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"listed\"}"),
        2.0
    );
    assert_eq!(m("tarpit_dnsbl_site_hits_total{site=\"w2.test*1\"}"), 1.0);
    assert!(m("tarpit_dnsbl_lookup_seconds_count{list=\"bl.test\"}") >= 10.0);

    // The callout-verification sender (<>) skips the delay of its MAIL and
    // first RCPT, not the reject: a listed bot gains nothing by using it.
    let s = swaks(&net, v4(130), &["--quit-after", "RCPT", "--from", "<>"]);
    assert!(!s.ok, "{}", s.out);
    assert!(s.out.contains("554 5.7.1"), "{}", s.out);
    assert_between("callout sender", s.took, greet);
}

#[test]
fn reputation_agent_host_allow_list_and_silent_dns() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    for last in [20, 21] {
        net.add_client_addr(v4(last)).unwrap();
    }
    let partner_v6 = IpAddr::V6(Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x20));
    net.add_client_addr(partner_v6).unwrap();
    let _dns = Dnsmasq::start(
        &net,
        &DnsmasqConfig {
            port: 5300,
            addr: vec![
                ("mx.partner.example".into(), v4(20)),
                ("mail.partner.example".into(), v4(99)),
                ("mx6.partner.example".into(), partner_v6),
            ],
            ptr: vec![(v4(21), "mail.partner.example".into())],
            local: vec![
                "in-addr.arpa".into(),
                "ip6.arpa".into(),
                "partner.example".into(),
            ],
            forward: vec![],
        },
    )
    .expect("dnsmasq");
    let pins = PinDir::new().unwrap();
    let _pf = Postfix::start(&net).expect("postfix");
    let greeting = Duration::from_secs(3);
    let rest = r#"
[greeting]
delay = "3s"
[dns]
nameservers = ["127.0.0.1:5300"]
timeout = "2s"
[allow]
hosts = ["*.partner.example"]
"#;
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    // Forward-confirmed partner name: no greeting delay.
    let s = swaks(&net, v4(20), &[]);
    assert!(s.ok && s.took < SLACK, "confirmed: {:?}\n{}", s.took, s.out);
    let s = swaks(&net, partner_v6, &[]);
    assert!(
        s.ok && s.took < SLACK,
        "confirmed v6: {:?}\n{}",
        s.took,
        s.out
    );
    // A PTR that does not forward-confirm counts for nothing.
    let s = swaks(&net, v4(21), &[]);
    assert!(s.ok, "{}", s.out);
    assert_between("not confirmed", s.took, greeting);
    assert!(
        agent.log().contains("allow-listed by DNS"),
        "{}",
        agent.log()
    );
    drop(agent);

    // A DNS server that never answers: the session goes on after the
    // timeout, as not listed, and the metric counts it.
    let _silent = net
        .in_server(|| std::net::UdpSocket::bind("127.0.0.1:5398"))
        .unwrap()
        .unwrap();
    let rest = r#"
[greeting]
delay = "0s"
[dns]
nameservers = ["127.0.0.1:5398"]
timeout = "2s"
[dnsbl]
sites = ["bl.test"]
"#;
    let _agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    assert!(s.ok, "{}", s.out);
    assert!(s.out.contains("250 2.0.0 Ok: queued"), "{}", s.out);
    assert_between("silent DNS", s.took, Duration::from_secs(2));
    assert_eq!(metric(&net, "tarpit_dnsbl_incomplete_total"), Some(1.0));
    assert_eq!(
        metric(
            &net,
            "tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"timeout\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn reputation_agent_greylisting_defers_passes_and_survives_a_restart() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    for last in [3, 4] {
        net.add_client_addr(v4(last)).unwrap();
    }
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).expect("postfix");
    let dir = TempDir::new("rep");
    let rest = format!(
        r#"
[greeting]
delay = "0s"
[allow]
ips = ["198.51.100.4/32"]
[greylist]
mode = "triplet"
min_wait = "5s"
retry_window = "1m"
store = "{}"
"#,
        dir.path.join("greylist.db").display()
    );
    let config = agent_config(&net, &pins, &proxy_backend(), &rest);
    let agent = Agent::start(&net, &config).expect("agent");
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    // The attempt happened before swaks returned: waits count from here.
    let first = Instant::now();
    assert!(!s.ok, "{}", s.out);
    assert!(s.out.contains("451 4.7.1 Greylisted"), "{}", s.out);
    // An early retry is deferred again.
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    assert!(s.out.contains("451 4.7.1"), "{}", s.out);
    // The allow-listed client is never greylisted.
    let s = swaks(&net, v4(4), &[]);
    assert!(s.ok, "allow-listed: {}", s.out);
    // IPv6: its own triplet.
    let s = swaks(&net, CLIENT_V6.into(), &[]);
    assert!(s.out.contains("451 4.7.1"), "{}", s.out);
    // After the minimum wait, within the window: passes and is delivered.
    std::thread::sleep(Duration::from_millis(5300).saturating_sub(first.elapsed()));
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    assert!(s.ok, "retry: {}", s.out);
    assert!(s.out.contains("250 2.0.0 Ok: queued"), "{}", s.out);
    // Same /24, sender and recipient from another address: passes too.
    let s = swaks(&net, v4(3), &[]);
    assert!(s.ok, "same /24: {}", s.out);
    // Another recipient is another triplet.
    let s = swaks(&net, CLIENT_V4.into(), &["--to", "other@tarpit.test"]);
    assert!(s.out.contains("451 4.7.1"), "{}", s.out);
    assert!(metric(&net, "tarpit_greylist_tempfail_total").unwrap_or(0.0) >= 4.0);
    agent.stop().expect("agent stops");

    // A new agent process reads the store: the pass is remembered.
    let _agent = Agent::start(&net, &config).expect("agent restarts");
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    assert!(s.ok, "after restart: {}", s.out);
    assert!(
        pf.wait_delivered(4, Duration::from_secs(20)),
        "4 messages delivered"
    );
}

#[test]
fn reputation_agent_greylisting_at_connect() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).expect("postfix");
    let dir = TempDir::new("rep");
    let rest = format!(
        r#"
[greeting]
delay = "0s"
[greylist]
mode = "connect"
min_wait = "5s"
retry_window = "1m"
store = "{}"
"#,
        dir.path.join("greylist.db").display()
    );
    let _agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).expect("agent");
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    // The attempt happened before swaks returned: waits count from here.
    let first = Instant::now();
    assert!(!s.ok, "{}", s.out);
    assert!(s.out.contains("421 4.7.1 Greylisted"), "{}", s.out);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pf.log().contains("[198.51.100.2]"),
        "the MTA never saw it:\n{}",
        pf.log()
    );
    std::thread::sleep(Duration::from_millis(5300).saturating_sub(first.elapsed()));
    let s = swaks(&net, CLIENT_V4.into(), &[]);
    assert!(s.ok, "{}", s.out);
    assert_eq!(
        metric(&net, "tarpit_sessions_total{outcome=\"greylisted\"}"),
        Some(1.0)
    );
}

#[test]
fn reputation_agent_allow_cache_skips_the_second_lookup() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    net.add_client_addr(v4(65)).unwrap();
    let _rbl = Rbldnsd::start(&net, &["bl.test:ip4set:bl.zone"], &[]).expect("rbldnsd");
    // dnsmasq in front of rbldnsd: its query log shows every lookup.
    let dns = Dnsmasq::start(
        &net,
        &DnsmasqConfig {
            port: 5301,
            forward: vec![("bl.test".into(), Ipv4Addr::LOCALHOST, 5353)],
            ..Default::default()
        },
    )
    .expect("dnsmasq");
    let pins = PinDir::new().unwrap();
    let _pf = Postfix::start(&net).expect("postfix");
    let rest = r#"
[greeting]
delay = "0s"
[blacklist]
delay = "1s"
[dns]
nameservers = ["127.0.0.1:5301"]
timeout = "3s"
[dnsbl]
sites = ["bl.test"]
allow_ttl = "1h"
"#;
    let _agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    let clean = "2.100.51.198.bl.test";
    let listed = "65.100.51.198.bl.test";
    for _ in 0..3 {
        let s = swaks(&net, CLIENT_V4.into(), &["--quit-after", "RCPT"]);
        assert!(s.ok && s.took < SLACK, "{:?}\n{}", s.took, s.out);
        let s = swaks(&net, v4(65), &["--quit-after", "RCPT"]);
        assert!(s.ok, "{}", s.out);
        assert_between("listed", s.took, Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The client that passed was looked up once; the listed one too (its
    // answer is cached for the record's TTL, but it never enters the
    // allow cache).
    assert_eq!(dns.queries_for(clean), 1, "{}", dns.log());
    assert_eq!(dns.queries_for(listed), 1, "{}", dns.log());
    assert_eq!(
        metric(&net, "tarpit_dnsbl_allow_cache_hits_total"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &net,
            "tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"cached\"}"
        ),
        Some(2.0)
    );
}
