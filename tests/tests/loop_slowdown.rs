//! Slow-down: an address with a pre-greet strike below the block
//! threshold is marked for the sock_ops window clamp; its next
//! connections get a tiny TCP window, so a 200 KB message body crawls
//! while a control client from another address sends it at full speed.
//! IPv4 and IPv6.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{agent_for, eventually, maps, send_body, talk_first};
use tarpit_common::{Counter, state::IP_F_SLOWED};
use tarpit_tests::smtp_client::SmtpClient;
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestCgroup, TestNet, require_root,
};

const BODY: usize = 200 * 1024;

fn body_time(net: &TestNet, src: IpAddr) -> Duration {
    let mut c = SmtpClient::connect(net, src, agent_for(src)).unwrap();
    c.set_read_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    let took = send_body(&mut c, BODY).unwrap();
    c.expect("QUIT", 221).unwrap();
    took
}

#[test]
fn a_first_offender_sends_a_200k_body_several_times_slower_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    // The agent in a cgroup of its own: the clamp touches its sockets only.
    let cg = TestCgroup::new().expect("cgroup");
    let pf = Postfix::start(&net).expect("postfix");
    let controls: [IpAddr; 2] = [
        "198.51.100.60".parse().unwrap(),
        "fd5b:1e00::60".parse().unwrap(),
    ];
    for c in controls {
        net.add_client_addr(c).unwrap();
    }
    let rest = "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 3\nslowdown = true\n\
                slowdown_ttl = \"120s\"\n";
    let _agent = Agent::start_with(
        &net,
        &common::config(&net, &pins, Some(&cg), true, rest),
        Some(&cg),
    )
    .expect("agent");
    let slow = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for s in slow {
        talk_first(&net, s).unwrap();
    }
    for s in slow {
        eventually(&format!("{s} is marked for slow-down"), || {
            maps(&pins).slow_get(s).unwrap().is_some()
        });
        assert!(
            maps(&pins).block_match(s).unwrap().is_none(),
            "one strike never blocks"
        );
    }
    // Both families at once (each pair: control first, then the slowed one).
    std::thread::scope(|scope| {
        for (s, c) in slow.into_iter().zip(controls) {
            let net = &net;
            let pins = &pins;
            scope.spawn(move || {
                let control = body_time(net, c);
                let slowed = body_time(net, s);
                eprintln!("200 KB body: control {c} {control:?}, slowed {s} {slowed:?}");
                assert!(
                    slowed >= control * 4,
                    "{s}: slowed body took {slowed:?}, control {control:?}"
                );
                let st = maps(pins).ip_state(s).unwrap().expect("per-IP state");
                assert!(st.flags & IP_F_SLOWED != 0, "{s}: flags {:#x}", st.flags);
            });
        }
    });
    let delivered = 4;
    assert!(maps(&pins).counters().unwrap().get(Counter::SockClamped) >= 2);
    // Slowed, not lost: every message arrived.
    assert!(
        pf.wait_delivered(delivered, Duration::from_secs(30)),
        "{}",
        pf.log()
    );
}
