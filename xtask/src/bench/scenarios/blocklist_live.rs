//! The block-list gate on a fair rig: the same SYN frames, built by the
//! kernel in a page pool with XDP's headroom (`BPF_PROG_RUN` with live
//! frames, see [`liveframes`]), received on the server veth of a bench
//! namespace, dropped either by the agent's real `tarpit_xdp` (its block
//! list) or, after an XDP program that passes everything, by the nftables
//! set rule on the netdev ingress hook once the stack has built an skb.
//!
//! This is a NIC driver's receive path without the NIC: both sides get
//! identical page-pool frames at the same kind of ifindex; XDP decides
//! before an skb exists, nftables only after, which is exactly the cost
//! XDP saves on a real NIC. The kernel runs all of it on the calling
//! thread with bottom halves off (XDP_PASS frames go through
//! `netif_receive_skb_list` there), so that thread's CPU time is the cost;
//! ksoftirqd's runtime is added in case the kernel defers anything. Each
//! side's counter must show every frame dropped by its dropper, or the side
//! fails. A third side runs a program that drops everything at once: the
//! harness's own cost (page pool, frame reset, the loop), which both sides
//! include, as a driver's receive ring would be.
//!
//! The sides take turns, one call each, on one thread that moves between
//! their namespaces: whatever else loads the box (two shared cores) lands
//! on all of them alike instead of on whichever side ran during a burst.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::liveframes::{self, Prog, XDP_DROP, XDP_PASS};
use super::super::report::{Aim, Scenario, Side};
use super::super::{Env, bpfstats, procstat, signal, synflood};
use super::blocklist::{PORT, World, side_name, source_params};

/// Frames per BPF_PROG_RUN call: long enough that the page pool each call
/// sets up is lost in the noise, short enough to alternate the sides, and
/// IPv4 with IPv6, often, and to stop in time.
const REPEAT: u32 = 1 << 16;
/// Distinct frames the calls cycle through: IPv4 and IPv6 alternating,
/// each with its own block-listed source and port. One call repeats one
/// frame (BPF_PROG_RUN takes one), so a source is new to the maps only at
/// its first call: this measures a flood from a known set of sources.
const FRAMES: u32 = 64;
/// Frames of the warm-up (caches, the rule's first match, the maps).
const WARM_UP: u64 = 4 * REPEAT as u64;

/// What a side drops with.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// The agent's `tarpit_xdp` with the sources on its block list.
    Xdp,
    /// XDP_PASS, then the nftables rule.
    Nftables,
    /// XDP_DROP for every frame without looking: the harness's own cost.
    Floor,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Xdp => side_name(true),
            Kind::Nftables => side_name(false),
            Kind::Floor => "floor_drop_all",
        }
    }
}

/// Frames run and what they cost the calling thread.
#[derive(Default, Clone, Copy)]
struct Pass {
    frames: u64,
    v4: u64,
    v6: u64,
    calls: u64,
    thread_cpu: f64,
    ksoftirqd: f64,
    /// Sum over calls of the kernel's mean ns per frame times the frames.
    kernel_ns: f64,
}

/// One side: its program, the server namespace and veth it runs at, its
/// frames, and which world counts its drops.
struct Lane {
    kind: Kind,
    prog: Prog,
    prog_id: Option<u32>,
    ns: File,
    ifindex: u32,
    frames: Vec<Vec<u8>>,
    world: usize,
}

impl Lane {
    fn new(kind: Kind, world: usize, w: &World) -> Result<Lane> {
        let (src_mac, dst_mac) = w.macs()?;
        let (prog_id, prog) = match kind {
            Kind::Xdp => {
                let (id, prog) = agent_xdp(w)?;
                (Some(id), prog)
            }
            Kind::Nftables => (None, Prog::returning(XDP_PASS, "tpbench_pass")?),
            Kind::Floor => (None, Prog::returning(XDP_DROP, "tpbench_drop")?),
        };
        let net = &w.net;
        let ifname = net.server_if.clone();
        Ok(Lane {
            kind,
            prog,
            prog_id,
            ns: File::open(format!("/var/run/netns/{}", net.server_ns))
                .with_context(|| format!("no namespace {}", net.server_ns))?,
            ifindex: net.in_server(|| liveframes::ifindex(&ifname))??,
            frames: (0..FRAMES)
                .map(|i| synflood::frame(i, dst_mac, src_mac, PORT))
                .collect(),
            world,
        })
    }
}

/// Moves the calling thread into a network namespace.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns(2) on an open namespace fd; it changes only the calling
    // thread, a scoped thread of ours that ends after the runs.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to the CPU it runs on, as a NIC queue's
/// receive path is pinned to its interrupt's CPU. Unpinned, some runs
/// showed the harness (and so every side) 40-50 ns dearer per frame for the
/// whole run, as the thread moved between the two CPUs.
fn stay_on_this_cpu() -> Result<()> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).context("sched_getcpu failed")?;
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; `cpu` came from the kernel,
    // below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread, a scoped thread of ours; `set`
    // is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs up to `count` frames per lane, `REPEAT` per call, the lanes taking
/// turns call by call, on a thread of its own that enters each lane's
/// namespace before its call (the ifindex is resolved there). Stops at
/// `limit` of wall time.
fn interleaved(lanes: &[Lane], count: u64, limit: Duration) -> Result<Vec<Pass>> {
    let ksoftirqd = procstat::ksoftirqd_pids();
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<Vec<Pass>> {
            stay_on_this_cpu()?;
            let mut out = vec![Pass::default(); lanes.len()];
            let start = Instant::now();
            for turn in 0usize.. {
                let left = count.saturating_sub(out.first().map_or(count, |p| p.frames));
                if left == 0 || start.elapsed() >= limit {
                    break;
                }
                signal::check()?;
                let n = u32::try_from(left).map_or(REPEAT, |l| l.min(REPEAT));
                for (lane, p) in lanes.iter().zip(out.iter_mut()) {
                    let frame = &lane.frames[turn % lane.frames.len()];
                    enter(&lane.ns)?;
                    let k0 = procstat::runtime_of(&ksoftirqd);
                    let cpu0 = procstat::thread_cpu();
                    let r = lane.prog.run_live(frame, lane.ifindex, n)?;
                    p.thread_cpu += procstat::thread_cpu().saturating_sub(cpu0).as_secs_f64();
                    p.ksoftirqd += (procstat::runtime_of(&ksoftirqd) - k0).max(0.0);
                    p.frames += u64::from(n);
                    p.calls += 1;
                    p.kernel_ns += f64::from(r.kernel_ns) * f64::from(n);
                    // Ethertype 0x0800 is IPv4, else IPv6 (synflood::frame).
                    if frame.get(12) == Some(&0x08) {
                        p.v4 += u64::from(n);
                    } else {
                        p.v6 += u64::from(n);
                    }
                }
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the live-frames thread panicked"))?
    })
}

/// The agent's loaded `tarpit_xdp` (found from the program ids it holds,
/// as bpfstats does): its id and an fd of our own.
fn agent_xdp(w: &World) -> Result<(u32, Prog)> {
    let pid = w
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .context("the agent is not running")?;
    let ids = bpfstats::prog_ids_of(pid);
    let id = bpfstats::snapshot(&ids)
        .into_iter()
        .find(|(_, s)| s.name == "tarpit_xdp" && s.kind == "xdp")
        .map(|(id, _)| id)
        .with_context(|| format!("the agent (pid {pid}) holds no tarpit_xdp program"))?;
    Ok((id, Prog::by_id(id)?))
}

/// The figures of one lane's measured run; `dropped` is its dropper's
/// counter (none for the floor), which must equal the frames run.
fn side_of(kind: Kind, run: &Pass, dropped: Option<u64>) -> Result<Side> {
    if run.frames == 0 {
        bail!("no frame ran in time");
    }
    let mut s = Side::new(kind.name());
    if let Some(d) = dropped {
        if d != run.frames {
            bail!(
                "{} frames ran but the {} counter shows {d} dropped: the figure would not be \
                 the drop's",
                run.frames,
                kind.name()
            );
        }
        s.set("dropped", d as f64);
    }
    let path = run.thread_cpu + run.ksoftirqd;
    let frames = run.frames as f64;
    s.set("frames", frames)
        .set("frames_v4", run.v4 as f64)
        .set("frames_v6", run.v6 as f64)
        .set("repeat_per_call", f64::from(REPEAT))
        .set("calls", run.calls as f64)
        .set("thread_cpu_s", run.thread_cpu)
        .set("ksoftirqd_cpu_s", run.ksoftirqd)
        .set("path_cpu_s", path)
        .set("kernel_timer_ns_per_frame", run.kernel_ns / frames);
    if path > 0.0 {
        s.set("drops_per_cpu_s", frames / path)
            .set("ns_per_packet", path * 1e9 / frames);
    }
    Ok(s)
}

/// The program's own run time (BPF statistics), in a pass of its own:
/// statistics cost clock reads per run, kept out of the measured pass.
fn stats_pass(lane: &Lane, count: u64, limit: Duration) -> Result<Option<f64>> {
    let Some(id) = lane.prog_id else {
        return Ok(None);
    };
    let stats = bpfstats::StatsOn::enable()?;
    let before = bpfstats::snapshot(&[id]);
    interleaved(std::slice::from_ref(lane), count, limit)?;
    let mut t = bpfstats::Totals::default();
    t.add(&before, &bpfstats::snapshot(&[id]));
    drop(stats);
    Ok(t.0
        .values()
        .find(|t| t.run_cnt > 0)
        .map(|t| t.run_time_ns as f64 / t.run_cnt as f64))
}

/// The sides in the report's order, and the world each runs in (0 drops
/// in nftables, 1 in the agent's XDP; the floor's program drops every
/// frame before the rule of world 0 could see it).
const SIDES: [(Kind, usize); 3] = [(Kind::Nftables, 0), (Kind::Xdp, 1), (Kind::Floor, 0)];

/// Measures the three sides, taking turns; a side that cannot run (no
/// agent, no nft) is reported with its reason and the others still run.
fn measure(env: &Env) -> Vec<Side> {
    let worlds = [World::new(env, false), World::new(env, true)];
    let mut lanes = Vec::new();
    let mut sides = Vec::new();
    for (kind, world) in SIDES {
        let lane = match &worlds[world] {
            Ok(w) => Lane::new(kind, world, w),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        match lane {
            Ok(l) => lanes.push(l),
            Err(e) => sides.push(Side::from_result(kind.name(), Err(e))),
        }
    }
    match measured_sides(&env.profile, &worlds, &lanes) {
        Ok(m) => sides.extend(m.into_iter().map(|(k, r)| Side::from_result(k.name(), r))),
        Err(e) => sides.extend(
            lanes
                .iter()
                .map(|l| Side::from_result(l.kind.name(), Err(anyhow::anyhow!("{e:#}")))),
        ),
    }
    sides.sort_by_key(|s| SIDES.iter().position(|(k, _)| k.name() == s.name));
    sides
}

/// The measured run of every lane, its counters checked.
fn measured_sides(
    p: &super::super::Profile,
    worlds: &[Result<World>],
    lanes: &[Lane],
) -> Result<Vec<(Kind, Result<Side>)>> {
    if lanes.is_empty() {
        bail!("no side could run");
    }
    let limit = p.syn_time * lanes.len() as u32;
    interleaved(lanes, WARM_UP, limit)?;
    let counter = |l: &Lane| -> Option<Result<u64>> {
        let w = worlds.get(l.world)?.as_ref().ok()?;
        (l.kind != Kind::Floor).then(|| w.dropped())
    };
    let before: Vec<Option<Result<u64>>> = lanes.iter().map(counter).collect();
    let runs = interleaved(lanes, p.live_frames, limit)?;
    let mut out = Vec::new();
    for ((lane, run), d0) in lanes.iter().zip(&runs).zip(before) {
        // Live frames are handled before BPF_PROG_RUN returns: the
        // counters are final now.
        let dropped = match (d0, counter(lane)) {
            (Some(Ok(a)), Some(Ok(b))) => Ok(Some(b.saturating_sub(a))),
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
            _ => Ok(None),
        };
        let side = dropped
            .and_then(|d| side_of(lane.kind, run, d))
            .and_then(|mut s| {
                if let Some(ns) = stats_pass(lane, (p.live_frames / 8).max(REPEAT.into()), limit)? {
                    s.set("tarpit_xdp_ns_per_run", ns);
                }
                Ok(s)
            });
        out.push((lane.kind, side));
    }
    Ok(out)
}

/// Each dropper's own cost: its ns per packet less the harness's
/// (`floor_drop_all`), and the drops per CPU-second that leaves.
fn beyond_floor(sides: &mut [Side]) {
    let floor = sides
        .iter()
        .find(|s| s.name == Kind::Floor.name() && s.available)
        .and_then(|s| s.get("ns_per_packet"));
    let Some(floor) = floor else { return };
    for s in sides.iter_mut().filter(|s| s.name != Kind::Floor.name()) {
        if let Some(ns) = s.get("ns_per_packet").map(|ns| ns - floor)
            && ns > 0.0
        {
            s.set("ns_per_packet_beyond_floor", ns)
                .set("drops_per_cpu_s_beyond_floor", 1e9 / ns);
        }
    }
}

pub fn scenario(env: &Env) -> Result<Scenario> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "blocklist_drops",
        "Block-list SYNs as a NIC delivers them (BPF_PROG_RUN live frames at the server veth): \
         XDP drops vs an nftables set rule (netdev ingress)",
    );
    sc.param("frames_max", p.live_frames)
        .param("time_max_s", p.syn_time.as_secs_f64())
        .param("repeat_per_call", REPEAT);
    source_params(&mut sc);
    sc.baseline = Some("nftables".into());
    signal::check()?;
    sc.sides = measure(env);
    signal::check()?;
    beyond_floor(&mut sc.sides);
    sc.ratio("xdp", "nftables", "drops_per_cpu_s", Aim::at_least(3.0));
    sc.ratio("floor_drop_all", "nftables", "drops_per_cpu_s", None);
    sc.ratio("xdp", "nftables", "drops_per_cpu_s_beyond_floor", None);
    sc.notes.push(
        "Rig: BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (Linux 5.18), run in the server \
         namespace with ingress_ifindex = its veth. The kernel builds each frame in a page pool \
         with XDP's headroom, as a NIC driver's receive ring holds them, and runs the XDP \
         program on it: on the xdp side the agent's loaded tarpit_xdp, whose block list drops \
         the frame; on the nftables side a two-instruction XDP_PASS program, after which the \
         kernel builds an skb and hands it to the stack (netif_receive_skb_list), where the \
         set rule on the netdev ingress hook drops it. Fair because both sides get identical \
         frames (but for their veth's MAC) from the same kind of page pool, at the same \
         place: the server veth of a bench network made the same way (one each, as the \
         agent's tc programs must not see nftables' skbs); XDP decides before an skb exists, \
         nftables only after the stack built one, which is exactly the cost XDP saves on a real \
         NIC. If anything it favours nftables: no GRO, and the frames arrive in batches of 64. \
         Each call repeats one frame (64 of them in turn, 32 sources per family), so the \
         agent's per-source maps see known sources, not a new one per packet."
            .into(),
    );
    sc.notes.push(
        "Cost: path_cpu_s = the calling thread's CPU time over the BPF_PROG_RUN calls (the \
         whole receive path runs there, bottom halves off) + ksoftirqd's runtime (in case the \
         kernel defers; other work on the box adds to it). dropped is the dropper's own \
         counter (the agent's xdp_drop, the rule's counter) and must equal frames. \
         kernel_timer_ns_per_frame is the kernel's own wall time per frame. The sides take \
         turns call by call on one thread pinned to one CPU, so other load on the box lands on \
         all of them alike."
            .into(),
    );
    sc.notes.push(
        "The harness is not free and both sides pay it: floor_drop_all (a program that drops \
         every frame without looking) is the page pool, the frame reset and the loop. Live-frames \
         mode returns every page through the pool's locked ring, a lock a driver's own \
         XDP_DROP recycling does not take. floor_drop_all / nftables is therefore the most any XDP program can \
         show on this rig, however cheap; the *_beyond_floor figures take the floor out of \
         both sides (each dropper's own cost per packet)."
            .into(),
    );
    sc.notes.push(
        "tarpit_xdp_ns_per_run is the program's run time from BPF statistics, in a pass of its \
         own after the measured one: the statistics' clock reads (a paravirtual clock here) \
         land partly inside it, so it reads higher than xdp's ns_per_packet_beyond_floor. \
         blocklist_drops_veth keeps the old raw-socket veth rig as a second view; it \
         understates XDP (see there)."
            .into(),
    );
    Ok(sc)
}
