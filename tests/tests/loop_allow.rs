//! One allow list for kernel and agent: `allow.ips` from the config and
//! run-time entries (`tarpit allow add`) land in the kernel's ALLOW map,
//! and the agent reads that same map for every new client, so a run-time
//! entry spares the client the greeting delay at once (within a second
//! for the first entry of a list that was empty) and its removal
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

/// The agent's config: a 2 s greeting delay and `allow` as `allow.ips`.
fn config_with(net: &TestNet, pins: &PinDir, allow: &str) -> String {
    common::config(
        net,
        pins,
        None,
        true,
        &format!("[greeting]\ndelay = \"2s\"\n[allow]\nips = [{allow}]\n"),
    )
}

/// A test net, pins, Postfix and a state file put back afterwards.
fn world() -> (TestNet, PinDir, Postfix, common::StateFileGuard) {
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    let state = common::StateFileGuard::new(&pins);
    (net, pins, pf, state)
}

#[test]
fn config_and_run_time_entries_are_one_list_for_kernel_and_agent_v4_and_v6() {
    if !require_root() {
        return;
    }
    let (net, pins, _pf, _state) = world();
    let cfg_with = |allow: &str| config_with(&net, &pins, allow);
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

/// The agent does not read an allow list that never held an entry (the
/// kernel's `LISTS_USED` flag, re-read at most once a second while it is
/// clear): a first entry added at run time still counts in the agent
/// within about a second, and one added once the list is in use at once.
#[test]
fn a_first_entry_on_an_empty_allow_list_counts_in_the_agent_too_v4_and_v6() {
    if !require_root() {
        return;
    }
    let (net, pins, _pf, _state) = world();
    let agent = Agent::start(&net, &config_with(&net, &pins, "")).expect("agent");
    let v4 = IpAddr::from(CLIENT_V4);
    let v6 = IpAddr::from(CLIENT_V6);
    assert!(banner_time(&net, v4) >= GREETING, "empty list: delayed");
    cli(&agent, &["allow", "add", &format!("{CLIENT_V4}/32")]);
    eventually("the first allow-list entry spares its client", || {
        banner_time(&net, v4) < GREETING
    });
    cli(&agent, &["allow", "add", &format!("{CLIENT_V6}/128")]);
    let took = banner_time(&net, v6);
    assert!(took < GREETING, "list in use: honoured at once: {took:?}");
}
