//! XDP allow and block lists on real handshakes: a block-listed prefix
//! cannot complete a handshake to an SMTP port, other ports still work
//! unless the entry covers all ports, the drop counters move, an expired
//! entry passes (and does not hide a shorter active one), an allow entry
//! wins over a block entry, a full list refuses with a clear error, and
//! entries kept in pins from before the "list used" flags still block.
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kernel_env::{OTHER_PORT, World, block_on, read_until};
use tarpit::kernel::{BlockSpec, EventKind, EventStream, IpNet, KernelError};
use tarpit_common::{BlockReason, Counter};
use tarpit_tests::{SERVER_V4, require_root, server_for};

const SHORT: Duration = Duration::from_millis(1500);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// True when a handshake from `src` to `port` completes (and the server
/// answers on it).
fn reachable(w: &World, src: IpAddr, port: u16) -> bool {
    let dst = SocketAddr::new(server_for(src), port);
    match w.connect(src, dst, SHORT) {
        Ok(mut s) => {
            if port == OTHER_PORT {
                let mut b = [0u8; 7];
                s.read_exact(&mut b).is_ok() && &b == b"hello\r\n"
            } else {
                true
            }
        }
        Err(_) => false,
    }
}

fn block(w: &World, n: &str, ttl: Option<Duration>, all_ports: bool) {
    block_as(w, n, ttl, all_ports, BlockReason::Manual);
}

/// A block entry for `reason`: `Manual` goes to the admin's list, any
/// other reason to the automatic one.
fn block_as(w: &World, n: &str, ttl: Option<Duration>, all_ports: bool, reason: BlockReason) {
    w.maps()
        .block_add(
            net(n),
            BlockSpec {
                ttl,
                reason,
                all_ports,
                hold: false,
            },
        )
        .unwrap();
}

#[test]
fn blocked_source_cannot_reach_smtp_ports_but_other_ports_work() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    for (bot, good, prefix) in [
        ("198.51.100.50", "198.51.100.51", "198.51.100.50/32"),
        ("fd5b:1e00::50", "fd5b:1e00::51", "fd5b:1e00::50/128"),
    ] {
        let (bot, good) = (ip(bot), ip(good));
        w.net.add_client_addr(bot).unwrap();
        w.net.add_client_addr(good).unwrap();
        assert!(reachable(&w, bot, 25), "{bot} before the block");
        block_as(
            &w,
            prefix,
            Some(Duration::from_secs(600)),
            false,
            BlockReason::Pregreet,
        );
        let syns_before = w.maps().syn_count(bot).unwrap();
        assert!(syns_before >= 1, "{bot}'s first connection was not counted");
        assert!(
            !reachable(&w, bot, 25),
            "{bot} reached port 25 while blocked"
        );
        assert!(
            !reachable(&w, bot, 587),
            "{bot} reached port 587 while blocked"
        );
        assert!(
            reachable(&w, bot, OTHER_PORT),
            "{bot}: other ports must work"
        );
        assert!(reachable(&w, good, 25), "{good} is not blocked");
        // A dropped SYN leaves no per-source state: a forged flood from a
        // blocked prefix (a new source per packet) cannot churn the LRU
        // maps that hold real clients' history.
        assert_eq!(w.maps().syn_count(bot).unwrap(), syns_before, "{bot}");
        // Removing the entry lets it in again at once.
        assert!(w.maps().block_del(net(prefix)).unwrap());
        assert!(
            !w.maps().block_del(net(prefix)).unwrap(),
            "second delete finds nothing"
        );
        assert!(reachable(&w, bot, 25), "{bot} after unblocking");
    }
    let c = w.maps().counters().unwrap();
    assert!(c.get(Counter::XdpDrop) >= 4, "{c:?}");
    assert_eq!(c.drops(BlockReason::Pregreet), c.get(Counter::XdpDrop));
    assert!(c.get(Counter::XdpBlockOtherPort) > 0);
    assert!(c.get(Counter::XdpPass) > 0);
    let hits = block_on(async {
        let mut s = EventStream::open(&w.pins.path).unwrap();
        let mut out = Vec::new();
        while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(300), s.next()).await {
            out.push(e);
        }
        out
    });
    assert!(
        hits.iter().any(|e| matches!(
            e.kind,
            EventKind::BlockHit {
                reason: 1,
                count: 1..
            }
        ) && e.addr == ip("198.51.100.50")),
        "no block-hit sample: {hits:?}"
    );
}

/// The kernel skips a list that never held an entry (`LISTS_USED`). Pins
/// kept from an earlier run, or made by a tarpit without the flags, hold
/// entries that no writer of this run marked: the loader must mark them,
/// or every entry in them would be ignored.
#[test]
fn entries_in_pins_without_the_list_flags_still_block() {
    if !require_root() {
        return;
    }
    let persist = |c: &mut tarpit::config::KernelConfig| c.detach_on_exit = false;
    let mut w = World::with(persist).expect("world");
    // One entry in the admin's list, one in the automatic one.
    let admin = ip("198.51.100.60");
    let auto = ip("fd5b:1e00::60");
    for (bot, prefix, reason) in [
        (admin, "198.51.100.60/32", BlockReason::Manual),
        (auto, "fd5b:1e00::60/128", BlockReason::Pregreet),
    ] {
        w.net.add_client_addr(bot).unwrap();
        block_as(&w, prefix, Some(Duration::from_secs(600)), false, reason);
        assert!(
            !reachable(&w, bot, 25),
            "{bot} reached port 25 while blocked"
        );
    }
    // The loader goes (programs stay attached) and the flags' pin with
    // it, as in pins made before the flags existed.
    drop(w.kernel.take());
    std::fs::remove_file(w.pins.path.join(tarpit_common::maps::LISTS_USED)).unwrap();
    w.load(persist).expect("reload");
    for bot in [admin, auto] {
        assert!(
            !reachable(&w, bot, 25),
            "{bot} reached port 25 after a restart on pins without the list flags"
        );
    }
    let good = ip("198.51.100.61");
    w.net.add_client_addr(good).unwrap();
    assert!(reachable(&w, good, 25), "{good} is on no list");
    let k = w.kernel.take().unwrap();
    k.shutdown().unwrap();
}

#[test]
fn all_ports_entry_blocks_every_port() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    for (bot, prefix) in [
        ("198.51.100.70", "198.51.100.64/28"),
        ("fd5b:1e00::7:1", "fd5b:1e00::7:0/112"),
    ] {
        let bot = ip(bot);
        w.net.add_client_addr(bot).unwrap();
        block(&w, prefix, None, true);
        assert!(!reachable(&w, bot, 25));
        assert!(
            !reachable(&w, bot, OTHER_PORT),
            "all-ports entry let {bot} through"
        );
        let listed = w.maps().block_list().unwrap();
        let item = listed
            .iter()
            .find(|i| i.net == net(prefix))
            .expect("listed");
        assert!(item.all_ports);
        assert_eq!(item.expires, None);
        assert_eq!(item.reason(), Some(BlockReason::Manual));
    }
    // The client's own address is outside both prefixes.
    assert!(reachable(&w, tarpit_tests::CLIENT_V4.into(), OTHER_PORT));
}

#[test]
fn expired_entry_passes_and_does_not_hide_a_shorter_active_one() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    let v4_expired = ip("198.51.100.120");
    let v6_expired = ip("fd5b:1e00::90");
    let v4_shadow = ip("198.51.100.81");
    let v6_shadow = ip("fd5b:1e00::8:1");
    for a in [v4_expired, v6_expired, v4_shadow, v6_shadow] {
        w.net.add_client_addr(a).unwrap();
    }
    // Longer than one blocked connect attempt (SYN + one retransmit).
    let ttl = Some(Duration::from_millis(2500));
    block(&w, "198.51.100.120/32", ttl, false);
    block(&w, "fd5b:1e00::90/128", ttl, false);
    // Longer expiring prefixes inside shorter permanent ones.
    block(&w, "198.51.100.80/28", None, false);
    block(&w, "198.51.100.81/32", ttl, false);
    block(&w, "fd5b:1e00::8:0/112", None, false);
    block(&w, "fd5b:1e00::8:1/128", ttl, false);
    assert!(
        !reachable(&w, v4_expired, 25),
        "blocked {v4_expired} got through: now {:?}, {:?} {:?}",
        tarpit::kernel::BootInstant::now(),
        w.maps().block_list().unwrap(),
        w.maps().counters().unwrap()
    );
    std::thread::sleep(Duration::from_millis(2000));

    assert!(
        reachable(&w, v4_expired, 25),
        "expired entry still drops: {:?} {:?}",
        w.maps().counters().unwrap(),
        w.maps().block_list().unwrap()
    );
    assert!(
        reachable(&w, v6_expired, 25),
        "expired entry still drops (v6)"
    );
    assert!(
        !reachable(&w, v4_shadow, 25),
        "an expired /32 hid the active /28"
    );
    assert!(
        !reachable(&w, v6_shadow, 25),
        "an expired /128 hid the active /112"
    );
    let c = w.maps().counters().unwrap();
    assert!(c.get(Counter::XdpBlockExpired) >= 4, "{c:?}");
    // The kernel swept what it found expired; the active prefixes stay.
    let left: Vec<IpNet> = w
        .maps()
        .block_list()
        .unwrap()
        .into_iter()
        .map(|i| i.net)
        .collect();
    assert!(!left.contains(&net("198.51.100.120/32")), "{left:?}");
    assert!(left.contains(&net("198.51.100.80/28")), "{left:?}");
    assert!(left.contains(&net("fd5b:1e00::8:0/112")), "{left:?}");
}

#[test]
fn allow_entry_wins_over_block_entry() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    for (friend, blocked, allowed) in [
        ("198.51.100.100", "198.51.100.96/27", "198.51.100.100/32"),
        ("fd5b:1e00::a:1", "fd5b:1e00::a:0/112", "fd5b:1e00::a:1/128"),
    ] {
        let friend = ip(friend);
        w.net.add_client_addr(friend).unwrap();
        block(&w, blocked, None, true);
        assert!(!reachable(&w, friend, 25));
        w.maps().allow_add(net(allowed), None).unwrap();
        assert!(
            reachable(&w, friend, 25),
            "allow entry did not win for {friend}"
        );
        assert!(reachable(&w, friend, OTHER_PORT));
        let m = w.maps().allow_match(friend).unwrap().expect("allow match");
        assert_eq!(m.net, net(allowed));
        let b = w.maps().block_match(friend).unwrap().expect("block match");
        assert_eq!(b.net, net(blocked));
    }
    assert!(w.maps().counters().unwrap().get(Counter::XdpAllowed) > 0);
    // Served normally once through.
    let mut s = w
        .connect(
            ip("198.51.100.100"),
            SocketAddr::new(SERVER_V4.into(), 25),
            SHORT,
        )
        .unwrap();
    read_until(&mut s, "220 ").unwrap();
}

#[test]
fn full_lists_refuse_new_entries_with_a_clear_error() {
    if !require_root() {
        return;
    }
    let w = World::with(|c| {
        c.allow_entries = 4;
        c.block_entries = 4;
    })
    .expect("world");
    let mut maps = w.maps();
    for i in 0..4 {
        maps.allow_add(net(&format!("198.51.100.{i}/32")), None)
            .unwrap();
        maps.block_add(
            net(&format!("fd5b:1e00::{i}/128")),
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap();
    }
    let e = maps.allow_add(net("198.51.100.200/32"), None).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::MapFull {
                map: "ALLOW",
                capacity: 4,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("kernel.allow_entries"), "{e}");
    let e = maps
        .block_add(
            net("fd5b:1e00::99/128"),
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, KernelError::MapFull { map: "BLOCK", .. }),
        "{e:?}"
    );
    // Replacing an existing entry still works; deleting makes room.
    maps.allow_add(net("198.51.100.0/32"), Some(Duration::from_secs(60)))
        .unwrap();
    assert!(maps.allow_del(net("198.51.100.1/32")).unwrap());
    maps.allow_add(net("198.51.100.200/32"), None).unwrap();
    assert_eq!(maps.allow_list().unwrap().len(), 4);
    // Nothing that was there got lost.
    assert_eq!(maps.block_list().unwrap().len(), 4);
}
