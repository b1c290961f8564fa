//! Malformed and unusual packets, sent with raw sockets from the client
//! namespace, are passed or dropped as designed and never misclassify a
//! flow: truncated IPv4 and TCP headers, IHL < 5, TCP data offset < 5 or
//! past the packet end, IP lengths past the frame, IPv4 first and later
//! fragments, IPv6 fragments, zero-length payload with PSH, and IPv6 with
//! hop-by-hop + routing + destination-options headers before TCP (parsed
//! through: a block-listed source cannot hide its TCP header behind them).
#[path = "../src/kernel_env.rs"]
mod kernel_env;
#[path = "../src/packet.rs"]
mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use kernel_env::{SLOW_PORT, World, mac_of, read_until, send, send_frames};
use packet::{
    ACK, ETH_IPV4, ETH_IPV6, PSH, SYN, Tcp, V4, ether, ext_fragment, ext_options, ext_routing,
    v6_packet,
};
use tarpit::kernel::{BlockSpec, PreGreetVerdict};
use tarpit_common::{BlockReason, Counter};
use tarpit_tests::{SERVER_V4, SERVER_V6, require_root, wait::until};

const TALK: &[u8] = b"EHLO sneaky\r\n";

struct Macs {
    server: [u8; 6],
    client: [u8; 6],
}

fn macs(w: &World) -> Macs {
    Macs {
        server: mac_of(&w.net.server_ns, &w.net.server_if).unwrap(),
        client: mac_of(&w.net.client_ns, &w.net.client_if).unwrap(),
    }
}

fn v4_frame(m: &Macs, ip: Vec<u8>) -> Vec<u8> {
    ether(m.server, m.client, ETH_IPV4, &ip)
}

fn v6_frame(m: &Macs, ip: Vec<u8>) -> Vec<u8> {
    ether(m.server, m.client, ETH_IPV6, &ip)
}

/// Broken IPv4 packets that all carry the flow's ports and client talk.
fn broken_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, m: &Macs) -> Vec<Vec<u8>> {
    let talk = Tcp::new(sport, SLOW_PORT, ACK | PSH, TALK);
    let seg = talk.v4_bytes(src, dst);
    let mut frames = Vec::new();
    // Truncated IPv4 header: the frame ends 10 bytes into it.
    let p = V4::default().packet(src, dst, &seg);
    frames.push(v4_frame(m, p[..10].to_vec()));
    // IHL < 5.
    frames.push(v4_frame(
        m,
        V4 {
            ihl: Some(4),
            ..V4::default()
        }
        .packet(src, dst, &seg),
    ));
    // Truncated TCP header: 10 of its 20 bytes.
    frames.push(v4_frame(m, V4::default().packet(src, dst, &seg[..10])));
    // TCP data offset < 5.
    let mut t = talk.clone();
    t.doff_words = 4;
    frames.push(v4_frame(
        m,
        V4::default().packet(src, dst, &t.v4_bytes(src, dst)),
    ));
    // TCP data offset past the end of the packet (60-byte header claimed).
    let mut t = talk.clone();
    t.doff_words = 15;
    frames.push(v4_frame(
        m,
        V4::default().packet(src, dst, &t.v4_bytes(src, dst)),
    ));
    // IP total length past the end of the frame.
    frames.push(v4_frame(
        m,
        V4 {
            total_len: Some(400),
            ..V4::default()
        }
        .packet(src, dst, &seg),
    ));
    // First fragment (MF, offset 0) with the TCP header and the talk.
    frames.push(v4_frame(
        m,
        V4 {
            frag: 0x2000,
            ..V4::default()
        }
        .packet(src, dst, &seg),
    ));
    // A later fragment (offset 8 units) whose bytes look like TCP.
    frames.push(v4_frame(
        m,
        V4 {
            frag: 8,
            ..V4::default()
        }
        .packet(src, dst, &seg),
    ));
    // Zero-length payload with PSH, behind IPv4 options (NOPs).
    frames.push(v4_frame(
        m,
        V4 {
            options: vec![1, 1, 1, 1],
            ..V4::default()
        }
        .packet(
            src,
            dst,
            &Tcp::new(sport, SLOW_PORT, ACK | PSH, b"").v4_bytes(src, dst),
        ),
    ));
    frames
}

fn broken_v6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, m: &Macs) -> Vec<Vec<u8>> {
    let talk = Tcp::new(sport, SLOW_PORT, ACK | PSH, TALK);
    let seg = talk.v6_bytes(src, dst);
    let mut frames = Vec::new();
    // Truncated IPv6 header.
    let p = v6_packet(src, dst, &[], 6, &seg);
    frames.push(v6_frame(m, p[..30].to_vec()));
    // Payload length past the end of the frame.
    let mut p = v6_packet(src, dst, &[], 6, &seg);
    p[4..6].copy_from_slice(&900u16.to_be_bytes());
    frames.push(v6_frame(m, p));
    // Truncated TCP header.
    frames.push(v6_frame(m, v6_packet(src, dst, &[], 6, &seg[..12])));
    // Data offset < 5 and past the end.
    for doff in [3, 15] {
        let mut t = talk.clone();
        t.doff_words = doff;
        frames.push(v6_frame(
            m,
            v6_packet(src, dst, &[], 6, &t.v6_bytes(src, dst)),
        ));
    }
    // First fragment with TCP header and talk; a later fragment.
    frames.push(v6_frame(
        m,
        v6_packet(src, dst, &[ext_fragment(0, true)], 6, &seg),
    ));
    frames.push(v6_frame(
        m,
        v6_packet(src, dst, &[ext_fragment(3, false)], 6, &seg),
    ));
    // More extension headers than the parser follows: not guessed at.
    let many: Vec<_> = (0..7).map(|_| ext_options(60)).collect();
    frames.push(v6_frame(m, v6_packet(src, dst, &many, 6, &seg)));
    // hop-by-hop + routing + destination options, zero-length PSH.
    frames.push(v6_frame(
        m,
        v6_packet(
            src,
            dst,
            &[ext_options(0), ext_routing(), ext_options(60)],
            6,
            &Tcp::new(sport, SLOW_PORT, ACK | PSH, b"").v6_bytes(src, dst),
        ),
    ));
    frames
}

fn check_flow_survives(w: &World, client: IpAddr, server: IpAddr, m: &Macs) {
    w.net.add_client_addr(client).unwrap();
    // The slow port greets after 8 s: the check below must see the flow
    // still waiting for its greeting, however slow the frames are to send.
    let dst = SocketAddr::new(server, SLOW_PORT);
    let mut c = w.connect_tracked(client, dst).unwrap();
    let me = c.local_addr().unwrap();
    let frames = match (client, server) {
        (IpAddr::V4(s), IpAddr::V4(d)) => broken_v4(s, d, me.port(), m),
        (IpAddr::V6(s), IpAddr::V6(d)) => broken_v6(s, d, me.port(), m),
        _ => unreachable!(),
    };
    send_frames(&w.net, &frames).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        w.maps().flow_verdict(me, dst).unwrap(),
        PreGreetVerdict::AwaitingGreeting,
        "a malformed packet was taken for client talk ({client})"
    );
    // The real conversation is unharmed and judged correctly.
    read_until(&mut c, "220 ").unwrap();
    send(&mut c, "EHLO honest").unwrap();
    read_until(&mut c, "250").unwrap();
    assert_eq!(
        w.maps().flow_verdict(me, dst).unwrap(),
        PreGreetVerdict::Clean
    );
    let st = w.maps().ip_state(client).unwrap().expect("client seen");
    assert_eq!(st.strikes, 0, "{st:?}");
}

#[test]
fn malformed_packets_never_misclassify_a_flow() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    let m = macs(&w);
    check_flow_survives(&w, "198.51.100.130".parse().unwrap(), SERVER_V4.into(), &m);
    check_flow_survives(&w, "fd5b:1e00::130".parse().unwrap(), SERVER_V6.into(), &m);
    let c = w.maps().counters().unwrap();
    assert!(c.get(Counter::Unparsed) >= 8, "{c:?}");
    assert!(c.get(Counter::Fragments) >= 2, "{c:?}");
    assert_eq!(c.get(Counter::TcPregreet), 0, "{c:?}");
}

#[test]
fn tcp_behind_ipv6_extension_headers_is_parsed_and_blocked() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    let m = macs(&w);
    let dst = SERVER_V6;
    let exts = || vec![ext_options(0), ext_routing(), ext_options(60)];
    // A SYN from an address with no socket: the kernel must find port 25
    // behind three extension headers (SYN counted, address seen; a bare
    // SYN makes no flow).
    let seen: Ipv6Addr = "fd5b:1e00::131".parse().unwrap();
    let syn = Tcp::new(40001, 25, SYN, b"").v6_bytes(seen, dst);
    send_frames(
        &w.net,
        &[v6_frame(&m, v6_packet(seen, dst, &exts(), 6, &syn))],
    )
    .unwrap();
    let maps = w.maps();
    assert!(
        until(Duration::from_secs(2), || maps
            .syn_count(seen.into())
            .unwrap()
            == 1),
        "XDP did not parse through the extension headers"
    );
    assert!(
        maps.ip_state(seen.into()).unwrap().is_some(),
        "tc did not parse through the extension headers"
    );
    assert_eq!(maps.counters().unwrap().get(Counter::TcFlowNew), 0);

    // The same trick from a block-listed source is dropped on port 25 and
    // passed on another port; a later fragment passes (no TCP header).
    let bad: Ipv6Addr = "fd5b:1e00::132".parse().unwrap();
    let mut maps = w.maps();
    maps.block_add(
        "fd5b:1e00::132/128".parse().unwrap(),
        BlockSpec {
            ttl: None,
            reason: BlockReason::Manual,
            all_ports: false,
            hold: false,
        },
    )
    .unwrap();
    let syn25 = Tcp::new(40002, 25, SYN, b"").v6_bytes(bad, dst);
    let syn_other = Tcp::new(40003, 2600, SYN, b"").v6_bytes(bad, dst);
    let first_frag = v6_packet(
        bad,
        dst,
        &[ext_options(0), ext_fragment(0, true)],
        6,
        &syn25,
    );
    let later_frag = v6_packet(bad, dst, &[ext_fragment(2, false)], 6, &syn25);
    send_frames(
        &w.net,
        &[
            v6_frame(&m, v6_packet(bad, dst, &exts(), 6, &syn25)),
            v6_frame(&m, v6_packet(bad, dst, &exts(), 6, &syn_other)),
            v6_frame(&m, first_frag),
            v6_frame(&m, later_frag),
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let c = maps.counters().unwrap();
    assert_eq!(c.get(Counter::XdpDrop), 2, "{c:?}");
    assert_eq!(c.get(Counter::XdpBlockOtherPort), 2, "{c:?}");
}
