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
use super::super::sink::BenchSink;
use super::super::worker::{self, AfterGreeting, Mode, Spec, Workers};
use super::super::{Env, signal};
use super::{TcpTrouble, both_families, quantile, zero_delays};

const AGENT_PORT: u16 = 25;
/// Connects in flight across all workers (as in the hold scenario).
const CONNECT_CONCURRENCY: u32 = 64;

/// Port of the bench sink backend inside the server namespace.
const SINK_PORT: u16 = 2600;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The bench's sink: greets at once, so lateness is the agent's own
    /// (`backend.connect = "at-connect"`, as the figures it is compared
    /// with were measured).
    Sink,
    /// The Postfix instance, connected at the banner (`at-connect`, no
    /// longer the default): lateness includes starting an smtpd.
    Postfix,
    /// The Postfix instance with `backend.connect = "at-transaction"`:
    /// the agent speaks the banner and EHLO, Postfix sees only MAIL on.
    PostfixLazy,
    /// No agent: the clients connect straight to Postfix's plain smtpd at
    /// the same arrival rate as the agent releases them, with no delay.
    /// What Postfix itself does with this load: the floor under any
    /// front's figures with Postfix behind.
    Direct,
}

/// One side: a backend, and what the clients do once greeted.
#[derive(Clone, Copy)]
struct Run {
    backend: Backend,
    after: AfterGreeting,
    name: &'static str,
    /// At a tenth of the profile's arrival rate (and a tenth of its
    /// clients): a load Postfix takes without queueing, so that what is
    /// left is each side's own time.
    calm: bool,
}

impl Run {
    /// The profile's figure for this side: a tenth of it when calm.
    fn scaled(&self, n: u32) -> u32 {
        if self.calm { (n / 10).max(1) } else { n }
    }
}

const RUNS: [Run; 9] = [
    Run {
        backend: Backend::Sink,
        after: AfterGreeting::Transaction,
        name: "agent",
        calm: false,
    },
    Run {
        backend: Backend::Postfix,
        after: AfterGreeting::Transaction,
        name: "agent_postfix_backend",
        calm: false,
    },
    Run {
        backend: Backend::PostfixLazy,
        after: AfterGreeting::Transaction,
        name: "agent_postfix_at_transaction",
        calm: false,
    },
    Run {
        backend: Backend::Direct,
        after: AfterGreeting::Transaction,
        name: "postfix_direct",
        calm: false,
    },
    Run {
        backend: Backend::Postfix,
        after: AfterGreeting::EhloQuit,
        name: "ehlo_quit_at_connect",
        calm: false,
    },
    Run {
        backend: Backend::PostfixLazy,
        after: AfterGreeting::EhloQuit,
        name: "ehlo_quit_at_transaction",
        calm: false,
    },
    Run {
        backend: Backend::Sink,
        after: AfterGreeting::Transaction,
        name: "calm_agent",
        calm: true,
    },
    Run {
        backend: Backend::PostfixLazy,
        after: AfterGreeting::Transaction,
        name: "calm_agent_postfix_at_transaction",
        calm: true,
    },
    Run {
        backend: Backend::Direct,
        after: AfterGreeting::Transaction,
        name: "calm_postfix_direct",
        calm: true,
    },
];

fn measure(env: &Env, run: Run) -> Result<Side> {
    let p = &env.profile;
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    let backend = run.backend;
    let delay = if backend == Backend::Direct {
        Duration::ZERO
    } else {
        p.lateness_delay
    };
    let (pf, _sink, cfg) = match backend {
        Backend::Postfix | Backend::PostfixLazy | Backend::Direct => (
            Some(Postfix::start(&net)?),
            None,
            base_config(&net, AGENT_PORT, postfix::PROXY),
        ),
        Backend::Sink => (
            None,
            Some(BenchSink::start(
                &env.self_exe,
                &net,
                SocketAddr::from(([127, 0, 0, 1], SINK_PORT)),
            )?),
            // The bench sink skips a PROXY v1 line (one text line).
            base_config(&net, AGENT_PORT, SINK_PORT).want("backend.client_address", "\"proxy-v1\""),
        ),
    };
    let mut cfg = zero_delays(cfg).need("greeting.delay", format!("\"{}ms\"", delay.as_millis()));
    cfg = if backend == Backend::PostfixLazy {
        cfg.need("backend.connect", "\"at-transaction\"")
    } else {
        // Said explicitly: the default is at-transaction. (An agent from
        // before the key only connects at the banner.)
        cfg.want("backend.connect", "\"at-connect\"")
    };
    let (agent, port) = if backend == Backend::Direct {
        (None, postfix::DIRECT)
    } else {
        (
            Some(Agent::start(&env.tarpit, &net, &cfg, Some(AGENT_PORT))?),
            AGENT_PORT,
        )
    };
    if let Some(agent) = agent.as_ref().filter(|_| backend == Backend::PostfixLazy) {
        // Until the probe has learned the banner, sessions connect at once.
        signal::wait_until(Duration::from_secs(20), || {
            agent.log().contains("learned the MTA's banner")
        })?;
    }
    let spec = Spec {
        mode: Mode::Lateness {
            delay_ms: delay.as_millis() as u64,
            after: run.after,
        },
        targets: both_families(port),
        sources,
        count: run.scaled(p.lateness_sessions),
        concurrency: CONNECT_CONCURRENCY,
        time_limit_ms: 60_000,
        talk: false,
        connect_rate: run.scaled(p.lateness_rate),
    };
    let trouble = TcpTrouble::before(&net);
    let mut workers = Workers::start(&env.self_exe, &net, p.workers, &spec)?;
    let r = worker::sum(&workers.collect("done", delay + Duration::from_secs(120))?);
    drop(workers);
    let mut late = r.lateness_ms.clone();
    late.sort_by(|a, b| a.total_cmp(b));
    let mut s = Side::new(run.name);
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
    if run.after == AfterGreeting::Transaction {
        let mut mail = r.mail_ms.clone();
        mail.sort_by(|a, b| a.total_cmp(b));
        s.set("transactions", mail.len() as f64)
            .set("mail_reply_p50_ms", quantile(&mail, 0.5))
            .set("mail_reply_p99_ms", quantile(&mail, 0.99));
    }
    if let Some(pf) = &pf {
        // Everyone but the probe (127.0.0.1) and Postfix's own readiness
        // check (from the server's addresses).
        let all = pf.log_count(": connect from unknown[");
        let not_clients: usize = ["127.0.0.1", "198.51.100.1", "fd5b:1e00::1"]
            .iter()
            .map(|a| pf.log_count(&format!(": connect from unknown[{a}]")))
            .sum();
        let clients = all.saturating_sub(not_clients);
        s.set("mta_connects", clients as f64).set(
            "mta_connects_per_1000",
            clients as f64 * 1000.0 / (r.connected.max(1) as f64),
        );
    }
    if let Some(e) = r.first_error {
        s.note(format!("first error: {e}"));
    }
    drop(agent);
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "delay_lateness",
        "Delay accuracy: lateness of the greeting with K sessions in the greeting delay",
    );
    sc.param("sessions", p.lateness_sessions)
        .param("arrivals_per_s", p.lateness_rate)
        .param("delay_s", p.lateness_delay.as_secs_f64());
    for run in RUNS {
        // Without a set arrival rate (smoke) there is no calm one either.
        if run.calm && p.lateness_rate == 0 {
            continue;
        }
        signal::check()?;
        let side = Side::from_result(run.name, measure(env, run));
        sc.sides.push(side);
    }
    sc.absolute("agent", "lateness_p99_ms", Aim::below(50.0));
    sc.absolute("agent", "early", Aim::at_most(0.0));
    sc.absolute("agent_postfix_backend", "lateness_p99_ms", None);
    sc.absolute("agent_postfix_at_transaction", "lateness_p99_ms", None);
    sc.absolute("agent_postfix_at_transaction", "mail_reply_p99_ms", None);
    // Issue 18's gate: with Postfix behind, within 2x of the sink's.
    sc.ratio(
        "agent_postfix_at_transaction",
        "agent",
        "lateness_p99_ms",
        Aim::at_most(2.0),
    );
    sc.ratio(
        "agent_postfix_at_transaction",
        "agent",
        "mail_reply_p99_ms",
        Aim::at_most(2.0),
    );
    // What Postfix alone makes of the same arrivals: its banner (lateness
    // with no delay) and its MAIL reply.
    sc.absolute("postfix_direct", "lateness_p99_ms", None);
    sc.absolute("postfix_direct", "mail_reply_p99_ms", None);
    if p.lateness_rate > 0 {
        sc.ratio(
            "calm_agent_postfix_at_transaction",
            "calm_agent",
            "mail_reply_p99_ms",
            Aim::at_most(2.0),
        );
        sc.absolute("calm_postfix_direct", "lateness_p99_ms", None);
        sc.absolute("calm_postfix_direct", "mail_reply_p99_ms", None);
    }
    sc.absolute(
        "ehlo_quit_at_transaction",
        "mta_connects_per_1000",
        Aim::at_most(0.0),
    );
    sc.notes.push(
        "lateness = the kernel's receive time of the final `220 ` line (SO_TIMESTAMPNS, so a \
         busy client adds no lag) - the moment the client's connect() returned - the configured \
         delay. On a busy box the client may note connect()'s return late (a negative \
         lateness_min shows by how much), which makes lateness read low; lateness_from_syn counts \
         from before connect() instead, an upper bound that also holds the handshake and any SYN retry (1 s) after a full accept queue (listen_overflows, \
         client_syn_retrans; listen_overflows counts every listener of the server namespace, the \
         backend's too, whose overflows delay the agent's connects to it). early = the greeting came more than 1 ms before the delay even \
         counted from before connect(). \
         agent: backend the bench's own sink (greets and answers at once, like smtp-sink), so lateness is the agent's timers and relay; \
         agent_postfix_backend: the Postfix instance behind it, connected at the banner \
         (backend.connect = \"at-connect\", as agent), where every greeting also waits \
         for a new smtpd (at most 100 at a time); agent_postfix_at_transaction: the same with \
         backend.connect = \"at-transaction\", the default (the agent greets, Postfix is connected at MAIL, \
         paced by backend.max_connecting). In those three the released clients go on to EHLO, \
         MAIL (mail_reply = its reply time), RCPT, DATA and one message. postfix_direct: \
         no agent, the same clients at the same arrival rate straight to Postfix's plain smtpd \
         with no delay (its lateness is the time to Postfix's banner): what Postfix itself makes \
         of this load, the floor under any front's figures with Postfix behind. calm_*: the same at a \
         tenth of the arrival rate with a tenth of the clients, a load Postfix takes without \
         queueing. ehlo_quit_*: clients \
         that QUIT after EHLO; mta_connects counts Postfix's `connect from` lines for the \
         clients' addresses (the issue asks 0 per 1,000 at-transaction). No postscreen baseline: it hands a passed \
         client to a new smtpd too, so its time to the final greeting measures process limits."
            .into(),
    );
    Ok(vec![sc])
}
