//! Scenario 6, delay accuracy: K sessions wait in the greeting delay at
//! once; how late does each greeting come, against the configured delay
//! (from the client's connect to the final `220 ` line)?
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use super::super::agent::{Agent, base_config};
use super::super::netns::{BenchNet, SERVER_V4, SERVER_V6};
use super::super::postfix::{self, Postfix};
use super::super::report::{Aim, Scenario, Side};
use super::super::worker::{self, Mode, Spec, Workers};
use super::super::{Env, signal};
use super::{quantile, zero_delays};

const AGENT_PORT: u16 = 25;
const CONNECT_CONCURRENCY: u32 = 400;

fn measure(env: &Env) -> Result<Side> {
    let p = &env.profile;
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    let pf = Postfix::start(&net)?;
    let delay = p.lateness_delay;
    let cfg = zero_delays(base_config(&net, AGENT_PORT, postfix::PROXY))
        .need("greeting.delay", format!("\"{}ms\"", delay.as_millis()));
    let agent = Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?;
    let spec = Spec {
        mode: Mode::Lateness {
            delay_ms: delay.as_millis() as u64,
        },
        targets: vec![
            SocketAddr::from((SERVER_V4, AGENT_PORT)),
            SocketAddr::from((SERVER_V6, AGENT_PORT)),
        ],
        sources,
        count: p.lateness_sessions,
        concurrency: CONNECT_CONCURRENCY,
        time_limit_ms: 60_000,
    };
    let mut workers = Workers::start(&env.self_exe, &net, p.workers, &spec)?;
    let r = worker::sum(&workers.collect("done", delay + Duration::from_secs(120))?);
    drop(workers);
    let mut late = r.lateness_ms.clone();
    late.sort_by(|a, b| a.total_cmp(b));
    let mut s = Side::new("agent");
    s.set("sessions", r.connected as f64)
        .set("failed", r.failed as f64)
        .set("early", r.early as f64)
        .set("delay_ms", delay.as_millis() as f64)
        .set("lateness_p50_ms", quantile(&late, 0.5))
        .set("lateness_p99_ms", quantile(&late, 0.99))
        .set("lateness_max_ms", late.last().copied().unwrap_or(f64::NAN));
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
        "delay_lateness",
        "Delay accuracy: lateness of the greeting with K sessions in the greeting delay",
    );
    sc.param("sessions", p.lateness_sessions)
        .param("delay_s", p.lateness_delay.as_secs_f64());
    signal::check()?;
    sc.sides.push(Side::from_result("agent", measure(env)));
    sc.absolute("agent", "lateness_p99_ms", Aim::below(50.0));
    sc.absolute("agent", "early", Aim::at_most(0.0));
    sc.notes.push(
        "No baseline: postscreen hands a passed client to a new smtpd (at most 100 at once here), \
         so its time to the final greeting measures process limits, not timer accuracy."
            .into(),
    );
    Ok(vec![sc])
}
