//! Real MTAs in front of the tarpit: a sending Postfix in the client
//! namespace relays mail to the tarpit-fronted MX (the agent in front of
//! the test Postfix) through the greeting delay, the RCPT tarpit, the
//! delayed 5xx and greylisting. Its own log shows the 451, the retry and
//! the final "sent"; every message lands in the MX's mailbox exactly once
//! per recipient; the unknown recipient comes back to the sender as one
//! bounce with the MX's 550. IPv4 and IPv6.
//!
//! And a real sender callout: a Postfix in the client namespace with
//! `reject_unverified_sender` verifies sender addresses against our MX from
//! an address on the agent's blacklist (60 s per reply). Its probe
//! (`double-bounce@`) is a callout sender, so the blacklist holds spare it
//! and the verification finishes within Postfix's own poll time (3 x 3 s):
//! a valid sender is accepted, an unknown one refused with the MX's 550.
//! A sending Exim does the same relay run, with the MTA connected at the
//! banner and at the transaction (it pipelines MAIL, the RCPTs, `BDAT ...
//! LAST` and QUIT, then shuts its sending side: it still reads the 451s,
//! and the 5xx hold overlaps the RCPT hold).
//!
//! The same callout with a verifying Exim (`verify = sender/callout=30s`, probes
//! from the null sender `<>`).
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tarpit_tests::smtp_client::{agent_config, metric, proxy_backend};
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TempDir, TestNet,
    require_root, unique_id, wait,
};
use testkit::postfix::Instance;

/// main.cf of the sending Postfix: mail for `*4@tarpit.test` goes to the
/// MX's IPv4 address, `*6@tarpit.test` to its IPv6 address, both port 25
/// (the agent), without DNS.
fn sender_main() -> String {
    let mut transport = String::new();
    for local in ["sink", "other", "unknown", "valid", "unknownsender"] {
        transport.push_str(&format!(
            "{{{local}4@tarpit.test = smtp:[{SERVER_V4}]:25}}, {{{local}6@tarpit.test = smtp:[{SERVER_V6}]:25}}, "
        ));
    }
    testkit::postfix::sender_main_cf(&transport)
}

fn start_sender(net: &TestNet, extra: &str, listener: &str) -> Instance {
    let dir = std::env::temp_dir().join(format!("tarpit-sender-{}", unique_id()));
    let main = format!("{}{extra}", sender_main());
    Instance::start_sender(dir, &net.client_ns, &main, listener).expect("sending Postfix")
}

/// Queues a message in the sending Postfix (its sendmail).
fn submit(pf: &Instance, subject: &str, rcpts: &[String]) {
    let body = format!(
        "From: <sender@client.example>\nTo: <{}>\nSubject: {subject}\n\nrelayed by a real MTA\n",
        rcpts.join(">, <")
    );
    pf.submit("sender@client.example", rcpts, &body)
        .expect("sendmail");
}

/// The relay tests' common outcome: every message of `expected` (family,
/// subject) reached the MX exactly once for each known recipient (`sink`,
/// `other`), and the sender got one bounce per message for the unknown
/// one, in its Maildir under `sender_dir`. Returns those bounces.
fn delivered_once_and_bounced(
    mx: &Postfix,
    sender_dir: &Path,
    sender_log: impl Fn() -> String,
    who: &str,
    expected: &[(&str, String)],
) -> Vec<String> {
    let want = expected.len() * 2;
    assert!(
        mx.wait_delivered(want, Duration::from_secs(120)),
        "{} of {want} delivered; {who}:\n{}\nMX:\n{}",
        mx.delivered(),
        sender_log(),
        mx.log()
    );
    let bounces_dir = sender_dir.join("mail/sender");
    assert!(
        wait::until(Duration::from_secs(30), || maildir(&bounces_dir).len()
            >= expected.len()),
        "bounces: {}\n{}",
        maildir(&bounces_dir).len(),
        sender_log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let delivered = mx.messages();
    assert_eq!(delivered.len(), want, "nothing twice");
    for (fam, subject) in expected {
        for local in ["sink", "other"] {
            let rcpt = format!("{local}{fam}@tarpit.test");
            let n = delivered
                .iter()
                .filter(|m| {
                    m.contains(&format!("Subject: {subject}\n"))
                        && m.contains(&format!("Delivered-To: {rcpt}\n"))
                })
                .count();
            assert_eq!(n, 1, "{subject} to {rcpt}: exactly once");
        }
    }
    let bounces = maildir(&bounces_dir);
    assert_eq!(bounces.len(), expected.len(), "one bounce per message");
    bounces
}

fn maildir(dir: &Path) -> Vec<String> {
    ["new", "cur"]
        .iter()
        .filter_map(|d| std::fs::read_dir(dir.join(d)).ok())
        .flat_map(|rd| rd.flatten())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

#[test]
fn a_real_postfix_relays_through_every_delay_and_greylisting_exactly_once() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pins");
    let mx = Postfix::start(&net).expect("MX Postfix");
    let store = TempDir::new("greylist");
    let rest = format!(
        r#"
[greeting]
delay = "2s"
[rcpt]
threshold = 1
delay = "1s"
[reject]
delay = "1s"
[greylist]
mode = "triplet"
min_wait = "2s"
retry_window = "1h"
store = "{}"
"#,
        store.path.join("greylist.db").display()
    );
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).expect("agent");
    let sender = start_sender(&net, "", "");

    let mut expected = Vec::new();
    for fam in ["4", "6"] {
        for n in 0..2 {
            let subject = format!("relay v{fam} #{n}");
            let rcpts: Vec<String> = ["sink", "other", "unknown"]
                .iter()
                .map(|l| format!("{l}{fam}@tarpit.test"))
                .collect();
            submit(&sender, &subject, &rcpts);
            expected.push((fam, subject));
        }
    }
    // Two recipients each reach the MX's Maildir (one file per recipient);
    // the unknown one bounces to the sender.
    let bounces = delivered_once_and_bounced(
        &mx,
        &sender.dir,
        || sender.log(),
        "sending Postfix",
        &expected,
    );
    for (fam, subject) in &expected {
        let b: Vec<&String> = bounces
            .iter()
            .filter(|m| m.contains(&format!("Subject: {subject}\n")))
            .collect();
        assert_eq!(b.len(), 1, "{subject}: one bounce");
        assert!(
            b[0].contains(&format!("unknown{fam}@tarpit.test")) && b[0].contains("550 5.1.1"),
            "the bounce names the MX's 550:\n{}",
            b[0]
        );
    }
    // The sending Postfix's own log: greylisted first, then sent, over
    // both families, the MX's 550 as the reason of the bounce.
    let log = sender.log();
    for (addr, fam) in [(SERVER_V4.to_string(), "4"), (SERVER_V6.to_string(), "6")] {
        let deferred = format!("to=<sink{fam}@tarpit.test>, relay={addr}[{addr}]:25");
        assert!(
            log.lines().any(|l| l.contains(&deferred)
                && l.contains("status=deferred")
                && l.contains("451 4.7.1")),
            "no greylisting 451 for v{fam} in:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&deferred) && l.contains("status=sent")),
            "no retry that was sent for v{fam} in:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("to=<unknown{fam}@tarpit.test>"))
                    && l.contains("status=bounced")
                    && l.contains("550 5.1.1")),
            "no bounce for v{fam} in:\n{log}"
        );
    }
    // The MX saw the real sending MTA.
    for src in [CLIENT_V4.to_string(), CLIENT_V6.to_string()] {
        assert!(
            mx.log().contains(&format!("connect from unknown[{src}]")),
            "MX did not see {src}"
        );
    }
    // The sessions went through the agent's holds.
    for reason in ["greeting", "rcpt", "reject"] {
        let n = metric(&net, &format!("tarpit_delays_total{{reason=\"{reason}\"}}")).unwrap_or(0.0);
        assert!(n >= 1.0, "no {reason} delay counted:\n{}", agent.log());
    }
    assert!(metric(&net, "tarpit_greylist_tempfail_total").unwrap_or(0.0) >= 1.0);
}

#[test]
fn a_real_postfix_sender_callout_from_a_blacklisted_address_finishes_in_time() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pins");
    let mx = Postfix::start(&net).expect("MX Postfix");
    // The verifying MTA's addresses are blacklisted: 60 s for every reply
    // from MAIL FROM on, far beyond Postfix's verification poll (3 x 3 s).
    let rest = format!(
        r#"
[greeting]
delay = "1s"
[blacklist]
delay = "60s"
ips = ["{CLIENT_V4}/32", "{CLIENT_V6}/128"]
"#
    );
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).expect("agent");
    // The verifying Postfix takes mail on 127.0.0.1:2525 of the client
    // namespace and verifies each sender against its MX (ours).
    let verifier = start_sender(
        &net,
        "smtpd_sender_restrictions = reject_unverified_sender
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
address_verify_poll_count = 3
address_verify_poll_delay = 3s
unverified_sender_reject_code = 550
",
        "127.0.0.1:2525 inet n - n - - smtpd\n",
    );
    assert!(
        wait::until(Duration::from_secs(20), || verifier
            .accepts(std::net::SocketAddr::from(([127, 0, 0, 1], 2525)))),
        "{}",
        verifier.log()
    );
    for fam in ["4", "6"] {
        let swaks = |from: &str| {
            let o = net
                .client_cmd("swaks")
                .args(["--server", "127.0.0.1", "--port", "2525", "--timeout", "60"])
                .args([
                    "--from",
                    from,
                    "--to",
                    "sink4@tarpit.test",
                    "--quit-after",
                    "RCPT",
                ])
                .output()
                .expect("swaks");
            String::from_utf8_lossy(&o.stdout).replace('\r', "")
        };
        let good = swaks(&format!("valid{fam}@tarpit.test"));
        assert!(
            good.contains("<-  250 2.1.5 Ok"),
            "v{fam}: the verified sender was not accepted in time:\n{good}\n{}",
            verifier.log()
        );
        let bad = swaks(&format!("unknownsender{fam}@tarpit.test"));
        assert!(
            bad.contains("550 5.1.7")
                && bad.contains("Sender address rejected")
                && bad.contains("said: 550 5.1.1"),
            "v{fam}: the unknown sender was not refused:\n{bad}"
        );
        let probe = format!("to=<valid{fam}@tarpit.test>");
        let addr = if fam == "4" {
            SERVER_V4.to_string()
        } else {
            SERVER_V6.to_string()
        };
        assert!(
            verifier.log().lines().any(|l| l.contains(&probe)
                && l.contains(&format!("relay={addr}[{addr}]:25"))
                && l.contains("status=deliverable")),
            "v{fam}: no probe through the agent in:\n{}",
            verifier.log()
        );
        assert!(
            mx.log().contains("from=<double-bounce@client.example>"),
            "the MX saw the probe:\n{}",
            mx.log()
        );
    }
    assert!(
        !verifier.log().contains("Address verification in progress"),
        "a probe ran out of time:\n{}",
        verifier.log()
    );
    drop(agent);
}

/// A verifying Exim in the client namespace (127.0.0.1:2525 there):
/// `verify = sender/callout=30s` against our MX, routed without DNS to
/// the MX's IPv4 (`*4@tarpit.test`) or IPv6 (`*6@tarpit.test`) address.
fn exim_verifier(dir: &Path, exim: &Path) -> String {
    let d = dir.display();
    let e = exim.display();
    // In Exim's colon-separated host lists an IPv6 address doubles its colons.
    let v6 = SERVER_V6.to_string().replace(':', "::");
    format!(
        r#"exim_path = {e}
exim_user = Debian-exim
exim_group = Debian-exim
keep_environment =
primary_hostname = verifier.client.example
qualify_domain = client.example
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
log_selector = +smtp_connection
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
daemon_smtp_ports = 2525
local_interfaces = 127.0.0.1
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  require verify = sender/callout=30s
  accept

begin routers
to_mx:
  driver = manualroute
  domains = tarpit.test
  route_data = ${{if eq{{${{substr_-1_1:$local_part}}}}{{6}}{{{v6}}}{{{SERVER_V4}}}}}
  transport = remote_smtp
  self = send

begin transports
remote_smtp:
  driver = smtp
  port = 25
"#
    )
}

#[test]
fn a_real_exim_sender_callout_from_a_blacklisted_address_finishes_in_time() {
    if !require_root() {
        return;
    }
    if !tarpit_tests::exim::available() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no Exim: run scripts/install-test-deps.sh"
        );
        eprintln!("skipped: no Exim (scripts/install-test-deps.sh)");
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pins");
    let mx = Postfix::start(&net).expect("MX Postfix");
    let rest = format!(
        r#"
[greeting]
delay = "1s"
[blacklist]
delay = "60s"
ips = ["{CLIENT_V4}/32", "{CLIENT_V6}/128"]
"#
    );
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).expect("agent");
    let verifier =
        tarpit_tests::exim::Exim::start_custom(&net, false, 2525, exim_verifier).expect("exim");
    for fam in ["4", "6"] {
        let swaks = |from: &str| {
            let o = net
                .client_cmd("swaks")
                .args(["--server", "127.0.0.1", "--port", "2525", "--timeout", "90"])
                .args([
                    "--from",
                    from,
                    "--to",
                    "sink4@tarpit.test",
                    "--quit-after",
                    "RCPT",
                ])
                .output()
                .expect("swaks");
            String::from_utf8_lossy(&o.stdout).replace('\r', "")
        };
        let good = swaks(&format!("valid{fam}@tarpit.test"));
        assert!(
            good.contains("<-  250 Accepted"),
            "v{fam}: the verified sender was not accepted:\n{good}\n{}",
            verifier.log()
        );
        let bad = swaks(&format!("unknownsender{fam}@tarpit.test"));
        assert!(
            bad.contains("<** 550") && bad.contains("Sender verify failed"),
            "v{fam}: the unknown sender was not refused:\n{bad}\n{}",
            verifier.log()
        );
        let addr = if fam == "4" {
            SERVER_V4.to_string()
        } else {
            SERVER_V6.to_string()
        };
        assert!(
            mx.log().contains(&format!(
                "reject: RCPT from unknown[{}]",
                if fam == "4" {
                    CLIENT_V4.to_string()
                } else {
                    CLIENT_V6.to_string()
                }
            )),
            "v{fam}: the callout reached the MX through the agent ({addr}):\n{}",
            mx.log()
        );
    }
    assert!(
        !verifier
            .log()
            .contains("Could not complete sender verify callout"),
        "a callout ran out of time:\n{}",
        verifier.log()
    );
    drop(agent);
}

/// A sending Exim in the client namespace: mail for `*4@tarpit.test` and
/// `*6@tarpit.test` goes to the MX's IPv4 or IPv6 address, port 25 (the
/// agent), without DNS; bounces for client.example land in its Maildir;
/// deferred addresses are retried every second.
fn exim_sender(dir: &Path, exim: &Path) -> String {
    let d = dir.display();
    let e = exim.display();
    let v6 = SERVER_V6.to_string().replace(':', "::");
    format!(
        r#"exim_path = {e}
exim_user = Debian-exim
exim_group = Debian-exim
keep_environment =
primary_hostname = exim-sender.client.example
qualify_domain = client.example
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
pid_file_path = {d}/exim.pid
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
daemon_smtp_ports = 2526
local_interfaces = 127.0.0.1
domainlist local_domains = client.example
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept

begin routers
to_mx:
  driver = manualroute
  domains = tarpit.test
  route_data = ${{if eq{{${{substr_-1_1:$local_part}}}}{{6}}{{{v6}}}{{{SERVER_V4}}}}}
  transport = remote_smtp
  self = send
local:
  driver = accept
  domains = +local_domains
  transport = maildir

begin transports
remote_smtp:
  driver = smtp
  port = 25
maildir:
  driver = appendfile
  directory = {d}/mail/sender
  maildir_format
  create_directory
  user = Debian-exim
  group = Debian-exim

begin retry
*   *   F,5m,1s
"#
    )
}

#[test]
fn a_real_exim_relays_through_every_delay_and_greylisting_exactly_once() {
    exim_relays("at-transaction");
}

#[test]
fn a_real_exim_relays_through_every_delay_and_greylisting_exactly_once_at_connect() {
    exim_relays("at-connect");
}

/// The Exim relay run with `backend.connect = mode`.
fn exim_relays(mode: &str) {
    if !require_root() {
        return;
    }
    if !tarpit_tests::exim::available() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no Exim: run scripts/install-test-deps.sh"
        );
        eprintln!("skipped: no Exim (scripts/install-test-deps.sh)");
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pins");
    let mx = Postfix::start(&net).expect("MX Postfix");
    let store = TempDir::new("greylist");
    let rest = format!(
        r#"
[greeting]
delay = "2s"
[rcpt]
threshold = 1
delay = "1s"
[reject]
delay = "1s"
[greylist]
mode = "triplet"
min_wait = "2s"
retry_window = "1h"
store = "{}"
"#,
        store.path.join("greylist.db").display()
    );
    let backend = format!("{}connect = \"{mode}\"\n", proxy_backend());
    let agent = Agent::start(&net, &agent_config(&net, &pins, &backend, &rest)).expect("agent");
    let sender =
        tarpit_tests::exim::Exim::start_custom(&net, false, 2526, exim_sender).expect("exim");
    let mut expected = Vec::new();
    for fam in ["4", "6"] {
        let subject = format!("exim relay v{fam}");
        let rcpts: Vec<String> = ["sink", "other", "unknown"]
            .iter()
            .map(|l| format!("{l}{fam}@tarpit.test"))
            .collect();
        let mut child = Command::new(sender.dir.join("exim4"))
            .arg("-C")
            .arg(sender.dir.join("exim.conf"))
            .args(["-odq", "-f", "sender@client.example"])
            .args(&rcpts)
            .stdin(Stdio::piped())
            .spawn()
            .expect("exim -odq");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(
                format!("From: <sender@client.example>\nSubject: {subject}\n\nrelayed by Exim\n")
                    .as_bytes(),
            )
            .expect("write");
        assert!(
            child.wait().expect("exim").success(),
            "exim refused the message"
        );
        expected.push((fam, subject));
    }
    let bounces = delivered_once_and_bounced(&mx, &sender.dir, || sender.log(), "Exim", &expected);
    let log = sender.log();
    for (addr, fam) in [(SERVER_V4.to_string(), "4"), (SERVER_V6.to_string(), "6")] {
        // Exim pipelines MAIL, the RCPTs, BDAT LAST (CHUNKING) and QUIT,
        // then shuts its sending side: with every RCPT greylisted the
        // agent still answers all of it, so Exim logs the 451 itself, not
        // "Remote host closed connection in response to pipelined end of
        // data" (the agent took that half-close for a client that left).
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("== sink{fam}@tarpit.test"))
                    && l.contains(" defer ")
                    && l.contains("451 4.7.1")),
            "no greylisted (451) first attempt for v{fam} ({mode}) in:\n{log}"
        );
        assert!(
            !log.contains("closed connection"),
            "the agent closed on Exim ({mode}):\n{log}\n{}",
            agent.log()
        );
        let src = if fam == "4" {
            CLIENT_V4.to_string()
        } else {
            format!("[{CLIENT_V6}]")
        };
        let alog = agent.log();
        assert!(
            alog.lines()
                .any(|l| l.contains(&format!("greylisted client={src}:"))
                    && l.contains(&format!("rcpt=\"sink{fam}@tarpit.test\""))),
            "the agent did not greylist v{fam}:\n{alog}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("=> sink{fam}@tarpit.test"))
                    && l.contains(&format!("[{addr}]"))),
            "no delivery for v{fam} in:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("** unknown{fam}@tarpit.test"))
                    && l.contains("550 5.1.1")),
            "no bounce for v{fam} in:\n{log}"
        );
        assert!(
            bounces.iter().any(
                |b| b.contains(&format!("unknown{fam}@tarpit.test")) && b.contains("550 5.1.1")
            ),
            "the bounce names the MX's 550 for v{fam}"
        );
    }
    // Exim's RCPTs come pipelined: the 550's own hold overlaps the RCPT
    // hold of the same reply (the longest wins), so it counts as "rcpt".
    for reason in ["greeting", "rcpt"] {
        let n = metric(&net, &format!("tarpit_delays_total{{reason=\"{reason}\"}}")).unwrap_or(0.0);
        assert!(n >= 1.0, "no {reason} delay counted:\n{}", agent.log());
    }
}
