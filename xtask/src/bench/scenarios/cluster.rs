//! Issue 20's figures: two MX hosts sharing one Redis (`[cluster]`).
//!
//! Two bench networks (as the e2e tests' `mx_pair`: each host its own
//! namespaces, veth, kernel programs, pins and agent), a real
//! `redis-server` in node 1's server namespace; node 1 reaches it over TCP
//! on its loopback, node 2 over its Unix socket.
//!
//! - `cluster_propagation`: blocks made at node 1, paced (an admin's
//!   `tarpit block add`, and bots that talk before the banner), each timed
//!   from when it is in node 1's kernel until it is in node 2's (bpf(2)
//!   look-ups straight on both nodes' pinned block lists, polled every
//!   millisecond), and node 2's own `tarpit_cluster_propagation_seconds`
//!   histogram.
//! - `cluster_greylist`: what a greylist decision costs locally (the
//!   session's calls, timed in a small program linked with the agent's
//!   library, `tarpit-user/examples/greylist_check_cost.rs`), one Redis
//!   round trip for a key of the greylist's shape (what a look-up through
//!   Redis would cost on every RCPT, which the agent never makes), and the
//!   time until a first try made at node 1 is known at node 2.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::agent::{Agent, agent_dir, base_config, cli, pin_dir};
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
    // Both hosts hash the greylist under the same key, an admin's (no
    // `# origin:` line): written before the first start, so neither host
    // waits to take the cluster's key (docs/cluster.md, the greylist key).
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
        // Bots that talk before the banner: one strike blocks (the same
        // at both hosts, as docs/cluster.md asks).
        .want("greeting.delay", "\"1s\"")
        .need("offenders.enabled", "true")
        .need("offenders.pregreet_strikes", "1")
        .want("offenders.slowdown", "false")
        .want("offenders.block_ttl", "\"10m\"")
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

/// The i-th address blocked by the admin: the first hundred alternate
/// between IPv4 (198.51.100.150..249, above the bots' 198.51.100.10..109)
/// and IPv6, the rest IPv6 (fd5b:1e00::b:0:0/96, in the bench's /64,
/// clear of the bots' fd5b:1e00::10..).
fn block_addr(i: u32) -> IpAddr {
    if i.is_multiple_of(2) && i / 2 < 100 {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 150 + (i / 2) as u8))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0xfd5b,
            0x1e00,
            0,
            0,
            0,
            0xb,
            ((i + 1) >> 16) as u16,
            (i + 1) as u16,
        ))
    }
}

/// One block on its way from node 1 to node 2: made at `started` (the
/// command's start, or the bot's connect), in node 1's kernel from `at1`
/// (the command's exit, or the first poll that found it there), in node
/// 2's from `at2`.
struct Watch {
    addr: IpAddr,
    started: Instant,
    at1: Option<Instant>,
    at2: Option<Instant>,
}

impl Watch {
    fn new(addr: IpAddr, started: Instant, at1: Option<Instant>) -> Watch {
        Watch {
            addr,
            started,
            at1,
            at2: None,
        }
    }
}

/// What [`watch`] saw, in milliseconds.
#[derive(Default)]
struct Trip {
    /// at2 - at1 of each block (negative when node 2 had it first).
    lags: Vec<f64>,
    /// at1 - started: the making at node 1.
    made: Vec<f64>,
    lost: u32,
    polls: u64,
    poll_time: Duration,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(earlier - later).as_secs_f64() * 1e3,
    }
}

/// A node's two kernel block lists (the admin's and the automatic one).
fn block_lists(net: &BenchNet) -> Result<[PinnedLpm; 2]> {
    let pins = pin_dir(net);
    Ok([
        PinnedLpm::open(&pins.join("BLOCK"))?,
        PinnedLpm::open(&pins.join("AUTO_BLOCK"))?,
    ])
}

fn covered(lists: &[PinnedLpm; 2], addr: IpAddr) -> Result<bool> {
    Ok(lists[0].covers(addr)? || lists[1].covers(addr)?)
}

/// Takes the blocks a maker sends and polls both nodes' block lists every
/// millisecond until each is in both, or [`GIVE_UP`] after it was made.
fn watch(rx: mpsc::Receiver<Result<Watch>>, pair: &Pair) -> Result<Trip> {
    let (node1, node2) = (block_lists(&pair.net1)?, block_lists(&pair.net2)?);
    let mut trip = Trip::default();
    let mut pending: Vec<Watch> = Vec::new();
    let mut maker_done = false;
    loop {
        loop {
            match rx.try_recv() {
                Ok(w) => pending.push(w?),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    maker_done = true;
                    break;
                }
            }
        }
        let poll = Instant::now();
        let mut still = Vec::with_capacity(pending.len());
        for mut w in pending.drain(..) {
            if w.at1.is_none() && covered(&node1, w.addr)? {
                w.at1 = Some(Instant::now());
            }
            if w.at2.is_none() && covered(&node2, w.addr)? {
                w.at2 = Some(Instant::now());
            }
            match (w.at1, w.at2) {
                (Some(a1), Some(a2)) => {
                    trip.lags.push(ms(a2, a1));
                    trip.made.push(ms(a1, w.started));
                }
                _ if w.started.elapsed() > GIVE_UP => trip.lost += 1,
                _ => still.push(w),
            }
        }
        pending = still;
        trip.poll_time += poll.elapsed();
        trip.polls += 1;
        if maker_done && pending.is_empty() {
            return Ok(trip);
        }
        signal::check()?;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `count` blocks at node 1 with `tarpit block add`, `rate` a second.
fn admin_blocks(env: &Env, pair: &Pair, tx: mpsc::Sender<Result<Watch>>) {
    let p = &env.profile;
    let interval = Duration::from_secs_f64(1.0 / p.cluster_block_rate.max(1) as f64);
    let t0 = Instant::now();
    for i in 0..p.cluster_blocks {
        if signal::interrupted() {
            return;
        }
        // Paced from the start, so a slow command does not stretch the
        // pace of the rest.
        if let Some(wait) = (t0 + interval * i).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let addr = block_addr(i);
        let started = Instant::now();
        let r = env
            .tarpit
            .path()
            .and_then(|bin| {
                cli(
                    bin,
                    &pair.node1.config,
                    &["block", "add", &addr.to_string()],
                )
            })
            .map(|_| Watch::new(addr, started, Some(Instant::now())));
        let failed = r.is_err();
        if tx.send(r).is_err() || failed {
            return;
        }
    }
}

/// One bot per source address at node 1, `rate` a second: it talks
/// before the banner (one strike, and `pregreet_strikes = 1`: blocked).
fn offender_blocks(
    env: &Env,
    pair: &Pair,
    sources: &[IpAddr],
    tx: mpsc::Sender<Result<Watch>>,
) -> Result<()> {
    let interval = Duration::from_secs_f64(1.0 / env.profile.cluster_block_rate.max(1) as f64);
    pair.net1.in_client(|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let t0 = tokio::time::Instant::now();
            let mut bots = tokio::task::JoinSet::new();
            for (i, &src) in sources.iter().enumerate() {
                if signal::interrupted() {
                    break;
                }
                tokio::time::sleep_until(t0 + interval * i as u32).await;
                let _ = tx.send(Ok(Watch::new(src, Instant::now(), None)));
                bots.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), bot(src)).await;
                });
            }
            while bots.join_next().await.is_some() {}
        });
        Ok(())
    })?
}

/// Connects from `src`, says EHLO before the banner, reads until closed.
async fn bot(src: IpAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (sock, dst) = match src {
        IpAddr::V4(_) => (
            tokio::net::TcpSocket::new_v4()?,
            SocketAddr::from((SERVER_V4, PORT)),
        ),
        IpAddr::V6(_) => (
            tokio::net::TcpSocket::new_v6()?,
            SocketAddr::from((super::super::netns::SERVER_V6, PORT)),
        ),
    };
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = sock.connect(dst).await?;
    s.write_all(b"EHLO bot.example\r\n").await?;
    let mut buf = [0u8; 512];
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}

/// The side of one way of blocking: the trip's figures and node 2's
/// histogram over the phase.
fn trip_side(name: &str, count: u32, elapsed: Duration, trip: Trip, hist: Option<Hist>) -> Side {
    let lags = sorted(trip.lags);
    let made = sorted(trip.made);
    let mut s = Side::new(name);
    s.set("blocks", count as f64)
        .set("seen", lags.len() as f64)
        .set("lost", trip.lost as f64)
        .set("per_s", count as f64 / elapsed.as_secs_f64())
        .set("lag_min_ms", lags.first().copied().unwrap_or(f64::NAN))
        .set("lag_p50_ms", quantile(&lags, 0.5))
        .set("lag_p90_ms", quantile(&lags, 0.9))
        .set("lag_p99_ms", quantile(&lags, 0.99))
        .set("lag_max_ms", lags.last().copied().unwrap_or(f64::NAN))
        .set("made_p50_ms", quantile(&made, 0.5))
        .set("made_p99_ms", quantile(&made, 0.99))
        .set(
            "poll_interval_ms",
            elapsed.as_secs_f64() * 1e3 / trip.polls.max(1) as f64,
        )
        .set(
            "poll_cost_us",
            trip.poll_time.as_secs_f64() * 1e6 / trip.polls.max(1) as f64,
        );
    match hist {
        Some(h) => h.set_on(&mut s),
        None => {
            s.note("node 2's metrics unreadable");
        }
    }
    s
}

fn admin_propagation(env: &Env, pair: &Pair) -> Result<Side> {
    let before = Hist::of(&pair.net2);
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let trip = std::thread::scope(|s| {
        s.spawn(|| admin_blocks(env, pair, tx));
        watch(rx, pair)
    })?;
    let elapsed = t0.elapsed();
    let hist = Hist::of(&pair.net2).zip(before).map(|(a, b)| a.since(&b));
    Ok(trip_side(
        "admin_block",
        env.profile.cluster_blocks,
        elapsed,
        trip,
        hist,
    ))
}

fn offender_propagation(env: &Env, pair: &Pair) -> Result<Side> {
    let count = env.profile.cluster_offenders;
    let sources: Vec<IpAddr> = pair
        .net1
        .add_client_addrs(count.div_ceil(2))?
        .into_iter()
        .take(count as usize)
        .collect();
    let before = Hist::of(&pair.net2);
    let offence = "kind=\"offence\"";
    // No sample yet is none counted.
    let strikes0 =
        metric_sum(&pair.net2, "tarpit_cluster_applied_total", Some(offence)).unwrap_or(0.0);
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    let (made, trip) = std::thread::scope(|s| {
        let maker = s.spawn(|| offender_blocks(env, pair, &sources, tx));
        let trip = watch(rx, pair);
        (maker.join(), trip)
    });
    made.map_err(|_| anyhow::anyhow!("the bots' thread panicked"))??;
    let trip = trip?;
    let elapsed = t0.elapsed();
    let hist = Hist::of(&pair.net2).zip(before).map(|(a, b)| a.since(&b));
    let mut s = trip_side("offender_block", sources.len() as u32, elapsed, trip, hist);
    let strikes = metric_sum(&pair.net2, "tarpit_cluster_applied_total", Some(offence));
    if let Some(n) = strikes {
        s.set("strikes_counted_at_node2", n - strikes0);
    }
    Ok(s)
}

/// `tarpit_cluster_propagation_seconds` of a node: cumulative buckets
/// (upper bound in seconds, count), sum and count.
struct Hist {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    const NAME: &str = "tarpit_cluster_propagation_seconds";

    fn of(net: &BenchNet) -> Option<Hist> {
        Some(Hist::parse(&scrape(net).ok()?))
    }

    fn parse(text: &str) -> Hist {
        let h = Hist::NAME;
        let mut buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&format!("{h}_bucket{{le=\""))?;
                let (le, rest) = rest.split_once('"')?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, rest.rsplit(' ').next()?.parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Hist {
            buckets,
            sum: sum_in(text, &format!("{h}_sum"), None).unwrap_or(0.0),
            count: sum_in(text, &format!("{h}_count"), None).unwrap_or(0.0),
        }
    }

    /// The samples added since `before`.
    fn since(&self, before: &Hist) -> Hist {
        let at = |le: f64| {
            before
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n)
        };
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, n - at(le)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// Count, mean, the share within 250 ms, and the bucket bounds that
    /// hold the median and the 99th percentile (it knows no finer).
    fn set_on(&self, s: &mut Side) {
        s.set("agent_hist_count", self.count);
        if self.count <= 0.0 {
            return;
        }
        let le_of = |q: f64| {
            self.buckets
                .iter()
                .find(|(_, n)| *n >= q * self.count)
                .map_or(f64::NAN, |(le, _)| le * 1e3)
        };
        s.set("agent_hist_mean_ms", self.sum / self.count * 1e3)
            .set("agent_hist_p50_le_ms", le_of(0.5))
            .set("agent_hist_p99_le_ms", le_of(0.99));
        if let Some((_, n)) = self
            .buckets
            .iter()
            .find(|(le, _)| (*le - 0.25).abs() < 1e-9)
        {
            s.set("agent_hist_within_250ms", n / self.count);
        }
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
        "Two MX hosts sharing one Redis: a block made at node 1 until it is in node 2's XDP block list",
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
            prop.sides.push(Side::from_result(
                "admin_block",
                admin_propagation(env, &pair),
            ));
            signal::check()?;
            prop.sides.push(Side::from_result(
                "offender_block",
                offender_propagation(env, &pair),
            ));
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
                (&mut prop, &["admin_block", "offender_block"][..]),
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
    for side in ["admin_block", "offender_block"] {
        prop.absolute(side, "lag_p50_ms", None);
        prop.absolute(side, "lag_p99_ms", Aim::below(1000.0));
        prop.absolute(side, "lost", Aim::at_most(0.0));
    }
    grey.ratio("redis_get_tcp", "local_check", "p50_ns", None);
    grey.ratio("redis_get_unix", "local_check", "p50_ns", None);
    grey.absolute("greylist_propagation", "lag_p99_ms", Aim::below(1000.0));
    prop.notes.push(
        "lag = from the moment the block is in node 1's kernel until it is in node 2's: \
         bpf(2) look-ups of the address in both nodes' pinned BLOCK and AUTO_BLOCK tries, every \
         ~1 ms (poll_interval_ms; each pass poll_cost_us), so a time is late by at most that. \
         admin_block: `tarpit block add ADDR` at node 1 (node 1 has the block when the command \
         returns; made_* = the command's run). offender_block: a bot per source address talks \
         before node 1's banner (offenders.pregreet_strikes = 1 at both hosts); node 1's time is \
         the first poll that finds the block there (made_* = from the bot's connect). What \
         bounds a block's way: node 1 finds its own new blocks by comparing its kernel block \
         list with what it shared every 250 ms, so a block waits 0-250 ms for that scan (p50 \
         ~125 ms, p99 ~250 ms by design), then one SET and one PUBLISH to Redis and node 2's \
         write into its own maps, a few ms. An offender's strike takes a faster way: it is \
         announced at once and counts at node 2 too (strikes_counted_at_node2), which blocks it \
         on its own; the lag is the faster of the two (negative when node 2 was first). \
         agent_hist_* is node 2's own tarpit_cluster_propagation_seconds over the phase (blocks \
         that came as records: from the time node 1 recorded, which for an admin's block is the \
         state file's added_at, to the second, so it reads up to 1 s high; buckets 10, 50, 100, \
         250, 500 ms, ...: the p50/p99 there are bucket bounds)."
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

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# TYPE tarpit_cluster_applied counter
tarpit_cluster_applied_total{kind=\"block\"} 3
tarpit_cluster_applied_total{kind=\"greylist\"} 5
tarpit_cluster_applied_totals 99
tarpit_cluster_propagation_seconds_sum 1.5
tarpit_cluster_propagation_seconds_count 4
tarpit_cluster_propagation_seconds_bucket{le=\"0.1\"} 1
tarpit_cluster_propagation_seconds_bucket{le=\"0.25\"} 3
tarpit_cluster_propagation_seconds_bucket{le=\"1.0\"} 4
tarpit_cluster_propagation_seconds_bucket{le=\"+Inf\"} 4
";

    #[test]
    fn sums_a_family_by_label() {
        let all = sum_in(PAGE, "tarpit_cluster_applied_total", None);
        assert_eq!(
            all,
            Some(8.0),
            "another family's name prefix is not counted"
        );
        let grey = sum_in(
            PAGE,
            "tarpit_cluster_applied_total",
            Some("kind=\"greylist\""),
        );
        assert_eq!(grey, Some(5.0));
        assert_eq!(sum_in(PAGE, "tarpit_cluster_up", None), None);
    }

    #[test]
    fn reads_the_histogram_and_its_growth() {
        let after = Hist::parse(PAGE);
        assert_eq!((after.count, after.sum), (4.0, 1.5));
        let before = Hist::parse(
            "tarpit_cluster_propagation_seconds_sum 0.5\n\
             tarpit_cluster_propagation_seconds_count 1\n\
             tarpit_cluster_propagation_seconds_bucket{le=\"0.1\"} 1\n\
             tarpit_cluster_propagation_seconds_bucket{le=\"0.25\"} 1\n\
             tarpit_cluster_propagation_seconds_bucket{le=\"1.0\"} 1\n\
             tarpit_cluster_propagation_seconds_bucket{le=\"+Inf\"} 1\n",
        );
        let d = after.since(&before);
        assert_eq!((d.count, d.sum), (3.0, 1.0));
        let mut s = Side::new("x");
        d.set_on(&mut s);
        // 0 of 3 within 100 ms, 2 within 250 ms, 3 within 1 s.
        assert_eq!(s.get("agent_hist_p50_le_ms"), Some(250.0));
        assert_eq!(s.get("agent_hist_p99_le_ms"), Some(1000.0));
        assert_eq!(s.get("agent_hist_within_250ms"), Some(2.0 / 3.0));
    }

    #[test]
    fn blocked_addresses_are_distinct_test_addresses_clear_of_the_bots() {
        let addrs: std::collections::HashSet<IpAddr> = (0..70_000).map(block_addr).collect();
        assert_eq!(addrs.len(), 70_000);
        assert!(
            addrs
                .iter()
                .all(|a| super::super::super::netns::is_test_address(*a))
        );
        // The bots use 198.51.100.10..109 (BenchNet::add_client_addrs).
        assert!(addrs.iter().all(|a| match a {
            IpAddr::V4(v4) => v4.octets()[3] >= 150,
            IpAddr::V6(_) => true,
        }));
    }
}
