//! The block-list gate on a fair rig: the same SYN frames, built by the
//! kernel in a page pool with XDP's headroom (`BPF_PROG_RUN` with live
//! frames, see [`liveframes`]), received on the server veth of the bench
//! namespace, dropped either by the agent's real `tarpit_xdp` (its block
//! list) or, after an XDP program that passes everything, by the nftables
//! set rule on the netdev ingress hook once the stack has built an skb.
//!
//! This is a NIC driver's receive path without the NIC: both sides get
//! identical page-pool frames at the same ifindex; XDP decides before an
//! skb exists, nftables only after, which is exactly the cost XDP saves on
//! a real NIC. The kernel runs all of it on the calling thread with bottom
//! halves off (XDP_PASS frames go through `netif_receive_skb_list` there),
//! so that thread's CPU time is the cost; ksoftirqd's runtime is added in
//! case the kernel defers anything. Each side's counter must show every
//! frame dropped by its dropper, or the side fails. A third side runs a
//! program that drops everything at once: the harness's own cost (page
//! pool, frame reset, the loop), which both sides include, as a driver's
//! receive ring would be.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::super::liveframes::{self, Prog, XDP_DROP, XDP_PASS};
use super::super::report::{Aim, Scenario, Side};
use super::super::{Env, bpfstats, procstat, signal, synflood};
use super::blocklist::{PORT, World, side_name, source_params};

/// Frames per BPF_PROG_RUN call: long enough that the page pool each call
/// sets up is lost in the noise, short enough to alternate IPv4 and IPv6
/// and stop in time.
const REPEAT: u32 = 1 << 16;
/// Distinct frames the calls cycle through: IPv4 and IPv6 alternating,
/// each with its own block-listed source and port.
const FRAMES: u32 = 8;
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
#[derive(Default)]
struct Pass {
    frames: u64,
    v4: u64,
    v6: u64,
    calls: u64,
    thread_cpu: f64,
    elapsed: f64,
    /// Sum over calls of the kernel's mean ns per frame times the frames.
    kernel_ns: f64,
}

/// Runs `count` frames (at most for `limit`) through `prog` at `ifindex`,
/// `REPEAT` per call, cycling through `frames`. Must run on a thread inside
/// the server namespace (the ifindex is resolved there).
fn pass(prog: &Prog, ifindex: u32, frames: &[Vec<u8>], count: u64, limit: Duration) -> Result<Pass> {
    let mut p = Pass::default();
    let cpu0 = procstat::thread_cpu();
    let start = Instant::now();
    for frame in frames.iter().cycle() {
        if p.frames >= count || start.elapsed() >= limit {
            break;
        }
        signal::check()?;
        let n = u32::try_from(count - p.frames).map_or(REPEAT, |left| left.min(REPEAT));
        let r = prog.run_live(frame, ifindex, n)?;
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
    p.thread_cpu = procstat::thread_cpu().saturating_sub(cpu0).as_secs_f64();
    p.elapsed = start.elapsed().as_secs_f64();
    Ok(p)
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

fn measure(env: &Env, kind: Kind) -> Result<Side> {
    let p = &env.profile;
    let w = World::new(env, kind == Kind::Xdp)?;
    let (src_mac, dst_mac) = w.macs()?;
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| synflood::frame(i, dst_mac, src_mac, PORT))
        .collect();
    let (prog_id, prog) = match kind {
        Kind::Xdp => {
            let (id, prog) = agent_xdp(&w)?;
            (Some(id), prog)
        }
        Kind::Nftables => (None, Prog::returning(XDP_PASS, "tpbench_pass")?),
        Kind::Floor => (None, Prog::returning(XDP_DROP, "tpbench_drop")?),
    };
    let net = &w.net;
    let ifname = net.server_if.clone();
    let ifindex = net.in_server(|| liveframes::ifindex(&ifname))??;
    let (count, limit) = (p.live_frames, p.syn_time);
    net.in_server(|| pass(&prog, ifindex, &frames, WARM_UP, limit))??;
    let counted = kind != Kind::Floor;
    let d0 = if counted { w.dropped()? } else { 0 };
    let ksoftirqd = procstat::ksoftirqd_pids();
    let k0 = procstat::runtime_of(&ksoftirqd);
    let run = net.in_server(|| pass(&prog, ifindex, &frames, count, limit))??;
    let k = (procstat::runtime_of(&ksoftirqd) - k0).max(0.0);
    if run.frames == 0 {
        bail!("no frame ran within {limit:?}");
    }
    let mut s = Side::new(kind.name());
    if counted {
        // Live frames are handled before BPF_PROG_RUN returns: the counter
        // is final now.
        let d = w.dropped()?.saturating_sub(d0);
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
    let path = run.thread_cpu + k;
    let frames_run = run.frames as f64;
    s.set("frames", frames_run)
        .set("frames_v4", run.v4 as f64)
        .set("frames_v6", run.v6 as f64)
        .set("repeat_per_call", f64::from(REPEAT))
        .set("calls", run.calls as f64)
        .set("elapsed_s", run.elapsed)
        .set("thread_cpu_s", run.thread_cpu)
        .set("ksoftirqd_cpu_s", k)
        .set("path_cpu_s", path)
        .set("kernel_timer_ns_per_frame", run.kernel_ns / frames_run);
    if path > 0.0 {
        s.set("drops_per_cpu_s", frames_run / path)
            .set("ns_per_packet", path * 1e9 / frames_run);
    }
    if let Some(id) = prog_id {
        // The program's own run time, in a pass of its own: statistics
        // cost two clock reads per run, kept out of the measured one.
        let stats = bpfstats::StatsOn::enable()?;
        let before = bpfstats::snapshot(&[id]);
        net.in_server(|| pass(&prog, ifindex, &frames, (count / 8).max(REPEAT.into()), limit))??;
        let mut t = bpfstats::Totals::default();
        t.add(&before, &bpfstats::snapshot(&[id]));
        drop(stats);
        if let Some(t) = t.0.values().find(|t| t.run_cnt > 0) {
            s.set(
                "tarpit_xdp_ns_per_run",
                t.run_time_ns as f64 / t.run_cnt as f64,
            );
        }
    }
    Ok(s)
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
    for kind in [Kind::Nftables, Kind::Xdp, Kind::Floor] {
        signal::check()?;
        let side = Side::from_result(kind.name(), measure(env, kind));
        signal::check()?;
        sc.sides.push(side);
    }
    sc.ratio("xdp", "nftables", "drops_per_cpu_s", Aim::at_least(3.0));
    sc.notes.push(
        "Rig: BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (Linux 5.18), run in the server \
         namespace with ingress_ifindex = its veth. The kernel builds each frame in a page pool \
         with XDP's headroom, as a NIC driver's receive ring holds them, and runs the XDP \
         program on it: on the xdp side the agent's loaded tarpit_xdp, whose block list drops \
         the frame; on the nftables side a two-instruction XDP_PASS program, after which the \
         kernel builds an skb and hands it to the stack (netif_receive_skb_list), where the \
         set rule on the netdev ingress hook drops it. Fair because both sides get identical \
         frames at the same ifindex from the same page pool; XDP decides before an skb exists, \
         nftables only after the stack built one, which is exactly the cost XDP saves on a real \
         NIC. If anything it favours nftables: no GRO, and the frames arrive in batches of 64."
            .into(),
    );
    sc.notes.push(
        "Cost: path_cpu_s = the calling thread's CPU time over the BPF_PROG_RUN calls (the \
         whole receive path runs there, bottom halves off) + ksoftirqd's runtime (in case the \
         kernel defers; other work on the box adds to it). dropped is the dropper's own \
         counter (the agent's xdp_drop, the rule's counter) and must equal frames. \
         floor_drop_all is the harness alone (a program that drops every frame without \
         looking), included in both sides. kernel_timer_ns_per_frame is the kernel's own wall \
         time per frame; tarpit_xdp_ns_per_run is the program's run time from BPF statistics, \
         in a pass of its own. blocklist_drops_veth keeps the old raw-socket veth rig as a \
         second view; it understates XDP (see there)."
            .into(),
    );
    Ok(sc)
}
