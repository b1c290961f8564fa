//! sock_ops on the test's cgroup: live connections per address go up and
//! down with real connections (closed by FIN or by RST), never below zero,
//! never stuck after close; sockets older than the program are not
//! decremented; an address marked for slow-down gets a clamped TCP window.
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kernel_env::{World, client_tcp_info, read_until, reset, send};
use tarpit_common::{
    Counter,
    state::{IP_F_AUTHENTICATED, IP_F_SLOWED},
};
use tarpit_tests::{SERVER_V4, require_root, server_for, wait::until};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn live(w: &World, who: IpAddr) -> u64 {
    w.maps()
        .ip_state(who)
        .unwrap()
        .map(|s| s.live_conns)
        .unwrap_or(0)
}

fn wait_live(w: &World, who: IpAddr, n: u64) {
    assert!(
        until(Duration::from_secs(8), || live(w, who) == n),
        "{who}: live connections {} (raw), expected {n}",
        live(w, who)
    );
}

#[test]
fn live_counts_follow_connections_closed_by_fin_and_rst() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    for client in [ip("198.51.100.60"), ip("fd5b:1e00::60")] {
        w.net.add_client_addr(client).unwrap();
        let dst = SocketAddr::new(server_for(client), 25);
        let mut conns: Vec<_> = (0..3)
            .map(|_| w.connect(client, dst, Duration::from_secs(5)).unwrap())
            .collect();
        wait_live(&w, client, 3);
        let st = w.maps().ip_state(client).unwrap().unwrap();
        assert_eq!(st.conns_total, 3);
        assert_eq!(st.live(), 3);

        // A normal close (FIN both ways once the server is done).
        let mut c = conns.pop().unwrap();
        read_until(&mut c, "220 ").unwrap();
        send(&mut c, "QUIT").unwrap();
        drop(c);
        wait_live(&w, client, 2);

        // Reset by the client.
        reset(conns.pop().unwrap());
        wait_live(&w, client, 1);

        // The last one: closed before the server even greeted.
        drop(conns.pop().unwrap());
        wait_live(&w, client, 0);
        // Stays at zero: nothing double-decremented, nothing stuck.
        std::thread::sleep(Duration::from_millis(500));
        let st = w.maps().ip_state(client).unwrap().unwrap();
        assert_eq!(st.live_conns, 0, "{st:?}");
        assert_eq!(st.conns_total, 3);
    }
    let c = w.maps().counters().unwrap();
    assert_eq!(c.get(Counter::SockEstablished), 6);
    assert_eq!(c.get(Counter::SockClosed), 6);
}

#[test]
fn sockets_older_than_the_program_are_not_counted_or_decremented() {
    if !require_root() {
        return;
    }
    let mut w = World::unloaded().expect("world");
    let client = ip("198.51.100.61");
    w.net.add_client_addr(client).unwrap();
    let dst = SocketAddr::new(SERVER_V4.into(), 25);
    let old = w.connect(client, dst, Duration::from_secs(5)).unwrap();
    w.load(|_| {}).expect("kernel loads");
    let new = w.connect(client, dst, Duration::from_secs(5)).unwrap();
    wait_live(&w, client, 1);
    reset(old);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(live(&w, client), 1, "an uncounted socket was decremented");
    reset(new);
    wait_live(&w, client, 0);
}

#[test]
fn slowed_address_gets_a_clamped_window_and_others_do_not() {
    if !require_root() {
        return;
    }
    let w = World::with(|c| c.window_clamp = 1024).expect("world");
    let mut clamped_conns = 0;
    for (slow, control) in [
        (ip("198.51.100.62"), ip("198.51.100.63")),
        (ip("fd5b:1e00::62"), ip("fd5b:1e00::63")),
    ] {
        w.net.add_client_addr(slow).unwrap();
        w.net.add_client_addr(control).unwrap();
        w.maps()
            .slow_add(slow, Some(Duration::from_secs(600)))
            .unwrap();
        w.maps().auth_add(control, None).unwrap();
        let dst = SocketAddr::new(server_for(slow), 25);
        // The window the client last saw, after filling whatever the
        // SYN-ACK offered.
        let window_after_fill = |who: IpAddr| -> u64 {
            let mut s = w.connect(who, dst, Duration::from_secs(5)).unwrap();
            read_until(&mut s, "220 ").unwrap();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let line = format!("X-Fill: {}\r\n", "y".repeat(1000));
            for _ in 0..200 {
                s.write_all(line.as_bytes()).unwrap();
            }
            read_until(&mut s, "250").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let wnd = client_tcp_info(&w.net, who, 25, "snd_wnd").expect("ss shows snd_wnd");
            send(&mut s, "QUIT").unwrap();
            wnd
        };
        // Up to three connections: under emulation (the qemu runs of old
        // kernels) one in a few has shown an unclamped window although the
        // program clamped it (counted below). Never clamped still fails.
        let mut slowed = Vec::new();
        while slowed.len() < 3 && slowed.last().is_none_or(|w| *w > 2048) {
            slowed.push(window_after_fill(slow));
        }
        clamped_conns += slowed.len() as u64;
        assert!(
            slowed.last().is_some_and(|w| *w <= 2048),
            "slowed {slow}: windows {slowed:?} not clamped; {:?} {:?}",
            w.maps().ip_state(slow).unwrap(),
            w.maps().counters().unwrap()
        );
        let control_window = window_after_fill(control);
        assert!(
            control_window >= 16 * 1024,
            "control {control}: window {control_window} unexpectedly small"
        );
        let s = w.maps().ip_state(slow).unwrap().unwrap();
        assert!(s.flags & IP_F_SLOWED != 0, "{s:?}");
        let c = w.maps().ip_state(control).unwrap().unwrap();
        assert!(c.flags & IP_F_SLOWED == 0, "{c:?}");
        assert!(c.flags & IP_F_AUTHENTICATED != 0, "{c:?}");
    }
    // Every connection from a slowed address was clamped, no other one.
    assert_eq!(
        w.maps().counters().unwrap().get(Counter::SockClamped),
        clamped_conns
    );
}
