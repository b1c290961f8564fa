//! `tarpit ip` and the agent agree on who is spared, blocked, delayed,
//! rejected or greylisted: one precedence rule (`Policy::explain` and
//! `Policy::decide`) serves both. A live agent in front of real Postfix,
//! real DNSBL zones (rbldnsd), the kernel's allow, block and AUTH maps
//! filled with the real `tarpit` binary; each client runs one SMTP
//! session (banner, EHLO, MAIL, RCPT) and what it experienced is compared
//! with what `tarpit ip` says of its address, for every precedence case:
//! allow-listed (kernel and config), allow beating block, internal beating
//! a blacklist entry, authenticated (with and without the once-per-day
//! rule), blacklisted, DNSBL-listed, greylisted, blocked and the master
//! switch off. IPv4 and IPv6.
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{StateFileGuard, agent_for};
use nix::sys::signal::Signal;
use tarpit_tests::smtp_client::{SmtpClient, agent_config, proxy_backend};
use tarpit_tests::{Agent, PinDir, Postfix, Rbldnsd, TempDir, TestNet, require_root, tarpit_bin};

/// The greeting delay and the blacklist delay (MAIL and RCPT replies) are
/// 3 s. A reply this late was held (a little early: the agent counts from
/// accept, the client from connect()).
const HELD: Duration = Duration::from_millis(2750);
/// A reply this early was not held (Postfix and a busy box take well
/// under this).
const PROMPT: Duration = Duration::from_millis(2000);

/// What one client lived through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lived {
    /// The handshake never completed: XDP dropped it.
    Dropped,
    /// No hold anywhere, the RCPT accepted.
    Spared,
    /// Greeting held, nothing else.
    Tarpitted,
    /// Greeting held, then MAIL held (ORF's blacklist delay), RCPT 250.
    Blacklisted,
    /// Greeting and MAIL held, RCPT answered 554 by the agent.
    DnsblRejected,
    /// Greeting held, RCPT answered 451 (greylisting).
    Greylisted,
    /// Anything else: the test fails with this description.
    Other(String),
}

/// What a client must live through when `tarpit ip` gives `verdict`.
fn lived_for(verdict: &str) -> Lived {
    match verdict {
        "allow" | "internal" | "authenticated" | "off" => Lived::Spared,
        "block" => Lived::Dropped,
        "tarpit" => Lived::Tarpitted,
        "blacklisted" => Lived::Blacklisted,
        // The zones here use the `reject` action.
        "dnsbl" => Lived::DnsblRejected,
        "greylist" => Lived::Greylisted,
        other => Lived::Other(format!("unknown verdict {other:?}")),
    }
}

/// One session from `src`: banner, EHLO, MAIL, RCPT, QUIT.
fn live(net: &TestNet, src: IpAddr) -> Lived {
    let Ok(mut c) = SmtpClient::connect(net, src, agent_for(src)) else {
        return Lived::Dropped;
    };
    let mut run = || -> anyhow::Result<Lived> {
        let (banner, greet) = c.timed_reply()?;
        anyhow::ensure!(banner.code == 220, "banner {:?}", banner.text);
        c.expect("EHLO client.example", 250)?;
        let (mail, mail_took) = c.cmd("MAIL FROM:<sender@client.example>")?;
        anyhow::ensure!(mail.code == 250, "MAIL {:?}", mail.text);
        let (rcpt, _) = c.cmd("RCPT TO:<sink@tarpit.test>")?;
        let _ = c.cmd("QUIT");
        let held = |d: Duration| d >= HELD;
        let prompt = |d: Duration| d < PROMPT;
        Ok(match (greet, mail_took, rcpt.code) {
            (g, m, 250) if prompt(g) && prompt(m) => Lived::Spared,
            (g, m, 250) if held(g) && prompt(m) => Lived::Tarpitted,
            (g, m, 250) if held(g) && held(m) => Lived::Blacklisted,
            (g, m, 554) if held(g) && held(m) => Lived::DnsblRejected,
            (g, m, 451) if held(g) && prompt(m) => Lived::Greylisted,
            (g, m, code) => Lived::Other(format!(
                "banner after {g:?}, MAIL after {m:?}, RCPT {code} {:?}",
                rcpt.text
            )),
        })
    };
    run().unwrap_or_else(|e| Lived::Other(e.to_string()))
}

/// `tarpit ip ADDR --json` run as an admin would, in the server namespace
/// (where the DNS servers of the config answer); its verdict and reason.
fn explain(net: &TestNet, agent: &Agent, ip: IpAddr) -> (String, String) {
    let out = net
        .server_cmd(&tarpit_bin().display().to_string())
        .arg("-c")
        .arg(&agent.config)
        .args(["ip", &ip.to_string(), "--json"])
        .output()
        .expect("run tarpit ip");
    assert!(out.status.success(), "tarpit ip {ip}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tarpit ip --json");
    let p = &v["policy"];
    (
        p["verdict"].as_str().unwrap_or_default().to_string(),
        p["reason"].as_str().unwrap_or_default().to_string(),
    )
}

fn cli(net: &TestNet, agent: &Agent, args: &[&str]) {
    let out = net
        .server_cmd(&tarpit_bin().display().to_string())
        .arg("-c")
        .arg(&agent.config)
        .args(args)
        .output()
        .expect("run tarpit");
    assert!(out.status.success(), "tarpit {args:?}: {out:?}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs every client at once, then checks each against `tarpit ip` and
/// the expected verdict. Returns the failures (all of them, not the first).
fn phase(net: &TestNet, agent: &Agent, name: &str, cases: &[(&str, &str)]) -> Vec<String> {
    let lived: Vec<Lived> = std::thread::scope(|s| {
        let hs: Vec<_> = cases
            .iter()
            .map(|(addr, _)| s.spawn(move || live(net, ip(addr))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for ((addr, want), lived) in cases.iter().zip(lived) {
        let (verdict, reason) = explain(net, agent, ip(addr));
        if verdict != *want {
            failures.push(format!(
                "{name}: {addr}: tarpit ip says {verdict:?} ({reason}), expected {want:?}"
            ));
        }
        if lived != lived_for(&verdict) {
            failures.push(format!(
                "{name}: {addr}: tarpit ip says {verdict:?} ({reason}) but the client lived {lived:?}"
            ));
        }
    }
    failures
}

#[test]
fn tarpit_ip_and_the_agent_agree_on_every_precedence_case_v4_and_v6() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _state = StateFileGuard::new(&pins);
    let grey = TempDir::new("agree-grey");
    let addrs = [
        "198.51.100.80", // kernel allow list
        "198.51.100.81", // kernel allow and block lists: allow wins
        "198.51.100.82", // allow.ips
        "198.51.100.83", // allow.internal and blacklist.ips: internal wins
        "198.51.100.84", // authenticated (AUTH map)
        "198.51.100.85", // kernel block list
        "198.51.100.86", // blacklist.ips
        "198.51.100.87", // DNSBL (reject)
        "198.51.100.88", // nothing known
        "198.51.100.89", // authenticated and blacklisted
        "fd5b:1e00::80",
        "fd5b:1e00::86",
        "fd5b:1e00::87",
        "fd5b:1e00::88",
    ];
    for a in addrs {
        net.add_client_addr(ip(a)).unwrap();
    }
    let _rbl = Rbldnsd::start(
        &net,
        &["reject.test:ip4set:reject.zone", "v6.test:ip6trie:v6.zone"],
        &[
            ("reject.zone", "198.51.100.87\n"),
            ("v6.zone", ":127.0.0.2:v6\nfd5b:1e00::87\n"),
        ],
    )
    .expect("rbldnsd");
    let pf = Postfix::start(&net).expect("postfix");
    let config = |top: &str, helo_once: bool, greylist: bool| {
        let greylist = if greylist {
            format!(
                "[greylist]\nmode = \"triplet\"\nmin_wait = \"1h\"\nretry_window = \"2h\"\nstore = \"{}\"\n",
                grey.path.join("greylist.db").display()
            )
        } else {
            String::new()
        };
        agent_config(
            &net,
            &pins,
            &proxy_backend(),
            &format!(
                r#"{top}
[state]
file = "{state}"
[greeting]
delay = "3s"
[blacklist]
delay = "3s"
ips = ["198.51.100.83/32", "198.51.100.86/32", "198.51.100.89/32", "fd5b:1e00::86/128"]
[helo]
authenticated_once_per_day = {helo_once}
[allow]
internal = ["198.51.100.83/32"]
ips = ["198.51.100.82/32"]
[offenders]
enabled = false
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
[dnsbl]
sites = ["reject.test*3", "v6.test*3"]
threshold = 3
action = "reject"
{greylist}
"#,
                state = common::state_file(&pins).display(),
            ),
        )
    };
    let agent = Agent::start(&net, &config("", true, false)).expect("agent");
    for a in ["198.51.100.80/32", "198.51.100.81/32", "fd5b:1e00::80/128"] {
        cli(&net, &agent, &["allow", "add", a]);
    }
    for a in ["198.51.100.81/32", "198.51.100.85/32"] {
        cli(&net, &agent, &["block", "add", a]);
    }
    for a in ["198.51.100.84", "198.51.100.89"] {
        cli(&net, &agent, &["auth", "add", a]);
    }

    let mut failures = phase(
        &net,
        &agent,
        "every list",
        &[
            ("198.51.100.80", "allow"),
            ("198.51.100.81", "allow"),
            ("198.51.100.82", "allow"),
            ("198.51.100.83", "internal"),
            ("198.51.100.84", "authenticated"),
            ("198.51.100.85", "block"),
            ("198.51.100.86", "blacklisted"),
            ("198.51.100.87", "dnsbl"),
            ("198.51.100.88", "tarpit"),
            ("198.51.100.89", "authenticated"),
            ("fd5b:1e00::80", "allow"),
            ("fd5b:1e00::86", "blacklisted"),
            ("fd5b:1e00::87", "dnsbl"),
            ("fd5b:1e00::88", "tarpit"),
        ],
    );

    // The master switch off (a reload): the agent spares everyone; XDP
    // still drops the block list.
    std::fs::write(&agent.config, config("enabled = false", true, false)).unwrap();
    agent.signal(Signal::SIGHUP).unwrap();
    let ok = tarpit_tests::wait::until(Duration::from_secs(20), || {
        agent.log().contains("configuration reloaded")
    });
    assert!(ok, "reload not applied; agent log:\n{}", agent.log());
    failures.extend(phase(
        &net,
        &agent,
        "master switch off",
        &[
            ("198.51.100.80", "allow"),
            ("198.51.100.85", "block"),
            ("198.51.100.86", "off"),
            ("198.51.100.87", "off"),
            ("198.51.100.88", "off"),
            ("fd5b:1e00::86", "off"),
        ],
    ));
    let first_log = agent.log();
    agent.stop().expect("agent stops");

    // Greylisting on (a restart: the mode is read at start), and an
    // authenticated address pays again (the once-per-day rule off): it is
    // greylisted like anybody. The run-time allow entry comes back from
    // the state file; the AUTH map went with the detached programs.
    let agent = Agent::start(&net, &config("", false, true)).expect("agent with greylisting");
    cli(&net, &agent, &["auth", "add", "198.51.100.84"]);
    failures.extend(phase(
        &net,
        &agent,
        "greylisting",
        &[
            ("198.51.100.80", "allow"),
            ("198.51.100.83", "internal"),
            ("198.51.100.84", "greylist"),
            ("198.51.100.88", "greylist"),
            ("fd5b:1e00::88", "greylist"),
        ],
    ));
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}\nfirst agent's log:\n{first_log}\nsecond agent's log:\n{}",
        failures.len(),
        failures.join("\n"),
        agent.log()
    );
    // The spared and accepted clients reached Postfix with their own
    // addresses; the blocked one never did.
    let log = pf.log();
    assert!(log.contains("[198.51.100.80]"), "{log}");
    assert!(!log.contains("[198.51.100.85]"), "{log}");
}
