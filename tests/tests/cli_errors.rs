//! Every error an admin can meet gets one clear line and a non-zero exit
//! status, and changes nothing: not root, no maps, bad input, a full map,
//! maps of another tarpit version, a damaged state file, a missing config.
mod cli_common;

use std::process::Command;

use aya::maps::{Array, Map, MapData};
use cli_common::{CliWorld, Opts, Probe, ip};
use tarpit_common::maps::{LAYOUT, LAYOUT_MAGIC};
use tarpit_tests::{require_root, tarpit_bin, unique_id};

fn world() -> CliWorld {
    let mut w = CliWorld::new(Opts {
        kernel: "allow_entries = 2\nblock_entries = 3",
        ..Opts::detached()
    });
    w.start_agent();
    w
}

#[test]
fn without_root_the_command_says_it_needs_root_or_cap_bpf() {
    if !require_root() {
        return;
    }
    let w = world();
    for args in [
        &["block", "list"][..],
        &["block", "add", "198.51.100.9"],
        &["stats"],
        &["detach"],
    ] {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(tarpit_bin())
            .arg("--pin-path")
            .arg(&w.pins.path)
            .args(args)
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("needs root or CAP_BPF"), "{args:?}: {err}");
    }
    // Nothing was added, nothing detached.
    assert!(w.json(&["block", "list"]).as_array().unwrap().is_empty());
    assert!(!w.pins.entries().is_empty());
}

#[test]
fn missing_pins_say_to_start_the_agent() {
    if !require_root() {
        return;
    }
    let w = CliWorld::new(Opts::default());
    let none = format!("/sys/fs/bpf/tarpit-test-{}-none", unique_id());
    for args in [
        &["block", "list"][..],
        &["allow", "add", "198.51.100.0/24"],
        &["auth", "list"],
        &["ip", "198.51.100.2"],
        &["maps"],
        &["stats"],
        &["detach"],
    ] {
        let mut all = vec!["--pin-path", none.as_str()];
        all.extend_from_slice(args);
        let err = w.fails(&all, 1);
        assert!(
            err.contains(&format!(
                "no tarpit maps at {none}; start the agent with `tarpit run`"
            )),
            "{args:?}: {err}"
        );
    }
    // A pin path outside bpffs cannot hold maps: the message says why.
    let tmp = w.dir.display().to_string();
    let err = w.fails(&["--pin-path", &tmp, "block", "list"], 1);
    assert!(
        err.contains(&format!(
            "no tarpit maps at {tmp}; start the agent with `tarpit run`"
        )) && err.contains("is not on a bpffs mount"),
        "{err}"
    );
    // The config's own pin path, before any agent ran.
    let err = w.fails(&["block", "list"], 1);
    assert!(
        err.contains(&format!("no tarpit maps at {}", w.pins.path.display())),
        "{err}"
    );
    // Nothing was written for the refused add.
    assert!(!w.state_file.exists());
}

#[test]
fn bad_addresses_and_durations_are_usage_errors_that_change_nothing() {
    if !require_root() {
        return;
    }
    let w = world();
    let cases: &[(&[&str], &str)] = &[
        (
            &["block", "add", "198.51.100.7/24"],
            "host bits set; the network is 198.51.100.0/24",
        ),
        (
            &["block", "add", "198.51.100.0/33"],
            "not an address or a network in CIDR form",
        ),
        (&["allow", "add", "mail.example.com"], "not an IP address"),
        (
            &["block", "add", "fd5b:1e00::1/64"],
            "the network is fd5b:1e00::/64",
        ),
        (
            &["block", "add", "198.51.100.7", "--ttl", "soon"],
            "not a duration",
        ),
        (
            &["block", "add", "198.51.100.7", "--ttl", "0s"],
            "use `del`",
        ),
        (
            &["allow", "add", "198.51.100.7", "--ttl=-5m"],
            "not a duration",
        ),
        (&["auth", "del", "198.51.100.0/24"], "not an IP address"),
        (&["ip", "300.1.2.3"], "not an IP address"),
        (&["top", "--interval", "1ms"], "at least 100ms"),
    ];
    for (args, needle) in cases {
        let err = w.fails(args, 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(w.json(&["block", "list"]).as_array().unwrap().is_empty());
    assert!(w.json(&["allow", "list"]).as_array().unwrap().is_empty());
    assert!(!w.state_file.exists(), "nothing saved");
    // A config named with -c must exist and be valid.
    let out = Command::new(tarpit_bin())
        .args(["-c", "/nonexistent/tarpit.toml", "block", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tarpit.toml"));
}

#[test]
fn a_full_list_refuses_clearly_and_saves_nothing() {
    if !require_root() {
        return;
    }
    let w = world();
    for n in ["198.51.100.80", "198.51.100.81", "fd5b:1e00::80"] {
        w.ok(&["block", "add", n]);
    }
    let err = w.fails(
        &["block", "add", "198.51.100.82", "--comment", "one too many"],
        1,
    );
    assert!(err.contains("BLOCK map is full (3 entries)"), "{err}");
    assert!(err.contains("block_entries"), "{err}");
    // Replacing an existing entry still works on a full map.
    w.ok(&["block", "add", "198.51.100.80", "--ttl", "1h"]);
    let list = w.json(&["block", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let st = w.state();
    assert_eq!(st["block"].as_array().unwrap().len(), 3, "{st}");
    assert!(!st.to_string().contains("one too many"));
    // The refused source is not blocked; the listed ones are.
    w.net.add_client_addr(ip("198.51.100.82")).unwrap();
    w.net.add_client_addr(ip("198.51.100.81")).unwrap();
    assert_eq!(w.probe(ip("198.51.100.82")), Probe::Connected);
    assert_eq!(w.probe(ip("198.51.100.81")), Probe::Dropped);

    w.ok(&["allow", "add", "198.51.100.0/24"]);
    w.ok(&["allow", "add", "fd5b:1e00::/64"]);
    let err = w.fails(&["allow", "add", "198.51.101.0/24"], 1);
    assert!(err.contains("ALLOW map is full (2 entries)"), "{err}");
    // `tarpit maps` shows them at capacity.
    let maps = w.json(&["maps"]);
    let block = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "BLOCK")
        .unwrap();
    assert_eq!(block["entries"], 3);
    assert_eq!(block["capacity"], 3);
    assert_eq!(block["type"], "lpm_trie");
    let human = w.ok(&["maps"]);
    let line = human.lines().find(|l| l.starts_with("BLOCK")).unwrap();
    assert!(
        line.contains("lpm_trie") && line.contains("100.0%"),
        "{line}"
    );
}

#[test]
fn maps_of_another_layout_are_refused_not_misread() {
    if !require_root() {
        return;
    }
    let w = world();
    w.ok(&["block", "add", "198.51.100.90"]);
    let set_marker = |v: u64| {
        let data = MapData::from_pin(w.pins.path.join(LAYOUT)).unwrap();
        let mut a: Array<MapData, u64> =
            Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
        a.set(0, v, 0).unwrap();
    };
    // The same tag, another version: a newer (or older) tarpit made them.
    set_marker((LAYOUT_MAGIC & !0xffff_ffff) | 99);
    for args in [
        &["block", "list"][..],
        &["block", "add", "198.51.100.91"],
        &["ip", "198.51.100.90"],
        &["stats"],
        &["maps"],
    ] {
        let err = w.fails(args, 1);
        assert!(
            err.contains("have another layout (layout 99)"),
            "{args:?}: {err}"
        );
        assert!(err.contains("tarpit detach"), "{args:?}: {err}");
    }
    // Something that is not ours at all.
    set_marker(0x1234_5678_9abc_def0);
    let err = w.fails(&["allow", "list"], 1);
    assert!(err.contains("another layout"), "{err}");
    // Nothing was changed meanwhile.
    set_marker(LAYOUT_MAGIC);
    let list = w.json(&["block", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["cidr"], "198.51.100.90/32");
}

#[test]
fn a_damaged_state_file_is_reported_and_never_overwritten() {
    if !require_root() {
        return;
    }
    let w = world();
    std::fs::create_dir_all(w.state_file.parent().unwrap()).unwrap();
    let damaged = "{\"version\": 1, \"block\": [{\"cidr\": \"198.51.";
    std::fs::write(&w.state_file, damaged).unwrap();
    let err = w.fails(&["block", "add", "198.51.100.95"], 1);
    assert!(err.contains("is not valid"), "{err}");
    assert!(err.contains(&w.state_file.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(&w.state_file).unwrap(), damaged);
    // The kernel was not changed either: add is all or nothing. Listing
    // still works (an admin under attack must see the kernel's lists),
    // with a warning.
    let out = w.tarpit(&["block", "list", "--json"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.as_array().unwrap().is_empty(), "{list}");
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("warning") && warning.contains("is not valid"),
        "{warning}"
    );
    let err = w.fails(&["block", "del", "198.51.100.95"], 1);
    assert!(err.contains("is not valid"), "{err}");
    assert_eq!(std::fs::read_to_string(&w.state_file).unwrap(), damaged);
    // A file from a newer tarpit is refused the same way.
    std::fs::write(&w.state_file, "{\"version\": 7}").unwrap();
    let err = w.fails(&["allow", "add", "198.51.100.0/24"], 1);
    assert!(err.contains("format version 7"), "{err}");
}
