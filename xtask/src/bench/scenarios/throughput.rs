//! Scenario 1, good mail: smtp-source sends N messages over S concurrent
//! sessions (a new connection per message, as many senders do) into the
//! Postfix test instance, which discards them. Sides: Postfix directly
//! (the baseline), through the agent with every delay 0, through the agent
//! for an allow-listed client (kernel bypass), and through postscreen
//! (client already in its cache, as a regular sender would be). Sides are
//! interleaved round by round; the median round counts.
//!
//! Scenario 5, kernel cost, is measured during the agent's rounds: the run
//! time per packet of each program the agent loaded.
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::agent::{Agent, AgentConfig, base_config};
use super::super::bpfstats::{self, StatsOn, Totals};
use super::super::netns::{BenchNet, SERVER_V4, SERVER_V6};
use super::super::postfix::{self, Postfix};
use super::super::procstat::{self, GroupCpu, MachineCpu};
use super::super::report::{Aim, Scenario, Side};
use super::super::{Env, signal};
use super::{median, zero_delays};

const AGENT_PORT: u16 = 25;
/// The discard transport logs one of these per accepted message.
const SENT: &str = "status=sent";

struct Round {
    msgs_per_s: f64,
    server_cpu_ms_per_msg: f64,
    /// smtp-source's own CPU (user + system) per message.
    client_cpu_ms_per_msg: f64,
    /// The whole machine's busy share during the round (0 to 1): near 1,
    /// the round was bound by CPU, and a side's rate follows its CPU per
    /// message.
    machine_busy: f64,
    agent_cpu_ms_per_msg: Option<f64>,
    accepted: usize,
}

/// The server's address for smtp-source, per family.
fn target(v6: bool, port: u16) -> String {
    if v6 {
        format!("inet:[{SERVER_V6}]:{port}")
    } else {
        format!("{SERVER_V4}:{port}")
    }
}

/// One smtp-source run against `port`, timed; counts what Postfix accepted.
fn one_run(
    env: &Env,
    net: &BenchNet,
    pf: &Postfix,
    port: u16,
    agent: Option<&Agent>,
) -> Result<Round> {
    one_run_to(env, net, pf, &target(false, port), agent)
}

/// An unmeasured short run, so that each path starts its rounds with
/// Postfix's smtpd processes already forked (they are reused after).
fn warm_up(
    env: &Env,
    net: &BenchNet,
    pf: &Postfix,
    target: &str,
    agent: Option<&Agent>,
) -> Result<()> {
    let n = (env.profile.messages / 10).max(env.profile.sessions * 2);
    run_messages(env, net, pf, target, agent, n).map(|_| ())
}

fn one_run_to(
    env: &Env,
    net: &BenchNet,
    pf: &Postfix,
    target: &str,
    agent: Option<&Agent>,
) -> Result<Round> {
    run_messages(env, net, pf, target, agent, env.profile.messages)
}

fn run_messages(
    env: &Env,
    net: &BenchNet,
    pf: &Postfix,
    target: &str,
    agent: Option<&Agent>,
    messages: u32,
) -> Result<Round> {
    let p = &env.profile;
    let sent_before = pf.log_count(SENT);
    let cpu0 = GroupCpu::of_ns(&net.server_ns);
    let agent0 = agent.map(|a| a.cpu_seconds());
    let children0 = procstat::children_cpu();
    let machine0 = MachineCpu::now();
    let start = Instant::now();
    let mut child = net
        .client_cmd("smtp-source")
        .args([
            "-s",
            &p.sessions.to_string(),
            "-m",
            &messages.to_string(),
            "-f",
            "sender@client.bench.test",
            "-t",
            "rcpt@discard.test",
            target,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run smtp-source")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if signal::interrupted() || start.elapsed() > p.throughput_timeout {
            let _ = child.kill();
            let _ = child.wait();
            signal::check()?;
            bail!(
                "smtp-source did not finish {} messages within {:?}",
                messages,
                p.throughput_timeout
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu0.since(&GroupCpu::of_ns(&net.server_ns));
    let client_cpu = (procstat::children_cpu() - children0).max(0.0);
    let machine = machine0.since(&MachineCpu::now());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let agent_cpu = agent0
        .zip(agent.map(|a| a.cpu_seconds()))
        .map(|(a, b)| b - a);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        bail!("smtp-source failed ({status}): {}", err.trim());
    }
    let want = sent_before + messages as usize;
    let seen = pf.wait_log_count(SENT, want, Duration::from_secs(20))?;
    let accepted = seen.saturating_sub(sent_before);
    if accepted < messages as usize {
        bail!(
            "Postfix accepted {accepted} of {} messages; smtp-source said: {}",
            messages,
            err.trim()
        );
    }
    let n = messages as f64;
    Ok(Round {
        msgs_per_s: n / elapsed,
        server_cpu_ms_per_msg: cpu * 1e3 / n,
        client_cpu_ms_per_msg: client_cpu * 1e3 / n,
        machine_busy: (machine.busy / (elapsed * cpus)).min(1.0),
        agent_cpu_ms_per_msg: agent_cpu.map(|c| c * 1e3 / n),
        accepted,
    })
}

fn summarize(name: &str, rounds: &[Round]) -> Side {
    let mut s = Side::new(name);
    s.set(
        "msgs_per_s",
        median(rounds.iter().map(|r| r.msgs_per_s).collect()),
    );
    s.set(
        "server_cpu_ms_per_msg",
        median(rounds.iter().map(|r| r.server_cpu_ms_per_msg).collect()),
    );
    s.set(
        "client_cpu_ms_per_msg",
        median(rounds.iter().map(|r| r.client_cpu_ms_per_msg).collect()),
    );
    // Server and client together: on a box the round keeps busy, the
    // rate a side can reach is the inverse of this.
    s.set(
        "total_cpu_ms_per_msg",
        median(
            rounds
                .iter()
                .map(|r| r.server_cpu_ms_per_msg + r.client_cpu_ms_per_msg)
                .collect(),
        ),
    );
    s.set(
        "machine_busy_pct",
        100.0 * median(rounds.iter().map(|r| r.machine_busy).collect()),
    );
    let agent: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.agent_cpu_ms_per_msg)
        .collect();
    if !agent.is_empty() {
        s.set("agent_cpu_ms_per_msg", median(agent));
    }
    s.set("accepted", rounds.iter().map(|r| r.accepted as f64).sum());
    s.set("rounds", rounds.len() as f64);
    s
}

/// The agent with every delay 0, reaching Postfix as a same-host agent
/// should: over the PROXY smtpd's Unix socket (`backend.addr =
/// "unix:..."`), not a second TCP connection.
fn agent_config(net: &BenchNet, pf: &Postfix) -> AgentConfig {
    agent_tcp_config(net).need(
        "backend.addr",
        format!("\"unix:{}\"", pf.dir.join(postfix::PROXY_UNIX).display()),
    )
}

/// The agent with every delay 0, reaching Postfix's PROXY smtpd over TCP
/// (an MTA on another host, or an agent configured as before).
fn agent_tcp_config(net: &BenchNet) -> AgentConfig {
    zero_delays(base_config(net, AGENT_PORT, postfix::PROXY))
}

/// Sessions the MTA's plain (bypass) listener has taken so far: each
/// logs one "connect from" line.
fn steered_sessions(pf: &Postfix) -> usize {
    pf.log()
        .lines()
        .filter(|l| l.contains(postfix::BYPASS_LOG) && l.contains("]: connect from"))
        .count()
}

/// The agent with the client allow-listed, so that its kernel bypass
/// (sk_lookup) hands the connections straight to the MTA's plain listener.
fn allowlisted_config(net: &BenchNet, pf: &Postfix) -> AgentConfig {
    agent_config(net, pf)
        .need("allow.ips", "[\"198.51.100.0/24\", \"fd5b:1e00::/64\"]")
        .need("bypass.enabled", "true")
        .need(
            "bypass.mta_listeners",
            format!("[\"127.0.0.1:{0}\", \"[::1]:{0}\"]", postfix::BYPASS),
        )
        .want("bypass.ports", format!("[{AGENT_PORT}]"))
        .want("bypass.allowlisted", "true")
        .want("exclude.allowlisted", "true")
        // Fail-open needs programs that outlive the agent; not wanted here.
        .want("bypass.fail_open", "false")
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "good_mail_throughput",
        "Good mail throughput (smtp-source, a new connection per message, discarded)",
    );
    sc.param("messages", p.messages)
        .param("sessions", p.sessions)
        .param("rounds", p.rounds);
    sc.baseline = Some("direct".into());
    let mut kc = Scenario::new(
        "kernel_cost",
        "Kernel cost per packet of each program (BPF run-time stats during scenario 1's agent rounds)",
    );

    let net = BenchNet::new()?;
    let pf = Postfix::start(&net)?;
    // A regular sender is in postscreen's cache: pass the test once.
    let warm = one_run_warm(&net)?;
    // Its log line must not land in the first measured round.
    pf.wait_log_count(SENT, 1, Duration::from_secs(10))?;
    let mut direct = Vec::new();
    let mut direct6 = Vec::new();
    let mut agent6_rounds = Vec::new();
    let mut ps = Vec::new();
    let mut agent_rounds = Vec::new();
    let mut allow_rounds = Vec::new();
    let mut agent_err: Option<String> = None;
    let mut allow_err: Option<String> = None;
    let mut tcp_rounds = Vec::new();
    let mut tcp_err: Option<String> = None;
    let mut ps_err: Option<String> = if warm {
        None
    } else {
        Some("postscreen never passed the warm-up client".into())
    };
    let mut totals = Totals::default();
    let stats = StatsOn::enable();

    for _ in 0..p.rounds {
        signal::check()?;
        if direct.is_empty() {
            warm_up(env, &net, &pf, &target(false, postfix::DIRECT), None)?;
        }
        direct.push(one_run(env, &net, &pf, postfix::DIRECT, None)?);
        direct6.push(one_run_to(
            env,
            &net,
            &pf,
            &target(true, postfix::DIRECT),
            None,
        )?);
        if ps_err.is_none() {
            let r = if ps.is_empty() {
                warm_up(env, &net, &pf, &target(false, postfix::PS_PASS), None)
            } else {
                Ok(())
            };
            match r.and_then(|()| one_run(env, &net, &pf, postfix::PS_PASS, None)) {
                Ok(r) => ps.push(r),
                Err(e) => ps_err = Some(format!("{e:#}")),
            }
        }
        if agent_err.is_none() {
            let r = (|| -> Result<(Round, Round)> {
                let agent = Agent::start(
                    &env.tarpit,
                    &net,
                    &agent_config(&net, &pf),
                    Some(AGENT_PORT),
                )?;
                warm_up(env, &net, &pf, &target(false, AGENT_PORT), Some(&agent))?;
                let ids = agent.pid().map(bpfstats::prog_ids_of).unwrap_or_default();
                let before = bpfstats::snapshot(&ids);
                let r = one_run(env, &net, &pf, AGENT_PORT, Some(&agent))?;
                let r6 = one_run_to(env, &net, &pf, &target(true, AGENT_PORT), Some(&agent))?;
                totals.add(&before, &bpfstats::snapshot(&ids));
                Ok((r, r6))
            })();
            match r {
                Ok((r, r6)) => {
                    agent_rounds.push(r);
                    agent6_rounds.push(r6);
                }
                Err(e) => agent_err = Some(format!("{e:#}")),
            }
        }
        if tcp_err.is_none() {
            let r = (|| -> Result<Round> {
                let cfg = agent_tcp_config(&net);
                let agent = Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?;
                warm_up(env, &net, &pf, &target(false, AGENT_PORT), Some(&agent))?;
                one_run(env, &net, &pf, AGENT_PORT, Some(&agent))
            })();
            match r {
                Ok(r) => tcp_rounds.push(r),
                Err(e) => tcp_err = Some(format!("{e:#}")),
            }
        }
        if allow_err.is_none() {
            let r = (|| -> Result<Round> {
                let cfg = allowlisted_config(&net, &pf);
                let agent = Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?;
                warm_up(env, &net, &pf, &target(false, AGENT_PORT), Some(&agent))?;
                let steered0 = steered_sessions(&pf);
                let r = one_run(env, &net, &pf, AGENT_PORT, Some(&agent))?;
                let steered = steered_sessions(&pf).saturating_sub(steered0);
                if steered < p.messages as usize {
                    bail!(
                        "the kernel bypass did not steer the sessions: {steered} of {} reached \
                         the MTA's plain listener",
                        p.messages
                    );
                }
                Ok(r)
            })();
            match r {
                Ok(r) => allow_rounds.push(r),
                Err(e) => allow_err = Some(format!("{e:#}")),
            }
        }
    }
    sc.sides.push(summarize("direct", &direct));
    sc.sides.push(summarize("direct_v6", &direct6));
    for (name, rounds, err) in [
        ("agent", &agent_rounds, &agent_err),
        ("agent_v6", &agent6_rounds, &agent_err),
        ("agent_tcp_backend", &tcp_rounds, &tcp_err),
        ("agent_allowlisted", &allow_rounds, &allow_err),
        ("postscreen", &ps, &ps_err),
    ] {
        let side = match err {
            Some(e) => Side::unavailable(name, e),
            None => summarize(name, rounds),
        };
        if let Some(e) = err {
            eprintln!("bench: {name} not available: {e}");
        }
        sc.sides.push(side);
    }
    sc.ratio("agent", "direct", "msgs_per_s", Aim::at_least(0.97));
    sc.ratio("agent_v6", "direct_v6", "msgs_per_s", Aim::at_least(0.97));
    sc.ratio("agent_tcp_backend", "direct", "msgs_per_s", None);
    // What CPU alone allows: the direct path's CPU per message over the
    // agent's (server and client). When the rounds keep the box busy
    // (machine_busy_pct near 100), msgs_per_s cannot beat this ratio.
    sc.ratio("direct", "agent", "total_cpu_ms_per_msg", None);
    sc.ratio("direct_v6", "agent_v6", "total_cpu_ms_per_msg", None);
    sc.ratio(
        "agent_allowlisted",
        "direct",
        "msgs_per_s",
        Aim::at_least(0.98),
    );
    sc.ratio("postscreen", "direct", "msgs_per_s", None);
    sc.ratio("agent", "postscreen", "msgs_per_s", Aim::at_least(1.0));
    sc.ratio(
        "agent_allowlisted",
        "postscreen",
        "msgs_per_s",
        Aim::at_least(1.0),
    );
    sc.notes.push(
        "server_cpu_ms_per_msg is every process of the server namespace (Postfix, postscreen, \
         agent) per message. IPv4 unless the side ends in _v6; postscreen, the allow-listed \
         path and agent_tcp_backend run over IPv4 only. The agent reaches Postfix over the \
         PROXY smtpd's Unix socket (backend.addr = \"unix:...\", as on one host); \
         agent_tcp_backend is the same agent over TCP (127.0.0.1)."
            .into(),
    );

    // Scenario 5 from the agent's rounds.
    kc.param("packets_from", "scenario good_mail_throughput, agent side");
    match (&stats, &agent_err) {
        (Err(e), _) => kc
            .sides
            .push(Side::unavailable("programs", format!("{e:#}"))),
        (_, Some(e)) => kc.sides.push(Side::unavailable(
            "programs",
            format!("agent side not available: {e}"),
        )),
        _ if totals.0.is_empty() => kc.sides.push(Side::unavailable(
            "programs",
            "the agent holds no eBPF programs (kernel data plane not loaded)",
        )),
        _ => {
            for (key, t) in &totals.0 {
                let mut s = Side::new(key);
                s.set("runs", t.run_cnt as f64);
                if t.run_cnt > 0 {
                    s.set("ns_per_run", t.run_time_ns as f64 / t.run_cnt as f64);
                }
                kc.sides.push(s);
            }
            let aims: Vec<(String, Option<Aim>)> = totals
                .0
                .iter()
                .map(|(k, t)| (k.clone(), bpfstats::aim_ns_per_run(&t.name, &t.kind)))
                .collect();
            for (key, aim) in aims {
                kc.absolute(&key, "ns_per_run", aim);
            }
        }
    }
    drop(stats);
    drop(pf);
    drop(net);
    Ok(vec![sc, kc])
}

/// One message through postscreen, waiting out its 1 s greet test, so the
/// client is cached as good; true when it passed.
fn one_run_warm(net: &BenchNet) -> Result<bool> {
    let ok = net
        .client_cmd("smtp-source")
        .args([
            "-s",
            "1",
            "-m",
            "1",
            "-f",
            "sender@client.bench.test",
            "-t",
            "rcpt@discard.test",
            &format!("{SERVER_V4}:{}", postfix::PS_PASS),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    Ok(ok)
}
