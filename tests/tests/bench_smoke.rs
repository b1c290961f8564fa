//! `cargo xtask bench --smoke` still works: every scenario runs with tiny
//! counts, report.json is well-formed, every baseline side measured real
//! figures, every side that could not run says why, and nothing the bench
//! made (namespaces, pins) is left behind.
//!
//! Runs the built xtask binary directly (`cargo xtask` would wait for the
//! cargo lock that `cargo test` holds).
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use tarpit_tests::{env::repo_root, require_root};

const SCENARIOS: &[&str] = &[
    "good_mail_throughput",
    "kernel_cost",
    "hold_capacity",
    "pregreet_flood",
    "blocklist_drops",
    "blocklist_drops_veth",
    "delay_lateness",
    "kernel_hold",
    "cluster_propagation",
    "cluster_greylist",
];

fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XTASK_BIN") {
        return PathBuf::from(p);
    }
    let p = repo_root().join("target/debug/xtask");
    assert!(
        p.is_file(),
        "{} not found: build it first (`cargo build -p xtask`) or set XTASK_BIN",
        p.display()
    );
    p
}

fn figure(side: &Value, key: &str) -> f64 {
    side["figures"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("side {} has no figure {key}: {side}", side["name"]))
}

fn side<'a>(scenario: &'a Value, name: &str) -> &'a Value {
    scenario["sides"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("scenario {} has no side {name}", scenario["id"]))
}

#[test]
fn bench_smoke_writes_a_well_formed_report() {
    if !require_root() {
        return;
    }
    let out = std::env::temp_dir().join(format!("tarpit-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let child = Command::new(xtask_bin())
        .args(["bench", "--smoke", "--out-dir"])
        .arg(&out)
        .spawn()
        .expect("cannot start xtask");
    let pid_hex = format!("{:x}-", child.id());
    let status = child.wait_with_output().expect("xtask bench").status;
    assert!(status.success(), "xtask bench --smoke failed: {status}");

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md written");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    assert_eq!(report["profile"], "smoke");
    assert_eq!(report["interrupted"], false);
    let scenarios = report["scenarios"].as_array().expect("scenarios array");
    let ids: Vec<&str> = scenarios.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, SCENARIOS, "one object per scenario, in order");

    for s in scenarios {
        let id = s["id"].as_str().unwrap_or_default();
        assert!(s["error"].is_null(), "scenario {id} failed: {}", s["error"]);
        assert!(md.contains(id), "report.md lacks {id}");
        let sides = s["sides"].as_array().expect("sides");
        assert!(!sides.is_empty(), "scenario {id} has no sides");
        for side in sides {
            if side["available"] == true {
                let figs = side["figures"].as_object().expect("figures");
                assert!(
                    !figs.is_empty(),
                    "{id}/{}: available but no figures",
                    side["name"]
                );
                assert!(
                    figs.values()
                        .all(|v| v.as_f64().is_some_and(f64::is_finite))
                );
            } else {
                // Never numbers for a side that did not run, always a reason.
                assert_eq!(side["available"], false);
                assert!(side["figures"].as_object().is_some_and(|f| f.is_empty()));
                assert!(
                    side["reason"].as_str().is_some_and(|r| !r.is_empty()),
                    "{id}/{}: unavailable without a reason",
                    side["name"]
                );
            }
        }
        for r in s["ratios"].as_array().expect("ratios") {
            let value = &r["value"];
            if let Some(v) = value.as_f64() {
                assert!(v.is_finite() && v >= 0.0, "{id}: bad ratio {r}");
                let a = side(s, r["side"].as_str().expect("ratio side"));
                assert_eq!(a["available"], true, "{id}: ratio of an unavailable side");
            } else {
                assert!(value.is_null());
                assert!(
                    r["why_none"].as_str().is_some(),
                    "{id}: missing ratio without why"
                );
            }
        }
    }

    // The baselines must always measure: they need nothing from tarpit.
    let by_id = |id: &str| scenarios.iter().find(|s| s["id"] == id).expect("scenario");
    let direct = side(by_id("good_mail_throughput"), "direct");
    assert!(figure(direct, "msgs_per_s") > 0.0);
    assert_eq!(
        figure(direct, "accepted"),
        20.0,
        "Postfix accepted every message"
    );
    let ps = side(by_id("good_mail_throughput"), "postscreen");
    assert_eq!(figure(ps, "accepted"), 20.0);
    let hold = side(by_id("hold_capacity"), "postscreen@50");
    assert_eq!(figure(hold, "held"), 50.0, "postscreen held every client");
    assert!(figure(hold, "rss_bytes_per_session") >= 0.0);
    let pre = side(by_id("pregreet_flood"), "postscreen");
    assert!(
        figure(pre, "judged") > 0.0,
        "postscreen judged pre-greet talkers"
    );
    // The block-list gate's baseline: nftables dropped every live frame
    // (the side fails otherwise); on the veth rig, some of the flood.
    let nft = side(by_id("blocklist_drops"), "nftables");
    assert!(figure(nft, "frames") > 0.0);
    assert_eq!(figure(nft, "dropped"), figure(nft, "frames"));
    let nft = side(by_id("blocklist_drops_veth"), "nftables");
    assert!(figure(nft, "dropped") > 0.0);
    assert!(figure(nft, "dropped") <= figure(nft, "sent"));

    // The kernel hold held every bot, and the server kept no socket for
    // any (the agent runs next to it; the hold needs Linux 6.0, as here).
    let xdp = side(by_id("kernel_hold"), "xdp@400");
    assert_eq!(figure(xdp, "client_established_after_window"), 400.0);
    assert_eq!(figure(xdp, "server_established"), 0.0);
    assert_eq!(figure(xdp, "banner_bytes_received"), 0.0);
    assert!(figure(xdp, "hold_syn_answered") >= 400.0);

    // Two hosts on one Redis: every block made at node 1 (by the admin, and
    // of a bot that talked first) reached node 2's kernel block list, and
    // node 1's greylist first tries reached node 2.
    for name in ["admin_block", "offender_block"] {
        let prop = side(by_id("cluster_propagation"), name);
        assert_eq!(figure(prop, "seen"), figure(prop, "blocks"), "{name}");
        assert_eq!(figure(prop, "lost"), 0.0, "{name}");
    }
    let grey = side(by_id("cluster_greylist"), "greylist_propagation");
    assert_eq!(figure(grey, "seen"), figure(grey, "tries"));
    let rtt = side(by_id("cluster_greylist"), "redis_get_tcp");
    assert_eq!(
        figure(rtt, "found"),
        figure(rtt, "calls"),
        "the key read is one node 1 wrote"
    );

    // Nothing of the bench's is left: namespaces and pin directories carry
    // its pid.
    let left: Vec<String> = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tpb-") && n.get(6..).is_some_and(|r| r.starts_with(&pid_hex)))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("tarpit-bench-{pid_hex}")))
        .collect();
    assert!(pins.is_empty(), "pin directories left behind: {pins:?}");
    let _ = std::fs::remove_dir_all(&out);
}
