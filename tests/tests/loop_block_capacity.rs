//! Admin entries always fit: automatic blocks (repeat offenders) have
//! their own part of the block list, which evicts its oldest entries when
//! a flood fills it; the admin's `tarpit block add` still succeeds and no
//! admin entry is ever evicted; XDP drops both kinds. With
//! `offenders.aggregate_ipv6_prefix` the strikes of one /64 add up to a
//! block of the /64. Pins of an older tarpit (one block list for both)
//! are upgraded at the agent's start, admin entries kept.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{
    Attempt, StateFileGuard, agent_for, attempt, cli, eventually, maps, metric_sum, talk_first,
};
use tarpit::kernel::{BlockSpec, IpNet};
use tarpit_common::{BlockReason, maps::AUTO_BLOCK};
use tarpit_tests::{Agent, CLIENT_V4, PinDir, Postfix, TestNet, require_root};

/// Sizes small enough to fill in a test.
const ADMIN_SIZE: u32 = 4;
const AUTO_SIZE: u32 = 8;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The loop's agent config with extra `[kernel]` keys (a TOML table can
/// be opened only once, so they go right under its header).
fn config(net: &TestNet, pins: &PinDir, kernel: &str, rest: &str) -> String {
    common::config(net, pins, None, false, rest).replacen(
        "[kernel]\n",
        &format!("[kernel]\n{kernel}\n"),
        1,
    )
}

fn json(agent: &Agent, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&cli(agent, args)).expect("JSON")
}

#[test]
fn a_flood_of_automatic_blocks_never_crowds_out_the_admin() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _state = StateFileGuard::new(&pins);
    let _pf = Postfix::start(&net).expect("postfix");
    let bots: Vec<IpAddr> = (150..162).map(|i| ip(&format!("198.51.100.{i}"))).collect();
    let admin = [ip("198.51.100.170"), ip("fd5b:1e00::170")];
    let later_admin = [ip("198.51.100.171"), ip("198.51.100.172")];
    for a in bots.iter().chain(&admin) {
        net.add_client_addr(*a).unwrap();
    }
    let kernel = format!("block_entries = {ADMIN_SIZE}\nauto_block_entries = {AUTO_SIZE}");
    let rest = "[greeting]\ndelay = \"500ms\"\n[offenders]\npregreet_strikes = 1\n\
                block_ttl = \"600s\"\nslowdown = false\n";
    let agent = Agent::start(&net, &config(&net, &pins, &kernel, rest)).expect("agent");
    for a in admin {
        cli(
            &agent,
            &["block", "add", &a.to_string(), "--comment", "admin"],
        );
    }

    // 12 offenders, one after the other, into a part of 8.
    for (i, bot) in bots.iter().enumerate() {
        talk_first(&net, *bot).unwrap();
        eventually(&format!("offender {i} ({bot}) is blocked"), || {
            maps(&pins)
                .block_match(*bot)
                .unwrap()
                .is_some_and(|e| e.automatic && e.reason() == Some(BlockReason::Pregreet))
        });
    }
    let list = maps(&pins).block_list().unwrap();
    let auto: Vec<IpNet> = list.iter().filter(|e| e.automatic).map(|e| e.net).collect();
    let evicted = bots.len() - AUTO_SIZE as usize;
    assert_eq!(auto.len(), AUTO_SIZE as usize, "{list:?}");
    for (i, bot) in bots.iter().enumerate() {
        assert_eq!(
            auto.contains(&host(*bot)),
            i >= evicted,
            "offender {i} ({bot}): the oldest go first: {auto:?}"
        );
    }
    // Every admin entry is still there, in the admin's part.
    for a in admin {
        let e = list
            .iter()
            .find(|e| e.net == host(a))
            .expect("admin entry kept");
        assert!(
            !e.automatic && e.reason() == Some(BlockReason::Manual),
            "{e:?}"
        );
    }
    assert!(
        agent.log().contains("oldest entries made room"),
        "{}",
        agent.log()
    );

    // The admin's list still takes entries up to its own size, after the flood.
    for a in later_admin {
        cli(&agent, &["block", "add", &a.to_string()]);
    }
    let list = maps(&pins).block_list().unwrap();
    assert_eq!(
        list.iter().filter(|e| !e.automatic).count(),
        ADMIN_SIZE as usize
    );
    assert_eq!(
        list.iter().filter(|e| e.automatic).count(),
        AUTO_SIZE as usize
    );

    // XDP drops both kinds; an evicted offender connects again.
    for a in admin {
        assert_eq!(
            attempt(&net, a, agent_for(a), Duration::from_secs(2)),
            Attempt::TimedOut,
            "admin-blocked {a}"
        );
    }
    let newest = *bots.last().unwrap();
    assert_eq!(
        attempt(&net, newest, agent_for(newest), Duration::from_secs(2)),
        Attempt::TimedOut,
        "automatically blocked {newest}"
    );
    assert_eq!(
        attempt(&net, bots[0], agent_for(bots[0]), Duration::from_secs(2)),
        Attempt::Connected,
        "evicted {}",
        bots[0]
    );
    let c = maps(&pins).counters().unwrap();
    assert!(c.drops(BlockReason::Manual) >= 2, "{c:?}");
    assert!(c.drops(BlockReason::Pregreet) >= 1, "{c:?}");

    // What the admin sees: the list with sources, stats with each part's fill.
    let rows = json(&agent, &["block", "list", "--json"]);
    let rows = rows.as_array().unwrap();
    let by = |src: &str| rows.iter().filter(|r| r["source"] == src).count();
    assert_eq!(by("cli"), ADMIN_SIZE as usize, "{rows:?}");
    assert_eq!(by("agent"), AUTO_SIZE as usize, "{rows:?}");
    assert!(
        rows.iter()
            .filter(|r| r["source"] == "agent")
            .all(|r| r["reason"] == "pregreet" && r["expires_in_secs"].as_u64() > Some(500)),
        "{rows:?}"
    );
    let stats = json(&agent, &["stats", "--json", "--kernel-only"]);
    let t = &stats["tracked"];
    assert_eq!(t["block"], ADMIN_SIZE + AUTO_SIZE, "{t}");
    assert_eq!(t["block_admin"], ADMIN_SIZE, "{t}");
    assert_eq!(t["block_admin_capacity"], ADMIN_SIZE, "{t}");
    assert_eq!(t["block_automatic"], AUTO_SIZE, "{t}");
    assert_eq!(t["block_automatic_capacity"], AUTO_SIZE, "{t}");
    let human = cli(&agent, &["stats", "--kernel-only"]);
    assert!(
        human.contains("block list: admin 4 of 4 (100.0%), automatic 8 of 8 (100.0%)"),
        "{human}"
    );
    let evicted_metric = metric_sum(&net, "tarpit_blocks_evicted_total").expect("metrics");
    assert_eq!(evicted_metric, evicted as f64);
    assert_eq!(
        metric_sum(&net, &format!("tarpit_map_entries{{map=\"{AUTO_BLOCK}\"}}")),
        Some(f64::from(AUTO_SIZE))
    );
}

#[test]
fn strikes_of_one_ipv6_network_add_up_to_a_block_of_the_network() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _state = StateFileGuard::new(&pins);
    let _pf = Postfix::start(&net).expect("postfix");
    let (a, b, c) = (
        ip("fd5b:1e00::a1"),
        ip("fd5b:1e00::a2"),
        ip("fd5b:1e00::a3"),
    );
    let (v4a, v4b) = (ip("198.51.100.181"), ip("198.51.100.182"));
    for x in [a, b, c, v4a, v4b] {
        net.add_client_addr(x).unwrap();
    }
    let rest = "[greeting]\ndelay = \"500ms\"\n[offenders]\npregreet_strikes = 2\n\
                block_ttl = \"600s\"\nslowdown = false\naggregate_ipv6_prefix = 64\n";
    let _agent = Agent::start(&net, &config(&net, &pins, "", rest)).expect("agent");
    // One strike each from two addresses of the /64: one offender, two strikes.
    talk_first(&net, a).unwrap();
    talk_first(&net, b).unwrap();
    let slash64: IpNet = "fd5b:1e00::/64".parse().unwrap();
    eventually("the /64 is blocked", || {
        maps(&pins)
            .block_list()
            .unwrap()
            .iter()
            .any(|e| e.net == slash64 && e.automatic)
    });
    // A third address of the /64, which never struck, is dropped too.
    assert_eq!(
        attempt(&net, c, agent_for(c), Duration::from_secs(2)),
        Attempt::TimedOut
    );
    // IPv4 is not aggregated: one strike each from two addresses of a /24
    // blocks nobody.
    talk_first(&net, v4a).unwrap();
    talk_first(&net, v4b).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for x in [v4a, v4b, IpAddr::from(CLIENT_V4)] {
        assert!(maps(&pins).block_match(x).unwrap().is_none(), "{x}");
        assert_eq!(
            attempt(&net, x, agent_for(x), Duration::from_secs(2)),
            Attempt::Connected,
            "{x}"
        );
    }
}

#[test]
fn pins_of_an_older_tarpit_keep_admin_entries_and_move_automatic_ones() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _state = StateFileGuard::new(&pins);
    let _pf = Postfix::start(&net).expect("postfix");
    let (admin, bot) = (ip("198.51.100.190"), ip("198.51.100.191"));
    for x in [admin, bot] {
        net.add_client_addr(x).unwrap();
    }
    let cfg = config(&net, &pins, "", "[greeting]\ndelay = \"500ms\"\n");
    let agent = Agent::start(&net, &cfg).expect("agent");
    agent.stop().expect("stop");
    // The older layout: no AUTO_BLOCK, automatic blocks in the admin's list.
    std::fs::remove_file(pins.path.join(AUTO_BLOCK)).expect("unpin AUTO_BLOCK");
    let mut m = maps(&pins);
    for (x, reason) in [(admin, BlockReason::Manual), (bot, BlockReason::Pregreet)] {
        m.block_add(
            host(x),
            BlockSpec {
                ttl: Some(Duration::from_secs(600)),
                reason,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap();
    }
    assert!(m.block_list().unwrap().iter().all(|e| !e.automatic));
    drop(m);

    let agent = Agent::start(&net, &cfg).expect("agent on old pins");
    let list = maps(&pins).block_list().unwrap();
    let find = |x: IpAddr| list.iter().find(|e| e.net == host(x)).cloned();
    let a = find(admin).expect("admin entry kept");
    assert!(!a.automatic, "{a:?}");
    let b = find(bot).expect("automatic entry moved");
    assert!(
        b.automatic && b.reason() == Some(BlockReason::Pregreet),
        "{b:?}"
    );
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(
        agent.log().contains("automatic blocks moved"),
        "{}",
        agent.log()
    );
    for x in [admin, bot] {
        assert_eq!(
            attempt(&net, x, agent_for(x), Duration::from_secs(2)),
            Attempt::TimedOut,
            "{x} still dropped"
        );
    }
}
