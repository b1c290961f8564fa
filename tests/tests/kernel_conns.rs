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
use tarpit_tests::{SERVER_V4, SERVER_V6, require_root, wait::until};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn server_for(client: IpAddr) -> IpAddr {
    if client.is_ipv4() {
        SERVER_V4.into()
    } else {
        SERVER_V6.into()
    }
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
        let mut windows = Vec::new();
        for who in [slow, control] {
            let mut s = w.connect(who, dst, Duration::from_secs(5)).unwrap();
            read_until(&mut s, "220 ").unwrap();
            // Enough data to use up whatever window the SYN-ACK offered.
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            let line = format!("X-Fill: {}\r\n", "y".repeat(1000));
            for _ in 0..200 {
                s.write_all(line.as_bytes()).unwrap();
            }
            read_until(&mut s, "250").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let wnd = client_tcp_info(&w.net, who, 25, "snd_wnd").expect("ss shows snd_wnd");
            windows.push(wnd);
            send(&mut s, "QUIT").unwrap();
        }
        assert!(
            windows[0] <= 2048,
            "slowed {slow}: window {} not clamped; {:?} {:?}",
            windows[0],
            w.maps().ip_state(slow).unwrap(),
            w.maps().counters().unwrap()
        );
        assert!(
            windows[1] >= 16 * 1024,
            "control {control}: window {} unexpectedly small",
            windows[1]
        );
        let s = w.maps().ip_state(slow).unwrap().unwrap();
        assert!(s.flags & IP_F_SLOWED != 0, "{s:?}");
        let c = w.maps().ip_state(control).unwrap().unwrap();
        assert!(c.flags & IP_F_SLOWED == 0, "{c:?}");
        assert!(c.flags & IP_F_AUTHENTICATED != 0, "{c:?}");
    }
    assert_eq!(w.maps().counters().unwrap().get(Counter::SockClamped), 2);
}
