//! The kernel hold from the command line (issue 21), with the real agent:
//! `tarpit block add --hold` holds the address (its connect() succeeds,
//! no banner, the agent never sees it), `block list` and `tarpit ip` say
//! so, `tarpit stats` counts it, and the state file keeps the action.
mod cli_common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use cli_common::{CliWorld, Opts, SMTP, ip, server_for};
use socket2::{Domain, Socket, Type};
use tarpit_tests::require_root;

#[test]
fn block_add_hold_holds_the_address_and_says_so() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::default());
    // Native XDP on a veth replies only when the peer has a program too.
    let _peer = testkit::xdp_pass::attach(&w.net.client_ns, &w.net.client_if).expect("XDP on peer");
    w.start_agent();
    let bot = ip("198.51.100.76");
    w.net.add_client_addr(bot).unwrap();

    let out = w.ok(&[
        "block",
        "add",
        "198.51.100.76",
        "--hold",
        "--comment",
        "bot",
    ]);
    assert!(out.contains("held in the kernel"), "{out}");
    let list = w.json(&["block", "list"]);
    assert_eq!(list[0]["action"], "hold", "{list}");
    assert_eq!(w.state()["block"][0]["hold"], true);
    let verdict = w.json(&["ip", "198.51.100.76"]);
    assert_eq!(verdict["policy"]["verdict"], "hold", "{verdict}");
    let human = w.ok(&["ip", "198.51.100.76"]);
    assert!(human.contains("held in kernel"), "{human}");

    let features = w.json(&["stats"]);
    if features["kernel"]["hold_unavailable"].is_null() {
        panic!("no hold counters in `tarpit stats`: {features}");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if release.starts_with("5.") {
        return; // no raw SYN-cookie helpers: dropped, see kernel_hold
    }
    let dst = server_for(bot, SMTP);
    let mut s: TcpStream = w
        .net
        .in_client(|| {
            let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            sock.bind(&SocketAddr::new(bot, 0).into()).unwrap();
            sock.connect_timeout(&dst.into(), Duration::from_secs(5))
                .map(|()| TcpStream::from(sock))
        })
        .unwrap()
        .expect("a held client's connect() succeeds");
    // The agent would greet (or answer 4xx) after its 2 s delay.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    let r = s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut),
        "held: nothing arrives, got {r:?}"
    );
    let k = w.json(&["stats"]);
    assert!(
        k["kernel"]["hold_syn_answered"].as_u64().unwrap() >= 1,
        "{k}"
    );
    assert!(k["kernel"]["hold_handshakes"].as_u64().unwrap() >= 1, "{k}");
}
