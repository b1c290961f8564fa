//! `tarpit ip` shows what the kernel learnt from real clients: the strikes
//! a pre-greet talker earned, connections, first and last seen; `--json`
//! says the same as the human output. IPv4 and IPv6.
mod cli_common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use cli_common::{CliWorld, Opts, SMTP, ip, server_for};
use socket2::{Domain, Socket, Type};
use tarpit_tests::require_root;

/// Connects from `src`, optionally talks before the banner, and reads
/// until the server closes (or 10 s pass).
fn session(w: &CliWorld, src: IpAddr, talk_first: bool) -> String {
    let dst = server_for(src, SMTP);
    w.net
        .in_client(|| {
            let domain = if src.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::STREAM, None).unwrap();
            s.bind(&std::net::SocketAddr::new(src, 0).into()).unwrap();
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .unwrap();
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            if talk_first {
                s.write_all(b"EHLO bot.example\r\n").unwrap();
            } else {
                // A polite client waits for the first reply (no MTA
                // listens behind the agent here, so it is a 4xx after the
                // greeting delay), then says goodbye.
                let mut b = [0u8; 512];
                let n = s.read(&mut b).unwrap_or(0);
                let reply = String::from_utf8_lossy(&b[..n]).into_owned();
                assert!(reply.starts_with('4'), "polite client got {reply:?}");
                s.write_all(b"QUIT\r\n").unwrap();
            }
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            String::from_utf8_lossy(&all).into_owned()
        })
        .unwrap()
}

/// The value of `key` in `tarpit ip` human output ("  key   value").
fn field<'a>(human: &'a str, key: &str) -> &'a str {
    human
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{human}"))
}

/// JSON time `2026-11-23T12:09:00Z` as the human form's prefix.
fn human_of(json_time: &serde_json::Value) -> String {
    json_time
        .as_str()
        .unwrap()
        .replacen('T', " ", 1)
        .trim_end_matches('Z')
        .to_string()
        + " UTC"
}

#[test]
fn ip_shows_the_strikes_a_pregreet_client_earned_and_json_matches() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts {
        greeting: "1500ms",
        ..Opts::detached()
    });
    for a in ["198.51.100.70", "198.51.100.71", "fd5b:1e00::70"] {
        w.net.add_client_addr(ip(a)).unwrap();
    }
    w.start_agent();

    for bot in ["198.51.100.70", "fd5b:1e00::70"] {
        for _ in 0..2 {
            session(&w, ip(bot), true);
        }
    }
    session(&w, ip("198.51.100.71"), false);

    for bot in ["198.51.100.70", "fd5b:1e00::70"] {
        let human = w.ok(&["ip", bot]);
        let json = w.json(&["ip", bot]);
        assert_eq!(json["ip"], bot);
        let st = &json["state"];
        assert_eq!(st["strikes"], 2, "{json}");
        assert!(st["conns_total"].as_u64().unwrap() >= 2, "{json}");
        assert!(
            st["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "pregreet"),
            "{json}"
        );
        assert!(json["syns"].as_u64().unwrap() >= 2, "{json}");
        assert_eq!(
            field(&human, "SYNs to SMTP"),
            json["syns"].to_string(),
            "{human}"
        );
        assert_eq!(json["policy"]["verdict"], "tarpit");
        assert!(
            json["policy"]["reason"]
                .as_str()
                .unwrap()
                .contains("2 times"),
            "{json}"
        );

        // The human output says the same.
        assert!(human.starts_with(bot), "{human}");
        assert!(
            field(&human, "pre-greet strikes").starts_with("2, last "),
            "{human}"
        );
        assert!(
            field(&human, "first seen").starts_with(&human_of(&st["first_seen"])),
            "{human}\n{json}"
        );
        assert!(
            field(&human, "last seen").starts_with(&human_of(&st["last_seen"])),
            "{human}\n{json}"
        );
        let conns = field(&human, "connections");
        assert_eq!(
            conns,
            format!("{} live, {} in total", st["conns_live"], st["conns_total"]),
            "{human}"
        );
        assert_eq!(field(&human, "allow list"), "no");
        assert_eq!(field(&human, "block list"), "no");
        assert_eq!(field(&human, "authenticated"), "no");
        assert!(
            field(&human, "policy now").starts_with("tarpit: "),
            "{human}"
        );
    }

    // The polite client earned nothing.
    let good = w.json(&["ip", "198.51.100.71"]);
    assert_eq!(good["state"]["strikes"], 0, "{good}");
    assert!(
        good["state"]["conns_total"].as_u64().unwrap() >= 1,
        "{good}"
    );
    // An IPv4-mapped address is the same client.
    let mapped = w.json(&["ip", "::ffff:198.51.100.70"]);
    assert_eq!(mapped["ip"], "198.51.100.70");
    assert_eq!(mapped["state"]["strikes"], 2);
    // An address never seen.
    let human = w.ok(&["ip", "198.51.100.99"]);
    assert_eq!(field(&human, "history"), "never seen by the kernel");
    assert!(w.json(&["ip", "198.51.100.99"])["state"].is_null());

    // The kernel's counters saw the same talkers.
    let stats = w.json(&["stats"]);
    assert!(
        stats["kernel"]["tc_pregreet"].as_u64().unwrap() >= 4,
        "{stats}"
    );
}
