//! Limits by network, not by address (issue 16), through the real agent:
//! addresses rotated through one IPv6 /64 cannot hold more than
//! `limits.per_ipv6_prefix` sessions, nor take the slots the site keeps
//! for its own relays and partners (`limits.reserved_sessions`), nor turn
//! each new address into one DNSBL query per list.
//!
//! The ten thousand sessions from one /64 run at the shipped
//! defaults (a few seconds). Filling every global slot is shown at a
//! smaller size with the same mechanism (`sessions = 200` with 10
//! reserved, `per_ipv6_prefix = 50`). The rotating clients bind any
//! address of fd5b:1e00:0:10::/60 (sixteen /64s inside the tests'
//! fd5b:1e00::/48): a local route for it in the client namespace with
//! `ip_nonlocal_bind`, and a route back through the client's address in
//! the server namespace. Both namespaces, and with them the routes and the
//! sysctl, go when the test network is dropped.
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, metric, proxy_backend, scrape_metrics,
};
use tarpit_tests::{Agent, CLIENT_V6, PinDir, Postfix, Rbldnsd, TestNet, require_root};

/// The rotating clients' range, inside the tests' fd5b:1e00::/48.
const ROTATING: &str = "fd5b:1e00:0:10::/60";
/// An internal relay (`allow.internal`) and an allow-listed partner
/// (`allow.ips`).
const RELAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const PARTNER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 4);
/// Served at once, whatever else is going on: well under any hold here.
const AT_ONCE: Duration = Duration::from_secs(3);

/// Address `host` of the `net`-th /64 of [`ROTATING`].
fn rotating(net: u16, host: u16) -> IpAddr {
    assert!(net < 16, "outside {ROTATING}");
    IpAddr::V6(Ipv6Addr::new(
        0xfd5b,
        0x1e00,
        0,
        0x10 + net,
        0,
        0,
        0xbeef,
        host,
    ))
}

/// The test network, with every address of [`ROTATING`] usable as a
/// client source address, and the relay's and the partner's addresses.
fn network() -> TestNet {
    let net = TestNet::new().expect("test network");
    for a in [RELAY, PARTNER] {
        net.add_client_addr(a.into()).expect("client address");
    }
    let run = |mut c: std::process::Command| {
        let out = c.output().expect("run");
        assert!(out.status.success(), "{c:?}: {out:?}");
    };
    let mut c = net.client_cmd("sysctl");
    c.args(["-qw", "net.ipv6.ip_nonlocal_bind=1"]);
    run(c);
    let mut c = net.client_cmd("ip");
    c.args(["-6", "route", "add", "local", ROTATING, "dev", "lo"]);
    run(c);
    let via = CLIENT_V6.to_string();
    let mut c = net.server_cmd("ip");
    c.args([
        "-6",
        "route",
        "add",
        ROTATING,
        "via",
        &via,
        "dev",
        &net.server_if,
    ]);
    run(c);
    net
}

fn connect(net: &TestNet, src: IpAddr) -> SmtpClient {
    let dst = if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    };
    let c = SmtpClient::connect(net, src, dst).expect("connect");
    c.set_read_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// The first line the client gets: the teaser (`220-`) for a client being
/// served and held, a `421` for one refused.
fn first_line(c: &mut SmtpClient) -> String {
    c.line().expect("a first line")
}

/// A client held in the greeting delay, served: it got the teaser.
fn held(net: &TestNet, src: IpAddr) -> SmtpClient {
    let mut c = connect(net, src);
    let l = first_line(&mut c);
    assert!(l.starts_with("220-"), "{src}: {l:?}");
    c
}

/// `src` is refused at once with `reply`.
fn refused(net: &TestNet, src: IpAddr, reply: &str) {
    let t = Instant::now();
    let mut c = connect(net, src);
    assert_eq!(first_line(&mut c), reply, "{src}");
    assert!(
        t.elapsed() < AT_ONCE,
        "refused only after {:?}",
        t.elapsed()
    );
    assert!(c.closed_within(Duration::from_secs(5)));
}

/// An exempt client gets the MTA's banner without the greeting delay and
/// can talk to the MTA.
fn served_at_once(net: &TestNet, src: IpAddr) {
    let t = Instant::now();
    let mut c = connect(net, src);
    let r = c.reply().expect("banner");
    assert_eq!(r.code, 220, "{src}: {}", r.text);
    assert!(!r.text.starts_with("220-tarpit"), "{src} got the teaser");
    assert!(t.elapsed() < AT_ONCE, "{src} waited {:?}", t.elapsed());
    c.expect("EHLO relay.example", 250).expect("EHLO");
    c.expect("QUIT", 221).expect("QUIT");
}

#[test]
fn one_slash_64_is_capped_and_the_sites_own_clients_keep_their_slots() {
    if !require_root() {
        return;
    }
    let net = network();
    let pins = PinDir::new().expect("pin dir");
    let _pf = Postfix::start(&net).expect("postfix");
    let _agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            &format!(
                "[greeting]\ndelay = \"120s\"\nteaser = \"tarpit.test\"\n\
                 [allow]\ninternal = [\"{RELAY}/32\"]\nips = [\"{PARTNER}/32\"]\n\
                 [limits]\nsessions = 200\nreserved_sessions = 10\nper_ip = 2\n\
                 per_ipv6_prefix = 50\n"
            ),
        ),
    )
    .expect("agent");

    // Fifty addresses of one /64 are served (held in the greeting delay);
    // the 51st address of that /64 is refused, though it is new.
    let mut open: Vec<SmtpClient> = (1..=50).map(|h| held(&net, rotating(0, h))).collect();
    refused(
        &net,
        rotating(0, 51),
        "421 4.7.0 Too many connections from your network\r\n",
    );
    // A client of another /64 is served.
    open.push(held(&net, rotating(1, 1)));
    assert_eq!(
        metric(&net, "tarpit_limit_refusals_total{limit=\"per_prefix\"}"),
        Some(1.0)
    );

    // Fill the open slots (200 - 10 reserved) from more /64s, each under
    // its cap: 50 + 1 so far, then 49 + 50 + 40.
    for (n, count) in [(1, 49), (2, 50), (3, 40)] {
        let first = if n == 1 { 2 } else { 1 };
        for h in first..first + count {
            open.push(held(&net, rotating(n, h)));
        }
    }
    assert_eq!(open.len(), 190);
    // Every open slot is taken: an ordinary client of a fresh /64 is
    // refused for lack of slots...
    refused(
        &net,
        rotating(4, 1),
        "421 4.3.2 Too many sessions, try again later\r\n",
    );
    // ... while the internal relay and the allow-listed partner are served
    // at once, from the reserve.
    served_at_once(&net, RELAY.into());
    served_at_once(&net, PARTNER.into());
    // Both ended: their reserve slots are free again, a second round too.
    served_at_once(&net, RELAY.into());
    assert_eq!(
        metric(&net, "tarpit_limit_refusals_total{limit=\"sessions\"}"),
        Some(1.0)
    );
    // A session of the capped /64 ends: the /64 may open one more, and
    // the slot it frees goes to it.
    drop(open.swap_remove(0));
    std::thread::sleep(Duration::from_millis(300));
    open.push(held(&net, rotating(0, 52)));
    refused(
        &net,
        rotating(0, 53),
        "421 4.7.0 Too many connections from your network\r\n",
    );
    drop(open);
}

/// The ten thousand, at the shipped defaults (`sessions` 10000,
/// `per_ipv6_prefix` 200): ten thousand connections at once from ten
/// thousand addresses of one /64. Exactly 200 are served, every other one
/// is refused at once, and the relay, the partner and a client of another
/// /64 are served as if nothing were going on.
#[test]
fn ten_thousand_addresses_of_one_slash_64_get_two_hundred_sessions() {
    if !require_root() {
        return;
    }
    let net = network();
    let pins = PinDir::new().expect("pin dir");
    let _pf = Postfix::start(&net).expect("postfix");
    let _agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            &format!(
                "[greeting]\ndelay = \"120s\"\nteaser = \"tarpit.test\"\n\
                 [allow]\ninternal = [\"{RELAY}/32\"]\nips = [\"{PARTNER}/32\"]\n"
            ),
        ),
    )
    .expect("agent");
    const N: u16 = 10_000;
    // One thread in the client namespace opens them all, each from its
    // own address, and reads what each got first.
    let (firsts, conns): (Vec<String>, Vec<TcpStream>) = net
        .in_client(|| {
            let mut conns = Vec::with_capacity(usize::from(N));
            let mut firsts = Vec::with_capacity(usize::from(N));
            for h in 1..=N {
                let s = Socket::new(Domain::IPV6, Type::STREAM, None).expect("socket");
                s.bind(&SocketAddr::new(rotating(2, h), 0).into())
                    .expect("bind");
                s.connect_timeout(&agent_v6().into(), Duration::from_secs(10))
                    .expect("connect");
                let s: TcpStream = s.into();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                // The served stay open (held in the greeting delay); the
                // refused are closed at once (a few hundred descriptors,
                // not ten thousand).
                if line.starts_with("220-") {
                    conns.push(s);
                }
                firsts.push(line);
            }
            (firsts, conns)
        })
        .expect("client namespace");
    let served = firsts.iter().filter(|l| l.starts_with("220-")).count();
    let refused = firsts
        .iter()
        .filter(|l| *l == "421 4.7.0 Too many connections from your network\r\n")
        .count();
    assert_eq!((served, refused), (200, usize::from(N) - 200));
    assert_eq!(
        metric(&net, "tarpit_limit_refusals_total{limit=\"per_prefix\"}"),
        Some(f64::from(N - 200))
    );
    served_at_once(&net, RELAY.into());
    served_at_once(&net, PARTNER.into());
    let _other = held(&net, CLIENT_V6.into());
    drop(conns);
}

/// Twenty new addresses of one /64 with a budget of five look-ups a
/// minute: at most five (six, should the test straddle a refill) queries
/// reach the list; the rest are "not looked up" and counted. An address of
/// another /64 is looked up as usual.
#[test]
fn a_rotating_slash_64_makes_at_most_its_budget_of_dnsbl_queries() {
    if !require_root() {
        return;
    }
    let net = network();
    let pins = PinDir::new().expect("pin dir");
    let _dns = Rbldnsd::start(
        &net,
        &["bl.test:ip6trie:v6.zone"],
        &[("v6.zone", ":127.0.0.2:listed\nfd5b:1e00:0:1f::beef:1\n")],
    )
    .expect("rbldnsd");
    let _pf = Postfix::start(&net).expect("postfix");
    let _agent = Agent::start(
        &net,
        &agent_config(
            &net,
            &pins,
            &proxy_backend(),
            "[greeting]\ndelay = \"120s\"\nteaser = \"tarpit.test\"\n\
             [dns]\nnameservers = [\"127.0.0.1:5353\"]\ntimeout = \"2s\"\n\
             prefix_lookups_per_minute = 5\n\
             [dnsbl]\nsites = [\"bl.test\"]\n",
        ),
    )
    .expect("agent");
    let sent = |net: &TestNet| -> f64 {
        let text = scrape_metrics(net).expect("metrics");
        ["listed", "not_listed", "error", "timeout"]
            .iter()
            .filter_map(|r| {
                let name =
                    format!("tarpit_dnsbl_queries_total{{list=\"bl.test\",result=\"{r}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(&name)?.trim().parse::<f64>().ok())
            })
            .sum()
    };
    let open: Vec<SmtpClient> = (1..=20).map(|h| held(&net, rotating(0, h))).collect();
    // Every look-up has answered or been skipped (the timeout is 2 s).
    std::thread::sleep(Duration::from_secs(3));
    let queries = sent(&net);
    assert!(
        (5.0..=6.0).contains(&queries),
        "{queries} queries for 20 addresses of one /64"
    );
    let skipped = metric(
        &net,
        "tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"over_budget\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(queries + skipped, 20.0, "each address looked up or counted");
    // Another /64 has its own budget, and its listing is found.
    let other = held(&net, rotating(15, 1));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sent(&net), queries + 1.0);
    assert_eq!(
        metric(
            &net,
            "tarpit_dnsbl_queries_total{list=\"bl.test\",result=\"listed\"}"
        ),
        Some(1.0)
    );
    drop((open, other));
}
