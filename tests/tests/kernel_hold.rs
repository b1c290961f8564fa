//! The kernel hold (issue 21): block entries that say `hold` are answered
//! by XDP with a zero-window TCP peer that has no socket.
//!
//! - A held client that waits for the banner has an ESTABLISHED
//!   connection and no banner, and a held talker's data stays
//!   unacknowledged in its Send-Q while its window probes are answered,
//!   while the server namespace has no socket for either (`ss`,
//!   `/proc/net/sockstat` and `sockstat6`). IPv4 and IPv6. The suite
//!   watches for [`OBSERVE`] (20 s), not the minutes: the mechanism
//!   is the same at minute 1 as at second 20 (every probe answered keeps
//!   the bot's probe count at zero), and the suite's time is shared. The
//!   bench's `kernel_hold` scenario watches 100,000 bots for two minutes.
//! - An allow-listed address inside a held network is never held.
//! - A forged SYN flood with held sources gets replies within the
//!   per-source and the total cap; data into the void is counted.
//! - Where XDP_TX cannot reply (a veth whose peer has no XDP program), the
//!   loader says so and held addresses are dropped, never passed.
//! - Kernels before 6.0 (no raw SYN-cookie helpers): the hold program is
//!   refused, the rest loads, held addresses are dropped.
#[path = "../src/kernel_env.rs"]
mod kernel_env;
#[path = "../src/packet.rs"]
mod packet;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use kernel_env::{World, mac_of, send_frames};
use packet::{ACK, PSH, SYN, Tcp, tcp_frame};
use tarpit::config::KernelConfig;
use tarpit::kernel::{BlockSpec, IpNet, hold_settings_from};
use tarpit_common::{BlockReason, Counter};
use tarpit_tests::{TestNet, require_root, server_for};

/// How long the hold is watched (the issue asks for minutes in
/// production; see the module comment).
const OBSERVE: Duration = Duration::from_secs(20);
const TALK: &[u8] = b"EHLO bot.example\r\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn smtp(client: IpAddr) -> SocketAddr {
    SocketAddr::new(server_for(client), 25)
}

fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

fn hold(w: &World, n: IpNet) {
    w.maps()
        .block_add(
            n,
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
                hold: true,
            },
        )
        .unwrap();
}

fn counter(w: &World, c: Counter) -> u64 {
    w.maps().counters().unwrap().get(c)
}

/// A world whose client veth has the pass-everything XDP program that a
/// native-mode veth needs before XDP_TX reaches it; the link is returned
/// and must live as long as the world.
fn world_with(tweak: impl FnOnce(&mut KernelConfig)) -> (World, OwnedFd) {
    let mut w = World::unloaded().expect("world");
    let link =
        testkit::xdp_pass::attach(&w.net.client_ns, &w.net.client_if).expect("XDP pass on peer");
    w.load(tweak).expect("load");
    (w, link)
}

/// Whether the hold runs; where it does not, it must be the kernel's
/// age, and held addresses must be dropped (checked here).
fn hold_runs(w: &World, probe_src: IpAddr) -> bool {
    let k = w.kernel.as_ref().unwrap();
    if k.features().contains(&("hold", true)) {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let major_minor: Vec<u32> = release
        .trim()
        .split(['.', '-'])
        .take(2)
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        major_minor < vec![6, 0],
        "the hold must run on {release}: {:?}",
        k.degraded()
    );
    eprintln!(
        "kernel {release}: no hold ({:?}); checking the drop",
        k.degraded()
    );
    let before = counter(w, Counter::HoldUnavailable);
    assert!(
        w.connect(probe_src, smtp(probe_src), Duration::from_secs(2))
            .is_err(),
        "a held address on a kernel without the hold is dropped"
    );
    assert!(counter(w, Counter::HoldUnavailable) > before);
    false
}

/// TCP sockets in use in the server namespace (sockstat and sockstat6).
fn server_tcp_inuse(net: &TestNet) -> u64 {
    testkit::netns::tcp_sockets_in_use(&net.server_ns).unwrap()
}

/// `ss -tan` lines in a namespace that mention `addr`.
fn ss_lines(mut cmd: std::process::Command, addr: IpAddr) -> Vec<String> {
    let out = cmd.args(["-Htan"]).output().unwrap();
    let needle = match addr {
        IpAddr::V4(a) => format!("{a}:"),
        IpAddr::V6(a) => format!("[{a}]:"),
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// (state, Send-Q) of the client's one connection from `src`.
fn client_conn(net: &TestNet, src: IpAddr) -> Option<(String, u64)> {
    let lines = ss_lines(net.client_cmd("ss"), src);
    let l = lines.first()?;
    let mut f = l.split_whitespace();
    let state = f.next()?.to_string();
    let _recv_q = f.next()?;
    let send_q = f.next()?.parse().ok()?;
    Some((state, send_q))
}

/// The client's zero-window probes in a row that got no answer: the last
/// field of `timer:(persist,<when>,<probes>)` in `ss -o` (the kernel's
/// icsk_probes_out, which every answer resets to 0). `None` when the
/// connection is not probing.
fn unanswered_probes(net: &TestNet, src: IpAddr) -> Option<u32> {
    let mut cmd = net.client_cmd("ss");
    cmd.arg("-o");
    let lines = ss_lines(cmd, src);
    let l = lines.first()?;
    let timer = l.split("timer:(persist,").nth(1)?;
    timer.split(')').next()?.rsplit(',').next()?.parse().ok()
}

/// True when nothing at all has arrived on `s` (no banner, no FIN).
fn nothing_arrived(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = s.read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn xdp_hold_waiters_and_talkers_have_no_socket_on_the_server_v4_and_v6() {
    if !require_root() {
        return;
    }
    let (w, _peer) = world_with(|_| {});
    let waiters = [ip("198.51.100.71"), ip("fd5b:1e00::71")];
    let talkers = [ip("198.51.100.72"), ip("fd5b:1e00::72")];
    for a in waiters.iter().chain(&talkers) {
        w.net.add_client_addr(*a).unwrap();
        hold(&w, host_net(*a));
    }
    if !hold_runs(&w, waiters[0]) {
        return;
    }
    let inuse_before = server_tcp_inuse(&w.net);
    let syns = counter(&w, Counter::HoldSynAnswered);
    let probes = counter(&w, Counter::HoldProbesAnswered);

    let mut conns = Vec::new();
    for a in waiters.iter().chain(&talkers) {
        let s = w
            .connect(*a, smtp(*a), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{a}: connect() to a held address succeeds: {e:#}"));
        conns.push((*a, s));
    }
    for (a, s) in conns.iter_mut() {
        if talkers.contains(a) {
            s.write_all(TALK).unwrap();
        }
    }
    let started = Instant::now();
    while started.elapsed() < OBSERVE {
        for (a, _) in &conns {
            assert!(
                ss_lines(w.net.server_cmd("ss"), *a).is_empty(),
                "{a}: the server namespace has a socket for a held client"
            );
        }
        assert_eq!(
            server_tcp_inuse(&w.net),
            inuse_before,
            "held clients cost the server namespace no socket"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    for (a, s) in conns.iter_mut() {
        assert!(nothing_arrived(s), "{a}: no banner, no FIN in {OBSERVE:?}");
        let (state, send_q) = client_conn(&w.net, *a).expect("client connection listed");
        assert_eq!(state, "ESTAB", "{a}: still established after {OBSERVE:?}");
        if talkers.contains(a) {
            assert_eq!(
                send_q,
                TALK.len() as u64,
                "{a}: the talker's data stays unacknowledged"
            );
            // Each family's probes are answered, not only counted in
            // total: an unanswered probe shows as a count above 0 (a
            // probe in flight for microseconds aside, hence a retry).
            let answered = (0..3).any(|_| {
                let n = unanswered_probes(&w.net, *a);
                n == Some(0) || {
                    std::thread::sleep(Duration::from_millis(300));
                    false
                }
            });
            assert!(
                answered,
                "{a}: the talker is probing and its probes are answered: {:?}",
                unanswered_probes(&w.net, *a)
            );
        } else {
            assert_eq!(send_q, 0, "{a}: the waiter sent nothing");
        }
    }
    assert!(counter(&w, Counter::HoldSynAnswered) >= syns + 4);
    assert!(counter(&w, Counter::HoldHandshakes) >= 4);
    let answered = counter(&w, Counter::HoldProbesAnswered) - probes;
    // Linux probes a zero window at 0.2, 0.6, 1.4, 3, 6.2, 12.6 s...:
    // about six per talker in 20 s; at least three each.
    assert!(
        answered >= 6,
        "window probes of two talkers answered: {answered}"
    );
    assert_eq!(counter(&w, Counter::HoldRateLimited), 0);
}

#[test]
fn xdp_hold_never_holds_an_allow_listed_address_v4_and_v6() {
    if !require_root() {
        return;
    }
    let (w, _peer) = world_with(|_| {});
    let friends = [ip("198.51.100.73"), ip("fd5b:1e00::73")];
    let bots = [ip("198.51.100.74"), ip("fd5b:1e00::74")];
    for a in friends.iter().chain(&bots) {
        w.net.add_client_addr(*a).unwrap();
    }
    hold(&w, "198.51.100.0/24".parse().unwrap());
    hold(&w, "fd5b:1e00::/64".parse().unwrap());
    for f in friends {
        w.maps().allow_add(host_net(f), None).unwrap();
    }
    if !hold_runs(&w, bots[0]) {
        return;
    }
    for f in friends {
        let mut s = w.connect(f, smtp(f), Duration::from_secs(5)).unwrap();
        let line = kernel_env::read_until(&mut s, "220").unwrap();
        assert!(line.starts_with("220 test"), "{f}: the real server greets");
    }
    let before = counter(&w, Counter::HoldSynAnswered);
    for b in bots {
        let mut s = w.connect(b, smtp(b), Duration::from_secs(5)).unwrap();
        // The scripted server greets after 1.5 s: wait well past that.
        std::thread::sleep(Duration::from_secs(3));
        assert!(nothing_arrived(&mut s), "{b}: held, no banner");
        assert!(ss_lines(w.net.server_cmd("ss"), b).is_empty());
    }
    assert_eq!(counter(&w, Counter::HoldSynAnswered), before + 2);
}

/// Forged frames from `src` (any address: the replies go to the client
/// veth, whose kernel drops what is not its own).
fn forged(w: &World, src: IpAddr, t: &Tcp) -> Vec<u8> {
    let server = mac_of(&w.net.server_ns, &w.net.server_if).unwrap();
    let client = mac_of(&w.net.client_ns, &w.net.client_if).unwrap();
    tcp_frame(server, client, src, server_for(src), t)
}

fn syn_from(w: &World, src: IpAddr, sport: u16) -> Vec<u8> {
    let mut t = Tcp::new(sport, 25, SYN, b"");
    t.seq = 7_000 + u32::from(sport);
    forged(w, src, &t)
}

/// Sends `frames` and returns (answered, refused) SYN counts of the hold
/// and the upper bound the caps allow in the time the sending took.
fn flood(w: &World, frames: &[Vec<u8>], rate: u64, burst: u64) -> (u64, u64, u64) {
    let answered = counter(w, Counter::HoldSynAnswered);
    let refused = counter(w, Counter::HoldRateLimited);
    let t0 = Instant::now();
    send_frames(&w.net, frames).unwrap();
    let secs = t0.elapsed().as_secs() + 1;
    (
        counter(w, Counter::HoldSynAnswered) - answered,
        counter(w, Counter::HoldRateLimited) - refused,
        burst + rate * secs,
    )
}

#[test]
fn xdp_hold_replies_to_a_forged_syn_flood_stay_within_the_caps() {
    if !require_root() {
        return;
    }
    let tweak = |c: &mut KernelConfig| {
        c.hold_rate_per_source = 5;
        c.hold_burst_per_source = 10;
        c.hold_rate_total = 20;
        c.hold_burst_total = 20;
    };
    let (w, _peer) = world_with(tweak);
    hold(&w, "198.51.100.128/25".parse().unwrap());
    hold(&w, "fd5b:1e00::8000:0/112".parse().unwrap());
    let probe = ip("198.51.100.129");
    w.net.add_client_addr(probe).unwrap();
    if !hold_runs(&w, probe) {
        return;
    }
    let mut cfg = w.config();
    tweak(&mut cfg);
    let s = hold_settings_from(&cfg);
    let cpus = aya::util::nr_cpus().unwrap() as u64;

    // One victim, many SYNs: its own cap. At least the burst gets
    // through (or this CPU's share of the total, if smaller: the frames
    // may all land on one CPU), once the shares have refilled.
    let least = 10.min(u64::from(s.cpu_burst));
    for victim in [ip("198.51.100.200"), ip("fd5b:1e00::8000:200")] {
        std::thread::sleep(Duration::from_secs(2));
        let frames: Vec<_> = (0..200).map(|i| syn_from(&w, victim, 30_000 + i)).collect();
        let (answered, refused, cap) = flood(&w, &frames, 5, 10);
        assert!(
            (least..=cap).contains(&answered),
            "{victim}: {answered} replies to 200 forged SYNs (cap {cap})"
        );
        assert_eq!(
            answered + refused,
            200,
            "{victim}: every SYN answered or refused"
        );
    }

    // Many victims, one SYN each: the total cap (each CPU's share).
    std::thread::sleep(Duration::from_secs(2));
    let frames: Vec<_> = (0..120u16)
        .map(|i| {
            let v = IpAddr::from([198, 51, 100, 130 + i as u8]);
            syn_from(&w, v, 40_000 + i)
        })
        .collect();
    let (answered, refused, cap) = flood(
        &w,
        &frames,
        u64::from(s.cpu_rate) * cpus,
        u64::from(s.cpu_burst) * cpus,
    );
    assert!(
        answered >= 1 && answered <= cap,
        "{answered} replies to 120 forged SYNs from 120 sources (total cap {cap})"
    );
    assert_eq!(answered + refused, 120);

    // Data from a held source goes into the void, counted.
    let void = counter(&w, Counter::HoldBytesVoid);
    let data: Vec<_> = (0..20u16)
        .map(|i| {
            let mut t = Tcp::new(31_000 + i, 25, ACK | PSH, b"EHLO spoof\r\n");
            t.seq = 1;
            t.ack = 2;
            forged(&w, ip("198.51.100.201"), &t)
        })
        .collect();
    send_frames(&w.net, &data).unwrap();
    assert_eq!(counter(&w, Counter::HoldBytesVoid) - void, 20 * 12);
}

#[test]
fn xdp_hold_falls_back_to_drop_without_xdp_on_the_veth_peer() {
    if !require_root() {
        return;
    }
    // No pass program on the client veth: XDP_TX replies would be lost.
    let w = World::new().expect("world");
    let k = w.kernel.as_ref().unwrap();
    assert!(k.features().contains(&("hold", false)));
    let why = &k.degraded().iter().find(|(f, _)| *f == "hold").unwrap().1;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if !release.starts_with("5.") {
        assert!(why.contains("veth"), "{why}");
    }
    let bot = ip("198.51.100.75");
    w.net.add_client_addr(bot).unwrap();
    hold(&w, host_net(bot));
    assert!(
        w.connect(bot, smtp(bot), Duration::from_secs(2)).is_err(),
        "dropped, never passed to the server"
    );
    assert!(counter(&w, Counter::HoldUnavailable) > 0);
    assert!(ss_lines(w.net.server_cmd("ss"), bot).is_empty());
}
