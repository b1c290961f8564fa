//! Holds as a client and the MTA behind the agent live them (issue 15),
//! through the agent to real Postfix over PROXY v2, with short timings:
//! pipelined commands pay the sum of their holds, a hold longer than
//! `limits.idle` is not idleness, the MTA's session survives a hold longer
//! than its `smtpd_timeout` (keep-alive), the end of data reaches the MTA
//! only after its hold (a client that hangs up queues nothing), and the
//! callout exception lifts only what a callout needs.
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::time::{Duration, Instant};

use tarpit_tests::postfix::{PROXY, STRESSED};
use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, agent_v6, message, tcp_connect,
};
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, Rbldnsd, TestNet, require_root, wait,
};

/// Scheduling, Postfix and the veth take well under this.
const SLACK: Duration = Duration::from_millis(1500);

struct World {
    net: TestNet,
    _pins: PinDir,
    pf: Postfix,
    agent: Agent,
}

/// `[backend]` for the PROXY v2 listener on `port`, with `extra` keys.
fn backend(port: u16, extra: &str) -> String {
    format!("[backend]\naddr = \"127.0.0.1:{port}\"\nclient_address = \"proxy-v2\"\n{extra}")
}

/// A network with the extra client addresses `more`, Postfix, and the
/// agent with `backend` and the other sections `rest`.
fn world(backend: &str, rest: &str, more: &[IpAddr]) -> World {
    let net = TestNet::new().expect("test network");
    for a in more {
        net.add_client_addr(*a).expect("client address");
    }
    let pins = PinDir::new().expect("pin dir");
    let pf = Postfix::start(&net).expect("postfix");
    let agent = Agent::start(&net, &agent_config(&net, &pins, backend, rest)).expect("agent");
    World {
        net,
        _pins: pins,
        pf,
        agent,
    }
}

fn connect(w: &World, src: IpAddr) -> SmtpClient {
    let dst = if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    };
    let mut c = SmtpClient::connect(&w.net, src, dst).expect("connect");
    let banner = c.reply().expect("banner");
    assert_eq!(banner.code, 220, "{}", banner.text);
    c
}

/// Runs `f` once per source address, all at once (each session keeps its
/// own clock), and re-raises the first panic.
fn each<F: Fn(IpAddr) + Sync>(srcs: &[IpAddr], f: F) {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = srcs.iter().map(|&src| s.spawn(move || f(src))).collect();
        for h in hs {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
}

const BOTH: [IpAddr; 2] = [IpAddr::V4(CLIENT_V4), IpAddr::V6(CLIENT_V6)];

#[track_caller]
fn held(what: &str, d: Duration, min: Duration) {
    assert!(d >= min, "{what}: took {d:?}, expected a hold of {min:?}");
}

#[track_caller]
fn free(what: &str, d: Duration) {
    assert!(d < SLACK, "{what}: took {d:?}, expected no hold");
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// Postfix's log lines that name `ip` and contain `needle`.
fn log_lines(pf: &Postfix, ip: IpAddr, needle: &str) -> Vec<String> {
    let who = format!("[{ip}]");
    pf.log()
        .lines()
        .filter(|l| l.contains(&who) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn pipelined_rcpts_pay_the_sum_of_their_holds() {
    if !require_root() {
        return;
    }
    // RCPTs 1 and 2 free, then 2, 3 and 4 s: 9 s one at a time.
    let w = world(
        &backend(PROXY, ""),
        "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 2\ndelay = \"2s\"\nscaling = 1.5\n",
        &[],
    );
    each(&BOTH, |src| {
        let mut c = connect(&w, src);
        let ehlo = c.expect("EHLO harvester.example", 250).unwrap();
        assert!(ehlo.text.contains("PIPELINING"), "{}", ehlo.text);
        c.expect("MAIL FROM:<h@client.example>", 250).unwrap();
        let batch: String = (0..5)
            .map(|i| format!("RCPT TO:<sink{i}@tarpit.test>\r\n"))
            .collect();
        let t = Instant::now();
        c.send(batch.as_bytes()).unwrap();
        let mut at = Vec::new();
        for i in 0..5 {
            let r = c.reply().unwrap();
            assert!(
                r.text.starts_with("250 2.1.5 Ok"),
                "{src} RCPT {}: Postfix's 250 expected, got {:?}",
                i + 1,
                r.text
            );
            at.push(t.elapsed());
        }
        free(&format!("{src} RCPTs within the threshold"), at[1]);
        // Each hold starts when the reply before it was released.
        held(&format!("{src} RCPT 3"), at[2], secs(1.9));
        held(&format!("{src} RCPT 4 (2 + 3 s)"), at[3], secs(4.5));
        held(&format!("{src} RCPT 5 (2 + 3 + 4 s)"), at[4], secs(8.5));
        c.expect("QUIT", 221).unwrap();
    });
}

#[test]
fn a_hold_of_twice_the_idle_limit_ends_with_the_reply_not_421() {
    if !require_root() {
        return;
    }
    let w = world(
        &backend(PROXY, ""),
        &format!(
            "[greeting]\ndelay = \"0s\"\n[limits]\nidle = \"2s\"\n\
             [blacklist]\ndelay = \"4s\"\nips = [\"{CLIENT_V4}/32\", \"{CLIENT_V6}/128\"]\n"
        ),
        &[],
    );
    each(&BOTH, |src| {
        let mut c = connect(&w, src);
        c.expect("EHLO listed.example", 250).unwrap();
        for (cmd, code) in [
            ("MAIL FROM:<a@client.example>", 250),
            ("RCPT TO:<sink@tarpit.test>", 250),
            ("DATA", 354),
        ] {
            let (r, d) = c.cmd(cmd).unwrap();
            assert_eq!(r.code, code, "{src} {cmd}: {}", r.text);
            held(&format!("{src} {cmd}"), d, secs(4.0));
        }
        c.send(message(&format!("idle {src}")).as_bytes()).unwrap();
        let (r, d) = c.cmd(".").unwrap();
        assert_eq!(r.code, 250, "{src} end of data: {}", r.text);
        held(&format!("{src} end of data"), d, secs(4.0));
        c.expect("QUIT", 221).unwrap();
    });
    assert!(
        w.pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
}

#[test]
fn keepalive_carries_the_mtas_session_through_a_60s_hold() {
    if !require_root() {
        return;
    }
    // Postfix's STRESSED listener drops a client after 10 s of silence;
    // the agent's default keep-alive (8 s) speaks to it during the hold.
    let w = world(
        &backend(STRESSED, ""),
        "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 0\ndelay = \"60s\"\n",
        &[],
    );
    each(&BOTH, |src| {
        let mut c = connect(&w, src);
        c.set_read_timeout(Duration::from_secs(120)).unwrap();
        c.expect("EHLO patient.example", 250).unwrap();
        c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
        let (r, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        assert!(
            r.text.starts_with("250 2.1.5 Ok"),
            "{src} RCPT after the hold: Postfix's 250 expected, got {:?}",
            r.text
        );
        held(&format!("{src} RCPT"), d, secs(60.0));
        c.expect("DATA", 354).unwrap();
        c.send(message(&format!("kept alive {src}")).as_bytes())
            .unwrap();
        c.expect(".", 250).unwrap();
        c.expect("QUIT", 221).unwrap();
    });
    assert!(
        w.pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    let msgs = w.pf.messages();
    for src in BOTH {
        let subject = format!("Subject: kept alive {src}\n");
        let n = msgs
            .iter()
            .filter(|m| m.replace("\r\n", "\n").contains(&subject))
            .count();
        assert_eq!(n, 1, "{src}: delivered once; log:\n{}", w.pf.log());
    }
    assert_eq!(msgs.len(), 2);
    assert!(!w.pf.log().contains("timeout after"), "{}", w.pf.log());
}

#[test]
fn without_keepalive_the_mta_times_out_during_the_hold() {
    if !require_root() {
        return;
    }
    // The control of the test above: keep-alive off, a hold of 15 s
    // against the 10 s smtpd_timeout.
    let w = world(
        &backend(STRESSED, "keepalive = \"0s\"\n"),
        "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 0\ndelay = \"15s\"\n",
        &[],
    );
    let src = IpAddr::V4(CLIENT_V4);
    let mut c = connect(&w, src);
    c.expect("EHLO patient.example", 250).unwrap();
    c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
    let (r, d) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
    held("RCPT", d, secs(15.0));
    // The MTA is gone: this reply or the next is the 421 of a lost
    // backend (or the session ends).
    if r.code != 421 {
        assert_eq!(r.code, 250, "{}", r.text);
        match c.cmd("DATA") {
            Ok((r, _)) => assert_eq!(r.code, 421, "DATA after the MTA timed out: {}", r.text),
            Err(e) => eprintln!("session ended: {e}"),
        }
    }
    assert!(
        !log_lines(&w.pf, src, "timeout after").is_empty(),
        "{}",
        w.pf.log()
    );
    assert_eq!(w.pf.delivered(), 0);
}

#[test]
fn a_client_gone_during_the_end_of_data_hold_queues_nothing() {
    if !require_root() {
        return;
    }
    // Two more addresses hang up; the usual ones wait.
    let gone_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));
    let gone_v6 = IpAddr::V6(Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x20));
    let w = world(
        &backend(PROXY, ""),
        "[greeting]\ndelay = \"0s\"\n[blacklist]\ndelay = \"3s\"\n\
         ips = [\"198.51.100.0/24\", \"fd5b:1e00::/64\"]\n",
        &[gone_v4, gone_v6],
    );
    each(&[BOTH[0], BOTH[1], gone_v4, gone_v6], |src| {
        let gone = src == gone_v4 || src == gone_v6;
        let mut c = connect(&w, src);
        c.expect("EHLO listed.example", 250).unwrap();
        c.expect("MAIL FROM:<a@client.example>", 250).unwrap();
        c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
        c.expect("DATA", 354).unwrap();
        let subject = if gone { "hung up" } else { "waited" };
        c.send(message(&format!("{subject} {src}")).as_bytes())
            .unwrap();
        if gone {
            c.send(b".\r\n").unwrap();
            std::thread::sleep(Duration::from_secs(1));
            drop(c);
        } else {
            let (r, d) = c.cmd(".").unwrap();
            assert_eq!(r.code, 250, "{src}: {}", r.text);
            held(&format!("{src} end of data"), d, secs(3.0));
            c.expect("QUIT", 221).unwrap();
        }
    });
    // The MTA lost the connections of those who hung up, in DATA.
    for ip in [gone_v4, gone_v6] {
        assert!(
            wait::until(Duration::from_secs(15), || {
                !log_lines(&w.pf, ip, "lost connection after DATA").is_empty()
            }),
            "{ip}: no lost connection in DATA; log:\n{}",
            w.pf.log()
        );
    }
    assert!(
        w.pf.wait_delivered(2, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    assert!(
        wait::until(Duration::from_secs(10), || w.pf.queued() == 0),
        "queue not empty: {}",
        w.pf.postqueue(&w.net)
    );
    std::thread::sleep(Duration::from_secs(1));
    let q = w.pf.postqueue(&w.net);
    assert!(q.contains("Mail queue is empty"), "{q}");
    let msgs: Vec<String> =
        w.pf.messages()
            .iter()
            .map(|m| m.replace("\r\n", "\n"))
            .collect();
    assert_eq!(msgs.len(), 2, "exactly the waiters' messages: {msgs:#?}");
    for src in BOTH {
        let n = msgs
            .iter()
            .filter(|m| m.contains(&format!("Subject: waited {src}\n")))
            .count();
        assert_eq!(n, 1, "{src}: {msgs:#?}");
    }
    assert!(!msgs.iter().any(|m| m.contains("Subject: hung up")));
}

#[test]
fn callout_senders_skip_the_hold_only_for_mail_and_two_rcpts() {
    if !require_root() {
        return;
    }
    let listed_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 130));
    let listed_v6 = IpAddr::V6(Ipv6Addr::new(0xfd5b, 0x1e00, 0, 0, 0, 0, 0, 0x82));
    let net = TestNet::new().expect("test network");
    for a in [listed_v4, listed_v6] {
        net.add_client_addr(a).unwrap();
    }
    let _rbl = Rbldnsd::start(
        &net,
        &[
            "reject.test:ip4set:reject.zone",
            "reject6.test:ip6trie:reject6.zone",
        ],
        &[
            ("reject.zone", "198.51.100.130\n"),
            ("reject6.zone", ":127.0.0.2:listed\nfd5b:1e00::82\n"),
        ],
    )
    .expect("rbldnsd");
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).expect("postfix");
    let rest = format!(
        r#"
[greeting]
delay = "0s"
[blacklist]
delay = "2s"
ips = ["{CLIENT_V4}/32", "{CLIENT_V6}/128"]
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
[dnsbl]
sites = ["reject.test*3", "reject6.test*3"]
threshold = 3
action = "reject"
"#
    );
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &backend(PROXY, ""), &rest)).expect("agent");
    let w = World {
        net,
        _pins: pins,
        pf,
        agent,
    };
    let two = secs(2.0);
    each(&BOTH, |src| {
        let mut c = connect(&w, src);
        c.expect("EHLO callout.example", 250).unwrap();
        for sender in ["<>", "<double-bounce@client.example>"] {
            let what = |s: &str| format!("{src} {sender}: {s}");
            let (r, d) = c.cmd(&format!("MAIL FROM:{sender}")).unwrap();
            assert_eq!(r.code, 250, "{}", r.text);
            free(&what("MAIL"), d);
            for i in 0..3 {
                let (r, d) = c.cmd(&format!("RCPT TO:<sink{i}@tarpit.test>")).unwrap();
                assert_eq!(r.code, 250, "{}", r.text);
                if i < 2 {
                    free(&what(&format!("RCPT {}", i + 1)), d);
                } else {
                    held(&what("RCPT 3"), d, two);
                }
            }
            let (r, d) = c.cmd("DATA").unwrap();
            assert_eq!(r.code, 354, "{}", r.text);
            held(&what("DATA"), d, two);
            c.send(message(&format!("callout {src} {sender}")).as_bytes())
                .unwrap();
            let (r, d) = c.cmd(".").unwrap();
            assert_eq!(r.code, 250, "{}", r.text);
            held(&what("end of data"), d, two);
        }
        c.expect("QUIT", 221).unwrap();
    });
    // Listed with action reject: the null sender changes nothing.
    each(&[listed_v4, listed_v6], |src| {
        let mut c = connect(&w, src);
        c.expect("EHLO callout.example", 250).unwrap();
        c.expect("MAIL FROM:<>", 250).unwrap();
        let (r, _) = c.cmd("RCPT TO:<sink@tarpit.test>").unwrap();
        assert_eq!(r.code, 554, "{src}: {}", r.text);
        assert!(r.text.contains("client blocked using reject"), "{}", r.text);
        c.expect("QUIT", 221).unwrap();
    });
    // Postfix saw no RCPT of the listed clients (its disconnect line
    // counts the commands of the session).
    for ip in [listed_v4, listed_v6] {
        assert!(
            wait::until(Duration::from_secs(10), || {
                !log_lines(&w.pf, ip, "disconnect from").is_empty()
            }),
            "{}",
            w.pf.log()
        );
        let lines = log_lines(&w.pf, ip, "disconnect from");
        assert!(lines.iter().all(|l| !l.contains("rcpt=")), "{lines:?}");
    }
    // 2 senders x 3 recipients x 2 families.
    assert!(
        w.pf.wait_delivered(12, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    assert!(w.agent.log().contains("client listed"), "{}", w.agent.log());
}

/// The pids of the MTA's smtpd processes (in the server namespace).
fn smtpds(net: &TestNet) -> Vec<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", &net.server_ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "smtpd")
        })
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

fn signal_all(pids: &[i32], sig: nix::sys::signal::Signal) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// A raw connection from `src` to the agent (for the test that needs
/// to read while another thread writes).
fn raw_connect(net: &TestNet, src: IpAddr) -> TcpStream {
    let dst = if src.is_ipv4() {
        agent_v4()
    } else {
        agent_v6()
    };
    tcp_connect(net, src, dst).expect("connect")
}

/// Reads one reply (all its lines); `None` at EOF or on an error.
fn read_reply(r: &mut impl BufRead) -> Option<String> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Some(text);
        }
    }
}

#[test]
fn a_stalled_mta_does_not_stall_the_session() {
    if !require_root() {
        return;
    }
    // The MTA stops reading in DATA (SIGSTOP): once the socket buffers
    // are full the agent's write to it cannot finish, and after
    // backend.write_timeout the agent gives the session up: the client
    // gets a reply or a closed connection, not silence.
    let w = world(
        &backend(PROXY, "write_timeout = \"2s\"\n"),
        "[greeting]\ndelay = \"0s\"\n",
        &[],
    );
    let stream = raw_connect(&w.net, IpAddr::V4(CLIENT_V4));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let banner = read_reply(&mut reader).unwrap_or_default();
    assert!(banner.starts_with("220"), "{banner:?}");
    for (cmd, code) in [
        ("EHLO big.example", "250"),
        ("MAIL FROM:<a@client.example>", "250"),
        ("RCPT TO:<sink@tarpit.test>", "250"),
        ("DATA", "354"),
    ] {
        writer.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let r = read_reply(&mut reader).unwrap_or_default();
        assert!(r.starts_with(code), "{cmd}: {r:?}");
    }
    let stopped = smtpds(&w.net);
    assert!(!stopped.is_empty(), "no smtpd to stop");
    signal_all(&stopped, nix::sys::signal::Signal::SIGSTOP);
    let t = Instant::now();
    // 64 MB, far more than the socket buffers on the way hold, then the
    // end of data; writes fail once the agent has closed.
    std::thread::spawn(move || {
        let line = format!("{}\r\n", "x".repeat(998));
        let chunk = line.repeat(64);
        for _ in 0..1024 {
            if writer.write_all(chunk.as_bytes()).is_err() {
                return;
            }
        }
        let _ = writer.write_all(b".\r\n");
    });
    let reply = read_reply(&mut reader);
    let waited = t.elapsed();
    // Whatever happened, let everything unwind: a killed smtpd fails the
    // agent's write at once.
    signal_all(&stopped, nix::sys::signal::Signal::SIGKILL);
    assert!(
        waited < Duration::from_secs(40),
        "the session stalled {waited:?} after the MTA stopped reading ({reply:?}); agent log:\n{}",
        w.agent.log()
    );
    if let Some(r) = &reply {
        assert!(r.starts_with('4'), "a temporary failure: {r:?}");
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.pf.delivered(), 0);
}
