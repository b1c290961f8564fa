//! Scenario 2, capacity to hold bots: K silent clients held in the
//! greeting delay, spread over several worker processes and many source
//! addresses. Resident memory per held session and CPU of the one process
//! that holds them: the agent, against postscreen holding the same clients
//! in its greet wait. Each side at each level gets a fresh world.
use std::time::Duration;

use anyhow::Result;

use super::super::agent::{Agent, base_config};
use super::super::netns::BenchNet;
use super::super::postfix::{self, Postfix};
use super::super::report::{Aim, Scenario, Side};
use super::super::worker::{self, Mode, Spec, Workers};
use super::super::{Env, procstat, signal};
use super::{TcpTrouble, both_families, judging_pid, zero_delays};

const AGENT_PORT: u16 = 25;
/// Longer than any hold phase: nobody is let through while measured.
const GREETING_DELAY: &str = "\"300s\"";
/// Connects in flight across all workers: below postscreen's listen
/// backlog (100), so that no client believes in a connection the server
/// never queued (a SYN-cookie ACK dropped on a full accept queue).
const CONNECT_CONCURRENCY: u32 = 64;

enum Holder {
    Postscreen,
    Agent,
}

fn measure(env: &Env, holder: &Holder, level: u32) -> Result<Side> {
    let p = &env.profile;
    let name = match holder {
        Holder::Postscreen => format!("postscreen@{level}"),
        Holder::Agent => format!("agent@{level}"),
    };
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    let pf = Postfix::start(&net)?;
    let (port, agent) = match holder {
        Holder::Postscreen => (postfix::PS_HOLD, None),
        Holder::Agent => {
            let cfg = zero_delays(base_config(&net, AGENT_PORT, postfix::PROXY))
                .need("greeting.delay", GREETING_DELAY)
                .want("limits.idle", "\"600s\"")
                .want("limits.max_total_delay", "\"600s\"");
            (
                AGENT_PORT,
                Some(Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?),
            )
        }
    };
    let pid = judging_pid(
        &net,
        &pf,
        agent.as_ref(),
        port,
        Duration::from_millis(500),
        "holds the sessions",
    )?;
    let rss0 = procstat::rss_bytes(pid).unwrap_or(0);
    let cpu0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let slab0 = procstat::kernel_slab_bytes();
    let sockets0 = net.server_tcp_inuse().ok();
    let spec = Spec {
        mode: Mode::Hold,
        targets: both_families(port),
        sources,
        count: level,
        concurrency: CONNECT_CONCURRENCY,
        time_limit_ms: 120_000,
        talk: false,
        connect_rate: 0,
    };
    let trouble = TcpTrouble::before(&net);
    let mut workers = Workers::start(
        &env.self_exe,
        &net,
        p.workers.max(level.div_ceil(15_000)),
        &spec,
    )?;
    let ready = worker::sum(&workers.collect("ready", Duration::from_secs(150))?);
    // A full accept queue leaves clients "connected" whose final ACK the
    // server has not taken yet; it retries, so wait (bounded) for them.
    let mut held = 0;
    signal::wait_until(Duration::from_secs(15), || {
        held = net.established_on(port).unwrap_or(0);
        held >= ready.connected
    })?;
    signal::sleep(Duration::from_millis(500))?;
    let held = net.established_on(port)?.max(held);
    let rss1 = procstat::rss_bytes(pid).unwrap_or(0);
    let cpu1 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let slab1 = procstat::kernel_slab_bytes();
    let sockets1 = net.server_tcp_inuse().ok();
    signal::sleep(p.hold_window)?;
    let cpu2 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let rss2 = procstat::rss_bytes(pid).unwrap_or(0);
    let held_after = net.established_on(port)?;
    workers.release();
    let done = worker::sum(&workers.collect("done", Duration::from_secs(30))?);
    drop(workers);

    let mut s = Side::new(&name);
    trouble.set_since(&net, &mut s);
    s.set("target_sessions", level as f64)
        .set("connected", ready.connected as f64)
        .set("connect_failed", ready.failed as f64)
        .set("held", held as f64)
        .set("held_after_window", held_after as f64)
        .set("closed_early", done.closed_early as f64)
        .set("connect_phase_s", ready.elapsed_ms / 1e3)
        .set("rss_idle_kib", rss0 as f64 / 1024.0)
        .set("rss_held_kib", rss1.max(rss2) as f64 / 1024.0)
        .set("cpu_ms_connect_phase", (cpu1 - cpu0) * 1e3)
        .set(
            "cpu_pct_while_holding",
            (cpu2 - cpu1) / p.hold_window.as_secs_f64() * 100.0,
        );
    if let (Some(a), Some(b)) = (sockets0, sockets1) {
        s.set("server_tcp_sockets_added", b.saturating_sub(a) as f64);
    }
    if let (Some(a), Some(b)) = (slab0, slab1)
        && held > 0
    {
        s.set(
            "kernel_slab_bytes_per_session",
            b.saturating_sub(a) as f64 / held as f64,
        );
    }
    if held > 0 {
        // Held: after the hold window, what the clients cost while they
        // wait; peak: the most seen, the connect burst's leftovers too.
        s.set(
            "rss_bytes_per_session",
            rss2.saturating_sub(rss0) as f64 / held as f64,
        );
        s.set(
            "rss_peak_bytes_per_session",
            rss1.max(rss2).saturating_sub(rss0) as f64 / held as f64,
        );
        s.set(
            "cpu_us_per_session_setup",
            (cpu1 - cpu0) * 1e6 / held as f64,
        );
    }
    if let Some(e) = ready.first_error {
        s.note(format!("first connect error: {e}"));
    }
    if let Some(a) = agent.as_ref()
        && a.pid().is_some_and(|p| procstat::rss_bytes(p).is_none())
    {
        s.note("the agent exited during the hold");
    }
    drop(agent);
    drop(pf);
    drop(net);
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "hold_capacity",
        "Capacity to hold bots in the greeting delay (RSS and CPU of the holding process)",
    );
    sc.param("levels", &p.hold_levels)
        .param("workers", p.workers)
        .param("source_addresses", p.source_addrs)
        .param("hold_window_s", p.hold_window.as_secs_f64());
    sc.baseline = Some(format!("postscreen@{}", p.hold_levels[0]));
    for &level in &p.hold_levels {
        for holder in [Holder::Postscreen, Holder::Agent] {
            signal::check()?;
            let name = match holder {
                Holder::Postscreen => format!("postscreen@{level}"),
                Holder::Agent => format!("agent@{level}"),
            };
            let side = Side::from_result(&name, measure(env, &holder, level));
            signal::check()?;
            sc.sides.push(side);
        }
        let (a, b) = (format!("agent@{level}"), format!("postscreen@{level}"));
        sc.ratio(&a, &b, "rss_bytes_per_session", Aim::at_most(1.0));
        sc.ratio(&a, &b, "cpu_us_per_session_setup", None);
        sc.absolute(&a, "held", Aim::at_least(level as f64));
        if level >= 15_000 {
            // Issue 19: at most half a KiB of agent RSS per held client.
            sc.absolute(&a, "rss_bytes_per_session", Aim::at_most(512.0));
        }
    }
    sc.notes.push(
        "rss_bytes_per_session = (RSS at the end of the hold window, the sessions held - RSS idle) / \
         sessions the server holds (ESTABLISHED on its port, counted by the kernel); \
         rss_peak_bytes_per_session: the same with the larger of that and the RSS right after the \
         connect phase (what a burst of connects leaves behind until the agent trims its heap, \
         a second after the burst). Kernel socket buffers are not in RSS, for either side. \
         kernel_slab_bytes_per_session: the machine's slab growth (/proc/meminfo) over the connect phase per held \
         session, both socket ends (client and server run on this box) and their files and epoll entries; \
         server_tcp_sockets_added: TCP sockets in use in the server namespace (/proc/net/sockstat and sockstat6)."
            .into(),
    );
    sc.notes.push(
        "connect_phase_s, listen_overflows and client_syn_retrans show how fast each side takes \
         new clients: postscreen's listen queue is Postfix's (100 here), so a burst of connects \
         overflows it and clients retry their SYN after 1 s or more; memory and CPU per held \
         session are measured once every client is in."
            .into(),
    );
    Ok(vec![sc])
}
