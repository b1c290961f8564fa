//! Graceful stop under load: SIGTERM closes the listeners, tarpitted
//! sessions get 421 at once, a message being sent finishes, every message
//! a client saw accepted is delivered, and the agent is gone within
//! `daemon.shutdown_timeout`.
mod ops_common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ops_common::World;
use tarpit_tests::smtp_client::{SmtpClient, agent_v4, agent_v6, message};
use tarpit_tests::{CLIENT_V4, CLIENT_V6, require_root};

const TIMEOUT: Duration = Duration::from_secs(8);

/// Greeting and first RCPT free; every RCPT after the first held 60 s.
fn rest() -> String {
    format!(
        "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 1\ndelay = \"60s\"\n\
         [daemon]\nshutdown_timeout = \"{}s\"\n",
        TIMEOUT.as_secs()
    )
}

/// A sender in a loop: one message per connection, counted when the end
/// of DATA got 250. Stops when the agent stops answering (or after 3000
/// messages / 60 s: bounded); returns when it stopped.
fn sender(
    w: Arc<World>,
    src: IpAddr,
    dst: SocketAddr,
    accepted: Arc<AtomicUsize>,
    n: usize,
) -> Instant {
    let start = Instant::now();
    for i in 0..3000 {
        if start.elapsed() > Duration::from_secs(60) {
            break;
        }
        let Ok(mut c) = SmtpClient::connect(&w.net, src, dst) else {
            break; // listener closed
        };
        let _ = c.set_read_timeout(Duration::from_secs(20));
        let mut step = || -> anyhow::Result<bool> {
            anyhow::ensure!(c.reply()?.code == 220);
            anyhow::ensure!(c.cmd("EHLO load.example")?.0.code == 250);
            anyhow::ensure!(c.cmd("MAIL FROM:<load@client.example>")?.0.code == 250);
            anyhow::ensure!(c.cmd("RCPT TO:<sink@tarpit.test>")?.0.code == 250);
            anyhow::ensure!(c.cmd("DATA")?.0.code == 354);
            c.send(message(&format!("load {n}-{i}")).as_bytes())?;
            Ok(c.cmd(".")?.0.code == 250)
        };
        match step() {
            Ok(true) => {
                accepted.fetch_add(1, Ordering::SeqCst);
                let _ = c.cmd("QUIT");
            }
            // 421 at MAIL once the agent stops, or the connection closed
            _ => break,
        }
    }
    Instant::now()
}

#[test]
fn sigterm_under_load_loses_no_accepted_message_and_ends_within_the_timeout() {
    if !require_root() {
        return;
    }
    let mut world = World::new(&rest());
    let agent = world.agent.take().expect("agent");
    let w = Arc::new(world);
    let accepted = Arc::new(AtomicUsize::new(0));
    let sigterm_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));

    // 4 senders in a loop, v4 and v6
    let mut senders = Vec::new();
    for n in 0..4 {
        let (src, dst) = if n % 2 == 0 {
            (IpAddr::from(CLIENT_V4), agent_v4())
        } else {
            (IpAddr::from(CLIENT_V6), agent_v6())
        };
        let (w, acc) = (w.clone(), accepted.clone());
        senders.push(std::thread::spawn(move || sender(w, src, dst, acc, n)));
    }

    // 3 tarpitted sessions: their second RCPT is held for 60 s
    let mut tarpitted = Vec::new();
    for n in 0..3 {
        let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
        c.set_read_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(c.reply().unwrap().code, 220);
        c.expect("EHLO bot.example", 250).unwrap();
        c.expect("MAIL FROM:<bot@client.example>", 250).unwrap();
        c.expect(&format!("RCPT TO:<a{n}@tarpit.test>"), 250)
            .unwrap();
        c.send(b"RCPT TO:<b@tarpit.test>\r\n").unwrap();
        let at = sigterm_at.clone();
        tarpitted.push(std::thread::spawn(move || {
            let r = c.reply();
            let when = Instant::now();
            let since = at
                .lock()
                .unwrap()
                .map(|t| when.saturating_duration_since(t));
            (r.map(|r| r.code).ok(), since)
        }));
    }

    // 1 session in the middle of DATA when SIGTERM comes: it must finish
    let mut slow = SmtpClient::connect(&w.net, CLIENT_V6.into(), agent_v6()).unwrap();
    slow.set_read_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(slow.reply().unwrap().code, 220);
    slow.expect("EHLO slow.example", 250).unwrap();
    slow.expect("MAIL FROM:<slow@client.example>", 250).unwrap();
    slow.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    slow.expect("DATA", 354).unwrap();
    slow.send(b"Subject: slow\r\n\r\nfirst half\r\n").unwrap();
    let slow_done = Arc::new(AtomicBool::new(false));
    let slow_thread = {
        let (at, done) = (sigterm_at.clone(), slow_done.clone());
        std::thread::spawn(move || {
            // the rest of the body 2 s after SIGTERM
            loop {
                if let Some(t) = *at.lock().unwrap()
                    && t.elapsed() > Duration::from_secs(2)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            slow.send(b"second half\r\n").unwrap();
            let r = slow.cmd(".").map(|(r, _)| r.code).ok();
            done.store(r == Some(250), Ordering::SeqCst);
            r
        })
    };

    // let the load run, then stop
    std::thread::sleep(Duration::from_secs(3));
    let before = accepted.load(Ordering::SeqCst);
    assert!(before > 0, "the load ran: no message accepted in 3 s");
    let t0 = Instant::now();
    *sigterm_at.lock().unwrap() = Some(t0);
    let status = agent.stop().expect("agent stops");
    let took = t0.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took < TIMEOUT + Duration::from_secs(2),
        "stopping took {took:?}, shutdown_timeout is {TIMEOUT:?}"
    );

    for t in tarpitted {
        let (code, since) = t.join().unwrap();
        assert_eq!(code, Some(421), "a tarpitted session gets 421");
        let since = since.expect("answered after SIGTERM, not before");
        assert!(
            since < Duration::from_secs(3),
            "421 came {since:?} after SIGTERM"
        );
    }
    assert_eq!(
        slow_thread.join().unwrap(),
        Some(250),
        "the message in DATA finished"
    );
    for s in senders {
        let ended = s.join().unwrap();
        assert!(
            ended > t0,
            "a sender was done before SIGTERM: no load at the stop"
        );
    }
    let accepted = accepted.load(Ordering::SeqCst) + 1; // + the slow one
    // Every message a client saw accepted was delivered. (A message the
    // MTA took but whose 250 the client never saw could be delivered on
    // top: at most one per sender.)
    assert!(
        w.pf.wait_delivered(accepted, Duration::from_secs(30)),
        "accepted {accepted}, delivered {}:\n{}",
        w.pf.delivered(),
        w.pf.log()
    );
    let delivered = w.pf.delivered();
    eprintln!("accepted {accepted}, delivered {delivered}, stopped {took:?} after SIGTERM");
    assert!(
        delivered <= accepted + 4,
        "delivered {delivered}, accepted {accepted}"
    );
    assert!(slow_done.load(Ordering::SeqCst));
}

#[test]
fn sigterm_releases_the_greeting_delay_with_421_and_stops_at_once() {
    if !require_root() {
        return;
    }
    let mut w = World::new("[greeting]\ndelay = \"60s\"\n[daemon]\nshutdown_timeout = \"30s\"\n");
    let mut held = Vec::new();
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let dst = if src.is_ipv4() {
            agent_v4()
        } else {
            agent_v6()
        };
        let c = SmtpClient::connect(&w.net, src, dst).unwrap();
        held.push(std::thread::spawn(move || {
            let mut c = c;
            c.set_read_timeout(Duration::from_secs(30)).unwrap();
            let r = c.timed_reply();
            r.map(|(r, t)| (r.code, r.text, t)).ok()
        }));
    }
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let status = w.agent.take().unwrap().stop().unwrap();
    assert!(status.success());
    // nothing to finish: no waiting for the 30 s timeout
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    for h in held {
        let (code, text, took) = h.join().unwrap().expect("a reply, not a reset");
        assert_eq!(code, 421, "{text}");
        assert!(text.contains("4.3.2"), "{text}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    // the listener is closed: new clients are refused
    let refused = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).is_err();
    assert!(refused, "still accepting after the stop");
}

/// A session in the middle of DATA holds the drain (60 s here); a second
/// SIGTERM ends it at once, and the unfinished message is not delivered
/// (its client never saw a 250, so it will retry).
#[test]
fn a_second_sigterm_stops_without_waiting() {
    if !require_root() {
        return;
    }
    let mut w = World::new("[greeting]\ndelay = \"0s\"\n[daemon]\nshutdown_timeout = \"60s\"\n");
    let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).unwrap();
    assert_eq!(c.reply().unwrap().code, 220);
    c.expect("EHLO slow.example", 250).unwrap();
    c.expect("MAIL FROM:<slow@client.example>", 250).unwrap();
    c.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send(b"Subject: never finished\r\n\r\nhalf\r\n").unwrap();
    let agent = w.agent.take().unwrap();
    agent.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(agent.log().contains("stopping"), "{}", agent.log());
    let t0 = Instant::now();
    let status = agent.stop().unwrap(); // the second SIGTERM
    assert!(status.success(), "{status}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    assert!(c.closed_within(Duration::from_secs(5)));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(w.pf.delivered(), 0);
}
