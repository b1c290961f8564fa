//! `tarpit stats` and `tarpit maps` against the real kernel and agent:
//! counters move with real traffic, the agent's metrics are shown while it
//! runs and reported missing when it does not, every map of the layout is
//! listed with its fill, and `--json` says what the tables say.
mod cli_common;

use std::collections::BTreeMap;

use cli_common::{CliWorld, Opts, Probe, ip};
use tarpit_tests::require_root;

/// `NAME  VALUE ...` rows of a human table, value with its blanks removed.
fn table(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split("  ").filter(|c| !c.trim().is_empty());
            let name = it.next()?.trim().to_string();
            let value = it.next()?.trim().replace(' ', "");
            Some((name, value))
        })
        .collect()
}

/// `65 536`: the human tables group thousands with a blank.
fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[test]
fn stats_and_maps_follow_real_traffic_and_the_agent() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::detached());
    w.start_agent();
    let bot = ip("198.51.100.85");
    w.net.add_client_addr(bot).unwrap();
    w.ok(&["block", "add", "198.51.100.85", "--comment", "stats test"]);
    for _ in 0..3 {
        assert_eq!(w.probe(bot), Probe::Dropped);
    }
    assert_eq!(w.probe(ip("198.51.100.2")), Probe::Connected);

    let json = w.json(&["stats"]);
    let k = &json["kernel"];
    // Each dropped handshake is at least one dropped SYN (retransmits add).
    assert!(k["xdp_drop"].as_u64().unwrap() >= 3, "{json}");
    assert_eq!(k["xdp_drop"], k["xdp_drop_manual"], "{json}");
    assert!(k["xdp_pass"].as_u64().unwrap() >= 1, "{json}");
    assert!(k["tc_flow_new"].as_u64().unwrap() >= 1, "{json}");
    assert!(k["sock_established"].as_u64().unwrap() >= 1, "{json}");
    assert_eq!(json["tracked"]["block"], 1, "{json}");
    assert!(
        json["tracked"]["addresses"].as_u64().unwrap() >= 1,
        "{json}"
    );
    assert_eq!(json["agent"]["status"], "up", "{json}");
    assert_eq!(json["agent"]["address"], "127.0.0.1:9325");
    assert!(
        !json["agent"]["metrics"].as_object().unwrap().is_empty(),
        "{json}"
    );

    // The human table shows the same numbers (counts may only have grown).
    let human = w.ok(&["stats"]);
    let rows = table(&human);
    for name in [
        "xdp_drop",
        "xdp_drop_manual",
        "tc_flow_new",
        "sock_established",
    ] {
        let shown: u64 = rows[name]
            .parse()
            .unwrap_or_else(|_| panic!("{name}: {human}"));
        assert!(shown >= k[name].as_u64().unwrap(), "{name}: {human}");
    }
    assert!(human.contains("agent metrics (127.0.0.1:9325)"), "{human}");
    assert!(human.contains(", block 1,"), "{human}");
    assert!(
        human.contains("XDP: packets dropped by the block list"),
        "{human}"
    );

    // Every map of the layout, with what it holds.
    let maps = w.json(&["maps"]);
    let by_name: BTreeMap<String, serde_json::Value> = maps
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m.clone()))
        .collect();
    for name in [
        "ALLOW", "BLOCK", "AUTH", "IP_STATE", "FLOWS", "COUNTERS", "EVENTS", "LAYOUT", "SETTINGS",
    ] {
        assert!(by_name.contains_key(name), "{name} missing: {maps}");
    }
    assert_eq!(by_name["BLOCK"]["entries"], 1);
    assert_eq!(by_name["BLOCK"]["type"], "lpm_trie");
    assert_eq!(by_name["IP_STATE"]["type"], "lru_hash");
    assert!(
        by_name["IP_STATE"]["entries"].as_u64().unwrap() >= 1,
        "{maps}"
    );
    assert_eq!(by_name["EVENTS"]["type"], "ringbuf");
    assert!(by_name["EVENTS"]["entries"].is_null());
    let human = w.ok(&["maps"]);
    let block = human.lines().find(|l| l.starts_with("BLOCK")).unwrap();
    let cols: Vec<&str> = block.split_whitespace().collect();
    assert_eq!(cols[1], "lpm_trie", "{block}");
    assert_eq!(cols[2], "1", "{block}");
    let capacity = by_name["BLOCK"]["capacity"].as_u64().unwrap();
    assert!(block.contains(&thousands(capacity)), "{block}");

    // The agent dies (SIGKILL: its pins stay); the kernel counters stay
    // readable, the agent is reported down.
    w.agent.take().unwrap().kill9();
    let json = w.json(&["stats"]);
    assert_eq!(json["agent"]["status"], "down", "{json}");
    assert!(json["kernel"]["xdp_drop"].as_u64().unwrap() >= 3);
    let human = w.ok(&["stats"]);
    assert!(human.contains("is the agent running?"), "{human}");
    let json = w.json(&["stats", "--kernel-only"]);
    assert_eq!(json["agent"]["status"], "skipped");
}
