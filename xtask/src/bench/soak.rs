//! `cargo xtask bench --soak MINUTES`: everything at once for a long time.
//! Bots talk early (and get dropped, later in XDP) and sit silent in the
//! greeting delay, while a real Postfix with its own queue sends good mail
//! through the agent, and the agent is reloaded, killed with SIGKILL and
//! started again at intervals (kernel bypass and fail-open on, so the MTA
//! takes the clients while no agent runs).
//!
//! The good mail is counted by Message-ID in the receiving Postfix's
//! mailbox: sent, delivered once, lost, delivered twice. A duplicate is
//! possible only when the agent dies between the MTA's 250 to the end of
//! DATA and relaying it (RFC 1047's window): the sending Postfix then logs
//! that the message "may be sent more than once", and each duplicate is
//! reported with whether that line explains it. The agent's RSS and
//! descriptor count are sampled throughout and must stay flat within each
//! of its lives.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use testkit::netns::{CLIENT_V4, CLIENT_V6};
use testkit::postfix::{Instance, sender_main_cf};

use super::agent::{Agent, base_config};
use super::netns::{BenchNet, SERVER_V4, SERVER_V6};
use super::postfix::{self, Postfix};
use super::report::{Aim, Scenario, Side};
use super::scenarios::both_families;
use super::worker::{self, Mode, Spec, Workers};
use super::{Env, procstat, signal};

/// The agent's SMTP port (what the sending Postfix's transport names).
const PORT: u16 = 25;
/// Short enough for mail to flow, long enough to hold silent bots.
const GREETING_DELAY: &str = "\"3s\"";
/// Good messages queued per second.
const MESSAGES_PER_SECOND: u32 = 1;
/// Silent bots connected per agent life (the agent's death frees them).
const HELD_PER_LIFE: u32 = 400;
/// How long the queue may take to drain after the load stops.
const DRAIN: Duration = Duration::from_secs(300);
/// Samples of a life younger than this are start-up, not a trend.
const WARM_UP: Duration = Duration::from_secs(30);

/// When the agent is reloaded and killed: five lives (four kills), a
/// reload in the middle of each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub total: Duration,
    pub life: Duration,
    /// How long the agent stays dead before its restart (fail-open time).
    pub dead: Duration,
}

impl Plan {
    pub fn new(minutes: u32) -> Plan {
        let total = Duration::from_secs(u64::from(minutes.max(1)) * 60);
        Plan {
            total,
            life: (total / 5).max(Duration::from_secs(20)),
            dead: Duration::from_secs(3),
        }
    }
}

/// One sample of the agent's footprint.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t: f64,
    /// Which life of the agent (0 = the first start).
    pub life: u32,
    /// Seconds since this life began.
    pub age: f64,
    pub rss_kib: f64,
    pub fds: f64,
}

/// The steepest least-squares slope (per minute) of `value` over `age`
/// among the lives, using the samples past the warm-up; `None` when no
/// life has two such samples.
pub fn steepest_slope(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> Option<f64> {
    let mut lives: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for s in samples {
        if s.age >= WARM_UP.as_secs_f64() {
            lives
                .entry(s.life)
                .or_default()
                .push((s.age / 60.0, value(s)));
        }
    }
    lives
        .values()
        .filter(|pts| pts.len() >= 2)
        .map(|pts| {
            let n = pts.len() as f64;
            let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
            let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
            let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
            let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
            if sxx > 0.0 { sxy / sxx } else { 0.0 }
        })
        .max_by(f64::total_cmp)
}

/// The Message-ID header of a stored message, if any.
pub fn message_id(message: &str) -> Option<&str> {
    for line in message.lines() {
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("message-id")
        {
            return Some(value.trim());
        }
    }
    None
}

/// How often each Message-ID was delivered into a Maildir.
fn delivered_ids(maildir: &Path) -> BTreeMap<String, u32> {
    let mut seen = BTreeMap::new();
    for sub in ["new", "cur"] {
        let Ok(dir) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for e in dir.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path())
                && let Some(id) = message_id(&text)
            {
                *seen.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// Whether the sending Postfix's log says that the message with this
/// Message-ID may have gone out twice: a connection lost or timed out
/// after the end of DATA, before the reply (RFC 1047).
pub fn in_rfc1047_window(sender_log: &str, id: &str) -> bool {
    let queue_ids: Vec<&str> = sender_log
        .lines()
        .filter(|l| l.contains(&format!("message-id={id}")))
        .filter_map(|l| l.split(": ").nth(1))
        .collect();
    sender_log.lines().any(|l| {
        l.contains("may be sent more than once")
            && queue_ids.iter().any(|q| l.contains(&format!(": {q}: ")))
    })
}

/// Counts and notes of the good mail.
#[derive(Debug, Default, PartialEq)]
pub struct MailCount {
    pub sent: u64,
    pub once: u64,
    pub lost: Vec<String>,
    pub twice_in_window: Vec<String>,
    pub twice_outside: Vec<String>,
}

pub fn count_mail(
    sent: &[String],
    delivered: &BTreeMap<String, u32>,
    sender_log: &str,
) -> MailCount {
    let mut c = MailCount {
        sent: sent.len() as u64,
        ..MailCount::default()
    };
    for id in sent {
        match delivered.get(id).copied().unwrap_or(0) {
            0 => c.lost.push(id.clone()),
            1 => c.once += 1,
            _ if in_rfc1047_window(sender_log, id) => c.twice_in_window.push(id.clone()),
            _ => c.twice_outside.push(id.clone()),
        }
    }
    c
}

pub fn run(env: &Env, minutes: u32, out_dir: &Path) -> Result<Vec<Scenario>> {
    let plan = Plan::new(minutes);
    let mut sc = Scenario::new(
        "soak",
        "Soak: good mail from a real Postfix queue while bots are dropped and held, \
         the agent reloaded, killed (-9) and restarted",
    );
    sc.param("minutes", minutes)
        .param("life_s", plan.life.as_secs())
        .param("dead_s", plan.dead.as_secs())
        .param("messages_per_second", MESSAGES_PER_SECOND)
        .param("held_per_life", HELD_PER_LIFE);
    let side = Side::from_result("agent", soak(env, plan, out_dir));
    sc.sides.push(side);
    sc.absolute("agent", "lost", Aim::at_most(0.0));
    sc.absolute(
        "agent",
        "duplicates_outside_rfc1047_window",
        Aim::at_most(0.0),
    );
    sc.absolute("agent", "rss_slope_kib_per_min", Aim::at_most(64.0));
    sc.absolute("agent", "fds_slope_per_min", Aim::at_most(1.0));
    Ok(vec![sc])
}

fn soak(env: &Env, plan: Plan, out_dir: &Path) -> Result<Side> {
    let net = BenchNet::new()?;
    let bots = net.add_client_addrs(20)?;
    let (talkers, silent) = bots.split_at(bots.len() / 2);
    let pf = Postfix::start(&net)?;
    let config = base_config(&net, PORT, postfix::PROXY)
        .need("greeting.delay", GREETING_DELAY)
        .need("greeting.drop_pre_greet", "true")
        .need("bypass.enabled", "true")
        .need(
            "bypass.mta_listeners",
            format!("[\"127.0.0.1:{0}\", \"[::1]:{0}\"]", postfix::BYPASS),
        )
        .need("bypass.ports", format!("[{PORT}]"))
        .need("bypass.fail_open", "true")
        // Fail-open needs programs that outlive the agent.
        .need("kernel.detach_on_exit", "false")
        .want("limits.sessions", "20000")
        .want("limits.per_ip", "20000")
        .want("limits.per_ipv6_prefix", "20000")
        // Silent bots never cost the MTA a process (the MTA's stress mode
        // would cut them off after 10 s), and stay for the agent's life.
        .want("backend.connect", "\"at-transaction\"")
        // Held bots stay for the agent's whole life.
        .want("limits.idle", "\"1h\"")
        .want("limits.max_total_delay", "\"1h\"");
    let mut agent = Agent::start(&env.tarpit, &net, &config, Some(PORT))?;

    let sender_dir = std::env::temp_dir().join(format!("tarpit-bench-sender-{}", net.id));
    let transport = format!(
        "{{soak4@tarpit.test = smtp:[{SERVER_V4}]:{PORT}}}, {{soak6@tarpit.test = smtp:[{SERVER_V6}]:{PORT}}}"
    );
    // The good sender has its own addresses, never a bot's.
    let main = format!(
        "{}smtp_bind_address = {CLIENT_V4}\nsmtp_bind_address6 = {CLIENT_V6}\n",
        sender_main_cf(&transport)
    );
    let sender = Instance::start_sender(sender_dir, &net.client_ns, &main, "")?;

    let ms = plan.total.as_millis() as u64;
    let mut talkers = Workers::start(
        &env.self_exe,
        &net,
        2,
        &Spec {
            mode: Mode::Pregreet,
            targets: both_families(PORT),
            sources: talkers.to_vec(),
            count: 10_000_000,
            concurrency: 20,
            time_limit_ms: ms,
            talk: false,
            connect_rate: 0,
        },
    )?;
    let hold_spec = |n| Spec {
        mode: Mode::Hold,
        targets: both_families(PORT),
        sources: silent.to_vec(),
        count: n,
        concurrency: 50,
        time_limit_ms: 20_000,
        talk: false,
        connect_rate: 100,
    };
    let mut held = Workers::start(&env.self_exe, &net, 1, &hold_spec(HELD_PER_LIFE))?;
    let mut held_total = 0u64;

    let start = Instant::now();
    let mut life = 0u32;
    let mut life_start = start;
    let mut reloaded = false;
    let mut sent: Vec<String> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = start;
    let mut next_message = start;
    let mut events: Vec<String> = Vec::new();
    while start.elapsed() < plan.total {
        signal::check()?;
        let now = Instant::now();
        if now >= next_message {
            let n = sent.len();
            let id = format!("<soak-{n}@client.example>");
            let rcpt = if n.is_multiple_of(2) {
                "soak4"
            } else {
                "soak6"
            };
            let msg = format!(
                "From: <sender@client.example>\nTo: <{rcpt}@tarpit.test>\nMessage-ID: {id}\n\
                 Subject: soak {n}\n\ngood mail number {n}\n"
            );
            sender.submit(
                "sender@client.example",
                &[format!("{rcpt}@tarpit.test")],
                &msg,
            )?;
            sent.push(id);
            next_message += Duration::from_secs(1) / MESSAGES_PER_SECOND;
        }
        if now >= next_sample {
            if let Some(pid) = agent.pid() {
                samples.push(Sample {
                    t: start.elapsed().as_secs_f64(),
                    life,
                    age: life_start.elapsed().as_secs_f64(),
                    rss_kib: procstat::rss_bytes(pid).unwrap_or(0) as f64 / 1024.0,
                    fds: agent.fd_count().unwrap_or(0) as f64,
                });
            }
            next_sample += Duration::from_secs(5);
        }
        let age = life_start.elapsed();
        if !reloaded && age >= plan.life / 2 {
            agent.reload()?;
            events.push(format!("{:.0}s reload", start.elapsed().as_secs_f64()));
            reloaded = true;
        }
        // The restarts' dead time shifts the lives: the last one may be a
        // little short, but not less than half a life.
        let last_life = start.elapsed() + plan.life / 2 > plan.total;
        if age >= plan.life && !last_life {
            held_total += worker::sum(
                &held
                    .collect("ready", Duration::from_secs(5))
                    .unwrap_or_default(),
            )
            .connected;
            agent.kill_hard();
            events.push(format!("{:.0}s kill -9", start.elapsed().as_secs_f64()));
            drop(held);
            // The MTA serves everyone meanwhile (fail-open); mail goes on.
            let dead_until = Instant::now() + plan.dead;
            while Instant::now() < dead_until {
                signal::check()?;
                std::thread::sleep(Duration::from_millis(100));
            }
            agent.restart(&env.tarpit, &net)?;
            events.push(format!("{:.0}s restarted", start.elapsed().as_secs_f64()));
            life += 1;
            life_start = Instant::now();
            reloaded = false;
            held = Workers::start(&env.self_exe, &net, 1, &hold_spec(HELD_PER_LIFE))?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    held_total += worker::sum(
        &held
            .collect("ready", Duration::from_secs(5))
            .unwrap_or_default(),
    )
    .connected;
    drop(held);
    let bots = worker::sum(
        &talkers
            .collect("done", Duration::from_secs(60))
            .unwrap_or_default(),
    );
    drop(talkers);

    // Let the queue drain: every message delivered or given up on.
    let maildir = pf.dir.join("mail/sink");
    let drained = signal::wait_until(DRAIN, || {
        sender.queue_empty() && delivered_ids(&maildir).values().sum::<u32>() as usize >= sent.len()
    })?;
    let sender_log = sender.log();
    let count = count_mail(&sent, &delivered_ids(&maildir), &sender_log);
    if count.once == 0 {
        bail!(
            "no good mail arrived; agent: {}; sender log tail: {}",
            agent.log_tail(),
            tail(&sender_log)
        );
    }
    let mut s = Side::new("agent");
    s.set("minutes", plan.total.as_secs_f64() / 60.0)
        .set("messages_sent", count.sent as f64)
        .set("delivered_once", count.once as f64)
        .set("lost", count.lost.len() as f64)
        .set(
            "delivered_twice",
            (count.twice_in_window.len() + count.twice_outside.len()) as f64,
        )
        .set(
            "duplicates_in_rfc1047_window",
            count.twice_in_window.len() as f64,
        )
        .set(
            "duplicates_outside_rfc1047_window",
            count.twice_outside.len() as f64,
        )
        .set("agent_kills", f64::from(life))
        .set(
            "reloads",
            events.iter().filter(|e| e.ends_with("reload")).count() as f64,
        )
        .set("bots_pregreet_judged", bots.judged as f64)
        .set(
            "bots_pregreet_refused_or_dropped",
            (bots.failed + bots.not_judged) as f64,
        )
        .set("bots_held", held_total as f64)
        .set("sessions_failed_open", failed_open_sessions(&pf) as f64);
    let after_warm_up = || samples.iter().filter(|x| x.age >= WARM_UP.as_secs_f64());
    if let Some(v) = steepest_slope(&samples, |x| x.rss_kib) {
        s.set("rss_slope_kib_per_min", v);
    }
    if let Some(v) = steepest_slope(&samples, |x| x.fds) {
        s.set("fds_slope_per_min", v);
    }
    s.set(
        "rss_kib_max",
        after_warm_up().map(|x| x.rss_kib).fold(0.0, f64::max),
    )
    .set(
        "fds_max",
        after_warm_up().map(|x| x.fds).fold(0.0, f64::max),
    );
    if !drained {
        s.note(format!(
            "the sender's queue was not empty {}s after the load stopped",
            DRAIN.as_secs()
        ));
    }
    for id in &count.lost {
        s.note(format!("lost: {id}"));
    }
    for id in &count.twice_in_window {
        s.note(format!(
            "twice, in RFC 1047's window (the sender logged \"may be sent more than once\"): {id}"
        ));
    }
    for id in &count.twice_outside {
        s.note(format!("twice, NOT explained by RFC 1047's window: {id}"));
    }
    s.note(format!("events: {}", events.join(", ")));
    let csv = out_dir.join("soak-samples.csv");
    write_samples(&csv, &samples)?;
    s.note(format!("RSS and descriptors every 5 s: {}", csv.display()));
    Ok(s)
}

/// Sessions the MTA took itself while no agent ran (fail-open): its plain
/// listener, where sk_lookup steers them, logs one "connect from" each.
fn failed_open_sessions(pf: &Postfix) -> usize {
    pf.log()
        .lines()
        .filter(|l| l.contains(postfix::BYPASS_LOG) && l.contains("]: connect from"))
        .count()
}

fn write_samples(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out = String::from("t_s,life,age_s,rss_kib,fds\n");
    for x in samples {
        out.push_str(&format!(
            "{:.1},{},{:.1},{:.0},{:.0}\n",
            x.t, x.life, x.age, x.rss_kib, x.fds
        ));
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_five_lives() {
        let p = Plan::new(30);
        assert_eq!(p.total, Duration::from_secs(1800));
        assert_eq!(p.life, Duration::from_secs(360));
        assert_eq!(Plan::new(0).life, Duration::from_secs(20));
    }

    #[test]
    fn slope_ignores_warm_up_and_takes_the_steepest_life() {
        let mut v = Vec::new();
        for i in 0..20 {
            let age = i as f64 * 10.0;
            // Life 0: start-up growth, then flat.
            v.push(Sample {
                t: age,
                life: 0,
                age,
                rss_kib: if age < 30.0 { age * 100.0 } else { 5000.0 },
                fds: 10.0,
            });
            // Life 1: 60 KiB a minute.
            v.push(Sample {
                t: 200.0 + age,
                life: 1,
                age,
                rss_kib: 4000.0 + age,
                fds: 10.0,
            });
        }
        let s = steepest_slope(&v, |x| x.rss_kib).unwrap();
        assert!((s - 60.0).abs() < 1e-6, "{s}");
        assert_eq!(steepest_slope(&v, |x| x.fds), Some(0.0));
        assert_eq!(steepest_slope(&v[..2], |x| x.fds), None);
    }

    #[test]
    fn duplicates_are_told_apart_by_the_senders_log() {
        let log = "\
Dec  6 cleanup[1]: A1: message-id=<soak-1@client.example>
Dec  6 cleanup[1]: B2: message-id=<soak-2@client.example>
Dec  6 smtp[2]: A1: to=<soak6@tarpit.test>, relay=[fd5b:1e00::1]:25, status=deferred (lost connection with [fd5b:1e00::1] while sending end of data -- message may be sent more than once)
Dec  6 smtp[2]: B2: to=<soak4@tarpit.test>, status=deferred (lost connection with [198.51.100.1] while receiving the initial server greeting)
";
        let sent: Vec<String> = (0..4)
            .map(|n| format!("<soak-{n}@client.example>"))
            .collect();
        let delivered: BTreeMap<String, u32> = [
            ("<soak-0@client.example>".to_string(), 1),
            ("<soak-1@client.example>".to_string(), 2),
            ("<soak-2@client.example>".to_string(), 2),
        ]
        .into();
        let c = count_mail(&sent, &delivered, log);
        assert_eq!(c.sent, 4);
        assert_eq!(c.once, 1);
        assert_eq!(c.lost, ["<soak-3@client.example>"]);
        assert_eq!(c.twice_in_window, ["<soak-1@client.example>"]);
        assert_eq!(c.twice_outside, ["<soak-2@client.example>"]);
    }

    #[test]
    fn message_id_is_read_from_the_header_only() {
        let m = "Return-Path: <a@b>\nMessage-Id: <x@y>\nSubject: s\n\nMessage-ID: <body@z>\n";
        assert_eq!(message_id(m), Some("<x@y>"));
        assert_eq!(message_id("Subject: s\n\nMessage-ID: <body@z>\n"), None);
    }
}
