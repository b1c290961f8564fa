//! Repeat offenders held in the kernel (issue 21): with
//! `offenders.action = "hold"` the agent's automatic block holds instead
//! of dropping. A pre-greet talker's next connect() succeeds, the agent
//! never greets it (XDP answered; no socket reached the agent), and the
//! automatic entry says `hold`. IPv4 and IPv6. On kernels before 6.0 the
//! hold degrades to the drop of before.
#[path = "loop_common/mod.rs"]
mod common;

use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use common::{Attempt, agent_for, attempt, eventually, maps, talk_first};
use tarpit_common::{BlockReason, Counter};
use tarpit_tests::smtp_client::tcp_connect;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

#[test]
fn xdp_hold_for_offenders_with_action_hold_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    // Native XDP on a veth replies only when the peer has a program too.
    let _peer = testkit::xdp_pass::attach(&net.client_ns, &net.client_if).expect("XDP on peer");
    let rest = "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 1\n\
                block_ttl = \"60s\"\nslowdown = false\naction = \"hold\"\n";
    let _agent = Agent::start(&net, &common::config(&net, &pins, None, true, rest)).expect("agent");
    let bots = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for bot in bots {
        talk_first(&net, bot).unwrap();
    }
    for bot in bots {
        eventually(&format!("{bot} is on the block list"), || {
            maps(&pins).block_match(bot).unwrap().is_some()
        });
        let item = maps(&pins).block_match(bot).unwrap().unwrap();
        assert!(item.hold, "{bot}: the automatic block holds: {item:?}");
        assert!(item.automatic);
        assert_eq!(item.reason(), Some(BlockReason::Pregreet));
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if release.starts_with("5.") {
        for bot in bots {
            assert_eq!(
                attempt(&net, bot, agent_for(bot), Duration::from_secs(2)),
                Attempt::TimedOut,
                "{bot}: no hold before 6.0: dropped"
            );
        }
        return;
    }
    let handshakes = maps(&pins).counters().unwrap().get(Counter::HoldHandshakes);
    for bot in bots {
        let mut s = tcp_connect(&net, bot, agent_for(bot)).expect("held: connect() succeeds");
        // The agent greets after 1 s; a held client hears nothing.
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        let mut b = [0u8; 64];
        let r = s.read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
            "{bot}: held, got {r:?}"
        );
    }
    let now = maps(&pins).counters().unwrap().get(Counter::HoldHandshakes);
    assert!(now >= handshakes + 2, "handshakes {handshakes} -> {now}");
}
