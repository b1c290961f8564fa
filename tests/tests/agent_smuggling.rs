//! SMTP smuggling and odd command spellings, tried as an attacker would
//! (issue 15): whatever the client sends, no transaction reaches the MTA
//! that the agent did not see, and the agent's policies apply to every
//! one that does.
//!
//! Two backends. Real Postfix, configured as permissively as old installs
//! are (`smtpd_forbid_bare_newline = no`), proves from its own log and
//! mailbox what an MTA makes of the agent's output. Postfix never ends a
//! line at a bare CR and strips CRs before an LF, so it cannot show every
//! byte; the recording MTA (`tarpit_tests::recording_mta`) reads strictly
//! and keeps the exact bytes the agent forwarded.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tarpit_tests::recording_mta::{Options, Recording, RecordingMta, bare_line_endings, count};
use tarpit_tests::smtp_client::{
    Reply, SmtpClient, agent_config, agent_v4, agent_v6, metric, proxy_backend,
};
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root, wait};

/// Postfix as old installs run it: bare LF ends a line (the default before
/// 3.9) and pipelining is not policed. Both parameters exist in the
/// Debian 12 Postfix (3.7.10 and later); they are set anyway, so a newer
/// default cannot make these tests pass for Postfix's sake.
const PERMISSIVE_POSTFIX: &str =
    "smtpd_forbid_bare_newline = no\nsmtpd_forbid_unauth_pipelining = no\n";

/// Greeting delay off: these tests are about what gets through.
const NO_GREETING: &str = "[greeting]\ndelay = \"0s\"\n";

/// End-of-data look-alikes from the public smuggling research (SEC
/// Consult's SMTP smuggling paper and hannob/smtpsmug): each is an end of
/// data for some MTA, none is CRLF.CRLF.
const VARIANTS: &[(&str, &[u8])] = &[
    ("lf.lf", b"\n.\n"),
    ("lf.crlf", b"\n.\r\n"),
    ("cr.cr", b"\r.\r"),
    ("cr.lf", b"\r.\n"),
    ("lf.cr", b"\n.\r"),
    ("crlf.lf", b"\r\n.\n"),
    ("cr.crlf", b"\r.\r\n"),
    ("crlf.cr", b"\r\n.\r"),
    ("crlf.crcrlf", b"\r\n.\r\r\n"),
    ("crcrlf.crcrlf", b"\r\r\n.\r\r\n"),
    ("crlf-nul.crlf", b"\r\n\x00.\r\n"),
    ("crlf.nul-crlf", b"\r\n.\x00\r\n"),
    ("crlf.cr-nul-lf", b"\r\n.\r\x00\n"),
];

/// The smuggled second transaction: a forged sender.
const FORGED: &str = "forged@victim.example";

struct World<B> {
    net: TestNet,
    _pins: PinDir,
    backend: B,
    agent: Agent,
}

fn postfix_world(rest: &str) -> World<Postfix> {
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let pf = Postfix::start_with(&net, PERMISSIVE_POSTFIX).expect("postfix");
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    World {
        net,
        _pins: pins,
        backend: pf,
        agent,
    }
}

/// The recording MTA checks every connection it gets as a client's
/// session, and some tests change its EHLO reply between sessions: here
/// the MTA is connected at the banner (`at-connect`), so there is no probe
/// connection and every EHLO reply a client gets is the MTA's of the
/// moment. What follows MAIL is relayed by the same code in both modes;
/// the Postfix world runs in the default, `at-transaction`.
fn recording_world(opts: Options, rest: &str) -> World<RecordingMta> {
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let mta = RecordingMta::start(&net, opts).expect("recording MTA");
    let backend = format!("{}connect = \"at-connect\"\n", mta.backend_config());
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, rest)).expect("agent");
    World {
        net,
        _pins: pins,
        backend: mta,
        agent,
    }
}

/// The client's two ways in: (source, agent address).
fn sources() -> [(IpAddr, SocketAddr); 2] {
    [
        (IpAddr::from(CLIENT_V4), agent_v4()),
        (IpAddr::from(CLIENT_V6), agent_v6()),
    ]
}

/// What went wrong in a test, collected so that one run shows every
/// variant and spelling that got through, not only the first.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn result(&mut self, what: &str, r: Result<()>) {
        if let Err(e) = r {
            self.0.push(format!("{what}: {e:#}"));
        }
    }

    #[track_caller]
    fn assert_none(&self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problem(s):\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

fn connect(net: &TestNet, src: IpAddr, dst: SocketAddr) -> Result<SmtpClient> {
    let c = SmtpClient::connect(net, src, dst)?;
    // A desynchronised session would otherwise wait the default 30 s.
    c.set_read_timeout(Duration::from_secs(10))?;
    Ok(c)
}

fn reply(c: &mut SmtpClient, what: &str) -> Result<Reply> {
    c.reply()
        .with_context(|| format!("{what}: no reply within 10 s"))
}

fn expect_code(c: &mut SmtpClient, what: &str, code: u16) -> Result<Reply> {
    let r = reply(c, what)?;
    if r.code != code {
        bail!("{what}: expected {code}, got {:?}", r.text);
    }
    Ok(r)
}

/// Sends `line` + CRLF; expects `code`; returns the reply and its time.
fn command(c: &mut SmtpClient, line: &str, code: u16) -> Result<(Reply, Duration)> {
    let t = Instant::now();
    c.send(format!("{line}\r\n").as_bytes())?;
    let r = expect_code(c, &format!("{line:?}"), code)?;
    Ok((r, t.elapsed()))
}

/// Banner, EHLO, MAIL, RCPT, DATA: the client is in the body.
fn open_data(c: &mut SmtpClient) -> Result<()> {
    expect_code(c, "banner", 220)?;
    command(c, "EHLO client.example", 250)?;
    command(c, "MAIL FROM:<alice@client.example>", 250)?;
    command(c, "RCPT TO:<sink@tarpit.test>", 250)?;
    command(c, "DATA", 354)?;
    Ok(())
}

/// A first message, an end-of-data look-alike, a whole second
/// transaction with a forged sender, and the real end: one write.
fn smuggling_body(tag: &str, variant: &[u8]) -> Vec<u8> {
    let mut b = format!("Subject: first {tag}\r\n\r\nline\r\n").into_bytes();
    b.extend_from_slice(variant);
    b.extend_from_slice(
        format!(
            "MAIL FROM:<{FORGED}>\r\nRCPT TO:<sink@tarpit.test>\r\nDATA\r\nSubject: smuggled {tag}\r\n\r\nevil\r\n"
        )
        .as_bytes(),
    );
    b.extend_from_slice(b"\r\n.\r\n");
    b
}

fn tag(name: &str, src: IpAddr) -> String {
    format!("{name} {}", if src.is_ipv4() { "v4" } else { "v6" })
}

/// Sends the smuggling body and expects exactly one reply for it (250),
/// then QUIT's 221: a reply of a second transaction would come first.
fn smuggle_once(net: &TestNet, src: IpAddr, dst: SocketAddr, tag: &str, v: &[u8]) -> Result<()> {
    let mut c = connect(net, src, dst)?;
    open_data(&mut c)?;
    c.send(&smuggling_body(tag, v))?;
    expect_code(&mut c, "end of data", 250)?;
    c.send(b"QUIT\r\n")?;
    let r = reply(&mut c, "QUIT")?;
    if r.code != 221 {
        bail!(
            "QUIT: expected 221, got {:?}: a reply to a second transaction",
            r.text
        );
    }
    Ok(())
}

/// Sends the smuggling body in reject mode: 554 and the session closed.
fn smuggle_rejected(
    net: &TestNet,
    src: IpAddr,
    dst: SocketAddr,
    tag: &str,
    v: &[u8],
) -> Result<()> {
    let mut c = connect(net, src, dst)?;
    open_data(&mut c)?;
    c.send(&smuggling_body(tag, v))?;
    expect_code(&mut c, "a body with a bare line ending", 554)?;
    if !c.closed_within(Duration::from_secs(5)) {
        bail!("the session was not closed after the 554");
    }
    Ok(())
}

/// Runs `f` for every variant from both sources.
fn for_each_variant(
    problems: &mut Problems,
    mut f: impl FnMut(IpAddr, SocketAddr, &str, &[u8]) -> Result<()>,
) {
    for (name, v) in VARIANTS {
        for (src, dst) in sources() {
            let tag = tag(name, src);
            let r = f(src, dst, &tag, v);
            problems.result(&format!("{tag} ({:?})", String::from_utf8_lossy(v)), r);
        }
    }
}

/// The messages in the sink Maildir, as text.
fn mailbox(pf: &Postfix) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(rd) = std::fs::read_dir(pf.dir.join("mail/sink").join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
    }
    out
}

/// The header section of a stored message (Maildir files end lines in LF).
fn headers(msg: &str) -> &str {
    msg.split_once("\n\n").map_or(msg, |(h, _)| h)
}

/// Files anywhere in Postfix's queue: a message the MTA accepted or
/// still holds.
fn queued(pf: &Postfix) -> Vec<PathBuf> {
    fn walk(dir: PathBuf, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for sub in [
        "maildrop", "incoming", "active", "deferred", "hold", "corrupt",
    ] {
        walk(pf.dir.join("queue").join(sub), &mut out);
    }
    out
}

/// The command counts of each of Postfix's `disconnect from` lines for
/// `client` (`ehlo=1 mail=1 ... commands=5`), in order: which commands
/// smtpd read in each session.
fn disconnect_counts(log: &str, client: IpAddr) -> Vec<BTreeMap<String, String>> {
    let needle = format!("disconnect from unknown[{client}]");
    log.lines()
        .filter_map(|l| Some(&l[l.find(&needle)? + needle.len()..]))
        .map(|after| {
            after
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Normalize (the default): every look-alike is body. Postfix gets one
/// message per session with the smuggled transaction as its text, and
/// never a transaction from the forged sender.
#[test]
fn smuggled_transactions_stay_in_the_body_of_one_message_v4_and_v6() {
    if !require_root() {
        return;
    }
    let w = postfix_world(NO_GREETING);
    let pf = &w.backend;
    let mut p = Problems::default();
    for_each_variant(&mut p, |src, dst, tag, v| {
        smuggle_once(&w.net, src, dst, tag, v)
    });
    let n = VARIANTS.len() * 2;
    pf.wait_delivered(n, Duration::from_secs(30));
    // Postfix delivers late ones (and smuggled extra ones) after a moment.
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    p.check(pf.delivered() == n, || {
        format!("{} messages delivered, want exactly {n}", pf.delivered())
    });
    p.check(!log.contains(&format!("from=<{FORGED}>")), || {
        format!("Postfix ran a transaction from <{FORGED}>")
    });
    let queued_senders = count(log.as_bytes(), b"from=<");
    p.check(queued_senders == n, || {
        format!("Postfix logged {queued_senders} from=<...>, want {n} (all alice's)")
    });
    let msgs = mailbox(pf);
    for (name, _) in VARIANTS {
        for (src, _) in sources() {
            let tag = tag(name, src);
            let first = format!("Subject: first {tag}\n");
            let mine: Vec<&String> = msgs.iter().filter(|m| m.contains(&first)).collect();
            let [m] = mine.as_slice() else {
                p.0.push(format!("{tag}: {} messages, want 1", mine.len()));
                continue;
            };
            p.check(
                m.contains(&format!("Subject: smuggled {tag}\n"))
                    && m.contains("\nevil\n")
                    && m.contains(&format!("MAIL FROM:<{FORGED}>\n")),
                || format!("{tag}: the smuggled transaction is not the body text:\n{m}"),
            );
            p.check(m.starts_with("Return-Path: <alice@client.example>"), || {
                format!("{tag}: not alice's message:\n{m}")
            });
        }
    }
    for m in &msgs {
        p.check(!headers(m).contains("Subject: smuggled"), || {
            format!("a smuggled message was delivered as a message of its own:\n{m}")
        });
    }
    if !p.0.is_empty() {
        p.0.push(format!("Postfix log:\n{log}"));
    }
    p.assert_none("smuggling against Postfix, normalize");
    drop(w.agent);
}

/// `bare_line_ending = "reject"`: every look-alike gets 554 and the
/// session ends; Postfix delivers and queues nothing.
#[test]
fn reject_mode_refuses_every_look_alike_and_nothing_is_queued() {
    if !require_root() {
        return;
    }
    let w = postfix_world(&format!(
        "{NO_GREETING}[smtp]\nbare_line_ending = \"reject\"\n"
    ));
    let pf = &w.backend;
    let mut p = Problems::default();
    for_each_variant(&mut p, |src, dst, tag, v| {
        smuggle_rejected(&w.net, src, dst, tag, v)
    });
    let n = VARIANTS.len() * 2;
    // Postfix has seen every session end before its queue is judged.
    let ended = wait::until(Duration::from_secs(15), || {
        count(pf.log().as_bytes(), b"disconnect from unknown[") >= n
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    p.check(ended, || format!("Postfix did not see {n} sessions end"));
    p.check(pf.delivered() == 0, || {
        format!("{} messages delivered, want none", pf.delivered())
    });
    p.check(!log.contains("from=<"), || {
        "Postfix queued a transaction (qmgr logged from=<...>)".to_string()
    });
    let q = queued(pf);
    p.check(q.is_empty(), || format!("Postfix's queue holds {q:?}"));
    if !p.0.is_empty() {
        p.0.push(format!("Postfix log:\n{log}"));
    }
    p.assert_none("smuggling against Postfix, reject");
}

/// What the agent forwards for the same bytes, read strictly: no bare
/// CR, LF or NUL, one CRLF.CRLF (the real end), the smuggled commands
/// only inside the body, and only the client's real commands as commands.
#[test]
fn forwarded_bytes_hold_no_bare_line_ending_and_one_end_of_data() {
    if !require_root() {
        return;
    }
    let w = recording_world(Options::default(), NO_GREETING);
    let mta = &w.backend;
    let mut p = Problems::default();
    for_each_variant(&mut p, |src, dst, tag, v| {
        let i = mta.connections();
        smuggle_once(&w.net, src, dst, tag, v)?;
        let Some(rec) = mta.wait_closed(i, Duration::from_secs(5)) else {
            bail!("the agent's MTA connection {i} did not end");
        };
        check_forwarded(&rec, src, tag)
    });
    p.assert_none("what the agent forwarded");
}

fn check_forwarded(rec: &Recording, src: IpAddr, tag: &str) -> Result<()> {
    let shown = String::from_utf8_lossy(&rec.bytes);
    if rec.proxy_source() != Some(src) {
        bail!("PROXY header names {:?}, not {src}", rec.proxy_source());
    }
    let bare = bare_line_endings(&rec.bytes);
    if !bare.is_empty() {
        bail!("bare CR/LF/NUL forwarded at {bare:?}: {shown:?}");
    }
    let ends = count(&rec.bytes, b"\r\n.\r\n");
    if ends != 1 {
        bail!("{ends} CRLF.CRLF forwarded, want 1: {shown:?}");
    }
    let commands: Vec<String> = rec
        .command_lines()
        .into_iter()
        .filter(|c| c != "NOOP")
        .collect();
    let want = [
        "EHLO client.example",
        "MAIL FROM:<alice@client.example>",
        "RCPT TO:<sink@tarpit.test>",
        "DATA",
        "QUIT",
    ];
    if commands != want {
        bail!("the MTA read the commands {commands:?}, want {want:?}");
    }
    let [body] = rec.bodies.as_slice() else {
        bail!("{} bodies, want 1: {shown:?}", rec.bodies.len());
    };
    let body = String::from_utf8_lossy(body);
    for part in [
        format!("Subject: first {tag}\r\n"),
        format!("MAIL FROM:<{FORGED}>\r\n"),
        format!("Subject: smuggled {tag}\r\n"),
        "\r\nevil\r\n".to_string(),
    ] {
        if !body.contains(&part) {
            bail!("the body lacks {part:?}: {body:?}");
        }
    }
    Ok(())
}

/// Reject mode through the recording MTA: the MTA's connection is closed
/// without an end of data, so no MTA can queue the message.
#[test]
fn reject_mode_closes_the_mta_connection_without_an_end_of_data() {
    if !require_root() {
        return;
    }
    let w = recording_world(
        Options::default(),
        &format!("{NO_GREETING}[smtp]\nbare_line_ending = \"reject\"\n"),
    );
    let mta = &w.backend;
    let mut p = Problems::default();
    for_each_variant(&mut p, |src, dst, tag, v| {
        let i = mta.connections();
        smuggle_rejected(&w.net, src, dst, tag, v)?;
        let Some(rec) = mta.wait_closed(i, Duration::from_secs(5)) else {
            bail!("the agent kept its MTA connection {i} open");
        };
        let shown = String::from_utf8_lossy(&rec.bytes);
        if !rec.bodies.is_empty() || count(&rec.bytes, b"\r\n.\r\n") != 0 {
            bail!("an end of data reached the MTA: {shown:?}");
        }
        let bare = bare_line_endings(&rec.bytes);
        if !bare.is_empty() {
            bail!("bare CR/LF/NUL forwarded at {bare:?}: {shown:?}");
        }
        if shown.contains(FORGED) {
            bail!("text after the bare line ending was forwarded: {shown:?}");
        }
        Ok(())
    });
    p.assert_none("reject mode, seen from the MTA");
}

/// A properly ended message with a second transaction pipelined behind
/// it: the agent reads the second transaction as commands and applies
/// the sender blacklist to it, as Postfix runs it.
#[test]
fn a_pipelined_second_transaction_is_seen_and_held_by_the_agent() {
    if !require_root() {
        return;
    }
    let w = postfix_world(&format!(
        "{NO_GREETING}[blacklist]\ndelay = \"2s\"\nsenders = [\"{FORGED}\"]\n"
    ));
    let pf = &w.backend;
    let mut p = Problems::default();
    for (src, dst) in sources() {
        let r = (|| -> Result<()> {
            let mut c = connect(&w.net, src, dst)?;
            open_data(&mut c)?;
            let t = Instant::now();
            c.send(
                format!(
                    "Subject: first\r\n\r\nline\r\n.\r\nMAIL FROM:<{FORGED}>\r\nRCPT TO:<sink@tarpit.test>\r\nDATA\r\n"
                )
                .as_bytes(),
            )?;
            expect_code(&mut c, "first message", 250)?;
            expect_code(&mut c, "pipelined MAIL", 250)?;
            let held = t.elapsed();
            p.check(held >= Duration::from_secs(2), || {
                format!(
                    "{src}: the blacklisted sender's MAIL reply came after {held:?}, want >= 2 s"
                )
            });
            expect_code(&mut c, "pipelined RCPT", 250)?;
            expect_code(&mut c, "pipelined DATA", 354)?;
            c.send(b"Subject: second\r\n\r\nblacklisted\r\n.\r\n")?;
            expect_code(&mut c, "second message", 250)?;
            command(&mut c, "QUIT", 221)?;
            Ok(())
        })();
        p.result(&format!("{src}"), r);
    }
    pf.wait_delivered(4, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    p.check(pf.delivered() == 4, || {
        format!("{} messages delivered, want 4", pf.delivered())
    });
    let forged = count(log.as_bytes(), format!("from=<{FORGED}>").as_bytes());
    p.check(forged == 2, || {
        format!("Postfix queued {forged} messages from <{FORGED}>, want one per session")
    });
    let held = metric(&w.net, "tarpit_delays_total{reason=\"blacklist\"}").unwrap_or(0.0);
    p.check(held >= 2.0, || format!("blacklist holds counted: {held}"));
    if !p.0.is_empty() {
        p.0.push(format!("Postfix log:\n{log}"));
    }
    p.assert_none("a pipelined second transaction");
}

/// Spellings Postfix reads as commands are commands for the agent too:
/// RCPT with a tab or leading space pays the RCPT delay and reaches
/// Postfix, `DATA<TAB>` delivers once. XCLIENT/XFORWARD in any spelling
/// and command lines with a bare CR, LF or NUL never reach Postfix.
#[test]
fn command_spellings_postfix_accepts_are_policed_and_the_rest_never_reach_it() {
    if !require_root() {
        return;
    }
    let w = postfix_world(&format!(
        "{NO_GREETING}[rcpt]\nthreshold = 0\ndelay = \"2s\"\nscaling = 1.0\n"
    ));
    let pf = &w.backend;
    let mut p = Problems::default();

    // Lenient spellings, one at a time: each RCPT is held.
    let (src1, dst) = sources()[0];
    let r = (|| -> Result<()> {
        let mut c = connect(&w.net, src1, dst)?;
        expect_code(&mut c, "banner", 220)?;
        command(&mut c, "EHLO client.example", 250)?;
        command(&mut c, "MAIL FROM:<alice@client.example>", 250)?;
        for line in ["RCPT\tTO:<tab@tarpit.test>", " RCPT TO:<space@tarpit.test>"] {
            let (_, d) = command(&mut c, line, 250)?;
            p.check(d >= Duration::from_secs(2), || {
                format!("{line:?} was not held as a RCPT: {d:?}")
            });
        }
        let rcpts = metric(&w.net, "tarpit_delays_total{reason=\"rcpt\"}");
        p.check(rcpts == Some(2.0), || {
            format!("RCPT holds counted: {rcpts:?}, want 2")
        });
        command(&mut c, "DATA\t", 354)?;
        c.send(b"Subject: spellings\r\n\r\nbody\r\n")?;
        command(&mut c, ".", 250)?;
        command(&mut c, "QUIT", 221)?;
        Ok(())
    })();
    p.result("lenient spellings", r);
    pf.wait_delivered(2, Duration::from_secs(20));
    pf.wait_log(
        &format!("disconnect from unknown[{src1}]"),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    for rcpt in ["tab@tarpit.test", "space@tarpit.test"] {
        p.check(
            log.lines()
                .any(|l| l.contains(&format!("to=<{rcpt}>")) && l.contains("status=sent")),
            || format!("Postfix did not deliver to {rcpt}"),
        );
    }
    p.check(pf.delivered() == 2, || {
        format!(
            "{} delivered, want 2 (one message, two recipients)",
            pf.delivered()
        )
    });
    let queued = count(log.as_bytes(), b"from=<alice@client.example>");
    p.check(queued == 1, || {
        format!("Postfix queued {queued} messages, want exactly 1")
    });
    match disconnect_counts(&log, src1).last() {
        Some(counts) => p.check(
            counts.get("rcpt").map(String::as_str) == Some("2")
                && counts.get("data").map(String::as_str) == Some("1")
                && !counts.contains_key("unknown"),
            || format!("Postfix's command counts for {src1}: {counts:?}, want rcpt=2 data=1"),
        ),
        None => p.0.push(format!("no disconnect line for {src1}")),
    }

    // Refused spellings: answered by the agent, never forwarded. One
    // session each, so that one that gets through cannot hide the next.
    let (src2, dst) = sources()[1];
    let session = |p: &mut Problems, what: &str, send: &[u8], code: &str| {
        let r = (|| -> Result<()> {
            let mut c = connect(&w.net, src2, dst)?;
            expect_code(&mut c, "banner", 220)?;
            command(&mut c, "EHLO client.example", 250)?;
            command(&mut c, "MAIL FROM:<alice@client.example>", 250)?;
            c.send(send)?;
            let r = reply(&mut c, "the refused line")?;
            if !r.text.starts_with(code) {
                bail!("expected {code}, got {:?}", r.text);
            }
            // Exactly one reply per refused line: QUIT's is next.
            command(&mut c, "QUIT", 221)?;
            Ok(())
        })();
        p.result(what, r);
    };
    let refused: [(&[u8], &str); 8] = [
        (b"XCLIENT\tADDR=127.0.0.1\r\n", "550"),
        (b" XCLIENT ADDR=127.0.0.1\r\n", "550"),
        (b"xforward NAME=x\r\n", "550"),
        (b"XFORWARD\tADDR=127.0.0.1\r\n", "550"),
        (b"RCPT TO:<lf@tarpit.test>\nDATA\r\n", "500 5.5.2"),
        (b"RCPT TO:<cr@tarpit.test>\rDATA\r\n", "500 5.5.2"),
        (b"RCPT TO:<nul@tarpit.test>\x00\r\n", "500 5.5.2"),
        (b"RCPT TO:<nul2\x00@tarpit.test>\r\n", "500 5.5.2"),
    ];
    for (send, code) in refused {
        let what = format!("{:?}", String::from_utf8_lossy(send));
        session(&mut p, &what, send, code);
    }
    let needle = format!("disconnect from unknown[{src2}]");
    let ended = wait::until(Duration::from_secs(10), || {
        count(pf.log().as_bytes(), needle.as_bytes()) >= refused.len()
    });
    p.check(ended, || {
        format!("Postfix did not see {} sessions end", refused.len())
    });
    let log = pf.log();
    for counts in disconnect_counts(&log, src2) {
        for never in ["xclient", "xforward", "rcpt", "data", "unknown"] {
            p.check(!counts.contains_key(never), || {
                format!("Postfix read a {never} command of the client: {counts:?}")
            });
        }
    }
    for addr in ["lf@", "cr@", "nul@", "nul2"] {
        p.check(!log.contains(addr), || format!("{addr} reached Postfix"));
    }
    if !p.0.is_empty() {
        p.0.push(format!("Postfix log:\n{log}"));
    }
    p.assert_none("command spellings");
}

/// BDAT only when the MTA offered CHUNKING: refused with 502 and nothing
/// of it (command or chunk) forwarded when it did not, relayed in
/// canonical spelling with its bytes intact when it did.
#[test]
fn bdat_reaches_the_mta_only_when_it_offered_chunking() {
    if !require_root() {
        return;
    }
    let w = recording_world(Options::default(), NO_GREETING);
    let mta = &w.backend;
    let mut p = Problems::default();

    let r = (|| -> Result<()> {
        let mut c = connect(&w.net, CLIENT_V4.into(), agent_v4())?;
        expect_code(&mut c, "banner", 220)?;
        let (ehlo, _) = command(&mut c, "EHLO client.example", 250)?;
        p.check(!ehlo.text.contains("CHUNKING"), || {
            format!("CHUNKING offered: {}", ehlo.text)
        });
        command(&mut c, "MAIL FROM:<alice@client.example>", 250)?;
        command(&mut c, "RCPT TO:<sink@tarpit.test>", 250)?;
        c.send(b"BDAT 5 LAST\r\nxyzzy")?;
        expect_code(&mut c, "BDAT without CHUNKING", 502)?;
        // Whether the agent takes the 5 bytes as the refused chunk or, as
        // an MTA without CHUNKING would, as the start of the next command
        // line, is its choice; the session must stay in step either way.
        c.send(b"RSET\r\nQUIT\r\n")?;
        for _ in 0..3 {
            if reply(&mut c, "after the refused BDAT")?.code == 221 {
                return Ok(());
            }
        }
        bail!("no 221 for QUIT within three replies")
    })();
    p.result("without CHUNKING", r);
    match mta.wait_closed(0, Duration::from_secs(5)) {
        Some(rec) => {
            let shown = String::from_utf8_lossy(&rec.bytes).into_owned();
            p.check(
                !shown.to_ascii_uppercase().contains("BDAT")
                    && !shown.contains("xyzzy")
                    && rec.chunks.is_empty(),
                || format!("BDAT or its chunk reached an MTA without CHUNKING: {shown:?}"),
            );
        }
        None => p.0.push("the first MTA connection did not end".into()),
    }

    mta.set_chunking(true);
    let r = (|| -> Result<()> {
        let mut c = connect(&w.net, CLIENT_V6.into(), agent_v6())?;
        expect_code(&mut c, "banner", 220)?;
        let (ehlo, _) = command(&mut c, "EHLO client.example", 250)?;
        p.check(ehlo.text.contains("CHUNKING"), || {
            format!("CHUNKING not relayed: {}", ehlo.text)
        });
        for bdat in ["BDAT 5 LAST", "bdat\t5 LAST"] {
            command(&mut c, "MAIL FROM:<alice@client.example>", 250)?;
            command(&mut c, "RCPT TO:<sink@tarpit.test>", 250)?;
            c.send(format!("{bdat}\r\nxyzzy").as_bytes())?;
            expect_code(&mut c, &format!("{bdat:?} with CHUNKING"), 250)?;
        }
        command(&mut c, "QUIT", 221)?;
        Ok(())
    })();
    p.result("with CHUNKING", r);
    match mta.wait_closed(1, Duration::from_secs(5)) {
        Some(rec) => {
            let shown = String::from_utf8_lossy(&rec.bytes).into_owned();
            // The agent may send a last chunk as `BDAT n` and an empty
            // `BDAT 0 LAST` after the end-of-data hold: the bytes and one
            // LAST per message are what count.
            let chunks = rec.chunks.concat();
            p.check(chunks == b"xyzzyxyzzy", || {
                format!("chunks {:?}, want xyzzy twice: {shown:?}", rec.chunks)
            });
            let bdats: Vec<String> = rec
                .command_lines()
                .into_iter()
                .filter(|l| l.to_ascii_uppercase().starts_with("BDAT"))
                .collect();
            p.check(bdats.iter().all(|b| canonical_bdat(b)), || {
                format!("BDAT forwarded as {bdats:?}, want canonical: {shown:?}")
            });
            let lasts = bdats.iter().filter(|b| b.ends_with(" LAST")).count();
            p.check(lasts == 2, || {
                format!("{lasts} BDAT ... LAST forwarded, want one per message: {shown:?}")
            });
            p.check(bare_line_endings(&rec.bytes).is_empty(), || {
                format!("bare CR/LF/NUL forwarded: {shown:?}")
            });
        }
        None => p.0.push("the second MTA connection did not end".into()),
    }
    p.assert_none("BDAT and CHUNKING");
}

/// `BDAT <size>` or `BDAT <size> LAST`, upper case, single spaces.
fn canonical_bdat(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("BDAT ") else {
        return false;
    };
    let size = match rest.split_once(' ') {
        Some((size, "LAST")) => size,
        Some(_) => return false,
        None => rest,
    };
    !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit())
}
