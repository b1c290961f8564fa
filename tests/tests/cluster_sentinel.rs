//! Two MX hosts sharing state through Redis Sentinel (`cluster.sentinels`,
//! docs/cluster.md), across a fail-over: a master, a replica and a
//! Sentinel started by the test in a namespace of their own, reached by
//! both hosts over veths of their own (fd5b:1e00:ff::/64).
//!
//! What a user sees: a block made at mx1 reaches mx2 through the master
//! the Sentinel names; an address authenticated at mx1 pays no HELO delay
//! at mx2 (`helo.authenticated_once_per_day`); the master is killed; mail keeps flowing at both;
//! once the Sentinel has promoted the replica, a block made at mx2 reaches
//! mx1 through the new master.
//!
//! The same over TLS (`rediss://` sentinels with `cluster.ca_file`): the
//! master, the replica and the Sentinel have no plain port at all (their
//! replication and the Sentinel's links are TLS too), the agents reach
//! the Sentinel and the master it names, before and after the fail-over,
//! with the test's CA.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{agent_for, assert_hosts_are_clients, assert_no_plain_port, blocked, cli, maps};
use tarpit_tests::redis::{RedisProc, TestCa};
use tarpit_tests::smtp_client::SmtpClient;
use tarpit_tests::swaks::swaks;
use tarpit_tests::{Agent, CLIENT_V4, Postfix, ServiceNet, require_root, wait};

const SERVICE: &str = "tarpit";
const HELO_DELAY_S: u64 = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn host_config(node: &str, sentinel: std::net::SocketAddr, ca: Option<&TestCa>) -> String {
    let (scheme, ca_file) = match ca {
        Some(ca) => (
            "rediss",
            format!("ca_file = \"{}\"\n", ca.ca_file().display()),
        ),
        None => ("redis", String::new()),
    };
    format!(
        r#"
[greeting]
delay = "0s"
[helo]
delay = "{HELO_DELAY_S}s"
authenticated_once_per_day = true
[cluster]
sentinels = ["{scheme}://{sentinel}"]
service = "{SERVICE}"
node = "{node}"
timeout = "200ms"
{ca_file}"#
    )
}

#[test]
fn blocks_reach_the_other_host_through_sentinel_before_and_after_a_fail_over() {
    if !require_root() {
        return;
    }
    run(None);
}

#[test]
fn the_same_over_tls_to_the_sentinel_and_the_masters_it_names() {
    if !require_root() {
        return;
    }
    let ca = TestCa::make().expect("test CA");
    run(Some(&ca));
}

/// The scenario, over TLS only with `ca`. Over TLS the AUTH part is left
/// out (it depends on how Redis is reached no more than a block does).
fn run(ca: Option<&TestCa>) {
    let (mx1, mx2, service) = common::mx_pair();
    let (net1, pins1, net2, pins2) = (&mx1.net, &mx1.pins, &mx2.net, &mx2.pins);
    let _pf1 = Postfix::start(net1).expect("postfix mx1");
    let _pf2 = Postfix::start(net2).expect("postfix mx2");
    let here = IpAddr::from(ServiceNet::V6);
    let mut master = RedisProc::server_with(&service, here, ca, &[]).expect("redis master");
    let m = master.addr;
    let replica = RedisProc::server_with(
        &service,
        here,
        ca,
        &["--replicaof", &m.ip().to_string(), &m.port().to_string()],
    )
    .expect("redis replica");
    wait::eventually("the replica in sync", Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .unwrap_or_default()
            .contains("master_link_status:up")
    });
    let sentinel =
        RedisProc::sentinel_with(&service, here, m, SERVICE, ca).expect("redis sentinel");
    // The Sentinel learns of the replica from the master.
    wait::eventually(
        "the sentinel sees the replica",
        Duration::from_secs(15),
        || {
            sentinel
                .cli(&["SENTINEL", "replicas", SERVICE])
                .unwrap_or_default()
                .contains(&replica.addr.port().to_string())
        },
    );
    let mx1 = Agent::start(
        net1,
        &common::config(
            net1,
            pins1,
            None,
            true,
            &host_config("mx1", sentinel.addr, ca),
        ),
    )
    .expect("mx1");
    let mx2 = Agent::start(
        net2,
        &common::config(
            net2,
            pins2,
            None,
            true,
            &host_config("mx2", sentinel.addr, ca),
        ),
    )
    .expect("mx2");
    let connected = |a: &Agent| a.log().contains("cluster: connected to Redis");
    wait::eventually("both hosts connected", Duration::from_secs(10), || {
        connected(&mx1) && connected(&mx2)
    });

    cli(&mx1, &["block", "add", "198.51.100.71/32", "--ttl", "10m"]);
    wait::eventually("mx1's block at mx2", Duration::from_secs(5), || {
        blocked(pins2, "198.51.100.71")
    });
    if ca.is_some() {
        // TLS only: no plain port to fall back to (the Sentinel's is 0
        // in its config file; it has no CONFIG command), and both agents
        // are clients of the master (over its TLS port, its only one).
        for p in [&master, &replica] {
            assert_no_plain_port(p);
        }
        assert_hosts_are_clients(&master);
    } else {
        // Authenticated at mx1 (once-per-day rule on): no HELO delay at mx2,
        // while an address that never authenticated pays it there.
        let user = IpAddr::from(CLIENT_V4);
        let stranger = ip("198.51.100.20");
        net2.add_client_addr(stranger).unwrap();
        cli(&mx1, &["auth", "add", &user.to_string(), "--ttl", "1d"]);
        wait::eventually(
            "mx1's authenticated address at mx2",
            Duration::from_secs(5),
            || maps(pins2).auth_get(user).unwrap().is_some(),
        );
        let helo_time = |src: IpAddr| -> Duration {
            let mut c = SmtpClient::connect(net2, src, agent_for(src)).unwrap();
            assert_eq!(c.reply().unwrap().code, 220);
            let (r, took) = c.cmd("EHLO client.example").unwrap();
            assert_eq!(r.code, 250, "{r:?}");
            let _ = c.cmd("QUIT");
            took
        };
        let spared = helo_time(user);
        let paid = helo_time(stranger);
        let delay = Duration::from_secs(HELO_DELAY_S);
        assert!(
            spared < delay / 2,
            "authenticated at mx1, EHLO at mx2 took {spared:?}"
        );
        assert!(
            paid >= delay,
            "never authenticated, EHLO at mx2 took {paid:?}"
        );
    }

    // The master dies; mail flows at both while the Sentinel fails over.
    master.kill();
    for (name, net) in [("mx1", net1), ("mx2", net2)] {
        let s = swaks(net, CLIENT_V4.into(), &[]);
        assert!(s.ok, "{name} during the fail-over: {}", s.out);
    }
    let promoted = replica.addr.port().to_string();
    wait::eventually(
        "the sentinel promotes the replica",
        Duration::from_secs(30),
        || {
            sentinel
                .cli(&["SENTINEL", "get-master-addr-by-name", SERVICE])
                .unwrap_or_default()
                .contains(&promoted)
        },
    );
    cli(&mx2, &["block", "add", "198.51.100.72/32", "--ttl", "10m"]);
    wait::eventually(
        "mx2's block at mx1 through the new master",
        Duration::from_secs(20),
        || blocked(pins1, "198.51.100.72"),
    );
    let there = replica
        .cli(&["GET", "tarpit:block:198.51.100.72/32"])
        .unwrap();
    assert!(
        there.contains("\"node\":\"mx2\""),
        "in the new master: {there}"
    );
    if ca.is_some() {
        assert_hosts_are_clients(&replica);
    }
    drop(mx1);
    drop(mx2);
}
