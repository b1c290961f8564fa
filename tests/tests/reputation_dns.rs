//! The reputation checks against real DNS servers inside the test's server
//! namespace: rbldnsd for the lists, dnsmasq for PTR/A/AAAA records and as
//! a query log in front of rbldnsd. The lookups run on a thread inside that
//! namespace, so no query can reach the machine's resolver.
use std::future::Future;
use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tarpit::config::Config;
use tarpit::reputation::dnsbl::ListAction;
use tarpit::reputation::fcrdns::HostPattern;
use tarpit::reputation::{DnsVerdict, Reputation};
use tarpit_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use tarpit_tests::{Rbldnsd, TestNet, require_root, wait};

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn reputation(toml: &str, hosts: &[&str]) -> Reputation {
    let c = Config::parse(toml).unwrap_or_else(|e| panic!("config: {e}\n{toml}"));
    let hosts: Vec<HostPattern> = hosts.iter().map(|h| h.parse().unwrap()).collect();
    Reputation::new(&c.dns, &c.dnsbl, &c.dnswl, hosts).expect("reputation")
}

async fn verdict(r: &Reputation, addr: &str) -> DnsVerdict {
    r.start_lookups(ip(addr)).verdict().await.clone()
}

/// The second zone: weights. 198.51.100.66-68 are in it.
const W_ZONE: &str = ":127.0.0.3:weighted\n198.51.100.66\n198.51.100.67\n198.51.100.68\n";
/// An allow list with dnswl.org-style codes.
const WL_ZONE: &str = ":127.0.10.2:allowed\n198.51.100.11\n198.51.100.68\n";
/// IPv6 block list.
const V6_ZONE: &str = ":127.0.0.2:v6 listed\nfd5b:1e00::66\n";

fn lists(net: &TestNet) -> Rbldnsd {
    Rbldnsd::start(
        net,
        &[
            "bl.test:ip4set:bl.zone",
            "w.test:ip4set:w.zone",
            "wl.test:ip4set:wl.zone",
            "v6.test:ip6trie:v6.zone",
        ],
        &[
            ("w.zone", W_ZONE),
            ("wl.zone", WL_ZONE),
            ("v6.zone", V6_ZONE),
        ],
    )
    .expect("rbldnsd")
}

#[test]
fn reputation_dnsbl_listed_unlisted_filtered_weighted() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let _rbl = lists(&net);
    let toml = r#"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
[dnsbl]
# bl.zone answers 127.0.0.2 for 198.51.100.64/26 and 127.0.0.4 for .7
sites = ["bl.test=127.0.0.[2..3]*2", "w.test*1", "v6.test*3"]
threshold = 3
action = "delay"
[dnsbl.actions]
"w.test" = "reject"
[dnswl]
sites = ["wl.test=127.0.[0..255].[1..3]*-2"]
"#;
    net.in_server(|| {
        block_on(async {
            let r = reputation(toml, &[]);
            // Unlisted anywhere.
            let v = verdict(&r, "198.51.100.9").await;
            assert_eq!((v.score, v.listed, v.dnswl), (0, None, false), "{v:?}");
            assert!(v.complete);
            // Listed in bl.test (code 2): weight 2 stays below threshold 3.
            let v = verdict(&r, "198.51.100.65").await;
            assert_eq!((v.score, v.listed), (2, None), "{v:?}");
            // bl.test + w.test = 3: listed; w.test's custom action wins.
            let v = verdict(&r, "198.51.100.66").await;
            assert_eq!((v.score, v.listed), (3, Some(ListAction::Reject)), "{v:?}");
            assert_eq!(v.action(), Some(ListAction::Reject));
            assert_eq!(
                v.reject_reply(),
                "554 5.7.1 Service unavailable; client blocked using bl.test, w.test"
            );
            // In the list with code 4: the reply filter [2..3] drops it.
            let v = verdict(&r, "198.51.100.7").await;
            assert_eq!((v.score, v.listed), (0, None), "{v:?}");
            // Same address from a v4-mapped v6 socket.
            let v = verdict(&r, "::ffff:198.51.100.66").await;
            assert_eq!(v.listed, Some(ListAction::Reject), "{v:?}");
            // An allow list offsets the block lists: 2 + 1 - 2 = 1.
            let v = verdict(&r, "198.51.100.68").await;
            assert_eq!((v.score, v.listed, v.dnswl), (1, None, false), "{v:?}");
            // Only on the allow list: -2 reaches dnswl.threshold -1.
            let v = verdict(&r, "198.51.100.11").await;
            assert_eq!((v.score, v.dnswl), (-2, true), "{v:?}");
            assert!(v.exempt());
            // IPv6 (nibble names, ip6trie): weight 3, default action.
            let v = verdict(&r, "fd5b:1e00::66").await;
            assert_eq!((v.score, v.listed), (3, Some(ListAction::Delay)), "{v:?}");
            let v = verdict(&r, "fd5b:1e00::9").await;
            assert_eq!((v.score, v.listed), (0, None), "{v:?}");

            let m = r.metrics();
            let bl = m.list("bl.test").unwrap();
            // .65 .66 .7 .68 answered with records (.66 twice: the mapped
            // address was served from the result cache).
            assert_eq!(bl.listed.load(Relaxed), 4);
            assert_eq!(bl.cache_hits.load(Relaxed), 1);
            assert_eq!(bl.errors.load(Relaxed) + bl.timeouts.load(Relaxed), 0);
            assert!(bl.latency.count() >= 6);
            let hits = |spec: &str| {
                m.sites
                    .iter()
                    .find(|s| s.spec == spec)
                    .unwrap()
                    .hits
                    .load(Relaxed)
            };
            assert_eq!(hits("bl.test=127.0.0.[2..3]*2"), 4); // .65 .66 .66 .68
            assert_eq!(hits("w.test*1"), 3); // .66 .66 .68
            assert_eq!(hits("wl.test=127.0.[0..255].[1..3]*-2"), 2);
            assert_eq!(hits("v6.test*3"), 1);
            assert_eq!(m.listed_reject.load(Relaxed), 2);
            assert_eq!(m.listed_delay.load(Relaxed), 1);
            assert_eq!(m.dnswl.load(Relaxed), 1);
            let mut text = String::new();
            m.render(&mut text);
            assert!(
                text.contains("tarpit_dnsbl_site_hits_total{site=\"w.test*1\"} 3"),
                "{text}"
            );
        })
    })
    .unwrap();
}

#[test]
fn reputation_fcrdns_confirms_and_refuses() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let a = |name: &str, addr: &str| (name.to_string(), ip(addr));
    let dns = Dnsmasq::start(
        &net,
        &DnsmasqConfig {
            port: 5300,
            // host-record: PTR and A/AAAA agree (forward-confirmed).
            addr: vec![
                a("mx.partner.example", "198.51.100.20"),
                a("mail.partner.example", "198.51.100.99"),
                a("mx.other.example", "198.51.100.22"),
                a("gw.exact.example", "198.51.100.23"),
                a("partner.example", "198.51.100.25"),
                a("mx6.partner.example", "fd5b:1e00::20"),
            ],
            // The PTR of .21 claims a partner name whose A record is .99.
            ptr: vec![(ip("198.51.100.21"), "mail.partner.example".into())],
            local: vec![
                "in-addr.arpa".into(),
                "ip6.arpa".into(),
                "partner.example".into(),
                "other.example".into(),
                "exact.example".into(),
            ],
            forward: vec![],
        },
    )
    .expect("dnsmasq");
    let toml = "[dns]\nnameservers = [\"127.0.0.1:5300\"]\ntimeout = \"3s\"\n";
    net.in_server(|| {
        block_on(async {
            let r = reputation(toml, &["*.partner.example", "gw.exact.example"]);
            let host = |v: &DnsVerdict| v.allow_host.clone();
            let v = verdict(&r, "198.51.100.20").await;
            assert_eq!(host(&v).as_deref(), Some("mx.partner.example"), "{v:?}");
            assert!(v.exempt() && v.complete);
            let v = verdict(&r, "fd5b:1e00::20").await;
            assert_eq!(host(&v).as_deref(), Some("mx6.partner.example"), "{v:?}");
            let v = verdict(&r, "198.51.100.23").await;
            assert_eq!(host(&v).as_deref(), Some("gw.exact.example"), "{v:?}");
            // A PTR that does not forward-confirm does not count.
            let v = verdict(&r, "198.51.100.21").await;
            assert_eq!(host(&v), None, "{v:?}");
            assert!(!v.exempt() && v.complete);
            // Confirmed, but not on the list.
            let v = verdict(&r, "198.51.100.22").await;
            assert_eq!(host(&v), None, "{v:?}");
            // *.partner.example does not cover partner.example itself.
            let v = verdict(&r, "198.51.100.25").await;
            assert_eq!(host(&v), None, "{v:?}");
            // No PTR at all.
            let v = verdict(&r, "198.51.100.24").await;
            assert_eq!(host(&v), None, "{v:?}");
            assert!(v.complete);
            assert_eq!(r.metrics().fcrdns_confirmed.load(Relaxed), 3);
        })
    })
    .unwrap();
    // The answers came from dnsmasq: PTR, then the forward lookup.
    assert_eq!(
        dns.queries_for("21.100.51.198.in-addr.arpa"),
        1,
        "{}",
        dns.log()
    );
    assert_eq!(dns.queries_for("mail.partner.example"), 1, "{}", dns.log());
    // mx.other.example is not on the list: never forward-looked-up.
    assert_eq!(dns.queries_for("mx.other.example"), 0, "{}", dns.log());
}

#[test]
fn reputation_dns_down_or_silent_is_not_listed_after_the_timeout() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    // A server that takes queries and never answers.
    let silent: UdpSocket = net
        .in_server(|| UdpSocket::bind("127.0.0.1:5398"))
        .unwrap()
        .unwrap();
    let timeout = Duration::from_secs(1);
    let slack = Duration::from_millis(1500);
    for (what, ns) in [("down", "127.0.0.1:5399"), ("silent", "127.0.0.1:5398")] {
        let toml = format!(
            "[dns]\nnameservers = [\"{ns}\"]\ntimeout = \"1s\"\n[dnsbl]\nsites = [\"bl.test\"]\n"
        );
        net.in_server(|| {
            block_on(async {
                let r = reputation(&toml, &["*.partner.example"]);
                let t0 = Instant::now();
                let mut h = r.start_lookups(ip("198.51.100.66"));
                let v = h.verdict().await.clone();
                let took = t0.elapsed();
                assert!(took <= timeout + slack, "{what}: verdict after {took:?}");
                if what == "silent" {
                    assert!(
                        took >= timeout - Duration::from_millis(50),
                        "{what}: {took:?}"
                    );
                }
                assert_eq!(v.listed, None, "{what}: {v:?}");
                assert!(!v.complete && !v.exempt(), "{what}: {v:?}");
                let m = r.metrics();
                let bl = m.list("bl.test").unwrap();
                assert_eq!(
                    bl.errors.load(Relaxed) + bl.timeouts.load(Relaxed),
                    1,
                    "{what}"
                );
                if what == "silent" {
                    assert_eq!(bl.timeouts.load(Relaxed), 1);
                }
                assert_eq!(m.incomplete.load(Relaxed), 1, "{what}");
                assert_eq!(m.fcrdns_errors.load(Relaxed), 1, "{what}");
                // Nothing was cached: the next connection asks again.
                let _ = r.start_lookups(ip("198.51.100.66")).verdict().await;
                assert_eq!(m.allow_cache_hits.load(Relaxed), 0, "{what}");
            })
        })
        .unwrap();
    }
    // The silent server really received the queries.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    assert!(
        silent.recv_from(&mut buf).is_ok(),
        "no query reached the silent server"
    );
}

#[test]
fn reputation_allow_cache_avoids_a_second_query() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let _rbl = lists(&net);
    // dnsmasq in front of rbldnsd, for its query log.
    let dns = Dnsmasq::start(
        &net,
        &DnsmasqConfig {
            port: 5301,
            forward: vec![("bl.test".into(), "127.0.0.1".parse().unwrap(), 5353)],
            ..Default::default()
        },
    )
    .expect("dnsmasq");
    let toml = r#"
[dns]
nameservers = ["127.0.0.1:5301"]
timeout = "3s"
[dnsbl]
sites = ["bl.test"]
min_ttl = "1s"
max_ttl = "2s"
allow_ttl = "3s"
"#;
    let clean = "9.100.51.198.bl.test";
    let listed = "66.100.51.198.bl.test";
    let count = |name: &str, n: usize| {
        // dnsmasq writes its log as it goes; allow it a moment.
        wait::until(Duration::from_secs(2), || dns.queries_for(name) >= n);
        dns.queries_for(name)
    };
    net.in_server(|| {
        block_on(async {
            let r = reputation(toml, &[]);
            let v = verdict(&r, "198.51.100.9").await;
            assert!(
                v.listed.is_none() && v.complete && !v.from_allow_cache,
                "{v:?}"
            );
            assert_eq!(count(clean, 1), 1, "{}", dns.log());
            // Passed: the allow cache answers, no query.
            let v = verdict(&r, "198.51.100.9").await;
            assert!(v.from_allow_cache, "{v:?}");
            let v = verdict(&r, "198.51.100.9").await;
            assert!(v.from_allow_cache, "{v:?}");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(dns.queries_for(clean), 1, "{}", dns.log());
            assert_eq!(r.metrics().allow_cache_hits.load(Relaxed), 2);
            // A listed client is not allow-cached, but its answer is cached
            // for the record's TTL (clamped to max_ttl).
            let v = verdict(&r, "198.51.100.66").await;
            assert!(v.listed.is_some(), "{v:?}");
            let v = verdict(&r, "198.51.100.66").await;
            assert!(v.listed.is_some() && !v.from_allow_cache, "{v:?}");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(count(listed, 1), 1, "{}", dns.log());
            assert_eq!(
                r.metrics()
                    .list("bl.test")
                    .unwrap()
                    .cache_hits
                    .load(Relaxed),
                1
            );
            // Both caches expire: asked again.
            tokio::time::sleep(Duration::from_millis(3200)).await;
            let v = verdict(&r, "198.51.100.9").await;
            assert!(!v.from_allow_cache, "{v:?}");
            let _ = verdict(&r, "198.51.100.66").await;
            assert_eq!(count(clean, 2), 2, "{}", dns.log());
            assert_eq!(count(listed, 2), 2, "{}", dns.log());
        })
    })
    .unwrap();
}
