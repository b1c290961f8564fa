//! `backend.connect = "at-transaction"`: the agent speaks the banner and
//! EHLO itself, and the MTA is connected only when a transaction starts.
use bytes::Bytes;

use super::*;
use crate::backend::probe::Learned;

const LAZY: &str = "[greeting]\ndelay = \"0s\"\n[backend]\nconnect = \"at-transaction\"\n";

fn lines(code: u16, l: &[&str]) -> Reply {
    Reply {
        code,
        lines: l.iter().map(|x| Bytes::from(format!("{x}\r\n"))).collect(),
    }
}

/// What the probe would have learned from the fake MTA.
fn learned() -> Learned {
    Learned {
        banner: lines(220, &["220 mx.fake ESMTP"]),
        ehlo: lines(
            250,
            &[
                "250-mx.fake",
                "250-PIPELINING",
                "250-SIZE 10240000",
                "250-XCLIENT NAME ADDR PORT",
                "250-8BITMIME",
                "250 CHUNKING",
            ],
        ),
    }
}

fn lazy_shared(extra: &str, mta: SocketAddr) -> Arc<Shared> {
    let s = shared(&format!("{LAZY}{extra}"), mta);
    s.mta.set(learned());
    s
}

/// A listener that must never be connected to.
async fn untouched_mta() -> (SocketAddr, TcpListener) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    (l.local_addr().unwrap(), l)
}

async fn assert_never_connected(l: TcpListener) {
    let r = tokio::time::timeout(Duration::from_secs(3600), l.accept()).await;
    assert!(r.is_err(), "the MTA was connected");
}

/// A fake MTA with its own banner that records when it was connected.
async fn timed_mta(
    banner: &'static str,
    script: Vec<super::Step>,
) -> (SocketAddr, tokio::task::JoinHandle<(Instant, Vec<String>)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let at = Instant::now();
        s.set_nodelay(true).unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut header = [0u8; 16];
        r.read_exact(&mut header).await.unwrap();
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        let mut rest = vec![0u8; len];
        r.read_exact(&mut rest).await.unwrap();
        w.write_all(banner.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        for step in script {
            let super::Step::Reply(expect, _, answer) = step else {
                continue;
            };
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            assert!(
                line.to_ascii_uppercase()
                    .starts_with(&expect.to_ascii_uppercase()),
                "MTA expected {expect:?}, got {line:?}"
            );
            seen.push(line.trim_end().to_string());
            w.write_all(answer.as_bytes()).await.unwrap();
        }
        (at, seen)
    });
    (addr, task)
}

const MTA_EHLO: &str = "250-mx.fake\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR PORT\r\n250-8BITMIME\r\n250 CHUNKING\r\n";

#[tokio::test(start_paused = true)]
async fn a_client_that_never_starts_a_transaction_never_reaches_the_mta() {
    let (addr, l) = untouched_mta().await;
    let shared = lazy_shared("", addr);
    let (mut c, task) = session(shared.clone()).await;
    assert_eq!(read_reply(&mut c).await, "220 mx.fake ESMTP\r\n");
    let (ehlo, _) = cmd(&mut c, "EHLO bot.example").await;
    assert!(ehlo.starts_with("250-mx.fake\r\n"), "{ehlo}");
    assert!(
        ehlo.contains("PIPELINING") && ehlo.contains("CHUNKING"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("XCLIENT"), "{ehlo}");
    assert!(cmd(&mut c, "NOOP").await.0.starts_with("250 "));
    assert!(cmd(&mut c, "RSET").await.0.starts_with("250 "));
    assert!(cmd(&mut c, "HELP").await.0.starts_with("214 "));
    assert!(cmd(&mut c, "RCPT TO:<x@y>").await.0.starts_with("503 "));
    assert!(cmd(&mut c, "DATA").await.0.starts_with("503 "));
    assert!(cmd(&mut c, "FOO bar").await.0.starts_with("502 "));
    // Only the agent may send XCLIENT, in every mode.
    assert!(
        cmd(&mut c, "XCLIENT ADDR=127.0.0.1")
            .await
            .0
            .starts_with("550 ")
    );
    assert!(
        cmd(&mut c, "HELO bot.example")
            .await
            .0
            .starts_with("250 mx.fake")
    );
    assert!(cmd(&mut c, "QUIT").await.0.starts_with("221 "));
    assert_eq!(task.await.unwrap(), Outcome::Quit);
    assert_eq!(shared.metrics.sessions_unreached_total.get(), 1);
    assert_eq!(shared.metrics.mta_connects_total.get(), 0);
    assert_never_connected(l).await;
}

#[tokio::test(start_paused = true)]
async fn mail_before_hello_is_refused_here_and_connects_nothing() {
    let (addr, l) = untouched_mta().await;
    let shared = lazy_shared("", addr);
    let (mut c, task) = session(shared).await;
    read_reply(&mut c).await;
    assert!(cmd(&mut c, "MAIL FROM:<a@b>").await.0.starts_with("503 "));
    assert!(cmd(&mut c, "AUTH PLAIN").await.0.starts_with("503 "));
    // A huge line is refused by the strict reader, never buffered.
    let long = format!("EHLO {}", "a".repeat(10_000));
    assert!(cmd(&mut c, &long).await.0.starts_with("500 "));
    drop(c);
    assert_eq!(task.await.unwrap(), Outcome::ClientClosed);
    assert_never_connected(l).await;
}

#[tokio::test(start_paused = true)]
async fn mail_connects_the_mta_and_replays_the_clients_ehlo() {
    let (mta, seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![
            reply("EHLO client.example", MTA_EHLO),
            reply("MAIL FROM:<a@b> SIZE=100", "250 2.1.0 Ok\r\n"),
            reply("RCPT TO:<x@y>", "250 2.1.5 Ok\r\n"),
            reply("QUIT", "221 bye\r\n"),
        ],
    )
    .await;
    let shared = lazy_shared("", mta);
    let (mut c, task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    // EHLO, MAIL and RCPT pipelined in one write.
    c.get_mut()
        .write_all(b"EHLO client.example\r\nMAIL FROM:<a@b> SIZE=100\r\nRCPT TO:<x@y>\r\n")
        .await
        .unwrap();
    assert!(read_reply(&mut c).await.starts_with("250-mx.fake"));
    assert_eq!(read_reply(&mut c).await, "250 2.1.0 Ok\r\n");
    assert_eq!(read_reply(&mut c).await, "250 2.1.5 Ok\r\n");
    assert!(cmd(&mut c, "QUIT").await.0.starts_with("221"));
    assert_eq!(task.await.unwrap(), Outcome::Quit);
    let (_, seen) = seen.await.unwrap();
    assert_eq!(
        seen,
        vec![
            "EHLO client.example",
            "MAIL FROM:<a@b> SIZE=100",
            "RCPT TO:<x@y>",
            "QUIT"
        ]
    );
    assert_eq!(shared.metrics.mta_connects_total.get(), 1);
    assert_eq!(shared.metrics.sessions_unreached_total.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_blacklisted_client_reaches_the_mta_only_after_its_mail_hold() {
    let (mta, seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![reply("EHLO", MTA_EHLO), reply("MAIL", "250 2.1.0 Ok\r\n")],
    )
    .await;
    let shared = lazy_shared(
        "[blacklist]\ndelay = \"60s\"\nips = [\"198.51.100.0/24\"]\n",
        mta,
    );
    let (mut c, _task) = session(shared).await;
    let start = Instant::now();
    read_reply(&mut c).await;
    cmd(&mut c, "EHLO bot").await;
    let (r, d) = cmd(&mut c, "MAIL FROM:<a@b>").await;
    assert_eq!(r, "250 2.1.0 Ok\r\n");
    assert_eq!(d, Duration::from_secs(60), "the hold is paid once");
    let (at, _) = seen.await.unwrap();
    assert!(
        at >= start + Duration::from_secs(60),
        "connected during the hold"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusing_late_banner_is_the_answer_to_mail() {
    let (mta, _seen) = timed_mta("554 5.7.1 go away\r\n", vec![]).await;
    let shared = lazy_shared("", mta);
    let (mut c, task) = session(shared).await;
    assert_eq!(read_reply(&mut c).await, "220 mx.fake ESMTP\r\n");
    cmd(&mut c, "EHLO client").await;
    let (r, _) = cmd(&mut c, "MAIL FROM:<a@b>").await;
    assert_eq!(r, "554 5.7.1 go away\r\n");
    assert_eq!(task.await.unwrap(), Outcome::BackendClosed);
}

#[tokio::test(start_paused = true)]
async fn a_capability_the_client_used_that_is_gone_is_a_421() {
    let (mta, _seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![reply("EHLO", "250-mx.fake\r\n250 PIPELINING\r\n")],
    )
    .await;
    let shared = lazy_shared("", mta);
    let (mut c, task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    cmd(&mut c, "EHLO client").await;
    let (r, _) = cmd(&mut c, "MAIL FROM:<a@b> BODY=8BITMIME").await;
    assert!(r.starts_with("421 4.3.0"), "{r}");
    assert_eq!(task.await.unwrap(), Outcome::BackendError);
    // The next clients are told what the MTA says now.
    let now = shared.mta.get().unwrap();
    assert_eq!(now.ehlo.ehlo_keywords(), vec!["PIPELINING"]);
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_while_its_mail_is_held_never_reaches_the_mta() {
    let (addr, l) = untouched_mta().await;
    let shared = lazy_shared(
        "[blacklist]\ndelay = \"60s\"\nips = [\"198.51.100.0/24\"]\n",
        addr,
    );
    let (mut c, task) = session(shared).await;
    read_reply(&mut c).await;
    cmd(&mut c, "EHLO bot").await;
    c.get_mut().write_all(b"MAIL FROM:<a@b>\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(c);
    assert_eq!(task.await.unwrap(), Outcome::ClientClosed);
    assert_never_connected(l).await;
}

/// A sender that pipelines its whole transaction and QUIT behind the EHLO
/// reply, then shuts its sending side (Exim does), has not left: its MAIL
/// hold runs, the late connection opens, the message is passed on and
/// every reply reaches it.
#[tokio::test(start_paused = true)]
async fn a_client_that_shuts_its_side_after_a_pipelined_quit_still_reaches_the_mta() {
    let (mta, seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![
            reply("EHLO client.example", MTA_EHLO),
            reply("MAIL FROM:<a@b>", "250 2.1.0 Ok\r\n"),
            reply("RCPT TO:<x@y>", "250 2.1.5 Ok\r\n"),
            reply("BDAT 5", "250 2.0.0 5 octets\r\n"),
            reply("abc", ""),
            reply("BDAT 0 LAST", "250 2.0.0 queued\r\n"),
            reply("QUIT", "221 2.0.0 Bye\r\n"),
        ],
    )
    .await;
    // The MAIL hold: the end of input comes before the MTA is connected.
    let shared = lazy_shared(
        "[blacklist]\ndelay = \"60s\"\nips = [\"198.51.100.0/24\"]\n",
        mta,
    );
    let (mut c, task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    cmd(&mut c, "EHLO client.example").await;
    c.get_mut()
        .write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nBDAT 5 LAST\r\nabc\r\nQUIT\r\n")
        .await
        .unwrap();
    c.get_mut().shutdown().await.unwrap();
    assert_eq!(
        super::replies_to_the_end(&mut c).await,
        [
            "250 2.1.0 Ok\r\n",
            "250 2.1.5 Ok\r\n",
            "250 2.0.0 queued\r\n",
            "221 2.0.0 Bye\r\n",
        ]
    );
    assert_eq!(task.await.unwrap(), Outcome::Quit);
    let (_, seen) = seen.await.unwrap();
    assert_eq!(
        seen,
        [
            "EHLO client.example",
            "MAIL FROM:<a@b>",
            "RCPT TO:<x@y>",
            "BDAT 5",
            "abc",
            "BDAT 0 LAST",
            "QUIT"
        ]
    );
    assert_eq!(shared.metrics.mta_connects_total.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_probe_the_session_connects_at_once() {
    let (mta, seen) = fake_mta(vec![reply("QUIT", "221 bye\r\n")]).await;
    // No `learned()`: the probe has not succeeded yet.
    let shared = shared(LAZY, mta);
    let (mut c, task) = session(shared).await;
    assert_eq!(read_reply(&mut c).await, "220 mx.fake ESMTP\r\n");
    cmd(&mut c, "QUIT").await;
    assert_eq!(task.await.unwrap(), Outcome::Quit);
    assert_eq!(seen.await.unwrap(), vec!["QUIT"]);
}

#[tokio::test(start_paused = true)]
async fn a_pipelining_flood_is_answered_here_and_cut_at_the_junk_limit() {
    let (addr, l) = untouched_mta().await;
    let shared = lazy_shared("", addr);
    let (mut c, task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    let (r, mut w) = c.into_inner().into_split();
    let mut r = BufReader::new(r);
    let flood = "NOOP\r\n".repeat(5_000);
    // The agent hangs up mid-flood: the rest of the write may fail.
    let writer = tokio::spawn(async move {
        let _ = w.write_all(flood.as_bytes()).await;
        w
    });
    for _ in 0..100 {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "250 2.0.0 Ok\r\n");
    }
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "421 4.7.0 Error: too many errors\r\n");
    assert_eq!(task.await.unwrap(), Outcome::Limit);
    let _ = writer.await;
    assert!(
        shared
            .metrics
            .render()
            .contains("tarpit_limit_refusals_total{limit=\"junk\"} 1")
    );
    assert_never_connected(l).await;
}

#[tokio::test(start_paused = true)]
async fn twenty_errors_in_the_spoken_phase_end_the_session() {
    let (addr, l) = untouched_mta().await;
    let shared = lazy_shared("", addr);
    let (mut c, task) = session(shared).await;
    read_reply(&mut c).await;
    for _ in 0..19 {
        assert!(cmd(&mut c, "RCPT TO:<x@y>").await.0.starts_with("503 "));
    }
    let (r, _) = cmd(&mut c, "RCPT TO:<x@y>").await;
    assert_eq!(r, "503 5.5.1 Error: need MAIL command\r\n");
    assert_eq!(
        read_reply(&mut c).await,
        "421 4.7.0 Error: too many errors\r\n"
    );
    assert_eq!(task.await.unwrap(), Outcome::Limit);
    assert_never_connected(l).await;
}

#[tokio::test(start_paused = true)]
async fn bare_line_endings_in_the_spoken_phase_are_refused_and_never_replayed() {
    let (mta, seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![
            reply("EHLO good.example", MTA_EHLO),
            reply("MAIL FROM:<a@b>", "250 2.1.0 Ok\r\n"),
        ],
    )
    .await;
    let shared = lazy_shared("", mta);
    let (mut c, _task) = session(shared).await;
    read_reply(&mut c).await;
    // A bare LF cannot smuggle a second command into the EHLO line.
    c.get_mut()
        .write_all(b"EHLO evil.example\nMAIL FROM:<x@y>\r\n")
        .await
        .unwrap();
    assert!(read_reply(&mut c).await.starts_with("500 "));
    assert!(cmd(&mut c, "EHLO good.example").await.0.starts_with("250-"));
    assert_eq!(cmd(&mut c, "MAIL FROM:<a@b>").await.0, "250 2.1.0 Ok\r\n");
    let (_, seen) = seen.await.unwrap();
    assert_eq!(seen, vec!["EHLO good.example", "MAIL FROM:<a@b>"]);
}

#[tokio::test(start_paused = true)]
async fn max_sessions_makes_the_second_transaction_wait_for_the_first() {
    // One MTA slot: the second client's MAIL waits until the first quits.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mta = tokio::spawn(async move {
        let mut order = Vec::new();
        for _ in 0..2 {
            let (s, _) = l.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut header = [0u8; 16];
            r.read_exact(&mut header).await.unwrap();
            let len = u16::from_be_bytes([header[14], header[15]]) as usize;
            let mut rest = vec![0u8; len];
            r.read_exact(&mut rest).await.unwrap();
            w.write_all(b"220 mx.fake ESMTP\r\n").await.unwrap();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                order.push(line.trim_end().to_string());
                let answer: &[u8] = match &line[..4] {
                    "EHLO" => MTA_EHLO.as_bytes(),
                    "QUIT" => b"221 bye\r\n",
                    _ => b"250 ok\r\n",
                };
                w.write_all(answer).await.unwrap();
                if line.starts_with("QUIT") {
                    break;
                }
            }
        }
        order
    });
    let shared = lazy_shared("max_sessions = 1\n", addr);
    let (mut a, ta) = session(shared.clone()).await;
    let (mut b, tb) = session(shared.clone()).await;
    read_reply(&mut a).await;
    read_reply(&mut b).await;
    cmd(&mut a, "EHLO a").await;
    cmd(&mut b, "EHLO b").await;
    assert!(cmd(&mut a, "MAIL FROM:<a@a>").await.0.starts_with("250"));
    b.get_mut().write_all(b"MAIL FROM:<b@b>\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(shared.metrics.mta_waiting.get(), 1, "b waits for a's slot");
    cmd(&mut a, "QUIT").await;
    assert!(read_reply(&mut b).await.starts_with("250"));
    assert_eq!(shared.metrics.mta_waiting.get(), 0);
    cmd(&mut b, "QUIT").await;
    assert_eq!(ta.await.unwrap(), Outcome::Quit);
    assert_eq!(tb.await.unwrap(), Outcome::Quit);
    assert_eq!(
        mta.await.unwrap(),
        vec![
            "EHLO a",
            "MAIL FROM:<a@a>",
            "QUIT",
            "EHLO b",
            "MAIL FROM:<b@b>",
            "QUIT"
        ]
    );
}

const DROP_ALL: &str =
    "[protocol]\npipelining = \"drop\"\nnon_smtp = \"drop\"\nbare_newline = \"drop\"\n";

#[tokio::test(start_paused = true)]
async fn protocol_tests_drop_the_clients_that_trip_them_and_only_those() {
    for (input, trips) in [
        (&b"EHLO a\r\nMAIL FROM:<a@b>\r\n"[..], "pipelining"),
        (&b"GET / HTTP/1.0\r\n"[..], "non_smtp"),
        (&b"EHLO a\nNOOP\r\n"[..], "bare_newline"),
    ] {
        let (addr, l) = untouched_mta().await;
        let shared = lazy_shared(DROP_ALL, addr);
        let (mut c, task) = session(shared.clone()).await;
        read_reply(&mut c).await;
        c.get_mut().write_all(input).await.unwrap();
        let mut last = read_reply(&mut c).await;
        if last.starts_with("250") {
            last = read_reply(&mut c).await;
        }
        assert_eq!(last, "554 5.5.1 SMTP protocol violation\r\n", "{trips}");
        assert_eq!(task.await.unwrap(), Outcome::Protocol, "{trips}");
        assert!(
            shared.metrics.render().contains(&format!(
                "tarpit_protocol_tests_total{{test=\"{trips}\",action=\"drop\"}} 1"
            )),
            "{}",
            shared.metrics.render()
        );
        assert_never_connected(l).await;
    }
}

#[tokio::test(start_paused = true)]
async fn protocol_tests_leave_a_well_behaved_client_alone() {
    let (mta, seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![
            reply("EHLO a", MTA_EHLO),
            reply("MAIL", "250 2.1.0 Ok\r\n"),
            reply("RCPT", "250 2.1.5 Ok\r\n"),
            reply("RCPT", "250 2.1.5 Ok\r\n"),
        ],
    )
    .await;
    let shared = lazy_shared(DROP_ALL, mta);
    let (mut c, _task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    assert!(cmd(&mut c, "EHLO a").await.0.starts_with("250-"));
    // PIPELINING was offered: a pipelined group after the EHLO reply is fine.
    c.get_mut()
        .write_all(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(read_reply(&mut c).await.starts_with("250 "));
    }
    assert_eq!(seen.await.unwrap().1.len(), 4);
    assert!(
        !shared
            .metrics
            .render()
            .contains("tarpit_protocol_tests_total{")
    );
}

#[tokio::test(start_paused = true)]
async fn log_and_strike_keep_the_session_going() {
    let (addr, _l) = untouched_mta().await;
    let shared = lazy_shared(
        "[protocol]\nnon_smtp = \"strike\"\nbare_newline = \"log\"\n",
        addr,
    );
    let (mut c, task) = session(shared.clone()).await;
    read_reply(&mut c).await;
    assert!(cmd(&mut c, "USER bob").await.0.starts_with("502 "));
    c.get_mut().write_all(b"NOOP\nNOOP\r\n").await.unwrap();
    assert!(read_reply(&mut c).await.starts_with("500 "));
    assert!(cmd(&mut c, "QUIT").await.0.starts_with("221 "));
    assert_eq!(task.await.unwrap(), Outcome::Quit);
    let m = shared.metrics.render();
    assert!(
        m.contains("tarpit_protocol_tests_total{test=\"non_smtp\",action=\"strike\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tarpit_protocol_tests_total{test=\"bare_newline\",action=\"log\"} 1"),
        "{m}"
    );
}

#[tokio::test(start_paused = true)]
async fn chunking_told_then_gone_is_a_421_when_the_client_uses_it() {
    let (mta, _seen) = timed_mta(
        "220 mx.fake ESMTP\r\n",
        vec![
            reply(
                "EHLO",
                "250-mx.fake\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n",
            ),
            reply("MAIL", "250 2.1.0 Ok\r\n"),
            reply("RCPT", "250 2.1.5 Ok\r\n"),
            // Nothing of the BDAT reaches it: the agent says goodbye.
            reply("QUIT", "221 bye\r\n"),
        ],
    )
    .await;
    let shared = lazy_shared("", mta);
    let (mut c, task) = session(shared).await;
    read_reply(&mut c).await;
    assert!(cmd(&mut c, "EHLO a").await.0.contains("CHUNKING"));
    assert!(cmd(&mut c, "MAIL FROM:<a@b>").await.0.starts_with("250"));
    assert!(cmd(&mut c, "RCPT TO:<x@y>").await.0.starts_with("250"));
    let (r, _) = cmd(&mut c, "BDAT 5 LAST").await;
    assert!(r.starts_with("421 4.3.0"), "{r}");
    assert_eq!(task.await.unwrap(), Outcome::BackendError);
}
