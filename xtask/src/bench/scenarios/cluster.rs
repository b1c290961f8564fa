//! Issue 20's figures: two MX hosts sharing one Redis (`[cluster]`).
//!
//! Two bench networks (as the e2e tests' `mx_pair`: each host its own
//! namespaces, veth, kernel programs, pins and agent), a real
//! `redis-server` in node 1's server namespace; node 1 reaches it over TCP
//! on its loopback, node 2 over its Unix socket.
//!
//! - `cluster_propagation`: blocks added at node 1 with `tarpit block
//!   add`, paced, each timed from the command's exit (the block is then in
//!   node 1's kernel) until a look-up in node 2's pinned block lists finds
//!   it (bpf(2) straight on the pins, polled every millisecond), and node
//!   2's own `tarpit_cluster_propagation_seconds` histogram.
//! - `cluster_greylist`: what a greylist decision costs locally (the
//!   session's calls, timed in a small program linked with the agent's
//!   library, `tarpit-user/examples/greylist_check_cost.rs`), one Redis
//!   round trip for a key of the greylist's shape (what a look-up through
//!   Redis would cost on every RCPT, which the agent never makes), and the
//!   time until a first try made at node 1 is known at node 2.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::agent::{Agent, agent_dir, base_config, pin_dir};
use super::super::netns::{BenchNet, SERVER_V4};
use super::super::pinned_lpm::PinnedLpm;
use super::super::redis_server::RedisServer;
use super::super::report::{Aim, Scenario, Side};
use super::super::sink::BenchSink;
use super::super::{Env, signal};
use super::{quantile, zero_delays};
use crate::{paths, shell};

const PORT: u16 = 25;
const SINK_PORT: u16 = 2599;
const METRICS: &str = "127.0.0.1:9325";
/// The site's greylist key, the same at both hosts (docs/cluster.md).
const SITE_KEY: &str = "00112233445566778899aabbccddeeff\n";
/// How long a block or a greylist change may take before it counts as lost.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Two hosts and their Redis; dropped in reverse order of making.
struct Pair {
    node1: Agent,
    node2: Agent,
    _sink: BenchSink,
    redis: RedisServer,
    net1: BenchNet,
    net2: BenchNet,
}

fn host_config(net: &BenchNet, node: &str, url: &str) -> Result<super::super::agent::AgentConfig> {
    // Both hosts hash the greylist under the same key: written before the
    // first start, as the docs tell an admin to copy it.
    let grey = agent_dir(net).join("grey");
    std::fs::create_dir_all(&grey)?;
    let key = grey.join("greylist.key");
    std::fs::write(&key, SITE_KEY)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let cfg = zero_delays(base_config(net, PORT, SINK_PORT))
        // The bench sink skips a PROXY v1 line (one text line).
        .want("backend.client_address", "\"proxy-v1\"")
        .want("backend.connect", "\"at-connect\"")
        .want("metrics.listen", format!("\"{METRICS}\""))
        .want("offenders.enabled", "false")
        .need("greylist.mode", "\"triplet\"")
        .need("greylist.store", "\"@AGENT_DIR@/grey/greylist.db\"")
        .need("cluster.url", format!("\"{url}\""))
        .need("cluster.node", format!("\"{node}\""))
        .want("cluster.timeout", "\"200ms\"");
    Ok(cfg)
}

impl Pair {
    fn start(env: &Env) -> Result<Pair> {
        let net1 = BenchNet::new()?;
        let net2 = BenchNet::new()?;
        let redis = RedisServer::start(&net1)?;
        let sink = BenchSink::start(
            &env.self_exe,
            &net1,
            SocketAddr::from(([127, 0, 0, 1], SINK_PORT)),
        )?;
        let node1 = Agent::start(
            &env.tarpit,
            &net1,
            &host_config(&net1, "bench-mx1", &redis.tcp_url())?,
            Some(PORT),
        )?;
        let node2 = Agent::start(
            &env.tarpit,
            &net2,
            &host_config(&net2, "bench-mx2", &redis.unix_url())?,
            None,
        )?;
        let pair = Pair {
            node1,
            node2,
            _sink: sink,
            redis,
            net1,
            net2,
        };
        // Both connected and subscribed before anything is measured.
        for (net, name) in [(&pair.net1, "node 1"), (&pair.net2, "node 2")] {
            let up = signal::wait_until(Duration::from_secs(15), || {
                metric_sum(net, "tarpit_cluster_up", None) == Some(1.0)
            })?;
            if !up {
                bail!("{name} did not connect to Redis within 15 s (tarpit_cluster_up)");
            }
        }
        Ok(pair)
    }
}

/// The agent's metrics page, from inside its server namespace.
fn scrape(net: &BenchNet) -> Result<String> {
    net.in_server(|| -> Result<String> {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?
}

/// The sum of a family's samples whose labels contain `label` (all when
/// `None`); `None` when the page cannot be read or has no such sample.
fn metric_sum(net: &BenchNet, family: &str, label: Option<&str>) -> Option<f64> {
    sum_in(&scrape(net).ok()?, family, label)
}

fn sum_in(text: &str, family: &str, label: Option<&str>) -> Option<f64> {
    let mut sum = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if label.is_some_and(|want| !rest.contains(want)) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The i-th address blocked: the first hundred alternate between IPv4
/// (198.51.100.100..199) and IPv6, the rest IPv6 (fd5b:1e00:b::/64).
fn block_addr(i: u32) -> IpAddr {
    if i.is_multiple_of(2) && i / 2 < 100 {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100 + (i / 2) as u8))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0xfd5b,
            0x1e00,
            0xb,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16 + 1,
        ))
    }
}

/// `tarpit -c CONFIG ARGS`; its output.
fn tarpit(env: &Env, config: &PathBuf, args: &[&str]) -> Result<String> {
    let out = Command::new(env.tarpit.path()?)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .context("cannot run tarpit")?;
    if !out.status.success() {
        bail!(
            "tarpit {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One block added at node 1: when the command started and returned.
struct Added {
    addr: IpAddr,
    started: Instant,
    done: Instant,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn propagation(env: &Env, pair: &Pair) -> Result<Side> {
    let p = &env.profile;
    let pins = pin_dir(&pair.net2);
    let lists = [
        PinnedLpm::open(&pins.join("BLOCK"))?,
        PinnedLpm::open(&pins.join("AUTO_BLOCK"))?,
    ];
    let interval = Duration::from_secs_f64(1.0 / p.cluster_block_rate.max(1) as f64);
    let (tx, rx) = mpsc::channel::<Result<Added>>();
    let config = pair.node1.config.clone();
    let count = p.cluster_blocks;
    let t0 = Instant::now();
    let mut lags = Vec::new();
    let mut from_start = Vec::new();
    let mut cli = Vec::new();
    let mut lost = 0u32;
    let mut polls = 0u64;
    let mut poll_time = Duration::ZERO;
    std::thread::scope(|s| -> Result<()> {
        s.spawn(move || {
            for i in 0..count {
                if signal::interrupted() {
                    return;
                }
                // Paced from the start, so a slow command does not stretch
                // the pace of the rest.
                let due = t0 + interval * i;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let addr = block_addr(i);
                let started = Instant::now();
                let r = tarpit(env, &config, &["block", "add", &addr.to_string()]).map(|_| Added {
                    addr,
                    started,
                    done: Instant::now(),
                });
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut pending: Vec<Added> = Vec::new();
        let mut adder_done = false;
        let mut last_add = Instant::now();
        loop {
            loop {
                match rx.try_recv() {
                    Ok(a) => {
                        let a = a?;
                        cli.push((a.done - a.started).as_secs_f64() * 1e3);
                        last_add = a.done;
                        pending.push(a);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        adder_done = true;
                        break;
                    }
                }
            }
            let poll = Instant::now();
            let mut still = Vec::with_capacity(pending.len());
            for a in pending.drain(..) {
                let mut seen = false;
                for l in &lists {
                    seen = seen || l.covers(a.addr)?;
                }
                if seen {
                    let now = Instant::now();
                    lags.push(now.saturating_duration_since(a.done).as_secs_f64() * 1e3);
                    from_start.push((now - a.started).as_secs_f64() * 1e3);
                } else if a.done.elapsed() > GIVE_UP {
                    lost += 1;
                } else {
                    still.push(a);
                }
            }
            pending = still;
            poll_time += poll.elapsed();
            polls += 1;
            if adder_done && pending.is_empty() {
                break;
            }
            if adder_done && last_add.elapsed() > GIVE_UP * 2 {
                lost += pending.len() as u32;
                break;
            }
            signal::check()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })?;
    let elapsed = t0.elapsed().as_secs_f64();
    if cli.len() < count as usize {
        bail!(
            "interrupted or a `tarpit block add` failed after {} blocks",
            cli.len()
        );
    }
    let lags = sorted(lags);
    let from_start = sorted(from_start);
    let cli = sorted(cli);
    let mut s = Side::new("redis_pubsub");
    s.set("blocks", count as f64)
        .set("seen", lags.len() as f64)
        .set("lost", lost as f64)
        .set("adds_per_s", count as f64 / elapsed)
        .set("lag_min_ms", lags.first().copied().unwrap_or(f64::NAN))
        .set("lag_p50_ms", quantile(&lags, 0.5))
        .set("lag_p90_ms", quantile(&lags, 0.9))
        .set("lag_p99_ms", quantile(&lags, 0.99))
        .set("lag_max_ms", lags.last().copied().unwrap_or(f64::NAN))
        .set("lag_from_cli_start_p50_ms", quantile(&from_start, 0.5))
        .set("lag_from_cli_start_p99_ms", quantile(&from_start, 0.99))
        .set("cli_p50_ms", quantile(&cli, 0.5))
        .set("cli_p99_ms", quantile(&cli, 0.99))
        .set("poll_interval_ms", elapsed * 1e3 / polls.max(1) as f64)
        .set(
            "poll_cost_us",
            poll_time.as_secs_f64() * 1e6 / polls.max(1) as f64,
        );
    // Node 2's own view: the propagation histogram of its metrics.
    match scrape(&pair.net2) {
        Ok(text) => agent_histogram(&text, &mut s),
        Err(e) => {
            s.note(format!("node 2's metrics unreadable: {e:#}"));
        }
    }
    Ok(s)
}

/// `tarpit_cluster_propagation_seconds` of node 2: count, mean, the share
/// within 250 ms, and the buckets that hold the median and the 99th
/// percentile (the histogram knows no finer).
fn agent_histogram(text: &str, s: &mut Side) {
    const H: &str = "tarpit_cluster_propagation_seconds";
    let count = sum_in(text, &format!("{H}_count"), None).unwrap_or(0.0);
    let sum = sum_in(text, &format!("{H}_sum"), None).unwrap_or(0.0);
    if count == 0.0 {
        s.note("node 2's tarpit_cluster_propagation_seconds has no samples");
        return;
    }
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("{H}_bucket{{le=\""))?;
            let (le, rest) = rest.split_once('"')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = rest.rsplit(' ').next()?.parse().ok()?;
            Some((le, n))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let le_of = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= q * count)
            .map(|(le, _)| le * 1e3)
            .unwrap_or(f64::NAN)
    };
    s.set("agent_hist_count", count)
        .set("agent_hist_mean_ms", sum / count * 1e3)
        .set("agent_hist_p50_le_ms", le_of(0.5))
        .set("agent_hist_p99_le_ms", le_of(0.99));
    if let Some((_, n)) = buckets.iter().find(|(le, _)| (*le - 0.25).abs() < 1e-9) {
        s.set("agent_hist_within_250ms", n / count);
    }
}

/// One SMTP command and its (final) reply line.
fn command(w: &mut TcpStream, r: &mut BufReader<TcpStream>, line: Option<&str>) -> Result<String> {
    if let Some(l) = line {
        w.write_all(format!("{l}\r\n").as_bytes())?;
    }
    loop {
        let mut reply = String::new();
        if r.read_line(&mut reply)? == 0 {
            bail!("connection closed waiting for the reply to {line:?}");
        }
        if reply.as_bytes().get(3) != Some(&b'-') {
            return Ok(reply.trim_end().to_string());
        }
    }
}

/// First tries at node 1, one at a time: RCPT of a new triplet (the
/// agent's 451), then node 2's `tarpit_cluster_applied_total{kind=
/// "greylist"}` polled until it counts it.
fn greylist_propagation(env: &Env, pair: &Pair) -> Result<Side> {
    let tries = env.profile.cluster_grey_tries;
    let stream = pair
        .net1
        .in_client(|| {
            TcpStream::connect_timeout(&(SERVER_V4, PORT).into(), Duration::from_secs(5))
        })?
        .context("cannot connect to node 1")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let banner = command(&mut w, &mut r, None)?;
    if !banner.starts_with("220") {
        bail!("node 1 greeted with {banner:?}");
    }
    command(&mut w, &mut r, Some("EHLO bench.example"))?;
    let mail = command(&mut w, &mut r, Some("MAIL FROM:<sender@bench.example>"))?;
    if !mail.starts_with("250") {
        bail!("MAIL got {mail:?}");
    }
    let applied = |net: &BenchNet| {
        metric_sum(
            net,
            "tarpit_cluster_applied_total",
            Some("kind=\"greylist\""),
        )
    };
    let mut known = applied(&pair.net2).unwrap_or(0.0);
    let (mut lags, mut replies, mut scrapes) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0u32;
    for i in 0..tries {
        signal::check()?;
        let t = Instant::now();
        let reply = command(
            &mut w,
            &mut r,
            Some(&format!("RCPT TO:<user{i}@bench.example>")),
        )?;
        replies.push(t.elapsed().as_secs_f64() * 1e3);
        if !reply.starts_with("451") {
            bail!("a new triplet at node 1 got {reply:?}, not the greylist's 451");
        }
        let mut seen = false;
        while t.elapsed() < GIVE_UP {
            let before = Instant::now();
            let n = applied(&pair.net2).unwrap_or(known);
            scrapes.push(before.elapsed().as_secs_f64() * 1e3);
            if n > known {
                known = n;
                lags.push(t.elapsed().as_secs_f64() * 1e3);
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !seen {
            lost += 1;
        }
    }
    let _ = command(&mut w, &mut r, Some("QUIT"));
    let (lags, replies, scrapes) = (sorted(lags), sorted(replies), sorted(scrapes));
    let mut s = Side::new("greylist_propagation");
    s.set("tries", tries as f64)
        .set("seen", lags.len() as f64)
        .set("lost", lost as f64)
        .set("lag_p50_ms", quantile(&lags, 0.5))
        .set("lag_p99_ms", quantile(&lags, 0.99))
        .set("lag_max_ms", lags.last().copied().unwrap_or(f64::NAN))
        .set("rcpt_451_p50_ms", quantile(&replies, 0.5))
        .set("rcpt_451_p99_ms", quantile(&replies, 0.99))
        .set("poll_scrape_p50_ms", quantile(&scrapes, 0.5));
    Ok(s)
}

/// A key of the greylist's shape that node 1 wrote (`tarpit:grey:<hex>`),
/// or one of the same shape nobody wrote when there is none.
fn grey_key(url: &str) -> Result<String> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("tarpit:grey:*").query(&mut con)?;
    Ok(keys
        .into_iter()
        .find(|k| k.len() == "tarpit:grey:".len() + 32)
        .unwrap_or_else(|| format!("tarpit:grey:{}", "5a".repeat(16))))
}

/// `calls` GETs of `key`, one at a time, on one connection: each call's
/// round trip.
fn round_trips(name: &str, url: &str, key: &str, calls: u32) -> Result<Side> {
    let client = redis::Client::open(url)?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut rtt = Vec::with_capacity(calls as usize);
    let mut found = 0u32;
    for i in 0..calls {
        if i.is_multiple_of(1000) {
            signal::check()?;
        }
        let t = Instant::now();
        let v: Option<Vec<u8>> = redis::cmd("GET").arg(key).query(&mut con)?;
        rtt.push(t.elapsed().as_secs_f64() * 1e9);
        found += u32::from(v.is_some());
    }
    let rtt = sorted(rtt);
    let mut s = Side::new(name);
    s.set("calls", calls as f64)
        .set("found", found as f64)
        .set("p50_ns", quantile(&rtt, 0.5))
        .set("p99_ns", quantile(&rtt, 0.99))
        .set("mean_ns", rtt.iter().sum::<f64>() / rtt.len().max(1) as f64);
    Ok(s)
}

/// The greylist decision of the agent itself, from the small program
/// linked with its library (built here; the smoke run takes one already
/// built, since `cargo test` holds cargo's lock).
fn local_check(env: &Env) -> Result<Side> {
    let p = &env.profile;
    let profile = if p.name == "smoke" {
        "debug"
    } else {
        "release"
    };
    let bin = paths::target_dir()
        .join(profile)
        .join("examples/greylist_check_cost");
    if p.name != "smoke" {
        shell::run(Command::new("cargo").current_dir(paths::root()).args([
            "build",
            "--release",
            "--quiet",
            "--package",
            "tarpit-user",
            "--example",
            "greylist_check_cost",
        ]))?;
    } else if !bin.is_file() {
        bail!(
            "{} not built (the smoke run does not build it: `cargo build -p tarpit-user --example greylist_check_cost`)",
            bin.display()
        );
    }
    let out = Command::new(&bin)
        .arg(p.greylist_checks.to_string())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "greylist_check_cost failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("greylist_check_cost printed no JSON")?;
    let mut s = Side::new("local_check");
    for (k, v) in &v {
        if let Some(f) = v.as_f64() {
            s.set(k, f);
        }
    }
    // The look-up a retry at another MX makes: a key the table knows.
    for q in ["p50", "p99"] {
        if let Some(f) = s.get(&format!("known_{q}_ns")) {
            s.set(&format!("{q}_ns"), f);
        }
    }
    if profile == "debug" {
        s.note("debug build");
    }
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut prop = Scenario::new(
        "cluster_propagation",
        "Two MX hosts sharing one Redis: a block added at node 1 until it is in node 2's XDP block list",
    );
    prop.param("blocks", p.cluster_blocks)
        .param("adds_per_s_target", p.cluster_block_rate)
        .param("scan_interval_ms", 250);
    let mut grey = Scenario::new(
        "cluster_greylist",
        "Greylist: the agent's local decision vs one Redis round trip, and a first try at node 1 until node 2 knows it",
    );
    grey.param("local_checks_per_phase", p.greylist_checks)
        .param("redis_calls", p.cluster_redis_calls)
        .param("first_tries", p.cluster_grey_tries);
    grey.baseline = Some("local_check".into());
    grey.sides
        .push(Side::from_result("local_check", local_check(env)));
    signal::check()?;
    match Pair::start(env) {
        Ok(pair) => {
            prop.sides
                .push(Side::from_result("redis_pubsub", propagation(env, &pair)));
            signal::check()?;
            grey.sides.push(Side::from_result(
                "greylist_propagation",
                greylist_propagation(env, &pair),
            ));
            signal::check()?;
            let calls = p.cluster_redis_calls;
            let tcp = pair.redis.tcp_url();
            let unix = pair.redis.unix_url();
            let key = grey_key(&unix);
            let key = key
                .as_deref()
                .unwrap_or("tarpit:grey:5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a");
            let side = pair
                .net1
                .in_server(|| round_trips("redis_get_tcp", &tcp, key, calls))
                .and_then(|r| r);
            grey.sides.push(Side::from_result("redis_get_tcp", side));
            grey.sides.push(Side::from_result(
                "redis_get_unix",
                round_trips("redis_get_unix", &unix, key, calls),
            ));
            if let Some(log) = [&pair.node1, &pair.node2]
                .iter()
                .map(|a| a.log())
                .find(|l| l.contains("another agent calls itself"))
            {
                grey.notes.push(format!("an agent saw its own name: {log}"));
            }
            drop(pair);
        }
        Err(e) => {
            for (sc, names) in [
                (&mut prop, &["redis_pubsub"][..]),
                (
                    &mut grey,
                    &["greylist_propagation", "redis_get_tcp", "redis_get_unix"][..],
                ),
            ] {
                for n in names {
                    sc.sides.push(Side::unavailable(n, format!("{e:#}")));
                }
            }
        }
    }
    prop.absolute("redis_pubsub", "lag_p50_ms", None);
    prop.absolute("redis_pubsub", "lag_p99_ms", Aim::below(1000.0));
    prop.absolute("redis_pubsub", "lost", Aim::at_most(0.0));
    grey.ratio("redis_get_tcp", "local_check", "p50_ns", None);
    grey.ratio("redis_get_unix", "local_check", "p50_ns", None);
    grey.absolute("greylist_propagation", "lag_p99_ms", Aim::below(1000.0));
    prop.notes.push(
        "lag = from the exit of `tarpit block add` at node 1 (the block is in node 1's kernel) \
         until a bpf(2) look-up of the address in node 2's pinned BLOCK or AUTO_BLOCK trie finds \
         it; the poll runs every ~1 ms (poll_interval_ms, each pass poll_cost_us), so a lag is \
         late by at most that. lag_from_cli_start adds the command itself (cli_*). What bounds \
         it: node 1 finds its own new blocks by comparing its kernel block list with what it \
         shared every 250 ms, so a block waits 0-250 ms for that scan (p50 ~125 ms, p99 ~250 ms \
         by design); then one SET and one PUBLISH to Redis and node 2's write into its own maps, \
         a few ms. agent_hist_* is node 2's own tarpit_cluster_propagation_seconds (from the \
         time node 1 recorded for the block, to the second for a block from the state file; \
         buckets 10, 50, 100, 250, 500 ms, ...: the p50/p99 there are bucket bounds)."
            .into(),
    );
    grey.notes.push(
        "No SMTP reply waits for Redis: each host applies the others' greylist changes to its \
         own table as they arrive and decides from that table. local_check = the session's own \
         calls at RCPT (Greylist::triplet_key + Greylist::check, timed one by one in \
         tarpit-user/examples/greylist_check_cost.rs, built from this tree in the release \
         profile): first_try records a new triplet (and hands it to the store's thread), \
         retry_pass is a retry after the minimum wait, known a known triplet; *_shared the same \
         with the hand-off to the cluster. p50_ns/p99_ns = known. redis_get_* = one GET of a key \
         of the greylist's shape (tarpit:grey:<32 hex>, a real one node 1 wrote) over one \
         connection, one at a time (redis-rs, synchronous): from node 1's namespace over TCP on \
         loopback, and over the Unix socket. That is the least a look-up through Redis would add \
         to every RCPT; between hosts add the network's round trip. greylist_propagation: a \
         RCPT of a new triplet at node 1 (rcpt_451 = the client's wait for the 451), then node \
         2's tarpit_cluster_applied_total{kind=\"greylist\"} scraped every ~1 ms until it \
         counts it (lag from the RCPT sent; each scrape poll_scrape_p50_ms). Greylist changes \
         are published at once, not by a scan."
            .into(),
    );
    Ok(vec![prop, grey])
}
