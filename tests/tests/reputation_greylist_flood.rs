//! The greylist under a flood of random recipients from one client
//! network (issue 16): thousands of pipelined RCPTs with long, never-seen
//! addresses, from several addresses of one /24 at once. Real agent in
//! front of real Postfix; Postfix logs every RCPT it is given (an `INFO`
//! access rule), so the test can tell what reached it.
//!
//! What a user relies on: the agent's memory and the store's file stay
//! within the bounds docs/reputation.md states (the network's share of
//! pending entries, not one entry per RCPT), a triplet that passed before
//! the flood keeps passing during and after it (also from the flooding
//! network), every flooded RCPT gets the same 451, and none reaches the MTA.
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, message, metric, proxy_backend,
};
use tarpit_tests::{Agent, CLIENT_V4, PinDir, Postfix, TempDir, TestNet, require_root};

/// The flood: sessions at once, each this many RCPTs in pipelined batches.
const SESSIONS: u32 = 4;
const RCPTS: u32 = 1000;
const BATCH: u32 = 100;
/// The greylist's bounds for the test.
const MAX_PENDING: usize = 200;
const PER_NETWORK: usize = 50;
const MAX_KNOWN: usize = 100;
/// Stated in docs/reputation.md ("Memory and file size").
const PENDING_BYTES: usize = 115;
const KNOWN_BYTES: usize = 58;
const LINE_BYTES: usize = 69;
const HEADER_BYTES: usize = 35;
/// Room for what the sessions themselves hold (pipelined lines, buffers
/// the allocator keeps): generous, yet far below the ~8 MB of addresses
/// the flood sends (4000 x ~1.9 KB), which an unbounded store would keep
/// in memory and in its file.
const SESSION_SLACK: usize = 6 << 20;

const GOOD_SENDER: &str = "good@partner.example";
const GOOD_RCPT: &str = "sink@tarpit.test";

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

/// A small xorshift: random recipients without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A never-seen address of about 1.9 KB (the agent's line limit is 2 KB).
    fn recipient(&mut self) -> String {
        let mut local = String::from("flood-");
        while local.len() < 1850 {
            local.push_str(&format!("{:016x}", self.next()));
        }
        format!("{local}@tarpit.test")
    }
}

fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One session of the known-good triplet up to its RCPT; the RCPT's code.
fn good_rcpt(net: &TestNet, deliver: bool) -> u16 {
    let mut c = SmtpClient::connect(net, CLIENT_V4.into(), agent_v4()).expect("connect");
    c.reply().expect("banner");
    c.expect("EHLO good.partner.example", 250).expect("EHLO");
    c.expect(&format!("MAIL FROM:<{GOOD_SENDER}>"), 250)
        .expect("MAIL");
    let (r, _) = c.cmd(&format!("RCPT TO:<{GOOD_RCPT}>")).expect("RCPT");
    if deliver && r.code == 250 {
        c.expect("DATA", 354).expect("DATA");
        c.send(format!("{}.\r\n", message("greylist flood")).as_bytes())
            .unwrap();
        let end = c.reply().expect("end of data");
        assert_eq!(end.code, 250, "{}", end.text);
    }
    let _ = c.cmd("QUIT");
    r.code
}

/// One flooding session: `RCPTS` random recipients, `BATCH` per write;
/// returns the replies' texts that were not the greylist's 451.
fn flood_session(net: &TestNet, src: IpAddr, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed | 1);
    let mut c = SmtpClient::connect(net, src, agent_v4()).expect("connect");
    c.reply().expect("banner");
    c.expect("EHLO bot.example", 250).expect("EHLO");
    c.expect("MAIL FROM:<bot@spam.example>", 250).expect("MAIL");
    let mut odd = Vec::new();
    for _ in 0..RCPTS / BATCH {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            batch.extend_from_slice(format!("RCPT TO:<{}>\r\n", rng.recipient()).as_bytes());
        }
        c.send(&batch).expect("pipelined RCPTs");
        for _ in 0..BATCH {
            let r = c.reply().expect("RCPT reply");
            if !r.text.starts_with("451 4.7.1 Greylisted") {
                odd.push(r.text);
            }
        }
    }
    let _ = c.cmd("QUIT");
    odd
}

#[test]
fn reputation_greylist_flood_stays_bounded_and_known_triplets_pass() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().unwrap();
    let flooders: Vec<IpAddr> = (10..10 + SESSIONS as u8).map(v4).collect();
    for a in &flooders {
        net.add_client_addr(*a).unwrap();
    }
    let pins = PinDir::new().unwrap();
    // Postfix logs every RCPT it is given, then applies the usual rules.
    let pf = Postfix::start_with(
        &net,
        "smtpd_recipient_restrictions =\n  check_recipient_access regexp:{ {/./ INFO rcpt seen} }\n  \
         check_recipient_access regexp:{ {/^unknown[^@]*@tarpit\\.test>?$$/ 550 5.1.1 User unknown} }\n",
    )
    .expect("postfix");
    let dir = TempDir::new("grey-flood");
    let store = dir.path.join("grey/greylist.db");
    let rest = format!(
        r#"
[greeting]
delay = "0s"
[rcpt]
delay = "0s"
[greylist]
mode = "triplet"
min_wait = "2s"
retry_window = "10m"
store = "{}"
max_pending = {MAX_PENDING}
pending_per_network = {PER_NETWORK}
max_entries = {MAX_KNOWN}
"#,
        store.display()
    );
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).expect("agent");

    // A real sender's triplet passes its greylisting before the flood.
    assert_eq!(good_rcpt(&net, false), 451, "first attempt greylisted");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(good_rcpt(&net, true), 250, "retry passes");
    assert!(
        pf.wait_log("rcpt seen", Duration::from_secs(10)),
        "Postfix logs the RCPTs it sees:\n{}",
        pf.log()
    );
    let pid = agent.pid().expect("agent pid");
    let rss_before = rss_bytes(pid);
    assert!(rss_before > 0);

    // The flood: every session at once, from four addresses of one /24.
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let odd: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = flooders
            .iter()
            .enumerate()
            .map(|(i, src)| {
                let net = &net;
                s.spawn(move || flood_session(net, *src, seed.wrapping_add(i as u64 * 7919)))
            })
            .collect();
        // Meanwhile the known triplet keeps passing, from the same /24.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            good_rcpt(&net, false),
            250,
            "known triplet during the flood"
        );
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        odd.is_empty(),
        "every flooded RCPT gets the same 451: {odd:?}"
    );
    assert_eq!(good_rcpt(&net, true), 250, "known triplet after the flood");

    // Memory: the tables hold the network's share, not one entry per RCPT.
    let m = |name: &str| metric(&net, name).unwrap_or(-1.0);
    let pending = m("tarpit_greylist_entries{table=\"pending\"}");
    let known = m("tarpit_greylist_entries{table=\"known\"}");
    assert!(
        (0.0..=PER_NETWORK as f64).contains(&pending),
        "pending {pending}"
    );
    assert!((1.0..=MAX_KNOWN as f64).contains(&known), "known {known}");
    let flooded = f64::from(SESSIONS * RCPTS);
    assert!(
        m("tarpit_greylist_network_capped_total") >= flooded - PER_NETWORK as f64,
        "capped: {}",
        m("tarpit_greylist_network_capped_total")
    );
    assert!(m("tarpit_greylist_tempfail_total") >= flooded);
    let rss_after = rss_bytes(pid);
    let table_bound = MAX_PENDING * PENDING_BYTES + MAX_KNOWN * KNOWN_BYTES;
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!(
        "agent RSS {rss_before} -> {rss_after} bytes (+{grown}); tables at most {table_bound}"
    );
    assert!(
        grown <= table_bound + SESSION_SLACK,
        "agent RSS grew by {grown} bytes ({rss_before} -> {rss_after})"
    );

    // The store: within its stated size, and no address in it.
    agent.stop().expect("agent stops");
    let text = std::fs::read_to_string(&store).expect("store");
    let entries = PER_NETWORK + MAX_KNOWN;
    let bound = HEADER_BYTES + (2 * entries + 1000) * LINE_BYTES;
    eprintln!(
        "store: {} bytes, {} lines",
        text.len(),
        text.lines().count()
    );
    assert!(text.len() <= bound, "{} bytes > {bound}", text.len());
    assert!(!text.contains("flood-") && !text.contains("tarpit.test"));
    let _ = std::io::stderr().flush();

    // The MTA never saw a flooded RCPT (it saw the sessions' MAIL).
    std::thread::sleep(Duration::from_millis(300));
    let log = pf.log();
    assert!(!log.contains("flood-"), "a flooded RCPT reached Postfix");
    assert!(
        log.contains("[198.51.100.10]"),
        "the flood's sessions reached Postfix:\n{log}"
    );
    assert!(pf.wait_delivered(2, Duration::from_secs(20)));
    let seen = log
        .lines()
        .filter(|l| l.contains("rcpt seen") && l.contains(&format!("to=<{GOOD_RCPT}>")))
        .count();
    assert_eq!(seen, 3, "the known triplet's RCPTs reached Postfix:\n{log}");
}
