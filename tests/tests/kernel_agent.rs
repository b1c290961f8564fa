//! The kernel programs loaded by the real agent (`tarpit run`): a
//! pre-greet talker shows up in the agent's own log through aya-log (the
//! kernel's rare-event diagnostics), and stopping the agent with
//! `detach_on_exit` leaves no program, link or pin behind.
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kernel_env::{World, read_until, send};
use tarpit::kernel::KernelMaps;
use tarpit_tests::hooks::{cgroup_progs, sock_ops_on, xdp_prog_id};
use tarpit_tests::{Agent, SERVER_V6, require_root, wait::until};

#[test]
fn agent_logs_kernel_pregreet_diagnostics_and_detaches_on_exit() {
    if !require_root() {
        return;
    }
    let w = World::unloaded().expect("world");
    let config = format!(
        r#"
[listen]
addrs = ["127.0.0.1:2999"]
backlog = 777
[backend]
addr = "127.0.0.1:2998"
[kernel]
interfaces = ["{iface}"]
smtp_ports = [25]
pin_path = "{pins}"
detach_on_exit = true
cgroup = "{cgroup}"
"#,
        iface = w.net.server_if,
        pins = w.pins.path.display(),
        cgroup = w.cgroup.path.display(),
    );
    let agent = Agent::start_with(&w.net, &config, Some(&w.cgroup)).expect("agent starts");
    // The listen queue is the configured one (ss shows it as Send-Q), not
    // tokio's 1024: connect bursts must not cost SYN retransmissions.
    let ss = w
        .net
        .server_cmd("ss")
        .args(["-Hltn", "sport", "= :2999"])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout).into_owned();
    assert_eq!(
        ss.split_whitespace().nth(2),
        Some("777"),
        "listen queue of 127.0.0.1:2999: {ss}"
    );
    let bot: IpAddr = "fd5b:1e00::150".parse().unwrap();
    w.net.add_client_addr(bot).unwrap();
    let mut s = w
        .connect(
            bot,
            SocketAddr::new(SERVER_V6.into(), 25),
            Duration::from_secs(5),
        )
        .unwrap();
    let port = s.local_addr().unwrap().port();
    send(&mut s, "EHLO early").unwrap();
    read_until(&mut s, "220 ").unwrap();
    let needle = format!("pre-greet talk from [{bot}]:{port} to port 25");
    assert!(
        until(Duration::from_secs(5), || agent.log().contains(&needle)),
        "no kernel log line {needle:?} in the agent's log:\n{}",
        agent.log()
    );
    let maps = KernelMaps::open(&w.pins.path).expect("maps of the running agent");
    assert_eq!(maps.ip_state(bot).unwrap().unwrap().strikes, 1);
    drop(maps);
    assert!(xdp_prog_id(&w.net).is_some(), "no XDP while the agent runs");
    assert!(
        sock_ops_on(&w.cgroup),
        "no sock_ops while the agent runs: {:?}",
        cgroup_progs(&w.cgroup)
    );

    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "{status}");
    assert!(!w.pins.path.exists(), "pins left: {:?}", w.pins.entries());
    assert_eq!(xdp_prog_id(&w.net), None, "XDP left on the interface");
    assert!(
        cgroup_progs(&w.cgroup).is_empty(),
        "left on the cgroup: {:?}",
        cgroup_progs(&w.cgroup)
    );
}
