//! One allow list for kernel and agent: `allow.ips` from the config and
//! run-time entries (`tarpit allow add`) land in the kernel's ALLOW map,
//! and the agent reads that same map for every new client, so a run-time
//! entry spares the client the greeting delay at once and its removal
//! brings the delay back. A reload that drops a config entry takes it out
//! of the kernel. IPv4 and IPv6 (no sk_lookup bypass here: the agent
//! serves every client).
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{agent_for, cli, eventually, maps};
use tarpit_tests::smtp_client::SmtpClient;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

const GREETING: Duration = Duration::from_secs(2);

fn banner_time(net: &TestNet, src: IpAddr) -> Duration {
    let t = Instant::now();
    let mut c = SmtpClient::connect(net, src, agent_for(src)).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let took = t.elapsed();
    c.expect("QUIT", 221).unwrap();
    took
}

#[test]
fn config_and_run_time_entries_are_one_list_for_kernel_and_agent_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let _state = common::StateFileGuard::new(&pins);
    let cfg_with = |allow: &str| {
        common::config(
            &net,
            &pins,
            None,
            true,
            &format!("[greeting]\ndelay = \"2s\"\n[allow]\nips = [{allow}]\n"),
        )
    };
    let configured: IpAddr = "198.51.100.70".parse().unwrap();
    net.add_client_addr(configured).unwrap();
    let agent = Agent::start(&net, &cfg_with("\"198.51.100.70/32\"")).expect("agent");
    assert!(maps(&pins).allow_match(configured).unwrap().is_some());
    assert!(banner_time(&net, configured) < GREETING);

    for (src, cidr) in [
        (IpAddr::from(CLIENT_V4), format!("{CLIENT_V4}/32")),
        (IpAddr::from(CLIENT_V6), format!("{CLIENT_V6}/128")),
    ] {
        assert!(banner_time(&net, src) >= GREETING, "{src}: not yet listed");
        cli(&agent, &["allow", "add", &cidr]);
        let took = banner_time(&net, src);
        assert!(took < GREETING, "{src}: run-time entry ignored: {took:?}");
        cli(&agent, &["allow", "del", &cidr]);
        let took = banner_time(&net, src);
        assert!(
            took >= GREETING,
            "{src}: removed entry still honoured: {took:?}"
        );
    }

    // A run-time entry survives a reload; the dropped config entry leaves.
    cli(&agent, &["allow", "add", &format!("{CLIENT_V6}/128")]);
    std::fs::write(&agent.config, cfg_with("")).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    eventually("the dropped config entry left the kernel", || {
        maps(&pins).allow_match(configured).unwrap().is_none()
    });
    assert!(banner_time(&net, configured) >= GREETING);
    assert!(
        maps(&pins)
            .allow_match(IpAddr::from(CLIENT_V6))
            .unwrap()
            .is_some()
    );
    assert!(banner_time(&net, IpAddr::from(CLIENT_V6)) < GREETING);
}
