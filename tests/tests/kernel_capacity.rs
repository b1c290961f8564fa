//! Full maps degrade to "no tarpit", never to "drop good mail": the per-IP
//! map filled far past its (small) size keeps working and holds the newest
//! addresses; a flow table that lost a flow's entry (pushed out by newer
//! connections) answers "unknown", never a strike, and the connection
//! itself is untouched.
#[path = "../src/kernel_env.rs"]
mod kernel_env;
#[path = "../src/packet.rs"]
mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use kernel_env::{FAST_PORT, SLOW_PORT, World, mac_of, read_until, send, send_frames_on};
use packet::{ETH_IPV4, ETH_IPV6, SYN, Tcp, V4, ether, v6_packet};
use tarpit::kernel::PreGreetVerdict;
use tarpit_common::Counter;
use tarpit_tests::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, require_root, wait::until};

/// SYNs to port 25 from `n` spoofed sources (IPv4 198.51.100.3.. and
/// IPv6 fd5b:1e00::1:N), in order.
fn syn_flood(w: &World, v4: usize, v6: usize) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (frames, a4, a6) = flood_frames(w, v4, v6);
    send_on_every_cpu(w, &frames);
    (a4, a6)
}

fn flood_frames(w: &World, v4: usize, v6: usize) -> (Vec<Vec<u8>>, Vec<IpAddr>, Vec<IpAddr>) {
    let server = mac_of(&w.net.server_ns, &w.net.server_if).unwrap();
    let client = mac_of(&w.net.client_ns, &w.net.client_if).unwrap();
    let mut frames = Vec::new();
    let mut a4 = Vec::new();
    let mut a6 = Vec::new();
    for i in 0..v4 {
        let src = Ipv4Addr::new(198, 51, 100, 3 + i as u8);
        let syn = Tcp::new(30000 + i as u16, 25, SYN, b"").v4_bytes(src, SERVER_V4);
        frames.push(ether(
            server,
            client,
            ETH_IPV4,
            &V4::default().packet(src, SERVER_V4, &syn),
        ));
        a4.push(src.into());
    }
    for i in 0..v6 {
        let src = Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 1, i as u16 + 1);
        let syn = Tcp::new(30000 + i as u16, 25, SYN, b"").v6_bytes(src, SERVER_V6);
        frames.push(ether(
            server,
            client,
            ETH_IPV6,
            &v6_packet(src, SERVER_V6, &[], 6, &syn),
        ));
        a6.push(src.into());
    }
    (frames, a4, a6)
}

fn send_on_every_cpu(w: &World, frames: &[Vec<u8>]) {
    // From every CPU in turn: LRU maps keep per-CPU lists of fresh
    // entries, and a flood seen by one CPU only may never reach the
    // entries another CPU made.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for cpu in 0..cpus {
        send_frames_on(&w.net, frames, Some(cpu)).unwrap();
    }
}

#[test]
fn per_ip_map_filled_past_its_size_keeps_the_newest_and_keeps_working() {
    if !require_root() {
        return;
    }
    let w = World::with(|c| c.ip_state_entries = 64).expect("world");
    let (a4, a6) = syn_flood(&w, 200, 300);
    let maps = w.maps();
    let newest = *a6.last().unwrap();
    assert!(
        until(Duration::from_secs(3), || maps
            .ip_state(newest)
            .unwrap()
            .is_some()),
        "the newest address is missing"
    );
    std::thread::sleep(Duration::from_millis(300));
    let all = maps.ip_states().unwrap();
    assert!(all.len() <= 64, "{} entries in a 64-entry map", all.len());
    for a in a6.iter().rev().take(4) {
        assert!(
            maps.ip_state(*a).unwrap().is_some(),
            "recent address {a} evicted before older ones"
        );
    }
    assert!(
        maps.ip_state(a4[0]).unwrap().is_none(),
        "the oldest address survived 500 newer ones in a 64-entry map"
    );
    // Still working: a real pre-greet talker is recorded with its strike.
    let bot: IpAddr = "198.51.100.250".parse().unwrap();
    w.net.add_client_addr(bot).unwrap();
    let mut s = w
        .connect(
            bot,
            SocketAddr::new(SERVER_V4.into(), 25),
            Duration::from_secs(5),
        )
        .unwrap();
    send(&mut s, "EHLO early").unwrap();
    read_until(&mut s, "220 ").unwrap();
    assert!(until(Duration::from_secs(3), || {
        maps.ip_state(bot).unwrap().map(|s| s.strikes) == Some(1)
    }));
    assert_eq!(maps.counters().unwrap().get(Counter::IpStateFailed), 0);
}

/// Whether this kernel's LRU maps evict their oldest entries first even
/// when tiny (6.16 stopped per-CPU reservations from starving small maps).
fn lru_keeps_newest() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 16, 0))
}

#[test]
fn lost_flow_entry_means_unknown_never_a_strike_never_a_drop() {
    if !require_root() {
        return;
    }
    let w = World::with(|c| c.flow_entries = 16).expect("world");
    for (good, bot, server) in [
        ("198.51.100.240", "198.51.100.241", IpAddr::from(SERVER_V4)),
        ("fd5b:1e00::240", "fd5b:1e00::241", IpAddr::from(SERVER_V6)),
    ] {
        let good: IpAddr = good.parse().unwrap();
        let bot: IpAddr = bot.parse().unwrap();
        w.net.add_client_addr(good).unwrap();
        w.net.add_client_addr(bot).unwrap();
        // A server that greets late, so nothing touches the flows until
        // the flood has pushed them out.
        let dst = SocketAddr::new(server, SLOW_PORT);
        let made = w.maps().counters().unwrap().get(Counter::TcFlowNew);
        let mut g = w.connect(good, dst, Duration::from_secs(5)).unwrap();
        let mut b = w.connect(bot, dst, Duration::from_secs(5)).unwrap();
        let (gme, bme) = (g.local_addr().unwrap(), b.local_addr().unwrap());
        // Both connections made an entry...
        assert!(
            until(Duration::from_secs(3), || {
                w.maps().counters().unwrap().get(Counter::TcFlowNew) >= made + 2
            }),
            "{:?}",
            w.maps().counters().unwrap()
        );
        // ...which a kernel with a working LRU still holds. Before 6.16 an
        // LRU map this small can recycle its newest entries at once (each
        // CPU reserves up to 128 free entries and force-shrinks before it
        // steals from another), so there the entry may be gone already:
        // the very case this test is about. The handshake's last ACK may
        // still be on its way through ingress when connect() returns.
        let tracked = until(Duration::from_secs(3), || {
            w.maps().flow_verdict(gme, dst).ok() == Some(PreGreetVerdict::AwaitingGreeting)
        });
        assert!(
            tracked || !lru_keeps_newest(),
            "{gme} not tracked before the flood: {:?}, {} flows, {:?}",
            w.maps().flow_verdict(gme, dst),
            w.maps().flow_count(),
            w.maps().counters().unwrap()
        );
        // New flows push both entries out of the 16-entry table: real
        // connections (forged SYNs make no flow at all), kept open.
        let src = if server.is_ipv4() {
            IpAddr::from(CLIENT_V4)
        } else {
            IpAddr::from(CLIENT_V6)
        };
        // The LRU's eviction order is approximate (per-CPU lists, entries
        // that packets touched get a second chance), so the flood goes on,
        // bounded, until both clients' entries are gone.
        let gone = |me| w.maps().flow_verdict(me, dst).ok() == Some(PreGreetVerdict::Unknown);
        let mut flood = Vec::new();
        while flood.len() < 256 && !(gone(gme) && gone(bme)) {
            for _ in 0..16 {
                flood.push(
                    w.connect(
                        src,
                        SocketAddr::new(server, FAST_PORT),
                        Duration::from_secs(5),
                    )
                    .unwrap(),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(w.maps().flow_count() <= 16);
        for me in [gme, bme] {
            assert_eq!(
                w.maps().flow_verdict(me, dst).unwrap(),
                PreGreetVerdict::Unknown,
                "{me}: {} flood connections, {} flows, {:?}",
                flood.len(),
                w.maps().flow_count(),
                w.maps().counters().unwrap()
            );
        }
        // The bot talks first, the good client waits: neither is flagged
        // (the kernel does not know), and both are served.
        send(&mut b, "EHLO early").unwrap();
        read_until(&mut b, "220 ").unwrap();
        read_until(&mut b, "250").unwrap();
        read_until(&mut g, "220 ").unwrap();
        send(&mut g, "EHLO good").unwrap();
        read_until(&mut g, "250").unwrap();
        assert_eq!(
            w.maps().flow_verdict(bme, dst).unwrap(),
            PreGreetVerdict::Unknown
        );
        for who in [good, bot] {
            let strikes = w.maps().ip_state(who).unwrap().map(|s| s.strikes);
            assert!(matches!(strikes, None | Some(0)), "{who}: {strikes:?}");
        }
        drop(flood);
    }
    let c = w.maps().counters().unwrap();
    assert!(c.get(Counter::TcFlowUnknown) >= 4, "{c:?}");
    assert_eq!(c.get(Counter::TcPregreet), 0);
    assert_eq!(c.get(Counter::XdpDrop), 0);
}
