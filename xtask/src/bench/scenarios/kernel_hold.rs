//! Scenario 7, kernel hold (XDP zero-window tarpit): the same bots held
//! by XDP, with no socket on the server, and by the agent in its greeting
//! delay, with a socket each (as many as one process's descriptors allow).
//! Each side gets a fresh world.
//!
//! The bots come from several worker processes in the client namespace
//! (at most [`PER_WORKER`] sockets each, under the 20,000 descriptors one
//! process may hold) and from every source address of the profile. Most
//! wait silently for a banner; on the kernel side some talk first, so that
//! their stacks probe the zero window and the cost per probe answered can
//! be read. On the agent's side every bot is silent: a talker is a
//! pre-greet offender there and would be closed, not held.
//!
//! What is read, per side: sockets of the server namespace
//! (/proc/net/sockstat) and the holding process's RSS before and after,
//! the connections the clients still hold after the window (and whether a
//! byte of banner reached any), the XDP program's own run time (BPF run
//! statistics) per SYN answered and per probe answered, and the whole
//! machine's busy CPU per bot set up (the clients' own connects are in it,
//! the same on both sides).
use std::time::Duration;

use anyhow::{Context, Result};

use super::super::agent::{Agent, base_config};
use super::super::netns::{BenchNet, ClientConns, snmp_counters, tx_dropped};
use super::super::postfix::{self, Postfix};
use super::super::procstat::MachineCpu;
use super::super::report::{Aim, Scenario, Side};
use super::super::worker::{self, Mode, Spec, Workers};
use super::super::xdpblock::XdpBlock;
use super::super::{Env, bpfstats, procstat, signal};
use super::{TcpTrouble, both_families, zero_delays};

const PORT: u16 = 25;
/// Longer than connect phase and window together: nobody gets a banner.
const GREETING_DELAY: &str = "\"600s\"";
/// Connects in flight across all workers.
const CONNECT_CONCURRENCY: u32 = 512;
/// Sockets per worker process: its 20,000 descriptors minus headroom.
const PER_WORKER: u32 = 18_000;
/// Connects per second of the talkers (see [`start_bots`]).
const TALKER_CONNECTS_PER_S: u32 = 2_000;
/// What the bots come from: the client namespace's addresses (the
/// server's are destinations at its XDP hook, never sources).
const HELD_NETS: [&str; 2] = ["198.51.100.0/24", "fd5b:1e00::/64"];

#[derive(Clone, Copy, PartialEq)]
enum Holder {
    Agent,
    Kernel,
}

impl Holder {
    fn bots(self, env: &Env) -> u32 {
        match self {
            Holder::Kernel => env.profile.kernel_hold_bots,
            Holder::Agent => env.profile.kernel_hold_bots.min(agent_capacity()),
        }
    }

    fn name(self, bots: u32) -> String {
        match self {
            Holder::Agent => format!("agent@{bots}"),
            Holder::Kernel => format!("xdp@{bots}"),
        }
    }
}

/// How many bots the agent can hold here: a socket each, within the
/// descriptors a process may have (the hard limit; 20,000 on the bench
/// machine, which root there cannot raise), less room for its own files.
fn agent_capacity() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local rlimit.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        20_000
    };
    u32::try_from(hard.saturating_sub(2_000)).unwrap_or(u32::MAX)
}

/// Gives the client veth a packet queue. A veth has none by default: when
/// its peer's 256-slot receive ring is full the packet is dropped at
/// once, and the sending stack sees a local drop, which for a window probe
/// means a retry every 500 ms and one more strike each time, not the
/// exponential back-off of a probe lost on the way: thousands of talkers
/// probing together then give up within seconds, an artefact of the rig
/// no bot on a real network meets. With a queue, veth (Linux 6.16 and
/// later) stops the queue while the ring is full instead.
fn client_queue(net: &BenchNet) -> Result<()> {
    let ok = std::process::Command::new("tc")
        .args([
            "-n",
            &net.client_ns,
            "qdisc",
            "replace",
            "dev",
            &net.client_if,
        ])
        .args(["root", "pfifo", "limit", "100000"])
        .status()
        .context("cannot run tc")?
        .success();
    anyhow::ensure!(ok, "tc could not give the client veth a queue");
    Ok(())
}

/// One group of held bots: silent or talking, spread over workers.
fn start_bots(
    env: &Env,
    net: &BenchNet,
    sources: &[std::net::IpAddr],
    count: u32,
    talk: bool,
) -> Result<Option<Workers>> {
    if count == 0 {
        return Ok(None);
    }
    let spec = Spec {
        mode: Mode::Hold,
        targets: both_families(PORT),
        sources: sources.to_vec(),
        count,
        concurrency: CONNECT_CONCURRENCY,
        time_limit_ms: 240_000,
        talk,
        // Talkers probe on a schedule counted from their connect: paced,
        // their probes come spread out, as a botnet's do, instead of in
        // one burst of thousands that overflows the veth's 256-slot ring.
        connect_rate: if talk { TALKER_CONNECTS_PER_S } else { 0 },
    };
    Workers::start(&env.self_exe, net, count.div_ceil(PER_WORKER), &spec).map(Some)
}

/// XDP programs' run time and runs (the hold program is tail-called from
/// the entry program, whose statistics include it).
fn xdp_run(ids: &[u32]) -> (u64, u64) {
    bpfstats::snapshot(ids)
        .values()
        .filter(|s| s.kind == "xdp")
        .fold((0, 0), |(t, n), s| (t + s.run_time_ns, n + s.run_cnt))
}

/// The kernel hold's counters, or zeros where there is no kernel hold.
#[derive(Default, Clone, Copy)]
struct HoldCounters {
    syn: u64,
    handshakes: u64,
    probes: u64,
    void_bytes: u64,
    rate_limited: u64,
    dropped: u64,
    unavailable: u64,
}

impl HoldCounters {
    fn read(b: Option<&XdpBlock>) -> Result<HoldCounters> {
        let Some(b) = b else {
            return Ok(HoldCounters::default());
        };
        Ok(HoldCounters {
            syn: b.counter("hold_syn_answered")?,
            handshakes: b.counter("hold_handshakes")?,
            probes: b.counter("hold_probes_answered")?,
            void_bytes: b.counter("hold_bytes_void")?,
            rate_limited: b.counter("hold_rate_limited")?,
            dropped: b.counter("hold_dropped")?,
            unavailable: b.counter("hold_unavailable")?,
        })
    }

    fn since(&self, later: &HoldCounters) -> HoldCounters {
        HoldCounters {
            syn: later.syn.saturating_sub(self.syn),
            handshakes: later.handshakes.saturating_sub(self.handshakes),
            probes: later.probes.saturating_sub(self.probes),
            void_bytes: later.void_bytes.saturating_sub(self.void_bytes),
            rate_limited: later.rate_limited.saturating_sub(self.rate_limited),
            dropped: later.dropped.saturating_sub(self.dropped),
            unavailable: later.unavailable.saturating_sub(self.unavailable),
        }
    }
}

fn measure(env: &Env, holder: Holder) -> Result<Side> {
    let p = &env.profile;
    let bots = holder.bots(env);
    let talkers = match holder {
        Holder::Kernel => p.kernel_hold_talkers.min(bots),
        Holder::Agent => 0,
    };
    let net = BenchNet::new()?;
    let sources = net.add_client_addrs(p.source_addrs / 2)?;
    // XDP_TX on a veth reaches the peer only when the peer has an XDP
    // program: the same on both sides, so that the worlds differ only in
    // who holds.
    let _peer = testkit::xdp_pass::attach(&net.client_ns, &net.client_if)
        .context("cannot attach XDP to the client veth")?;
    client_queue(&net)?;
    if holder == Holder::Agent {
        // The agent, a child of ours, inherits it: every descriptor of the
        // hard limit.
        worker::raise_nofile();
    }
    let pf = Postfix::start(&net)?;
    let cap = (u64::from(bots) * 10).to_string();
    let cfg = zero_delays(base_config(&net, PORT, postfix::PROXY))
        .need("greeting.delay", GREETING_DELAY)
        .want("limits.sessions", (bots + 1000).to_string())
        .want("limits.per_ip", bots.to_string())
        .want("limits.per_ipv6_prefix", bots.to_string())
        .want("limits.idle", "\"900s\"")
        .want("limits.max_total_delay", "\"900s\"")
        // The caps are proven by the forged-flood test; here they must
        // not limit the bots, which come from few addresses.
        .want("kernel.hold_rate_per_source", cap.clone())
        .want("kernel.hold_burst_per_source", cap.clone())
        .want("kernel.hold_rate_total", cap.clone())
        .want("kernel.hold_burst_total", cap);
    let agent = Agent::start(&env.tarpit, &net, &cfg, Some(PORT))?;
    let pid = agent.pid().context("the agent has no pid")?;
    let block = match holder {
        Holder::Kernel => {
            let nets: Vec<String> = HELD_NETS.iter().map(|n| n.to_string()).collect();
            Some(XdpBlock::hold(env, &agent, &nets)?)
        }
        Holder::Agent => None,
    };
    let stats = bpfstats::StatsOn::enable().ok();
    let ids = bpfstats::prog_ids_of(pid);
    signal::sleep(Duration::from_millis(300))?;

    let sockets0 = net.server_tcp_inuse()?;
    let rss0 = procstat::rss_bytes(pid).unwrap_or(0);
    let agent_cpu0 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let hold0 = HoldCounters::read(block.as_ref())?;
    let xdp0 = xdp_run(&ids);
    let trouble = TcpTrouble::before(&net);
    let snmp0 = (snmp_counters(&net.client_ns), snmp_counters(&net.server_ns));
    let drops0 = (
        tx_dropped(&net.client_ns, &net.client_if),
        tx_dropped(&net.server_ns, &net.server_if),
    );
    let m0 = MachineCpu::now();

    let mut silent = start_bots(env, &net, &sources, bots - talkers, false)?;
    let mut talking = start_bots(env, &net, &sources, talkers, true)?;
    let mut ready = Vec::new();
    for w in [&mut silent, &mut talking].into_iter().flatten() {
        ready.extend(w.collect("ready", Duration::from_secs(300))?);
    }
    let ready = worker::sum(&ready);
    let m1 = MachineCpu::now();
    let agent_cpu1 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let xdp1 = xdp_run(&ids);
    let hold1 = HoldCounters::read(block.as_ref())?;
    // The agent takes its last clients off the accept queue a moment later.
    signal::wait_until(Duration::from_secs(15), || {
        net.client_conns_to(PORT)
            .map(|c| c.established >= ready.connected)
            .unwrap_or(false)
    })?;
    let sockets1 = net.server_tcp_inuse()?;
    let rss1 = procstat::rss_bytes(pid).unwrap_or(0);
    let clients1 = net.client_conns_to(PORT)?;
    let server_est1 = net.established_on(PORT)?;

    signal::sleep(p.kernel_hold_window)?;
    let m2 = MachineCpu::now();
    let agent_cpu2 = procstat::cpu_seconds(pid).unwrap_or(0.0);
    let xdp2 = xdp_run(&ids);
    let hold2 = HoldCounters::read(block.as_ref())?;
    let sockets2 = net.server_tcp_inuse()?;
    let rss2 = procstat::rss_bytes(pid).unwrap_or(0);
    let clients2: ClientConns = net.client_conns_to(PORT)?;
    let server_est2 = net.established_on(PORT)?;
    let snmp2 = (snmp_counters(&net.client_ns), snmp_counters(&net.server_ns));
    let drops2 = (
        tx_dropped(&net.client_ns, &net.client_if),
        tx_dropped(&net.server_ns, &net.server_if),
    );
    drop(stats);

    let mut done = Vec::new();
    for w in [&mut silent, &mut talking].into_iter().flatten() {
        w.release();
        done.extend(w.collect("done", Duration::from_secs(60))?);
    }
    let done = worker::sum(&done);
    drop(silent);
    drop(talking);

    let name = holder.name(bots);
    let mut s = Side::new(&name);
    trouble.set_since(&net, &mut s);
    let connect = m0.since(&m1);
    let window = m1.since(&m2);
    let win_s = p.kernel_hold_window.as_secs_f64();
    let held = clients1.established.max(1) as f64;
    s.set("bots", bots as f64)
        .set("talkers", talkers as f64)
        .set("connected", ready.connected as f64)
        .set("connect_failed", ready.failed as f64)
        .set("connect_phase_s", ready.elapsed_ms / 1e3)
        .set("client_established", clients1.established as f64)
        .set(
            "client_established_after_window",
            clients2.established as f64,
        )
        .set("client_send_q_after_window", clients2.with_send_q as f64)
        .set("client_probing_after_window", clients2.probing as f64)
        .set(
            "client_probes_unanswered_after_window",
            clients2.probes_unanswered as f64,
        )
        .set("banner_bytes_received", clients2.recv_q_bytes as f64)
        .set("closed_early", done.closed_early as f64)
        .set("server_established", server_est1.max(server_est2) as f64)
        .set("server_tcp_sockets_idle", sockets0 as f64)
        .set(
            "server_tcp_sockets_added",
            sockets1.max(sockets2).saturating_sub(sockets0) as f64,
        )
        .set("agent_rss_idle_kib", rss0 as f64 / 1024.0)
        .set(
            "agent_rss_added_kib",
            rss1.max(rss2).saturating_sub(rss0) as f64 / 1024.0,
        )
        .set(
            "agent_cpu_ms_connect_phase",
            (agent_cpu1 - agent_cpu0) * 1e3,
        )
        .set(
            "agent_cpu_pct_while_holding",
            (agent_cpu2 - agent_cpu1) / win_s * 100.0,
        )
        .set("machine_busy_cpu_s_connect_phase", connect.busy)
        .set("machine_busy_ns_per_bot_setup", connect.busy * 1e9 / held)
        .set(
            "machine_busy_pct_while_holding",
            window.busy / win_s * 100.0,
        )
        .set(
            "server_sockets_per_bot",
            sockets1.max(sockets2).saturating_sub(sockets0) as f64 / held,
        )
        .set(
            "agent_rss_bytes_per_bot",
            rss1.max(rss2).saturating_sub(rss0) as f64 / held,
        );
    // Why a bot lost its connection, as the two stacks count it.
    for (side, key) in [
        ("client", "Tcp.EstabResets"),
        ("client", "TcpExt.TCPAbortOnTimeout"),
        ("client", "Tcp.InErrs"),
        ("client", "TcpExt.PAWSEstab"),
        ("server", "Tcp.OutRsts"),
    ] {
        let (a, b) = match side {
            "client" => (&snmp0.0, &snmp2.0),
            _ => (&snmp0.1, &snmp2.1),
        };
        let d = b
            .get(key)
            .copied()
            .unwrap_or(0)
            .saturating_sub(a.get(key).copied().unwrap_or(0));
        s.set(&format!("{side}_{}", key.replace('.', "_")), d as f64);
    }
    s.set(
        "client_veth_tx_dropped",
        drops2.0.saturating_sub(drops0.0) as f64,
    )
    .set(
        "server_veth_tx_dropped",
        drops2.1.saturating_sub(drops0.1) as f64,
    );
    if holder == Holder::Agent {
        s.set(
            "holder_cpu_ns_per_bot_setup",
            (agent_cpu1 - agent_cpu0) * 1e9 / held,
        );
    }
    let (connect_hold, window_hold) = (hold0.since(&hold1), hold1.since(&hold2));
    let all = hold0.since(&hold2);
    if holder == Holder::Kernel {
        s.set("hold_syn_answered", all.syn as f64)
            .set("hold_handshakes", all.handshakes as f64)
            .set("hold_probes_answered", all.probes as f64)
            .set("hold_probes_answered_in_window", window_hold.probes as f64)
            .set("hold_bytes_void", all.void_bytes as f64)
            .set("hold_rate_limited", all.rate_limited as f64)
            .set("hold_dropped", all.dropped as f64)
            .set("hold_unavailable", all.unavailable as f64);
        let (t_connect, n_connect) = (xdp1.0 - xdp0.0, xdp1.1 - xdp0.1);
        let (t_window, n_window) = (xdp2.0 - xdp1.0, xdp2.1 - xdp1.1);
        if n_connect > 0 {
            s.set(
                "xdp_ns_per_packet_connect_phase",
                t_connect as f64 / n_connect as f64,
            );
        }
        if connect_hold.syn > 0 {
            // Every packet of the phase (SYN, the handshake's ACK, the
            // talkers' first probes) per SYN answered.
            let per_syn = t_connect as f64 / connect_hold.syn as f64;
            s.set("xdp_ns_per_syn", per_syn)
                .set("holder_cpu_ns_per_bot_setup", per_syn);
        }
        if window_hold.probes > 0 {
            s.set(
                "xdp_ns_per_probe",
                t_window as f64 / window_hold.probes as f64,
            );
        }
        if n_window > 0 {
            s.set("xdp_packets_in_window", n_window as f64);
        }
        if all.syn == 0 {
            s.note("the kernel hold answered no SYN: the bots were not held by XDP");
        }
    }
    if let Some(e) = ready.first_error {
        s.note(format!("first connect error: {e}"));
    }
    if procstat::rss_bytes(pid).is_none() {
        s.note("the agent exited during the hold");
    }
    drop(block);
    drop(agent);
    drop(pf);
    drop(net);
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let bots = p.kernel_hold_bots;
    let agent_bots = Holder::Agent.bots(env);
    let mut sc = Scenario::new(
        "kernel_hold",
        "Bots held by XDP with no socket (zero window, SYN cookies) against the same bots held by the agent",
    );
    sc.param("bots", bots)
        .param("talkers_of_them_on_the_xdp_side", p.kernel_hold_talkers)
        .param("bots_per_worker_max", PER_WORKER)
        .param("source_addresses", p.source_addrs)
        .param("window_s", p.kernel_hold_window.as_secs_f64());
    let (xdp, agent) = (Holder::Kernel.name(bots), Holder::Agent.name(agent_bots));
    sc.baseline = Some(agent.clone());
    for holder in [Holder::Agent, Holder::Kernel] {
        signal::check()?;
        let side = Side::from_result(&holder.name(holder.bots(env)), measure(env, holder));
        signal::check()?;
        sc.sides.push(side);
    }
    sc.ratio(
        &xdp,
        &agent,
        "holder_cpu_ns_per_bot_setup",
        Aim::at_most(1.0),
    );
    sc.ratio(&xdp, &agent, "machine_busy_ns_per_bot_setup", None);
    sc.ratio(&xdp, &agent, "machine_busy_pct_while_holding", None);
    sc.ratio(&xdp, &agent, "server_sockets_per_bot", Aim::at_most(0.0));
    sc.absolute(
        &xdp,
        "client_established_after_window",
        Aim::at_least(bots as f64),
    );
    sc.absolute(&xdp, "server_sockets_per_bot", Aim::at_most(0.0));
    sc.absolute(&xdp, "banner_bytes_received", Aim::at_most(0.0));
    sc.absolute(
        &xdp,
        "client_send_q_after_window",
        Aim::at_least(p.kernel_hold_talkers as f64),
    );
    sc.absolute(
        &xdp,
        "client_probes_unanswered_after_window",
        Aim::at_most(0.0),
    );
    sc.absolute(&xdp, "closed_early", Aim::at_most(0.0));
    sc.absolute(&xdp, "xdp_ns_per_syn", None);
    sc.absolute(&xdp, "xdp_ns_per_probe", None);
    sc.absolute(&agent, "server_sockets_per_bot", None);
    sc.absolute(&agent, "agent_rss_bytes_per_bot", None);
    sc.notes.push(
        "server_tcp_sockets_added: /proc/net/sockstat of the server namespace with the bots in, \
         minus before (any state, the listeners included); agent_rss_added_kib: the agent's VmRSS \
         likewise. Kernel socket memory is not in RSS."
            .into(),
    );
    sc.notes.push(
        "xdp_ns_per_syn: the XDP program's run time (BPF run statistics, the hold program \
         included through the tail call) over the connect phase, per SYN the hold answered: it \
         covers the SYN, the handshake's ACK and the talkers' first probes. xdp_ns_per_probe: its \
         run time over the window per probe answered (in the window only the talkers send). \
         The XDP_TX transmit itself runs in the veth's NAPI, outside the program's time. \
         holder_cpu_ns_per_bot_setup is the holder's own code: that XDP time per SYN, against \
         the agent process's CPU per bot accepted (the kernel's handshake and accept work for \
         it, in softirq, are not in it); \
         machine_busy_ns_per_bot_setup counts everything, the clients' own connects included, \
         the same on both sides."
            .into(),
    );
    if agent_bots < bots {
        sc.notes.push(format!(
            "The agent holds {agent_bots} bots, not {bots}: one socket each, and one process may \
             have no more descriptors than the hard limit here allows; compare the per-bot \
             figures. The kernel hold has no such limit: it keeps no socket."
        ));
    }
    sc.notes.push(
        "On the agent's side every bot is silent (a talker would be closed as a pre-greet \
         offender, not held); on the XDP side the talkers' data stays in their Send-Q while their \
         stacks probe the zero window. The hold's reply caps are raised for the bench: the bots \
         come from few addresses; the forged-flood test proves the caps."
            .into(),
    );
    Ok(vec![sc])
}
