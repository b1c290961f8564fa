//! `tarpit stats`: the kernel's counters, and the agent's metrics when the
//! agent runs.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::Context;
use super::output::{self, Align, Table};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON (one object; fields in docs/cli.md).
    #[arg(long)]
    pub json: bool,
    /// The agent's metrics endpoint. Default: metrics.listen of the
    /// configuration.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Leave out the agent's metrics.
    #[arg(long, conflicts_with = "metrics")]
    pub kernel_only: bool,
}

/// What each kernel counter means, for the human table.
fn describe(name: &str) -> &'static str {
    match name {
        "xdp_pass" => "XDP: packets passed, no list entry involved",
        "xdp_drop" => "XDP: packets dropped by the block list",
        "xdp_allowed" => "XDP: block-listed sources passed by the allow list",
        "xdp_block_expired" => "XDP: expired block entries passed",
        "xdp_allow_expired" => "XDP: expired allow entries ignored",
        "xdp_block_other_port" => "XDP: block-listed sources to a port not covered",
        "xdp_block_disabled" => "XDP: block-listed sources passed, blocking off",
        "tc_flow_new" => "SMTP flows tracked (connections the kernel accepted)",
        "tc_flow_insert_failed" => "tc: flows not tracked (flow table full)",
        "tc_flow_unknown" => "tc: client payload on untracked flows (unknown, never a strike)",
        "tc_flow_unseen" => {
            "tc: flows whose replies egress never saw (asymmetric route?): unknown, no strike"
        }
        "tc_out_of_window" => "tc: client payload out of sequence (forged or stray): ignored",
        "tc_pregreet" => "tc: pre-greet talkers flagged",
        "tc_pregreet_teaser" => "tc: ... of which after a 220- teaser",
        "tc_greeted" => "tc: greetings completed",
        "tc_flow_closed" => "SMTP flows closed (their socket closed)",
        "events_lost" => "events lost (ring buffer full)",
        "sock_established" => "sock_ops: SMTP connections established",
        "sock_closed" => "sock_ops: SMTP connections closed",
        "sock_clamped" => "sock_ops: TCP windows clamped",
        "ip_state_failed" => "per-address updates that failed",
        "unparsed" => "packets not parsed (passed untouched)",
        "fragments" => "non-first IP fragments",
        n if n.starts_with("xdp_drop_") => "XDP: drops for this block reason",
        _ => "",
    }
}

/// `tarpit stats --json` (docs/cli.md).
#[derive(Debug, Serialize)]
struct StatsJson {
    kernel: serde_json::Map<String, serde_json::Value>,
    tracked: Tracked,
    agent: AgentJson,
}

/// What the kernel holds right now (entries in its maps).
#[derive(Debug, Serialize)]
struct Tracked {
    /// Open SMTP flows (FLOWS).
    flows: u64,
    /// Addresses with history (IP_STATE).
    addresses: u64,
    allow: u64,
    /// Both parts of the block list.
    block: u64,
    /// The admin's part (BLOCK) and its capacity.
    block_admin: u64,
    block_admin_capacity: u64,
    /// The automatic part (AUTO_BLOCK: repeat offenders) and its capacity
    /// (0 on pins of an older tarpit, until the agent creates it).
    block_automatic: u64,
    block_automatic_capacity: u64,
    authenticated: u64,
    slowed: u64,
}

fn tracked(maps: &super::kernel_glue::AdminMaps) -> Result<Tracked> {
    use tarpit_common::maps as names;
    let rows = maps.map_rows()?;
    let n = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .and_then(|r| r.entries)
            .unwrap_or(0)
    };
    let cap = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map_or(0, |r| u64::from(r.capacity))
    };
    Ok(Tracked {
        flows: n(names::FLOWS),
        addresses: n(names::IP_STATE),
        allow: n(names::ALLOW),
        block: n(names::BLOCK) + n(names::AUTO_BLOCK),
        block_admin: n(names::BLOCK),
        block_admin_capacity: cap(names::BLOCK),
        block_automatic: n(names::AUTO_BLOCK),
        block_automatic_capacity: cap(names::AUTO_BLOCK),
        authenticated: n(names::AUTH),
        slowed: n(names::SLOW),
    })
}

#[derive(Debug, Serialize)]
struct AgentJson {
    /// `up`, `down` (nothing answered), `disabled` (no endpoint), `skipped`.
    status: &'static str,
    address: Option<String>,
    error: Option<String>,
    /// Every sample, keyed by name with its labels: `name{a="b"}`.
    metrics: serde_json::Map<String, serde_json::Value>,
}

pub fn run(ctx: &Context, args: StatsArgs) -> Result<()> {
    let maps = ctx.open()?;
    let counters = maps.counters()?;
    let now = tracked(&maps)?;
    let address = args.metrics.or(ctx.config.metrics.listen);
    let agent = if args.kernel_only {
        AgentJson {
            status: "skipped",
            address: None,
            error: None,
            metrics: Default::default(),
        }
    } else {
        match address {
            None => AgentJson {
                status: "disabled",
                address: None,
                error: None,
                metrics: Default::default(),
            },
            Some(a) => match scrape(a) {
                Ok(samples) => AgentJson {
                    status: "up",
                    address: Some(a.to_string()),
                    error: None,
                    metrics: samples
                        .into_iter()
                        .map(|(k, v)| (k, json_number(v)))
                        .collect(),
                },
                Err(e) => AgentJson {
                    status: "down",
                    address: Some(a.to_string()),
                    error: Some(e),
                    metrics: Default::default(),
                },
            },
        }
    };
    if args.json {
        return output::print_json(&StatsJson {
            kernel: counters
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
                .collect(),
            tracked: now,
            agent,
        });
    }
    println!(
        "kernel now: {} open SMTP flows, {} addresses with history, allow {}, block {}, \
         authenticated {}, slowed {}",
        output::count(now.flows),
        output::count(now.addresses),
        now.allow,
        now.block,
        now.authenticated,
        now.slowed
    );
    println!("{}", block_parts(&now));
    println!();
    println!("kernel counters (since the maps were created, all CPUs)");
    let mut table = Table::new(&[
        ("COUNTER", Align::Left),
        ("VALUE", Align::Right),
        ("MEANING", Align::Left),
    ]);
    for (name, value) in &counters {
        table.row(vec![
            name.clone(),
            output::count(*value),
            describe(name).into(),
        ]);
    }
    table.print("no counters");
    println!();
    match agent.status {
        "up" => {
            if let Some(line) = cluster_summary(&agent.metrics) {
                println!("{line}");
                println!();
            }
            println!(
                "agent metrics ({})",
                agent.address.as_deref().unwrap_or("?")
            );
            let mut table = Table::new(&[("METRIC", Align::Left), ("VALUE", Align::Right)]);
            for (name, value) in &agent.metrics {
                // Histogram buckets are for Prometheus, not for a terminal.
                if name.contains("_bucket{") || name.ends_with("_created") {
                    continue;
                }
                table.row(vec![name.clone(), value.to_string()]);
            }
            table.print("the agent exports no metrics");
        }
        "disabled" => println!("agent metrics: no endpoint configured (metrics.listen)"),
        "skipped" => {}
        _ => println!(
            "agent metrics: no answer at {} ({}); is the agent running?",
            agent.address.as_deref().unwrap_or("?"),
            agent.error.as_deref().unwrap_or("")
        ),
    }
    Ok(())
}

/// One line on the cluster (`[cluster]`, docs/cluster.md) from the
/// agent's metrics; `None` when the agent runs without one.
fn cluster_summary(m: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    let up = m.get("tarpit_cluster_up")?.as_f64()?;
    let n = |name: &str| m.get(name).and_then(|v| v.as_f64()).unwrap_or(0.0) as u64;
    let sum = |family: &str| -> u64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(family) && k[family.len()..].starts_with('{'))
            .filter_map(|(_, v)| v.as_f64())
            .sum::<f64>() as u64
    };
    let state = if up >= 1.0 {
        "connected to Redis".to_string()
    } else {
        "Redis not reachable: on local state only".to_string()
    };
    Some(format!(
        "cluster: {state}; {} changes shared, {} applied from other hosts, {} waiting for \
         Redis, {} outages",
        sum("tarpit_cluster_published_total"),
        sum("tarpit_cluster_applied_total"),
        n("tarpit_cluster_backlog"),
        n("tarpit_cluster_outages_total"),
    ))
}

/// How full each part of the block list is: the admin's must never fill
/// up by itself; the automatic one evicts its oldest entries when full.
fn block_parts(t: &Tracked) -> String {
    let part = |n: u64, cap: u64| {
        let pct = if cap == 0 {
            0.0
        } else {
            n as f64 * 100.0 / cap as f64
        };
        format!("{} of {} ({pct:.1}%)", output::count(n), output::count(cap))
    };
    let auto = if t.block_automatic_capacity == 0 {
        "not created yet (pins of an older tarpit: the agent creates it at its next start)"
            .to_string()
    } else {
        format!(
            "{}, oldest evicted when full",
            part(t.block_automatic, t.block_automatic_capacity)
        )
    };
    format!(
        "block list: admin {}, automatic {auto}",
        part(t.block_admin, t.block_admin_capacity)
    )
}

fn json_number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        serde_json::Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Fetches `GET /metrics` over plain HTTP/1.0 with short timeouts (the
/// endpoint is on loopback; a hung agent must not hang the command).
fn scrape(addr: SocketAddr) -> Result<Vec<(String, f64)>, String> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    // Bounded: a metrics page is kilobytes; 16 MiB is plenty.
    s.take(16 << 20)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP response".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("HTTP status {status:?}"));
    }
    Ok(parse_metrics(body))
}

/// Parses the Prometheus / OpenMetrics text format: `name{labels} value`
/// per line, comments and `# EOF` skipped, unparsable lines ignored.
pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The value follows the name and its labels (which may hold spaces
        // inside quotes), so split after the closing brace when there is one.
        let (name, rest) = match line.rfind('}') {
            Some(i) => (&line[..=i], &line[i + 1..]),
            None => match line.split_once(' ') {
                Some((n, r)) => (n, r),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        out.push((name.trim().to_string(), value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_line_only_with_a_cluster() {
        let mut m = serde_json::Map::new();
        m.insert("tarpit_sessions_active".into(), 3.into());
        assert_eq!(cluster_summary(&m), None);
        m.insert("tarpit_cluster_up".into(), 1.into());
        m.insert(
            "tarpit_cluster_published_total{kind=\"block\"}".into(),
            2.into(),
        );
        m.insert(
            "tarpit_cluster_published_total{kind=\"greylist\"}".into(),
            5.into(),
        );
        m.insert(
            "tarpit_cluster_applied_total{kind=\"block\"}".into(),
            4.into(),
        );
        m.insert("tarpit_cluster_backlog".into(), 0.into());
        m.insert("tarpit_cluster_outages_total".into(), 1.into());
        assert_eq!(
            cluster_summary(&m).unwrap(),
            "cluster: connected to Redis; 7 changes shared, 4 applied from other hosts, \
             0 waiting for Redis, 1 outages"
        );
        m.insert("tarpit_cluster_up".into(), 0.into());
        assert!(cluster_summary(&m).unwrap().contains("local state only"));
    }

    #[test]
    fn block_parts_say_how_full_each_is() {
        let t = Tracked {
            flows: 0,
            addresses: 0,
            allow: 0,
            block: 9,
            block_admin: 1,
            block_admin_capacity: 4,
            block_automatic: 8,
            block_automatic_capacity: 8,
            authenticated: 0,
            slowed: 0,
        };
        let line = block_parts(&t);
        assert!(line.contains("admin 1 of 4 (25.0%)"), "{line}");
        assert!(line.contains("automatic 8 of 8 (100.0%)"), "{line}");
        let old = Tracked {
            block_automatic_capacity: 0,
            block_automatic: 0,
            ..t
        };
        assert!(block_parts(&old).contains("not created yet"));
    }

    #[test]
    fn parses_openmetrics_text() {
        let text = "# HELP tarpit_sessions Sessions.\n# TYPE tarpit_sessions counter\n\
                    tarpit_sessions_total{outcome=\"dropped pregreet\"} 3\n\
                    tarpit_sessions_active 2\n\
                    tarpit_delay_seconds_bucket{le=\"+Inf\"} 7\n\
                    tarpit_delay_seconds_sum 12.5\n\
                    garbage\n# EOF\n";
        let m = parse_metrics(text);
        assert_eq!(
            m,
            vec![
                (
                    "tarpit_sessions_total{outcome=\"dropped pregreet\"}".to_string(),
                    3.0
                ),
                ("tarpit_sessions_active".to_string(), 2.0),
                ("tarpit_delay_seconds_bucket{le=\"+Inf\"}".to_string(), 7.0),
                ("tarpit_delay_seconds_sum".to_string(), 12.5),
            ]
        );
        assert_eq!(json_number(3.0), serde_json::json!(3));
        assert_eq!(json_number(12.5), serde_json::json!(12.5));
    }

    #[test]
    fn scrape_reads_a_real_http_answer_and_reports_a_dead_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // Read the whole request first: closing with unread data
            // would reset the connection.
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\ntarpit_up 1\n")
                .unwrap();
        });
        assert_eq!(scrape(addr).unwrap(), vec![("tarpit_up".to_string(), 1.0)]);
        server.join().unwrap();
        // Nothing listens there any more.
        assert!(scrape(addr).is_err());
    }
}
