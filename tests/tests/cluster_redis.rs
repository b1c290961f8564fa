//! Two MX hosts sharing one Redis (`[cluster]`, docs/cluster.md), each
//! with its own namespaces, kernel programs, pins, agent and Postfix, and
//! a real `redis-server` started by the test in a namespace of its own,
//! which both hosts reach over veths of their own (mx1 over TLS to its
//! IPv4 address, `rediss://` with a CA the test made, as the default user;
//! mx2 over TCP to its IPv6 address as the ACL user of docs/cluster.md,
//! password from a file).
//!
//! What a user sees:
//! - each host made its own greylist key at its first start; the cluster
//!   shares one (the second host takes the first's), and a sender
//!   greylisted at mx1 passes at mx2 after the minimum wait, while a
//!   triplet nobody saw is still greylisted at mx2;
//! - pre-greet strikes split across mx1 (two) and mx2 (one) block the bot
//!   in both hosts' XDP;
//! - `tarpit block add` on mx1 shows on mx2's kernel block list with the
//!   same expiry, except for an address on mx2's own allow list, and
//!   `tarpit ip` at mx2 names mx1 as the one who blocked;
//! - `tarpit auth add|del` on mx1 shows in mx2's AUTH map, and
//!   `tarpit allow add|del` in mx2's kernel allow list (kept through a
//!   reload at mx2);
//! - Redis killed: mail keeps flowing at both; a block added on mx2 and
//!   one deleted on mx1 meanwhile reach the other host once Redis is back,
//!   and so do a greylist first attempt and two pre-greet strikes made at
//!   mx1 meanwhile (a third strike at mx2 then blocks the bot);
//! - Redis hung (SIGSTOP): mail flows as fast as ever, and a block made
//!   meanwhile reaches the other host once Redis answers again;
//! - `tarpit stats` says the host is connected again.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{blocked, cli, cli_at, maps, talk_first};
use tarpit_tests::redis::Redis;
use tarpit_tests::smtp_client::metric;
use tarpit_tests::swaks::swaks;
use tarpit_tests::tempdir::TempDir;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, Postfix, ServiceNet, require_root, wait};

const MIN_WAIT: Duration = Duration::from_secs(3);
/// The ACL of docs/cluster.md: tarpit's keys, channel and commands only.
const ACL_USER: &[&str] = &[
    "--user",
    "tarpit",
    "on",
    ">cluster-test-secret",
    "~tarpit:*",
    "&tarpit:*",
    "-@all",
    "+get",
    "+set",
    "+mget",
    "+scan",
    "+publish",
    "+subscribe",
    "+ping",
    "+hello",
    "+auth",
    "+client|setname",
    "+select",
];
const ACL_DEFAULT: &[&str] = &["--user", "default", "on", "nopass", "~*", "&*", "+@all"];

fn host_config(node: &str, url: &str, grey: &TempDir, allow: &str, auth: &str) -> String {
    let store = grey.path.join("greylist.db");
    format!(
        r#"
[greeting]
delay = "1s"
[offenders]
pregreet_strikes = 3
slowdown = false
block_ttl = "10m"
[allow]
ips = [{allow}]
[greylist]
mode = "triplet"
min_wait = "{}s"
retry_window = "10m"
store = "{}"
[cluster]
url = "{url}"
node = "{node}"
timeout = "200ms"
{auth}
"#,
        MIN_WAIT.as_secs(),
        store.display()
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn two_mx_hosts_share_blocks_and_greylist_and_go_on_without_redis() {
    if !require_root() {
        return;
    }
    let (mx1, mx2, service) = common::mx_pair();
    let (net1, pins1, net2, pins2) = (&mx1.net, &mx1.pins, &mx2.net, &mx2.pins);
    let _pf1 = Postfix::start(net1).expect("postfix mx1");
    let _pf2 = Postfix::start(net2).expect("postfix mx2");
    let acl = [ACL_USER, ACL_DEFAULT].concat();
    let mut redis =
        Redis::start_tls(&service, &acl).expect("redis-server (scripts/install-test-deps.sh)");
    let (grey1, grey2) = (TempDir::new("cl-grey1"), TempDir::new("cl-grey2"));
    let pass = grey2.path.join("redis.pass");
    std::fs::write(&pass, "cluster-test-secret\n").unwrap();
    let auth = format!("user = \"tarpit\"\npassword_file = \"{}\"", pass.display());
    let tls = format!("ca_file = \"{}\"", redis.ca_file().display());
    let c1 = host_config("mx1", &redis.tls_url().unwrap(), &grey1, "", &tls);
    let c2 = host_config(
        "mx2",
        &redis.tcp_url_v6(),
        &grey2,
        "\"198.51.100.79/32\"",
        &auth,
    );
    let mx1 = Agent::start(net1, &common::config(net1, pins1, None, true, &c1)).expect("mx1");
    let mx2 = Agent::start(net2, &common::config(net2, pins2, None, true, &c2)).expect("mx2");
    let connected = |a: &Agent| a.log().contains("cluster: connected to Redis");
    wait::eventually("both hosts connected", Duration::from_secs(10), || {
        connected(&mx1) && connected(&mx2)
    });
    // mx2 is in as the ACL user, from its own address, and its password
    // is nowhere in its log; mx1 over TLS, from its own.
    let clients = redis.cli(&["CLIENT", "LIST"]).unwrap();
    let from = |host: String, what: &str| {
        clients
            .lines()
            .any(|l| l.contains(&format!("addr={host}")) && l.contains(what))
    };
    assert!(
        from(format!("[{}]", ServiceNet::host_v6(2)), "user=tarpit"),
        "{clients}"
    );
    let tls = format!("laddr={}", redis.laddr_tls().unwrap());
    assert!(from(ServiceNet::host_v4(1).to_string(), &tls), "{clients}");
    assert!(!mx2.log().contains("cluster-test-secret"));
    // Two keys made by tarpit, one cluster key: the host that connected
    // second took the first's, into its key file too.
    let key_of = |grey: &TempDir| {
        let text = std::fs::read_to_string(grey.path.join("greylist.key")).unwrap();
        text.lines().next().unwrap_or_default().to_string()
    };
    let took = |a: &Agent| a.log().contains("greylist key taken from the cluster");
    assert!(took(&mx1) ^ took(&mx2), "one host takes the other's key");
    assert_eq!(key_of(&grey1), key_of(&grey2));
    let in_redis = redis.cli(&["GET", "tarpit:grey-key"]).unwrap();
    assert_eq!(in_redis.trim(), key_of(&grey1));

    // Greylisted at mx1, retried at mx2 after the minimum wait: passes.
    let s = swaks(net1, CLIENT_V4.into(), &[]);
    let first = Instant::now();
    assert!(s.out.contains("451 4.7.1"), "mx1 first try: {}", s.out);
    std::thread::sleep((MIN_WAIT + Duration::from_millis(500)).saturating_sub(first.elapsed()));
    let s = swaks(net2, CLIENT_V4.into(), &[]);
    assert!(s.ok, "retry at mx2: {}\nmx2 log:\n{}", s.out, mx2.log());
    assert!(s.out.contains("250 2.0.0 Ok: queued"), "{}", s.out);
    // A triplet nobody saw is still greylisted at mx2.
    let s = swaks(net2, CLIENT_V4.into(), &["--to", "other@tarpit.test"]);
    assert!(s.out.contains("451 4.7.1"), "new triplet at mx2: {}", s.out);

    // Three pre-greet strikes, two at mx1 and one at mx2: one block, in
    // both kernels.
    let bot = IpAddr::from(CLIENT_V6);
    talk_first(net1, bot).unwrap();
    talk_first(net1, bot).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!blocked(pins1, &bot.to_string()) && !blocked(pins2, &bot.to_string()));
    talk_first(net2, bot).unwrap();
    wait::eventually("the bot blocked at mx2", Duration::from_secs(10), || {
        blocked(pins2, &bot.to_string())
    });
    wait::eventually("the bot blocked at mx1", Duration::from_secs(10), || {
        blocked(pins1, &bot.to_string())
    });

    // A block made at mx1 reaches mx2's kernel with the same expiry (to the
    // second: expiries are shared in whole seconds); one
    // on mx2's own allow list does not.
    cli(&mx1, &["block", "add", "198.51.100.79/32"]);
    cli(
        &mx1,
        &[
            "block",
            "add",
            "198.51.100.77/32",
            "--ttl",
            "10m",
            "--comment",
            "harvester seen at mx1",
        ],
    );
    wait::eventually(
        "mx1's block in mx2's kernel",
        Duration::from_secs(5),
        || blocked(pins2, "198.51.100.77"),
    );
    let there = maps(pins2)
        .block_match(ip("198.51.100.77"))
        .unwrap()
        .unwrap();
    let ttl = Duration::from_nanos(there.expires.expect("an expiry").0 - there.added.0);
    assert!(
        ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(602),
        "{ttl:?}"
    );
    assert!(blocked(pins1, "198.51.100.79"));
    assert!(
        !blocked(pins2, "198.51.100.79"),
        "mx2's allow list must win over mx1's block"
    );
    // `tarpit ip` at mx2 says who blocked, with the admin's comment, and
    // what was not applied here.
    let ip77 = cli_at(net2, &mx2, &["ip", "--no-dns", "198.51.100.77"]);
    let line = ip77
        .lines()
        .find(|l| l.contains("198.51.100.77/32 blocked by mx1"))
        .unwrap_or_else(|| panic!("{ip77}"));
    assert!(line.contains("(harvester seen at mx1)"), "{ip77}");
    let ip79 = cli_at(net2, &mx2, &["ip", "--no-dns", "198.51.100.79"]);
    assert!(
        ip79.contains("blocked by mx1") && ip79.contains("not applied here"),
        "{ip79}"
    );

    // An address authenticated at mx1 is authenticated at mx2 (the
    // once-per-day HELO rule, the bypass), with its expiry; deleted, gone.
    let user = ip("fd5b:1e00::60");
    cli(&mx1, &["auth", "add", "fd5b:1e00::60", "--ttl", "1h"]);
    wait::eventually(
        "mx1's authenticated address at mx2",
        Duration::from_secs(5),
        || maps(pins2).auth_get(user).unwrap().is_some(),
    );
    let a = maps(pins2).auth_get(user).unwrap().unwrap();
    let ttl = Duration::from_nanos(a.expires.expect("an expiry").0 - a.added.0);
    assert!(
        ttl > Duration::from_secs(3590) && ttl <= Duration::from_secs(3602),
        "{ttl:?}"
    );
    cli(&mx1, &["auth", "del", "fd5b:1e00::60"]);
    wait::eventually("mx1's deletion at mx2", Duration::from_secs(5), || {
        maps(pins2).auth_get(user).unwrap().is_none()
    });

    // A run-time allow entry made at mx1 is on mx2's kernel allow list,
    // and stays there through a reload at mx2 (which re-syncs the list
    // from mx2's own config and state file); mx2's allow.ips stays its own.
    let partner = ip("198.51.100.90");
    cli(
        &mx1,
        &[
            "allow",
            "add",
            "198.51.100.90/32",
            "--ttl",
            "1h",
            "--comment",
            "partner relay",
        ],
    );
    wait::eventually("mx1's allow entry at mx2", Duration::from_secs(5), || {
        maps(pins2).allow_match(partner).unwrap().is_some()
    });
    let ip90 = cli_at(net2, &mx2, &["ip", "--no-dns", "--json", "198.51.100.90"]);
    let v: serde_json::Value = serde_json::from_str(&ip90).expect("tarpit ip --json");
    let shared = &v["cluster"]["allow"][0];
    assert_eq!(shared["node"], "mx1", "{ip90}");
    assert_eq!(shared["comment"], "partner relay", "{ip90}");
    assert_eq!(shared["here"], true, "{ip90}");
    let reloads = mx2.log().matches("configuration reloaded").count();
    mx2.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait::eventually("mx2 reloaded", Duration::from_secs(10), || {
        mx2.log().matches("configuration reloaded").count() > reloads
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        maps(pins2).allow_match(partner).unwrap().is_some(),
        "a reload at mx2 dropped mx1's allow entry"
    );
    assert!(
        maps(pins1)
            .allow_match(ip("198.51.100.79"))
            .unwrap()
            .is_none()
    );
    cli(&mx1, &["allow", "del", "198.51.100.90/32"]);
    wait::eventually(
        "mx1's allow deletion at mx2",
        Duration::from_secs(5),
        || maps(pins2).allow_match(partner).unwrap().is_none(),
    );

    // Redis gone: mail flows at both (the triplet is known at both now).
    redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    for (name, net) in [("mx1", net1), ("mx2", net2)] {
        let s = swaks(net, CLIENT_V4.into(), &[]);
        assert!(s.ok, "{name} without Redis: {}", s.out);
    }
    // A first attempt at mx1 meanwhile (a new triplet: another sender).
    let late = ["--from", "late@client.example"];
    let s = swaks(net1, CLIENT_V4.into(), &late);
    let late_first = Instant::now();
    assert!(s.out.contains("451 4.7.1"), "new triplet at mx1: {}", s.out);
    cli(&mx2, &["block", "add", "198.51.100.78/32", "--ttl", "10m"]);
    cli(&mx1, &["block", "del", "198.51.100.77/32"]);
    // Two pre-greet strikes at mx1 meanwhile, by another bot.
    let bot2 = ip("198.51.100.33");
    net1.add_client_addr(bot2).unwrap();
    net2.add_client_addr(bot2).unwrap();
    talk_first(net1, bot2).unwrap();
    talk_first(net1, bot2).unwrap();
    wait::eventually(
        "mx2 counts what it could not share",
        Duration::from_secs(5),
        || metric(net2, "tarpit_cluster_unshared_total{kind=\"block\"}").unwrap_or(0.0) >= 1.0,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !blocked(pins1, "198.51.100.78"),
        "reached mx1 without Redis?"
    );
    assert!(blocked(pins2, "198.51.100.77"));

    // Redis back (empty): both catch up.
    redis.start_again().expect("redis-server again");
    wait::eventually(
        "mx2's block (made meanwhile) at mx1",
        Duration::from_secs(15),
        || blocked(pins1, "198.51.100.78"),
    );
    wait::eventually(
        "mx1's deletion (made meanwhile) at mx2",
        Duration::from_secs(15),
        || !blocked(pins2, "198.51.100.77"),
    );
    // mx1's first attempt of the outage was replayed: the retry at mx2
    // after the minimum wait passes.
    std::thread::sleep(
        (MIN_WAIT + Duration::from_millis(500)).saturating_sub(late_first.elapsed()),
    );
    wait::eventually("mx1 caught up", Duration::from_secs(10), || {
        metric(net1, "tarpit_cluster_backlog") == Some(0.0)
    });
    let s = swaks(net2, CLIENT_V4.into(), &late);
    assert!(
        s.ok,
        "retry at mx2 of a first try made without Redis: {}",
        s.out
    );
    // mx1's strikes of the outage were announced once Redis was back: one
    // more at mx2 is the third there, and mx2 blocks the bot itself (not
    // only on mx1's word, which would come after mx1 counted three).
    assert!(!blocked(pins2, "198.51.100.33"));
    let own = |net| metric(net, "tarpit_blocks_added_total").unwrap_or(0.0);
    let before = own(net2);
    talk_first(net2, bot2).unwrap();
    wait::eventually(
        "the bot of the outage blocked at mx2",
        Duration::from_secs(10),
        || blocked(pins2, "198.51.100.33"),
    );
    assert_eq!(own(net2), before + 1.0, "mx2's own block");
    wait::eventually(
        "the bot of the outage blocked at mx1",
        Duration::from_secs(10),
        || blocked(pins1, "198.51.100.33"),
    );
    // ... and the deletion stays deleted.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!blocked(pins1, "198.51.100.77") && !blocked(pins2, "198.51.100.77"));
    assert_eq!(metric(net1, "tarpit_cluster_up"), Some(1.0));
    let tomb = redis
        .cli(&["GET", "tarpit:block:198.51.100.77/32"])
        .unwrap();
    assert!(
        tomb.contains("\"deleted\":true"),
        "tombstone in Redis: {tomb}"
    );
    assert!(
        metric(net2, "tarpit_cluster_refused_total{reason=\"allow.ips\"}").unwrap_or(0.0) >= 1.0
    );

    // Redis hung: no SMTP reply waits for it.
    redis.freeze();
    for (name, net) in [("mx1", net1), ("mx2", net2)] {
        let t = Instant::now();
        let s = swaks(net, CLIENT_V4.into(), &[]);
        assert!(s.ok, "{name} with Redis hung: {}", s.out);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{name}: a message took {:?} with Redis hung",
            t.elapsed()
        );
    }
    cli(&mx1, &["block", "add", "198.51.100.81/32", "--ttl", "10m"]);
    std::thread::sleep(Duration::from_secs(1));
    redis.thaw();
    wait::eventually(
        "mx1's block (made while Redis hung) at mx2",
        Duration::from_secs(15),
        || blocked(pins2, "198.51.100.81"),
    );
    // Two local-only periods at mx1: Redis killed, then hung.
    assert!(metric(net1, "tarpit_cluster_outages_total").unwrap_or(0.0) >= 2.0);
    // What an operator sees: `tarpit stats`, and the propagation lag.
    let stats = cli_at(net2, &mx2, &["stats"]);
    assert!(stats.contains("cluster: connected to Redis"), "{stats}");
    assert!(metric(net2, "tarpit_cluster_propagation_seconds_count").unwrap_or(0.0) >= 1.0);
    drop(mx1);
    drop(mx2);
}
