//! Pre-greet detection in the kernel (tc ingress + egress), on real TCP
//! connections in test namespaces: a client that talks before the banner
//! is flagged (strike in the per-IP map, a ring-buffer event, the flow's
//! verdict), one that waits is not, one that talks after a `220-` teaser
//! but before the final `220 ` is flagged, port 465 is never checked, and
//! a full flow table means "unknown", never a strike.
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kernel_env::{World, block_on, read_until, send};
use tarpit::kernel::{EventKind, EventStream, KernelEvent, PreGreetVerdict};
use tarpit_common::{Counter, state::IP_F_PREGREET};
use tarpit_tests::{SERVER_V4, SERVER_V6, require_root, wait::until};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Every event queued now (reads until 300 ms pass without one).
fn drain_events(w: &World) -> Vec<KernelEvent> {
    block_on(async {
        let mut stream = EventStream::open(&w.pins.path).expect("event stream");
        let mut out = Vec::new();
        while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await
        {
            out.push(e);
        }
        out
    })
}

fn strikes(w: &World, who: IpAddr) -> u32 {
    w.maps()
        .ip_state(who)
        .unwrap()
        .map(|s| s.strikes)
        .unwrap_or(0)
}

/// One family: a bot that talks first on port `port`, a patient client.
fn talker_and_patient(w: &World, server: IpAddr, bot: IpAddr, good: IpAddr) {
    w.net.add_client_addr(bot).unwrap();
    w.net.add_client_addr(good).unwrap();
    let dst = SocketAddr::new(server, 25);

    let mut b = w
        .connect(bot, dst, Duration::from_secs(5))
        .expect("bot connects");
    let bot_addr = b.local_addr().unwrap();
    send(&mut b, "EHLO bot.example").unwrap();
    assert!(
        until(Duration::from_secs(3), || {
            w.maps().flow_verdict(bot_addr, dst).unwrap()
                == PreGreetVerdict::PreGreet { teaser: false }
        }),
        "the bot's flow is not flagged: {:?}",
        w.maps().flow_verdict(bot_addr, dst)
    );
    // The server still greets; the bot is only flagged, not cut off.
    read_until(&mut b, "220 ").expect("banner after pre-greet talk");
    drop(b);

    // Tracked (awaiting its greeting) until it has one.
    let mut g = w.connect_tracked(good, dst).expect("good connects");
    let good_addr = g.local_addr().unwrap();
    read_until(&mut g, "220 ").unwrap();
    send(&mut g, "EHLO good.example").unwrap();
    read_until(&mut g, "250").unwrap();
    assert_eq!(
        w.maps().flow_verdict(good_addr, dst).unwrap(),
        PreGreetVerdict::Clean
    );
    drop(g);

    let bot_state = w.maps().ip_state(bot).unwrap().expect("bot in per-IP map");
    assert_eq!(bot_state.strikes, 1, "{bot_state:?}");
    assert!(bot_state.flags & IP_F_PREGREET != 0);
    assert!(bot_state.last_strike_ns > 0);
    assert_eq!(strikes(w, good), 0, "the patient client got a strike");

    let events = drain_events(w);
    let pregreets: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::PreGreet { .. }))
        .collect();
    assert_eq!(pregreets.len(), 1, "events: {events:?}");
    let e = pregreets[0];
    assert_eq!(e.kind, EventKind::PreGreet { teaser: false });
    assert_eq!(e.addr, bot);
    assert_eq!(e.client_port, bot_addr.port());
    assert_eq!(e.server_port, 25);
    assert_eq!(e.server, Some(server));
}

#[test]
fn talker_before_banner_is_flagged_and_patient_client_is_not() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    talker_and_patient(
        &w,
        SERVER_V4.into(),
        ip("198.51.100.20"),
        ip("198.51.100.21"),
    );
    talker_and_patient(
        &w,
        SERVER_V6.into(),
        ip("fd5b:1e00::20"),
        ip("fd5b:1e00::21"),
    );
    let c = w.maps().counters().unwrap();
    assert_eq!(c.get(Counter::TcPregreet), 2);
    assert_eq!(c.get(Counter::TcPregreetTeaser), 0);
    assert!(c.get(Counter::TcGreeted) >= 4);
}

fn teaser(w: &World, server: IpAddr, bot: IpAddr, good: IpAddr) {
    w.net.add_client_addr(bot).unwrap();
    w.net.add_client_addr(good).unwrap();
    let dst = SocketAddr::new(server, 587);

    // Reads the teaser line only, like a bot that reads one line.
    let mut b = w.connect(bot, dst, Duration::from_secs(5)).unwrap();
    let bot_addr = b.local_addr().unwrap();
    read_until(&mut b, "220-").unwrap();
    send(&mut b, "EHLO bot.example").unwrap();
    assert!(
        until(Duration::from_secs(3), || {
            w.maps().flow_verdict(bot_addr, dst).unwrap()
                == PreGreetVerdict::PreGreet { teaser: true }
        }),
        "teaser talker not flagged: {:?}",
        w.maps().flow_verdict(bot_addr, dst)
    );
    read_until(&mut b, "220 ").unwrap();
    drop(b);

    // Waits for the final line.
    let mut g = w.connect(good, dst, Duration::from_secs(5)).unwrap();
    let good_addr = g.local_addr().unwrap();
    read_until(&mut g, "220-").unwrap();
    read_until(&mut g, "220 ").unwrap();
    send(&mut g, "EHLO good.example").unwrap();
    read_until(&mut g, "250").unwrap();
    assert_eq!(
        w.maps().flow_verdict(good_addr, dst).unwrap(),
        PreGreetVerdict::Clean
    );
    drop(g);

    assert_eq!(strikes(w, bot), 1);
    assert_eq!(strikes(w, good), 0);
    let events = drain_events(w);
    assert!(
        events
            .iter()
            .any(|e| e.kind == EventKind::PreGreet { teaser: true } && e.addr == bot),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| e.addr == good), "{events:?}");
}

#[test]
fn talker_after_220_teaser_is_flagged() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    teaser(
        &w,
        SERVER_V4.into(),
        ip("198.51.100.30"),
        ip("198.51.100.31"),
    );
    teaser(
        &w,
        SERVER_V6.into(),
        ip("fd5b:1e00::30"),
        ip("fd5b:1e00::31"),
    );
    let c = w.maps().counters().unwrap();
    assert_eq!(c.get(Counter::TcPregreetTeaser), 2);
}

#[test]
fn port_465_talker_is_never_flagged() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    for (server, client) in [
        (IpAddr::from(SERVER_V4), ip("198.51.100.40")),
        (IpAddr::from(SERVER_V6), ip("fd5b:1e00::40")),
    ] {
        w.net.add_client_addr(client).unwrap();
        let dst = SocketAddr::new(server, 465);
        let mut s = w.connect(client, dst, Duration::from_secs(5)).unwrap();
        let me = s.local_addr().unwrap();
        // Implicit TLS: the client speaks first (here: anything at all).
        send(&mut s, "\u{16}\u{3}\u{1} client hello").unwrap();
        read_until(&mut s, "220 ").unwrap();
        assert_eq!(
            w.maps().flow_verdict(me, dst).unwrap(),
            PreGreetVerdict::Unknown,
            "465 is not tracked"
        );
        drop(s);
        assert_eq!(strikes(&w, client), 0);
    }
    assert_eq!(w.maps().counters().unwrap().get(Counter::TcPregreet), 0);
    assert!(drain_events(&w).is_empty());
}
