//! Scenario 3, pre-greet flood: clients that talk before the banner, as
//! fast as the generators go. Sessions judged (a 5xx verdict) per second
//! and CPU per session: the agent (greeting delay, drop_pre_greet) against
//! postscreen with `postscreen_greet_action = drop`.
use std::time::Duration;

use anyhow::Result;

use super::super::agent::{Agent, base_config};
use super::super::netns::BenchNet;
use super::super::postfix::{self, Postfix};
use super::super::procstat::{self, GroupCpu};
use super::super::report::{Aim, Scenario, Side};
use super::super::worker::{self, Mode, Spec, Workers};
use super::super::{Env, signal};
use super::{both_families, judging_pid, zero_delays};

const AGENT_PORT: u16 = 25;
/// Sessions in flight across all workers.
const CONCURRENCY: u32 = 64;
/// Issue 19's aims for a pre-greet talker judged and dropped: CPU of the
/// agent's side (its server namespace: the agent, and the kernel's work
/// charged to it) in µs, and that figure against postscreen's (postscreen,
/// master and postlogd) in the same run.
const AIM_US_PER_SESSION: f64 = 25.0;
const AIM_RATIO: f64 = 0.5;

fn measure(env: &Env, agent_side: bool) -> Result<Side> {
    let p = &env.profile;
    let name = if agent_side { "agent" } else { "postscreen" };
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    let pf = Postfix::start(&net)?;
    let (port, agent) = if agent_side {
        let cfg = zero_delays(base_config(&net, AGENT_PORT, postfix::PROXY))
            .need("greeting.delay", "\"5s\"")
            .need("greeting.drop_pre_greet", "true")
            // Repeat offenders would be block-listed in XDP after a few
            // strikes and never judged again: measure the judging itself.
            .want("offenders.enabled", "false");
        (
            AGENT_PORT,
            Some(Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?),
        )
    } else {
        (postfix::PS_DROP, None)
    };
    let pid = judging_pid(
        &net,
        &pf,
        agent.as_ref(),
        port,
        Duration::from_millis(300),
        "judges the sessions",
    )?;
    let cpu0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let ns0 = GroupCpu::of_ns(&net.server_ns);
    let spec = Spec {
        mode: Mode::Pregreet,
        targets: both_families(port),
        sources,
        count: p.pregreet_sessions,
        concurrency: CONCURRENCY,
        time_limit_ms: p.pregreet_time.as_millis() as u64,
        talk: false,
        connect_rate: 0,
    };
    let mut workers = Workers::start(&env.self_exe, &net, p.workers, &spec)?;
    let r = worker::sum(&workers.collect("done", p.pregreet_time + Duration::from_secs(40))?);
    let cpu = procstat::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let ns_cpu = ns0.since(&GroupCpu::of_ns(&net.server_ns));
    drop(workers);
    let sessions = (r.judged + r.not_judged) as f64;
    let mut s = Side::new(name);
    s.set("sessions", sessions)
        .set("judged", r.judged as f64)
        .set("not_judged", r.not_judged as f64)
        .set("failed", r.failed as f64)
        .set("elapsed_s", r.elapsed_ms / 1e3)
        .set(
            "judged_per_s",
            r.judged as f64 / (r.elapsed_ms / 1e3).max(1e-3),
        )
        .set("cpu_s", cpu);
    if sessions > 0.0 {
        s.set("cpu_us_per_session", cpu * 1e6 / sessions);
        s.set("server_ns_cpu_us_per_session", ns_cpu * 1e6 / sessions);
    }
    if let Some(e) = r.first_error {
        s.note(format!("first error: {e}"));
    }
    drop(agent);
    drop(pf);
    drop(net);
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "pregreet_flood",
        "Pre-greet flood: clients that talk first; sessions judged per second and CPU per session",
    );
    sc.param("sessions_max", p.pregreet_sessions)
        .param("time_max_s", p.pregreet_time.as_secs_f64())
        .param("concurrency", CONCURRENCY)
        .param("workers", p.workers);
    sc.baseline = Some("postscreen".into());
    for agent_side in [false, true] {
        signal::check()?;
        let name = if agent_side { "agent" } else { "postscreen" };
        let side = Side::from_result(name, measure(env, agent_side));
        signal::check()?;
        sc.sides.push(side);
    }
    // The gates, on the comparable figure: every process of the
    // server namespace on each side (postscreen pays master and postlogd
    // for what the agent does in one process).
    sc.absolute(
        "agent",
        "server_ns_cpu_us_per_session",
        Aim::at_most(AIM_US_PER_SESSION),
    );
    sc.ratio(
        "agent",
        "postscreen",
        "server_ns_cpu_us_per_session",
        Aim::at_most(AIM_RATIO),
    );
    sc.ratio("agent", "postscreen", "cpu_us_per_session", None);
    sc.ratio("agent", "postscreen", "judged_per_s", None);
    sc.notes.push(
        "The agent's repeat-offender block list is off here (offenders.enabled = false): with it, \
         these sources would be dropped in XDP after a few strikes, so fewer sessions would need \
         judging at all."
            .into(),
    );
    sc.notes.push(
        "cpu_us_per_session: the judging process only (postscreen, or the agent); \
         server_ns_cpu_us_per_session: every process of the server namespace (Postfix master and log daemon too), \
         the comparable figure and the one the aims (<= 25 us, <= 0.5x postscreen) apply to. CPU is read from /proc \
         in 10 ms ticks over about a second of judging: about 1 us per session before a busy box's noise."
            .into(),
    );
    Ok(vec![sc])
}
