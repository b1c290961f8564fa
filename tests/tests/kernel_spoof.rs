//! Only real connections earn kernel verdicts (issue 16).
//!
//! - A blind spoofer in the client namespace sends SYNs and data packets
//!   with the source address of a real client, many times, and segments
//!   with that client's own ports while it waits for its banner: no
//!   strike, no slow-down, no block; the client then delivers its mail.
//!   A real pre-greet talker on the same agent is still struck and
//!   blocked. IPv4 and IPv6.
//! - Forged SYNs make no flow, so they cannot push a real flow out of a
//!   small flow table, and forged segments on a live flow change nothing.
//! - Replies routed out of a second veth that has no programs (asymmetric
//!   routing): no strike for anyone, mail flows, and the flows count as
//!   unknown (`tc_flow_unseen` in `tarpit stats`).
//! - A flow map pinned by an older tarpit (another value size) is replaced
//!   at start instead of refusing the pin directory.
#[path = "loop_common/mod.rs"]
mod common;
#[path = "../src/kernel_env.rs"]
mod kernel_env;
#[path = "../src/packet.rs"]
mod packet;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{agent_for, eventually, maps, talk_first};
use kernel_env::{SLOW_PORT, World, mac_of, read_until, send, send_frames};
use packet::{ACK, PSH, SYN, Tcp, tcp_frame};
use tarpit::kernel::PreGreetVerdict;
use tarpit_common::{Counter, FlowState, maps as names};
use tarpit_tests::smtp_client::{SmtpClient, message, tcp_connect};
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TestCgroup, TestNet,
    require_root, tarpit_bin, wait::until,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The (server, client) MAC addresses of the test veth pair.
type Macs = ([u8; 6], [u8; 6]);

fn macs(net: &TestNet) -> Macs {
    (
        mac_of(&net.server_ns, &net.server_if).unwrap(),
        mac_of(&net.client_ns, &net.client_if).unwrap(),
    )
}

/// One forged segment from `src:sport` to `dst:dport`, as a frame for the
/// client veth.
fn forged((server, client): Macs, src: IpAddr, dst: IpAddr, t: &Tcp) -> Vec<u8> {
    tcp_frame(server, client, src, dst, t)
}

/// `rounds` forged SYN + data pairs from `victim` to `dst` (no handshake;
/// guessed sequence and acknowledgment numbers, as a blind attacker must).
fn spoof_pairs(m: Macs, victim: IpAddr, dst: SocketAddr, rounds: u16) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for i in 0..rounds {
        let sport = 41000 + i;
        let isn = 1000u32.wrapping_mul(u32::from(i) + 7);
        let mut syn = Tcp::new(sport, dst.port(), SYN, b"");
        syn.seq = isn;
        frames.push(forged(m, victim, dst.ip(), &syn));
        let mut data = Tcp::new(sport, dst.port(), ACK | PSH, b"EHLO spoof.example\r\n");
        data.seq = isn.wrapping_add(1);
        data.ack = 0x5eed_0000u32.wrapping_add(u32::from(i) * 7919);
        frames.push(forged(m, victim, dst.ip(), &data));
    }
    frames
}

/// Segments with the exact four-tuple of a live connection, but sequence
/// and acknowledgment numbers a blind attacker has to guess.
fn spoof_live(m: Macs, client: SocketAddr, dst: SocketAddr) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for guess in [0u32, 1, 0x8000_0000, 0xdead_beef, 0x1234_5678] {
        let mut data = Tcp::new(client.port(), dst.port(), ACK | PSH, b"EHLO spoof\r\n");
        data.seq = guess;
        data.ack = guess.rotate_left(7);
        frames.push(forged(m, client.ip(), dst.ip(), &data));
    }
    frames
}

fn strikes(pins: &PinDir, who: IpAddr) -> u32 {
    maps(pins).ip_state(who).unwrap().map_or(0, |s| s.strikes)
}

/// A whole message from `src` through the agent; panics on any surprise.
fn deliver(net: &TestNet, src: IpAddr, subject: &str) {
    let mut c = SmtpClient::connect(net, src, agent_for(src)).expect("connects");
    assert_eq!(c.reply().unwrap().code, 220, "{src} greeted");
    c.expect("EHLO client.example", 250).unwrap();
    c.expect("MAIL FROM:<sender@client.example>", 250).unwrap();
    c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send(message(subject).as_bytes()).unwrap();
    c.expect(".", 250).unwrap();
    c.expect("QUIT", 221).unwrap();
}

/// Offenders are blocked at the second strike and slowed at the first:
/// any forged strike would show.
const STRICT: &str = "[greeting]\ndelay = \"1s\"\n[offenders]\npregreet_strikes = 2\n\
                      block_ttl = \"60s\"\nslowdown = true\n";

#[test]
fn spoofed_syns_and_data_never_strike_the_real_client_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    // The agent in its own cgroup: sock_ops then sees its sockets only,
    // not other tests' port-25 traffic elsewhere on the machine.
    let cg = TestCgroup::new().expect("cgroup");
    let agent = Agent::start_with(
        &net,
        &common::config(&net, &pins, Some(&cg), true, STRICT),
        Some(&cg),
    )
    .expect("agent");
    let victims = [ip("198.51.100.61"), ip("fd5b:1e00::61")];
    for v in victims {
        net.add_client_addr(v).unwrap();
    }

    // Forged SYN + data pairs with the victims' address, many times.
    let m = macs(&net);
    for v in victims {
        send_frames(&net, &spoof_pairs(m, v, agent_for(v), 40)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let c = maps(&pins).counters().unwrap();
    assert_eq!(
        c.get(Counter::TcFlowNew),
        0,
        "a bare SYN made a flow: {c:?}"
    );
    assert!(c.get(Counter::TcFlowUnknown) >= 80, "{c:?}");
    assert_eq!(c.get(Counter::TcPregreet), 0, "{c:?}");

    // Forged segments on a victim's own connection while it waits for
    // its banner: ignored, the session goes on.
    for v in victims {
        let mut s = tcp_connect(&net, v, agent_for(v)).expect("connects");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let me = s.local_addr().unwrap();
        send_frames(&net, &spoof_live(m, me, agent_for(v))).unwrap();
        read_until(&mut s, "220 ").expect("greeted after the hold");
        send(&mut s, "QUIT").unwrap();
        read_until(&mut s, "221").expect("a normal session");
    }
    std::thread::sleep(Duration::from_millis(500));
    let c = maps(&pins).counters().unwrap();
    assert!(c.get(Counter::TcOutOfWindow) >= 1, "{c:?}");
    assert_eq!(c.get(Counter::TcPregreet), 0, "{c:?}");
    for v in victims {
        assert_eq!(strikes(&pins, v), 0, "{v} got a strike");
        assert!(maps(&pins).block_match(v).unwrap().is_none(), "{v} blocked");
        assert!(maps(&pins).slow_get(v).unwrap().is_none(), "{v} slowed");
    }
    assert!(
        !agent.log().contains("pre-greet talk seen by the kernel"),
        "{}",
        agent.log()
    );

    // The real clients deliver mail normally.
    for (i, v) in victims.iter().enumerate() {
        deliver(&net, *v, &format!("after the spoofing {i}"));
    }
    assert!(pf.wait_delivered(2, Duration::from_secs(20)), "mail lost");

    // A real pre-greet talker on the same agent is still struck, then
    // blocked at the second strike.
    let bots = [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)];
    for bot in bots {
        talk_first(&net, bot).unwrap();
        eventually(&format!("{bot} struck"), || strikes(&pins, bot) == 1);
        talk_first(&net, bot).unwrap();
        eventually(&format!("{bot} blocked"), || {
            maps(&pins).block_match(bot).unwrap().is_some()
        });
    }
    for v in victims {
        assert_eq!(strikes(&pins, v), 0, "{v}");
        assert!(maps(&pins).block_match(v).unwrap().is_none(), "{v}");
    }
}

#[test]
fn forged_syns_push_no_real_flow_out_and_forged_segments_change_none() {
    if !require_root() {
        return;
    }
    // A flow table of 16: forged SYNs that made entries would evict the
    // real one at once.
    let w = World::with(|c| c.flow_entries = 16).expect("world");
    let m = macs(&w.net);
    for (client, server, victim) in [
        (
            ip("198.51.100.80"),
            IpAddr::from(SERVER_V4),
            ip("198.51.100.81"),
        ),
        (
            ip("fd5b:1e00::80"),
            IpAddr::from(SERVER_V6),
            ip("fd5b:1e00::81"),
        ),
    ] {
        w.net.add_client_addr(client).unwrap();
        // The slow port greets after 8 s: the flow waits meanwhile. The
        // flood is built first (slow under emulation), the live segments
        // once the port is known.
        let dst = SocketAddr::new(server, SLOW_PORT);
        let mut frames = spoof_pairs(m, victim, dst, 100);
        let mut c = w.connect(client, dst, Duration::from_secs(5)).unwrap();
        let me = c.local_addr().unwrap();
        assert!(
            until(Duration::from_secs(3), || {
                w.maps().flow_verdict(me, dst).ok() == Some(PreGreetVerdict::AwaitingGreeting)
            }),
            "{me} not tracked: {:?}",
            w.maps().flow_verdict(me, dst)
        );
        frames.extend(spoof_live(m, me, dst));
        send_frames(&w.net, &frames).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            w.maps().flow_verdict(me, dst).unwrap(),
            PreGreetVerdict::AwaitingGreeting,
            "forged packets moved the real flow"
        );
        assert!(w.maps().flow_count() <= 2, "{}", w.maps().flow_count());
        // The real client talks early: still caught.
        send(&mut c, "EHLO early").unwrap();
        assert!(
            until(Duration::from_secs(3), || {
                w.maps().flow_verdict(me, dst).ok()
                    == Some(PreGreetVerdict::PreGreet { teaser: false })
            }),
            "{:?}",
            w.maps().flow_verdict(me, dst)
        );
        drop(c);
        assert_eq!(strikes_of(&w, client), 1);
        assert_eq!(strikes_of(&w, victim), 0);
    }
    let c = w.maps().counters().unwrap();
    assert_eq!(c.get(Counter::TcPregreet), 2, "{c:?}");
    assert!(c.get(Counter::TcOutOfWindow) >= 2, "{c:?}");
}

fn strikes_of(w: &World, who: IpAddr) -> u32 {
    w.maps().ip_state(who).unwrap().map_or(0, |s| s.strikes)
}

/// A second veth pair between the two namespaces, with no programs, and
/// routes in the server namespace that send replies to `clients` out of
/// it (static neighbours: no ARP or ND across the odd path). It goes with
/// the namespaces when the test's [`TestNet`] drops.
fn route_replies_around(net: &TestNet, clients: &[IpAddr]) {
    let (srv, cli) = (format!("ta{}", net.id), format!("tb{}", net.id));
    let run = |args: &[&str]| testkit::netns::ip(args).unwrap();
    run(&[
        "link",
        "add",
        &srv,
        "netns",
        &net.server_ns,
        "type",
        "veth",
        "peer",
        "name",
        &cli,
        "netns",
        &net.client_ns,
    ]);
    run(&["-n", &net.server_ns, "link", "set", &srv, "up"]);
    run(&["-n", &net.client_ns, "link", "set", &cli, "up"]);
    // The client side accepts replies on the "wrong" interface.
    for key in ["all", "default", cli.as_str()] {
        let st = net
            .client_cmd("sysctl")
            .args(["-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let mac = mac_of(&net.client_ns, &cli).unwrap();
    let lladdr = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for c in clients {
        let host = match c {
            IpAddr::V4(_) => format!("{c}/32"),
            IpAddr::V6(_) => format!("{c}/128"),
        };
        run(&["-n", &net.server_ns, "route", "add", &host, "dev", &srv]);
        run(&[
            "-n",
            &net.server_ns,
            "neigh",
            "replace",
            &c.to_string(),
            "lladdr",
            &lladdr,
            "dev",
            &srv,
            "nud",
            "permanent",
        ]);
    }
}

#[test]
fn replies_routed_around_the_programs_strike_nobody_and_count_as_unknown() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    let clients = [ip("198.51.100.70"), ip("fd5b:1e00::70")];
    for c in clients {
        net.add_client_addr(c).unwrap();
    }
    route_replies_around(&net, &clients);
    // The agent in its own cgroup: sock_ops then sees its sockets only,
    // not other tests' port-25 traffic elsewhere on the machine.
    let cg = TestCgroup::new().expect("cgroup");
    let agent = Agent::start_with(
        &net,
        &common::config(&net, &pins, Some(&cg), true, STRICT),
        Some(&cg),
    )
    .expect("agent");
    // Several sessions each: with pre-greet detection fooled, the second
    // EHLO of an address would already block it.
    for (i, c) in clients.iter().enumerate() {
        for n in 0..3 {
            deliver(&net, *c, &format!("asymmetric {i}.{n}"));
        }
    }
    assert!(pf.wait_delivered(6, Duration::from_secs(30)), "mail lost");
    for c in clients {
        assert_eq!(strikes(&pins, c), 0, "{c} got a strike");
        assert!(maps(&pins).block_match(c).unwrap().is_none(), "{c} blocked");
        assert!(maps(&pins).slow_get(c).unwrap().is_none(), "{c} slowed");
    }
    let k = maps(&pins).counters().unwrap();
    assert_eq!(k.get(Counter::TcPregreet), 0, "{k:?}");
    assert_eq!(k.get(Counter::TcGreeted), 0, "egress saw a banner: {k:?}");
    assert!(k.get(Counter::TcFlowNew) >= 6, "{k:?}");
    assert!(k.get(Counter::TcFlowUnseen) >= 6, "{k:?}");

    // `tarpit stats` says so.
    let out = std::process::Command::new(tarpit_bin())
        .arg("-c")
        .arg(&agent.config)
        .args(["stats", "--json", "--kernel-only"])
        .output()
        .expect("tarpit stats");
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["kernel"]["tc_flow_unseen"].as_u64().unwrap_or(0) >= 6,
        "{json}"
    );
    assert_eq!(json["kernel"]["tc_pregreet"], 0, "{json}");
    let text = std::process::Command::new(tarpit_bin())
        .arg("-c")
        .arg(&agent.config)
        .args(["stats", "--kernel-only"])
        .output()
        .expect("tarpit stats");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("tc_flow_unseen") && l.contains("unknown")),
        "{text}"
    );
}

/// Creates an LRU hash map with these sizes and pins it at `path` (what an
/// older tarpit left behind).
fn pin_old_map(path: &std::path::Path, key_size: u32, value_size: u32) {
    use std::os::unix::ffi::OsStrExt;
    // BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[0] = 9; // BPF_MAP_TYPE_LRU_HASH
    attr[1] = key_size;
    attr[2] = value_size;
    attr[3] = 64;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), 128u32) };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // BPF_OBJ_PIN: pathname (u64), bpf_fd (u32).
    let mut attr = [0u64; 16];
    attr[0] = name.as_ptr() as u64;
    attr[1] = fd as u64;
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_mut_ptr(), 128u32) };
    assert!(rc == 0, "map pin: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fd as i32) };
}

#[test]
fn a_flow_map_of_an_older_layout_is_replaced_at_start() {
    if !require_root() {
        return;
    }
    let mut w = World::with(|c| c.detach_on_exit = false).expect("world");
    let cfg = {
        let mut c = w.config();
        c.detach_on_exit = false;
        c
    };
    w.kernel.take().unwrap().shutdown().unwrap();
    let flows = w.pins.path.join(names::FLOWS);
    std::fs::remove_file(&flows).unwrap();
    let old_value = 16;
    assert_ne!(std::mem::size_of::<FlowState>() as u32, old_value);
    pin_old_map(&flows, 36, old_value);
    assert_eq!(
        aya::maps::MapInfo::from_pin(&flows).unwrap().value_size(),
        old_value
    );
    w.kernel = Some(tarpit::kernel::Kernel::load(&cfg).expect("loads over the old flow map"));
    assert_eq!(
        aya::maps::MapInfo::from_pin(&flows).unwrap().value_size(),
        std::mem::size_of::<FlowState>() as u32
    );
    // And it works: a pre-greet talker is struck.
    let bot = ip("198.51.100.90");
    w.net.add_client_addr(bot).unwrap();
    let dst = SocketAddr::new(SERVER_V4.into(), 25);
    let mut s = w.connect(bot, dst, Duration::from_secs(5)).unwrap();
    send(&mut s, "EHLO early").unwrap();
    read_until(&mut s, "220 ").unwrap();
    assert!(until(Duration::from_secs(3), || strikes_of(&w, bot) == 1));
    // detach_on_exit = false: the World's drop detaches what is pinned.
}
