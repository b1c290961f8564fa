//! Scenario 6, delay accuracy: K sessions wait in the greeting delay at
//! once; how late does each greeting come, against the configured delay
//! (from the client's connect to the final `220 ` line)?
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use super::super::agent::{Agent, base_config};
use super::super::netns::BenchNet;
use super::super::postfix::{self, Postfix};
use super::super::report::{Aim, Scenario, Side};
use super::super::sink::SmtpSink;
use super::super::worker::{self, Mode, Spec, Workers};
use super::super::{Env, signal};
use super::{TcpTrouble, both_families, quantile, zero_delays};

const AGENT_PORT: u16 = 25;
/// Connects in flight across all workers (as in the hold scenario).
const CONNECT_CONCURRENCY: u32 = 64;

/// Port of the smtp-sink backend inside the server namespace.
const SINK_PORT: u16 = 2600;

#[derive(Clone, Copy)]
enum Backend {
    /// smtp-sink: greets at once, so lateness is the agent's own.
    Sink,
    /// The Postfix instance: lateness includes starting an smtpd.
    Postfix,
}

fn measure(env: &Env, backend: Backend) -> Result<Side> {
    let p = &env.profile;
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    let delay = p.lateness_delay;
    let (_pf, _sink, cfg) = match backend {
        Backend::Postfix => (
            Some(Postfix::start(&net)?),
            None,
            base_config(&net, AGENT_PORT, postfix::PROXY),
        ),
        Backend::Sink => (
            None,
            Some(SmtpSink::start(
                &net,
                SocketAddr::from(([127, 0, 0, 1], SINK_PORT)),
            )?),
            // smtp-sink knows no PROXY header: v1 is one text line, which
            // it answers with an error after its greeting; the greeting
            // (what is timed) is unaffected.
            base_config(&net, AGENT_PORT, SINK_PORT).want("backend.client_address", "\"proxy-v1\""),
        ),
    };
    let cfg = zero_delays(cfg).need("greeting.delay", format!("\"{}ms\"", delay.as_millis()));
    let agent = Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?;
    let spec = Spec {
        mode: Mode::Lateness {
            delay_ms: delay.as_millis() as u64,
        },
        targets: both_families(AGENT_PORT),
        sources,
        count: p.lateness_sessions,
        concurrency: CONNECT_CONCURRENCY,
        time_limit_ms: 60_000,
        talk: false,
        connect_rate: 0,
    };
    let trouble = TcpTrouble::before(&net);
    let mut workers = Workers::start(&env.self_exe, &net, p.workers, &spec)?;
    let r = worker::sum(&workers.collect("done", delay + Duration::from_secs(120))?);
    drop(workers);
    let mut late = r.lateness_ms.clone();
    late.sort_by(|a, b| a.total_cmp(b));
    let mut s = Side::new(side_name(backend));
    trouble.set_since(&net, &mut s);
    s.set("sessions", r.connected as f64)
        .set("failed", r.failed as f64)
        .set("early", r.early as f64)
        .set("delay_ms", delay.as_millis() as f64)
        .set("lateness_p50_ms", quantile(&late, 0.5))
        .set("lateness_p99_ms", quantile(&late, 0.99))
        .set("lateness_max_ms", late.last().copied().unwrap_or(f64::NAN))
        .set("lateness_min_ms", late.first().copied().unwrap_or(f64::NAN));
    let mut syn = r.lateness_from_syn_ms.clone();
    syn.sort_by(|a, b| a.total_cmp(b));
    s.set("lateness_from_syn_p99_ms", quantile(&syn, 0.99)).set(
        "lateness_from_syn_max_ms",
        syn.last().copied().unwrap_or(f64::NAN),
    );
    let mut conn = r.connect_ms.clone();
    conn.sort_by(|a, b| a.total_cmp(b));
    s.set("connect_p99_ms", quantile(&conn, 0.99))
        .set("connect_max_ms", conn.last().copied().unwrap_or(f64::NAN));
    if let Some(e) = r.first_error {
        s.note(format!("first error: {e}"));
    }
    drop(agent);
    Ok(s)
}

fn side_name(b: Backend) -> &'static str {
    match b {
        Backend::Sink => "agent",
        Backend::Postfix => "agent_postfix_backend",
    }
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "delay_lateness",
        "Delay accuracy: lateness of the greeting with K sessions in the greeting delay",
    );
    sc.param("sessions", p.lateness_sessions)
        .param("delay_s", p.lateness_delay.as_secs_f64());
    for b in [Backend::Sink, Backend::Postfix] {
        signal::check()?;
        let side = Side::from_result(side_name(b), measure(env, b));
        sc.sides.push(side);
    }
    sc.absolute("agent", "lateness_p99_ms", Aim::below(50.0));
    sc.absolute("agent", "early", Aim::at_most(0.0));
    sc.absolute("agent_postfix_backend", "lateness_p99_ms", None);
    sc.notes.push(
        "lateness = the kernel's receive time of the final `220 ` line (SO_TIMESTAMPNS, so a \
         busy client adds no lag) - the moment the client's connect() returned - the configured \
         delay. On a busy box the client may note connect()'s return late (a negative \
         lateness_min shows by how much), which makes lateness read low; lateness_from_syn counts \
         from before connect() instead, an upper bound that also holds the handshake and any SYN retry (1 s) after a full accept queue (listen_overflows, \
         client_syn_retrans; listen_overflows counts every listener of the server namespace, the \
         backend's too, whose overflows delay the agent's connects to it). early = the greeting came more than 1 ms before the delay even \
         counted from before connect(). \
         agent: backend smtp-sink (greets at once), so lateness is the agent's timers and relay; \
         agent_postfix_backend: the Postfix instance behind it, where every greeting also waits \
         for a new smtpd (at most 100 at a time). No postscreen baseline: it hands a passed \
         client to a new smtpd too, so its time to the final greeting measures process limits."
            .into(),
    );
    Ok(vec![sc])
}
