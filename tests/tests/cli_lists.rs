//! `tarpit allow|block|auth` change what a real client experiences, with
//! the agent running and with it stopped, IPv4 and IPv6; entries survive
//! in the state file and come back when the agent starts on empty maps.
mod cli_common;

use cli_common::{CliWorld, Opts, Probe, assert_list_matches, ip};
use tarpit_tests::require_root;

/// Block, allow over block, delete: each step is seen by a real client's
/// handshake. Returns nothing; panics with the step that failed.
fn block_allow_cycle(w: &CliWorld, bot: &str, bot_net: &str, wide_allow: &str, listening: bool) {
    let src = ip(bot);
    let open = if listening {
        Probe::Connected
    } else {
        Probe::Refused
    };
    assert_eq!(w.probe(src), open, "{bot} before any entry");

    let out = w.ok(&[
        "block",
        "add",
        bot_net,
        "--ttl",
        "10m",
        "--comment",
        "cli test bot",
    ]);
    assert!(out.contains(bot_net) && out.contains("SMTP ports"), "{out}");
    assert_eq!(
        w.probe(src),
        Probe::Dropped,
        "{bot} must be dropped once blocked"
    );

    // The listing shows it, human and JSON alike.
    let human = w.ok(&["block", "list"]);
    let line = human
        .lines()
        .find(|l| l.starts_with(bot_net))
        .unwrap_or_else(|| panic!("{bot_net} not listed:\n{human}"));
    assert!(line.contains("in 9m") || line.contains("in 10m"), "{line}");
    assert!(
        line.contains("manual") && line.contains("smtp") && line.contains("cli test bot"),
        "{line}"
    );
    let json = w.json(&["block", "list"]);
    let e = json
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["cidr"] == bot_net)
        .unwrap_or_else(|| panic!("{bot_net} not in JSON: {json}"));
    assert_eq!(e["active"], true);
    assert_eq!(e["in_kernel"], true);
    assert_eq!(e["saved"], true);
    assert_eq!(e["source"], "cli");
    assert_eq!(e["reason"], "manual");
    assert_eq!(e["all_ports"], false);
    assert_eq!(e["comment"], "cli test bot");
    let left = e["expires_in_secs"].as_u64().unwrap();
    assert!((540..=600).contains(&left), "{e}");

    // An allow entry wins over the block entry.
    w.ok(&["allow", "add", wide_allow, "--comment", "partner"]);
    assert_list_matches(w, "allow");
    assert_list_matches(w, "block");
    assert_eq!(w.probe(src), open, "allow must beat block for {bot}");
    let ipj = w.json(&["ip", bot]);
    assert_eq!(ipj["policy"]["verdict"], "allow", "{ipj}");
    assert_eq!(ipj["allow"][0]["cidr"], wide_allow, "{ipj}");
    assert_eq!(ipj["block"][0]["cidr"], bot_net, "{ipj}");

    w.ok(&["allow", "del", wide_allow]);
    assert_eq!(
        w.probe(src),
        Probe::Dropped,
        "blocked again without the allow entry"
    );
    assert_eq!(w.json(&["ip", bot])["policy"]["verdict"], "block");

    w.ok(&["block", "del", bot_net]);
    assert_eq!(w.probe(src), open, "{bot} after the block entry went");
    let err = w.fails(&["block", "del", bot_net], 1);
    assert!(err.contains("no block-list entry"), "{err}");
    assert!(w.json(&["block", "list"]).as_array().unwrap().is_empty());
}

#[test]
fn allow_and_block_act_on_real_clients_with_the_agent_running_and_stopped() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::default());
    for a in ["198.51.100.60", "fd5b:1e00::60"] {
        w.net.add_client_addr(ip(a)).unwrap();
    }
    w.start_agent();
    block_allow_cycle(
        &w,
        "198.51.100.60",
        "198.51.100.60/32",
        "198.51.100.0/24",
        true,
    );
    block_allow_cycle(
        &w,
        "fd5b:1e00::60",
        "fd5b:1e00::60/128",
        "fd5b:1e00::/64",
        true,
    );
    // Another client of the same network is not affected by a host entry.
    w.ok(&["block", "add", "198.51.100.60"]);
    assert_eq!(w.probe(ip("198.51.100.2")), Probe::Connected);
    w.ok(&["block", "del", "198.51.100.60/32"]);

    // The agent stops; its programs and maps stay (detach_on_exit = false)
    // and the command line still changes what the kernel does.
    w.stop_agent();
    block_allow_cycle(
        &w,
        "198.51.100.60",
        "198.51.100.0/24",
        "198.51.100.60/32",
        false,
    );
    block_allow_cycle(
        &w,
        "fd5b:1e00::60",
        "fd5b:1e00::/64",
        "fd5b:1e00::60/128",
        false,
    );

    // Authenticated addresses are kept and changed without the agent too.
    w.ok(&["auth", "add", "fd5b:1e00::60", "--ttl", "1h"]);
    let auth = w.json(&["auth", "list"]);
    assert_eq!(auth[0]["ip"], "fd5b:1e00::60", "{auth}");
    w.ok(&["auth", "del", "fd5b:1e00::60"]);
    assert!(w.json(&["auth", "list"]).as_array().unwrap().is_empty());

    // --all-ports drops other ports too; without it they stay open.
    w.ok(&["block", "add", "198.51.100.60", "--all-ports"]);
    assert_eq!(w.probe_port(ip("198.51.100.60"), 26), Probe::Dropped);
    w.ok(&["block", "add", "198.51.100.60"]);
    assert_eq!(w.probe_port(ip("198.51.100.60"), 26), Probe::Refused);
    assert_eq!(w.probe(ip("198.51.100.60")), Probe::Dropped);

    // detach removes programs and pins: the client gets through, the CLI
    // says there is nothing left.
    let out = w.ok(&["detach"]);
    assert!(out.contains("detached"), "{out}");
    assert!(
        w.pins.entries().is_empty(),
        "pins left: {:?}",
        w.pins.entries()
    );
    assert_eq!(
        w.probe(ip("198.51.100.60")),
        Probe::Refused,
        "no XDP after detach"
    );
    let err = w.fails(&["block", "list"], 1);
    assert!(
        err.contains(&format!(
            "no tarpit maps at {}; start the agent with `tarpit run`",
            w.pins.path.display()
        )),
        "{err}"
    );
}

#[test]
fn saved_entries_come_back_when_the_agent_starts_on_empty_maps() {
    if !require_root() {
        return;
    }
    // detach_on_exit = true: stopping the agent removes the maps, as a
    // reboot would.
    let mut w = CliWorld::new(Opts::detached());
    w.net.add_client_addr(ip("198.51.100.61")).unwrap();
    w.net.add_client_addr(ip("fd5b:1e00::61")).unwrap();
    w.start_agent();
    w.ok(&[
        "block",
        "add",
        "198.51.100.61",
        "--ttl",
        "2h",
        "--comment",
        "v4 bot",
    ]);
    w.ok(&["block", "add", "fd5b:1e00::61/128", "--all-ports"]);
    w.ok(&[
        "allow",
        "add",
        "198.51.100.0/25",
        "--ttl",
        "1d",
        "--comment",
        "partner",
    ]);
    w.ok(&["allow", "del", "198.51.100.0/25"]);
    w.ok(&["allow", "add", "fd5b:1e00::100/126", "--comment", "relay"]);
    let before = w.json(&["block", "list"]);

    let st = w.state();
    assert_eq!(st["version"], 1);
    assert_eq!(st["block"].as_array().unwrap().len(), 2, "{st}");
    assert_eq!(
        st["allow"].as_array().unwrap().len(),
        1,
        "deleted entries leave the file: {st}"
    );
    // No temporary file is left beside it.
    let names: Vec<String> = std::fs::read_dir(w.state_file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(names, vec!["state.json"]);

    w.stop_agent();
    assert!(
        w.pins.entries().is_empty(),
        "detach_on_exit removed the maps"
    );
    // Maps gone, entries kept.
    assert_eq!(w.probe(ip("198.51.100.61")), Probe::Refused);

    w.start_agent();
    assert!(
        w.agent
            .as_ref()
            .unwrap()
            .log()
            .contains("saved allow and block entries restored"),
        "{}",
        w.agent.as_ref().unwrap().log()
    );
    assert_eq!(
        w.probe(ip("198.51.100.61")),
        Probe::Dropped,
        "restored v4 block"
    );
    assert_eq!(
        w.probe(ip("fd5b:1e00::61")),
        Probe::Dropped,
        "restored v6 block"
    );
    assert_eq!(
        w.probe_port(ip("fd5b:1e00::61"), 26),
        Probe::Dropped,
        "all ports kept"
    );
    let after = w.json(&["block", "list"]);
    assert_eq!(after.as_array().unwrap().len(), 2, "{after}");
    for (b, a) in before
        .as_array()
        .unwrap()
        .iter()
        .zip(after.as_array().unwrap())
    {
        assert_eq!(a["cidr"], b["cidr"]);
        assert_eq!(a["comment"], b["comment"]);
        assert_eq!(a["all_ports"], b["all_ports"]);
        // The expiry is the same wall-clock time (to the second or so).
        match (b["expires_in_secs"].as_u64(), a["expires_in_secs"].as_u64()) {
            (Some(x), Some(y)) => assert!(x >= y && x - y <= 30, "{b} vs {a}"),
            (None, None) => {}
            other => panic!("expiry changed: {other:?}"),
        }
    }
    assert_list_matches(&w, "allow");
    assert_list_matches(&w, "block");
    let allow = w.json(&["allow", "list"]);
    assert_eq!(allow[0]["cidr"], "fd5b:1e00::100/126");
    assert_eq!(allow[0]["comment"], "relay");
    assert_eq!(allow[0]["active"], true);
}

#[test]
fn auth_entries_are_listed_seen_by_the_kernel_and_removed() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::detached());
    w.start_agent();
    let client = "198.51.100.2";
    assert!(w.json(&["auth", "list"]).as_array().unwrap().is_empty());
    w.ok(&["auth", "add", client, "--ttl", "2h"]);
    w.ok(&["auth", "add", "fd5b:1e00::2"]);
    let list = w.json(&["auth", "list"]);
    let v4 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == client)
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(v4["active"], true);
    let left = v4["expires_in_secs"].as_u64().unwrap();
    assert!((7000..=7200).contains(&left), "{v4}");
    let v6 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == "fd5b:1e00::2")
        .unwrap();
    let left = v6["expires_in_secs"].as_u64().unwrap();
    assert!((86_000..=86_400).contains(&left), "24h by default: {v6}");
    let human = w.ok(&["auth", "list"]);
    assert!(
        human
            .lines()
            .any(|l| l.starts_with(client) && (l.contains("in 1h 59m") || l.contains("in 2h"))),
        "{human}"
    );

    // A new connection from the authenticated client is marked by the
    // kernel (sock_ops reads the map). `tarpit ip` says what the agent
    // does: with `helo.authenticated_once_per_day` off (the default) a new
    // session is tarpitted until the client authenticates again, and the
    // reason says it authenticated.
    assert_eq!(w.probe(ip(client)), Probe::Connected);
    let ipj = w.json(&["ip", client]);
    assert_eq!(ipj["policy"]["verdict"], "tarpit", "{ipj}");
    let reason = ipj["policy"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("it authenticated"), "{ipj}");
    let flags = &ipj["state"]["flags"];
    assert!(
        flags
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "authenticated"),
        "kernel flags {flags}"
    );

    w.ok(&["auth", "del", client]);
    let ipj = w.json(&["ip", client]);
    assert_eq!(ipj["policy"]["verdict"], "tarpit");
    let reason = ipj["policy"]["reason"].as_str().unwrap_or_default();
    assert!(!reason.contains("authenticated"), "{ipj}");
    let err = w.fails(&["auth", "del", client], 1);
    assert!(err.contains("not an authenticated address"), "{err}");
    assert_eq!(w.json(&["auth", "list"]).as_array().unwrap().len(), 1);
    // Auth entries are a fact of the moment, not configuration: not saved.
    assert!(
        !w.state_file.exists()
            || !std::fs::read_to_string(&w.state_file)
                .unwrap()
                .contains("198.51.100.2")
    );
}
