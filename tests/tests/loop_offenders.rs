//! Repeat offenders: an address that talks before the greeting three times
//! is blocked in XDP (its next SYN goes unanswered) for the configured TTL,
//! and connects again once the TTL is over, without the agent's help.
//! IPv4 and IPv6.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{Attempt, agent_for, attempt, eventually, maps, talk_first};
use tarpit_common::BlockReason;
use tarpit_tests::smtp_client::SmtpClient;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

const TTL: Duration = Duration::from_secs(8);

#[test]
fn three_pre_greet_strikes_block_in_xdp_until_the_ttl_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let good: IpAddr = "198.51.100.20".parse().unwrap();
    net.add_client_addr(good).unwrap();
    let rest = format!(
        "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 3\nblock_ttl = \"{}s\"\n\
         slowdown = false\n",
        TTL.as_secs()
    );
    let agent = Agent::start(&net, &common::config(&net, &pins, None, true, &rest)).expect("agent");
    let bots = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];

    // Two strikes: still served (554 each time, never blocked).
    for _ in 0..2 {
        for bot in bots {
            talk_first(&net, bot).unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for bot in bots {
        assert!(
            maps(&pins).block_match(bot).unwrap().is_none(),
            "{bot} blocked after two strikes"
        );
        assert_eq!(
            attempt(&net, bot, agent_for(bot), Duration::from_secs(2)),
            Attempt::Connected
        );
    }
    // The third strike blocks, with its reason and TTL.
    for bot in bots {
        talk_first(&net, bot).unwrap();
    }
    let mut blocked_at = Instant::now();
    for bot in bots {
        eventually(&format!("{bot} is on the block list"), || {
            maps(&pins).block_match(bot).unwrap().is_some()
        });
        blocked_at = Instant::now();
        let entry = maps(&pins).block_match(bot).unwrap().unwrap();
        assert_eq!(entry.reason(), Some(BlockReason::Pregreet));
        let ttl = entry.expires.expect("a TTL").0 - entry.added.0;
        let ttl = Duration::from_nanos(ttl);
        assert!(ttl >= TTL && ttl < TTL + Duration::from_secs(1), "{ttl:?}");
        assert_eq!(entry.net.prefix_len(), if bot.is_ipv4() { 32 } else { 128 });
    }
    // The next SYN gets no answer; a good client still connects.
    for bot in bots {
        assert_eq!(
            attempt(&net, bot, agent_for(bot), Duration::from_secs(2)),
            Attempt::TimedOut,
            "{bot} is blocked"
        );
    }
    let mut c = SmtpClient::connect(&net, good, agent_for(good)).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    c.expect("QUIT", 221).unwrap();
    assert!(
        agent.log().contains("repeat offender blocked in XDP"),
        "{}",
        agent.log()
    );
    let drops = maps(&pins).counters().unwrap().drops(BlockReason::Pregreet);
    assert!(drops >= 2, "XDP drop counter for pre-greet blocks: {drops}");

    // After the TTL the kernel lets them in again by itself.
    let left = TTL.saturating_sub(blocked_at.elapsed()) + Duration::from_millis(500);
    std::thread::sleep(left);
    for bot in bots {
        let mut c = SmtpClient::connect(&net, bot, agent_for(bot)).expect("connects after the TTL");
        assert_eq!(c.reply().unwrap().code, 220, "{bot} served after the TTL");
        c.expect("QUIT", 221).unwrap();
    }
}

/// A bot whose handshake ACK is lost (or who never sends one: a raw
/// client can put its EHLO on the ACK that completes the handshake) talks
/// in the very segment that makes the connection. The kernel's tc program
/// sees that segment before sock_ops has made the flow, so the flow
/// reads "awaiting the greeting" afterwards; the agent saw the bytes
/// before its banner all the same, and they are pre-greet talk: 554, and
/// a strike that counts toward the XDP block like the kernel's own.
#[test]
fn talk_on_the_handshake_ack_is_pre_greet_talk_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let rest = "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 2\nblock_ttl = \"60s\"\n\
                slowdown = false\n";
    let agent = Agent::start(&net, &common::config(&net, &pins, None, true, rest)).expect("agent");
    // Every pure ACK the client sends to the agent is lost; segments with
    // data (PSH|ACK) and FINs go through, so the client's first data
    // segment is what completes the handshake at the server.
    let rules = format!(
        "table inet lossy {{\n chain out {{\n  type filter hook output priority 0;\n  \
         tcp dport {port} tcp flags == ack drop\n }}\n}}\n",
        port = agent_for(IpAddr::from(CLIENT_V4)).port()
    );
    testkit::feed(net.client_cmd("nft").args(["-f", "-"]), &rules).expect("nft");
    let bots = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for bot in bots {
        talk_first(&net, bot).unwrap_or_else(|e| panic!("{bot}: {e:#}\n{}", agent.log()));
        // tc saw the talk before the flow existed: no kernel strike.
        let kernel = maps(&pins).ip_state(bot).unwrap().map_or(0, |s| s.strikes);
        assert_eq!(kernel, 0, "{bot}: the kernel struck it after all");
        assert!(maps(&pins).block_match(bot).unwrap().is_none(), "{bot}");
    }
    for bot in bots {
        talk_first(&net, bot).unwrap_or_else(|e| panic!("{bot}: {e:#}\n{}", agent.log()));
        eventually(&format!("{bot} is on the block list"), || {
            maps(&pins).block_match(bot).unwrap().is_some()
        });
        let entry = maps(&pins).block_match(bot).unwrap().unwrap();
        assert_eq!(entry.reason(), Some(BlockReason::Pregreet));
    }
    drop(agent);
}

#[test]
fn allow_listed_and_internal_talkers_are_never_blocked() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    // The v4 client is internal, the v6 client allow-listed; both are
    // exempt from the tarpit, so test the kernel side with drop_pre_greet
    // on: their pre-greet talk is still seen by the kernel.
    let rest = format!(
        "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 2\nblock_ttl = \"60s\"\n\
         [allow]\ninternal = [\"{CLIENT_V4}/32\"]\nips = [\"{CLIENT_V6}/128\"]\n"
    );
    let agent = Agent::start(&net, &common::config(&net, &pins, None, true, &rest)).expect("agent");
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        // Exempt: no greeting delay, so the MTA's banner races the
        // client's early talk; try until the kernel saw three strikes.
        let strikes = || maps(&pins).ip_state(src).unwrap().map_or(0, |s| s.strikes);
        for _ in 0..30 {
            if strikes() >= 3 {
                break;
            }
            let mut c = SmtpClient::connect(&net, src, agent_for(src)).unwrap();
            c.send(b"EHLO early.example\r\n").unwrap();
            // No 554 for them: the MTA answers.
            assert_eq!(c.reply().unwrap().code, 220);
            let _ = c.reply();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(strikes() >= 3, "{src}: kernel strikes {}", strikes());
    }
    std::thread::sleep(Duration::from_secs(1));
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        assert!(maps(&pins).block_match(src).unwrap().is_none(), "{src}");
        assert!(maps(&pins).slow_get(src).unwrap().is_none(), "{src}");
        assert_eq!(
            attempt(&net, src, agent_for(src), Duration::from_secs(2)),
            Attempt::Connected
        );
    }
    // And the allow-listed prefix sits in the kernel's allow list.
    let allow = maps(&pins).allow_list().unwrap();
    assert!(
        allow
            .iter()
            .any(|i| i.net == format!("{CLIENT_V6}/128").parse().unwrap()),
        "{allow:?}"
    );
    drop(agent);
}

#[test]
fn a_run_of_unknown_recipients_blocks_as_harvest_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let rest = "[greeting]\ndelay = \"0s\"\n[offenders]\nunknown_recipients = 4\nblock_ttl = \"60s\"\n\
                slowdown = false\n";
    let agent = Agent::start(&net, &common::config(&net, &pins, None, true, rest)).expect("agent");
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let mut c = SmtpClient::connect(&net, src, agent_for(src)).unwrap();
        assert_eq!(c.reply().unwrap().code, 220);
        c.expect("EHLO harvester.example", 250).unwrap();
        c.expect("MAIL FROM:<probe@harvester.example>", 250)
            .unwrap();
        // A real recipient does not count; three unknown ones stay below.
        c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
        for i in 0..3 {
            c.expect(&format!("RCPT TO:<unknown{i}@tarpit.test>"), 550)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(maps(&pins).block_match(src).unwrap().is_none(), "{src}");
        c.expect("RCPT TO:<unknown9@tarpit.test>", 550).unwrap();
        eventually(&format!("{src} blocked as a harvester"), || {
            maps(&pins)
                .block_match(src)
                .unwrap()
                .is_some_and(|e| e.reason() == Some(BlockReason::Harvest))
        });
        drop(c);
        assert_eq!(
            attempt(&net, src, agent_for(src), Duration::from_secs(2)),
            Attempt::TimedOut
        );
    }
    assert!(
        agent.log().contains("unknown recipients"),
        "{}",
        agent.log()
    );
}

#[test]
fn sessions_dropped_by_a_dnsbl_block_after_the_threshold() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let bot: IpAddr = "198.51.100.131".parse().unwrap();
    net.add_client_addr(bot).unwrap();
    let _rbl = tarpit_tests::Rbldnsd::start(
        &net,
        &["drop.test:ip4set:drop.zone"],
        &[("drop.zone", "198.51.100.131\n")],
    )
    .expect("rbldnsd");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let rest = r#"
[greeting]
delay = "1s"
[dns]
nameservers = ["127.0.0.1:5353"]
# Generous: on a busy box a late answer would let the client in.
timeout = "8s"
[dnsbl]
sites = ["drop.test*3"]
threshold = 3
[dnsbl.actions]
"drop.test" = "drop"
[offenders]
rejected_sessions = 2
block_ttl = "60s"
slowdown = false
"#;
    let agent = Agent::start(&net, &common::config(&net, &pins, None, true, rest)).expect("agent");
    for i in 0..2 {
        let mut c = SmtpClient::connect(&net, bot, agent_for(bot)).unwrap();
        assert!(c.closed_within(Duration::from_secs(10)), "drop {i}");
    }
    eventually("the dropped client is blocked", || {
        maps(&pins)
            .block_match(bot)
            .unwrap()
            .is_some_and(|e| e.reason() == Some(BlockReason::Rejected))
    });
    assert_eq!(
        attempt(&net, bot, agent_for(bot), Duration::from_secs(2)),
        Attempt::TimedOut
    );
    assert!(agent.log().contains("rejected sessions"), "{}", agent.log());
}
