//! Two MX hosts sharing state through a three-node Redis Cluster
//! (`cluster.nodes`, docs/cluster.md) made by the test in a namespace of
//! its own and reached by both hosts over veths of their own
//! (fd5b:1e00:ff::/64).
//!
//! What a user sees: a block made at mx1 reaches mx2's kernel, and so does
//! its deletion; a block made while mx2's agent was stopped reaches it at
//! its next start (the catch-up reads the cluster node that holds tarpit's
//! slot); every key of tarpit is in that one slot; an offender mx2 blocked
//! stays blocked at mx2 when mx1 evicts it from its full automatic block
//! list to make room for offenders of its own (an eviction is no deletion).
//!
//! Over TLS (`rediss://` nodes with `cluster.ca_file`): a cluster whose
//! nodes have no plain port (their bus is TLS too); a block and its
//! deletion reach mx2, both hosts being clients of the node of tarpit's
//! slot on its TLS port.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{assert_hosts_are_clients, assert_no_plain_port, blocked, cli, talk_first};
use tarpit_tests::redis::{RedisProc, TestCa, free_addr};
use tarpit_tests::{Agent, PinDir, Postfix, ServiceNet, require_root, wait};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Three masters, no replicas, the 16384 slots split between them; TLS
/// only with `ca`.
fn redis_cluster(net: &ServiceNet, bind: IpAddr, ca: Option<&TestCa>) -> Vec<RedisProc> {
    let nodes: Vec<RedisProc> = (0..3)
        .map(|_| {
            let bus = free_addr(net, bind).expect("bus port").port().to_string();
            RedisProc::server_with(
                net,
                bind,
                ca,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                ],
            )
            .expect("redis cluster node")
        })
        .collect();
    // Bounded: a cluster whose nodes cannot meet would wait forever.
    let mut create = net.cmd("timeout");
    create.args(["60", "redis-cli"]);
    if let Some(ca) = ca {
        create.args(ca.cli_args());
    }
    create.args(["--cluster", "create"]);
    for n in &nodes {
        create.arg(format!("{}:{}", n.addr.ip(), n.addr.port()));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(out.status.success(), "cluster create: {out:?}");
    for n in &nodes {
        wait::eventually("the cluster is ok", Duration::from_secs(20), || {
            n.cli(&["CLUSTER", "INFO"])
                .unwrap_or_default()
                .contains("cluster_state:ok")
        });
    }
    nodes
}

/// mx1's automatic part of the block list: small enough to fill.
const MX1_AUTO: u32 = 4;

fn host_config(node: &str, nodes: &[RedisProc], ca: Option<&TestCa>) -> String {
    let scheme = if ca.is_some() { "rediss" } else { "redis" };
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("\"{scheme}://[{}]:{}\"", n.addr.ip(), n.addr.port()))
        .collect();
    let ca_file = ca
        .map(|ca| format!("ca_file = \"{}\"\n", ca.ca_file().display()))
        .unwrap_or_default();
    format!(
        r#"
[greeting]
delay = "500ms"
[offenders]
pregreet_strikes = 1
block_ttl = "10m"
slowdown = false
[cluster]
nodes = [{}]
node = "{node}"
timeout = "200ms"
{ca_file}"#,
        list.join(", ")
    )
}

/// Once both hosts are connected, a block made at mx1 reaches mx2's
/// kernel (at `pins2`), and so does its deletion.
fn block_and_deletion_reach_mx2(mx1: &Agent, mx2: &Agent, pins2: &PinDir) {
    let connected = |a: &Agent| a.log().contains("cluster: connected to Redis");
    wait::eventually("both hosts connected", Duration::from_secs(10), || {
        connected(mx1) && connected(mx2)
    });

    cli(mx1, &["block", "add", "198.51.100.61/32", "--ttl", "10m"]);
    wait::eventually("mx1's block at mx2", Duration::from_secs(5), || {
        blocked(pins2, "198.51.100.61")
    });
    cli(mx1, &["block", "del", "198.51.100.61/32"]);
    wait::eventually("mx1's deletion at mx2", Duration::from_secs(5), || {
        !blocked(pins2, "198.51.100.61")
    });
}

#[test]
fn blocks_and_deletions_reach_the_other_host_through_a_redis_cluster() {
    if !require_root() {
        return;
    }
    let (mx1, mx2, service) = common::mx_pair();
    let (net1, pins1, net2, pins2) = (&mx1.net, &mx1.pins, &mx2.net, &mx2.pins);
    let nodes = redis_cluster(&service, ServiceNet::V6.into(), None);
    let c1 = common::config(net1, pins1, None, true, &host_config("mx1", &nodes, None)).replacen(
        "[kernel]\n",
        &format!("[kernel]\nauto_block_entries = {MX1_AUTO}\n"),
        1,
    );
    let c2 = common::config(net2, pins2, None, true, &host_config("mx2", &nodes, None));
    let mx1 = Agent::start(net1, &c1).expect("mx1");
    let mx2 = Agent::start(net2, &c2).expect("mx2");
    block_and_deletion_reach_mx2(&mx1, &mx2, pins2);

    // mx2 away: a block made meanwhile reaches it at its next start.
    mx2.stop().expect("mx2 stops");
    cli(&mx1, &["block", "add", "198.51.100.62/32", "--ttl", "10m"]);
    std::thread::sleep(Duration::from_secs(1));
    let mx2 = Agent::start(net2, &c2).expect("mx2 again");
    wait::eventually(
        "the block made while mx2 was away",
        Duration::from_secs(10),
        || blocked(pins2, "198.51.100.62"),
    );

    // Every key in tarpit's one slot.
    let slot = nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", "{tarpit:}block:198.51.100.62/32"])
        .unwrap();
    let other = nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", "{tarpit:}block:198.51.100.61/32"])
        .unwrap();
    assert_eq!(slot, other);
    let mut found = String::new();
    for n in &nodes {
        found += &n
            .cli(&["-c", "GET", "{tarpit:}block:198.51.100.62/32"])
            .unwrap_or_default();
    }
    assert!(found.contains("\"node\":\"mx1\""), "{found}");

    // An offender blocked at mx2 is in mx1's automatic part too; offenders
    // of mx1's own fill that part, and the oldest entry, mx2's, makes room
    // at mx1: mx2 keeps its block, and Redis has no deletion of it.
    let _pf1 = Postfix::start(net1).expect("postfix mx1");
    let _pf2 = Postfix::start(net2).expect("postfix mx2");
    let theirs = ip("198.51.100.63");
    let ours: Vec<IpAddr> = (64..64 + MX1_AUTO as u8)
        .map(|i| ip(&format!("198.51.100.{i}")))
        .collect();
    net2.add_client_addr(theirs).unwrap();
    for a in &ours {
        net1.add_client_addr(*a).unwrap();
    }
    talk_first(net2, theirs).unwrap();
    wait::eventually("mx2's offender at mx1", Duration::from_secs(5), || {
        blocked(pins1, "198.51.100.63")
    });
    // Settled at mx1 (its own block on mx2's strike, mx2's block): several
    // of mx1's looks at its kernel (every 250 ms) have seen it.
    std::thread::sleep(Duration::from_millis(1500));
    for a in &ours {
        talk_first(net1, *a).unwrap();
        wait::eventually("mx1's offender blocked", Duration::from_secs(5), || {
            blocked(pins1, &a.to_string())
        });
    }
    assert!(
        !blocked(pins1, "198.51.100.63"),
        "mx2's offender made room at mx1"
    );
    // Several of mx1's looks at its kernel later.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        blocked(pins2, "198.51.100.63"),
        "mx1's eviction deleted mx2's block"
    );
    let mut there = String::new();
    for n in &nodes {
        there += &n
            .cli(&["-c", "GET", "{tarpit:}block:198.51.100.63/32"])
            .unwrap_or_default();
    }
    assert!(
        there.contains("198.51.100.63") && !there.contains("\"deleted\""),
        "{there}"
    );
    drop(mx1);
    drop(mx2);
}

#[test]
fn blocks_and_deletions_reach_the_other_host_through_a_redis_cluster_over_tls() {
    if !require_root() {
        return;
    }
    let (mx1, mx2, service) = common::mx_pair();
    let (net1, pins1, net2, pins2) = (&mx1.net, &mx1.pins, &mx2.net, &mx2.pins);
    let ca = TestCa::make().expect("test CA");
    let nodes = redis_cluster(&service, ServiceNet::V6.into(), Some(&ca));
    for n in &nodes {
        assert_no_plain_port(n);
    }
    let c1 = common::config(
        net1,
        pins1,
        None,
        true,
        &host_config("mx1", &nodes, Some(&ca)),
    );
    let c2 = common::config(
        net2,
        pins2,
        None,
        true,
        &host_config("mx2", &nodes, Some(&ca)),
    );
    let mx1 = Agent::start(net1, &c1).expect("mx1");
    let mx2 = Agent::start(net2, &c2).expect("mx2");
    block_and_deletion_reach_mx2(&mx1, &mx2, pins2);
    // The node of tarpit's slot has both hosts as clients, on TLS.
    let slot_node = nodes
        .iter()
        .find(|n| {
            n.cli(&["GET", "{tarpit:}block:198.51.100.61/32"])
                .is_ok_and(|v| v.contains("\"deleted\""))
        })
        .expect("a node holds tarpit's slot");
    assert_hosts_are_clients(slot_node);
    drop(mx1);
    drop(mx2);
}
