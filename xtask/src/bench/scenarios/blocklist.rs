//! Scenario 4, block-list drops: SYNs from block-listed sources (IPv4 and
//! IPv6 alternating) dropped by our XDP program (the agent's block list)
//! or by an nftables set-based rule on the netdev ingress hook. Figure of
//! merit: packets dropped per CPU-second. Two rigs, two report objects:
//!
//! - `blocklist_drops` (the gate, [`super::blocklist_live`]): frames the
//!   kernel builds in a page pool with XDP's headroom (`BPF_PROG_RUN` with
//!   live frames) at the server veth, as a NIC driver has them. XDP decides
//!   before an skb exists; nftables sees them once the stack has built one.
//! - `blocklist_drops_veth` (a second view, this module): a raw-socket SYN
//!   flood over the veth pair. Here XDP runs on the sender's skb, copied
//!   into a fresh page first (a raw socket leaves too little headroom), so
//!   XDP pays an skb and a copy that nftables does not: it understates XDP.
//!
//! The veth rig: both sides drop in softirq context (veth NAPI for XDP,
//! the backlog for nftables), which the kernel runs inline right after
//! each send, on the sender's own thread, or else in ksoftirqd. So the
//! cost of a packet is measured precisely as the sender thread's CPU time
//! plus ksoftirqd's runtime, untouched by whatever else runs on the box;
//! it includes the send itself, the same for both sides. The machine-wide
//! tick-sampled `softirq` time of /proc/stat is reported as a second view.
use std::time::Duration;

use anyhow::{Result, bail};

use super::super::agent::{Agent, base_config};
use super::super::netns::{BenchNet, link_mac};
use super::super::procstat::MachineCpu;
use super::super::report::{Scenario, Side};
use super::super::xdpblock::XdpBlock;
use super::super::{Env, bpfstats, nft, postfix, procstat, signal, synflood};
use super::blocklist_live;

pub const PORT: u16 = 25;

/// One side's world: a bench network whose server veth drops the
/// block-listed sources either in the agent's XDP program or in the
/// nftables rule. Fields drop in order: the agent before its network.
pub struct World {
    pub block: Option<XdpBlock>,
    pub agent: Option<Agent>,
    pub net: BenchNet,
}

impl World {
    pub fn new(env: &Env, xdp: bool) -> Result<World> {
        let net = BenchNet::new()?;
        let (mut agent, mut block) = (None, None);
        if xdp {
            let cfg = base_config(&net, PORT, postfix::PROXY);
            let a = Agent::start(&env.tarpit, &net, &cfg, None)?;
            block = Some(XdpBlock::install(env, &a)?);
            agent = Some(a);
        } else {
            nft::install(&net, PORT)?;
        }
        Ok(World { block, agent, net })
    }

    /// Packets dropped so far by this world's dropper: the agent's XDP drop
    /// counter, or the nftables rules' counters.
    pub fn dropped(&self) -> Result<u64> {
        match &self.block {
            Some(b) => b.dropped(),
            None => nft::dropped(&self.net),
        }
    }

    /// Source and destination MACs of frames from the client to the server.
    pub fn macs(&self) -> Result<([u8; 6], [u8; 6])> {
        Ok((
            link_mac(&self.net.client_ns, &self.net.client_if)?,
            link_mac(&self.net.server_ns, &self.net.server_if)?,
        ))
    }
}

pub fn side_name(xdp: bool) -> &'static str {
    if xdp { "xdp" } else { "nftables" }
}

fn measure_veth(env: &Env, xdp: bool) -> Result<Side> {
    let p = &env.profile;
    let name = side_name(xdp);
    let w = World::new(env, xdp)?;
    let (src_mac, dst_mac) = w.macs()?;
    let net = &w.net;
    let (ifname, count, limit) = (net.client_if.clone(), p.syn_packets, p.syn_time);
    // Warm-up: caches, NAPI, the rule's first match.
    net.in_client(|| synflood::flood(&ifname, src_mac, dst_mac, PORT, 20_000, limit))??;
    signal::sleep(Duration::from_millis(300))?;
    // XDP's own run time per packet, from the agent's programs.
    let stats = w
        .agent
        .as_ref()
        .and_then(|_| bpfstats::StatsOn::enable().ok());
    let ids = w
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .map(bpfstats::prog_ids_of)
        .unwrap_or_default();
    let prog0 = bpfstats::snapshot(&ids);
    let d0 = w.dropped()?;
    let ksoftirqd = procstat::ksoftirqd_pids();
    let k0 = procstat::runtime_of(&ksoftirqd);
    let m0 = MachineCpu::now();
    let res =
        net.in_client(|| synflood::flood(&ifname, src_mac, dst_mac, PORT, count, limit))??;
    // The receive path runs inline with the sends (softirq on bh enable),
    // so the window ends with the flood; counters settle a moment later.
    let m = m0.since(&MachineCpu::now());
    let k = procstat::runtime_of(&ksoftirqd) - k0;
    signal::sleep(Duration::from_millis(300))?;
    let d = w.dropped()?.saturating_sub(d0);
    let mut progs = bpfstats::Totals::default();
    progs.add(&prog0, &bpfstats::snapshot(&ids));
    drop(stats);
    if d == 0 {
        bail!("nothing was dropped by the {name} rule: the rule does not match the flood");
    }
    let mut s = Side::new(name);
    let secs = res.elapsed.as_secs_f64();
    let sender = res.sender_cpu.as_secs_f64();
    s.set("sent", res.sent as f64)
        .set("dropped", d as f64)
        .set("elapsed_s", secs)
        .set("sent_per_s", res.sent as f64 / secs)
        .set("softirq_cpu_s", m.softirq)
        .set("busy_cpu_s", m.busy)
        .set("sender_thread_cpu_s", sender)
        .set("ksoftirqd_cpu_s", k)
        .set("path_cpu_s", sender + k);
    if sender + k > 0.0 {
        s.set("drops_per_path_cpu_s", d as f64 / (sender + k));
        s.set(
            "path_ns_per_packet",
            (sender + k) * 1e9 / res.sent.max(1) as f64,
        );
    }
    if m.softirq > 0.0 {
        s.set("drops_per_softirq_cpu_s", d as f64 / m.softirq);
    }
    for t in progs
        .0
        .values()
        .filter(|t| t.kind == "xdp" && t.run_cnt > 0)
    {
        s.set("xdp_ns_per_packet", t.run_time_ns as f64 / t.run_cnt as f64);
    }
    Ok(s)
}

/// The block-listed prefixes, as parameters of both report objects.
pub fn source_params(sc: &mut Scenario) {
    sc.param(
        "sources_v4",
        format!("{}/{}", synflood::BLOCK_V4.0, synflood::BLOCK_V4.1),
    )
    .param(
        "sources_v6",
        format!("{}/{}", synflood::BLOCK_V6.0, synflood::BLOCK_V6.1),
    );
}

fn veth(env: &Env) -> Result<Scenario> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "blocklist_drops_veth",
        "Second view, generic path: a raw-socket SYN flood over a veth pair, XDP drops vs \
         an nftables set rule (netdev ingress); XDP pays veth's skb copy here",
    );
    sc.param("packets_max", p.syn_packets)
        .param("time_max_s", p.syn_time.as_secs_f64());
    source_params(&mut sc);
    sc.baseline = Some("nftables".into());
    for xdp in [false, true] {
        signal::check()?;
        let side = Side::from_result(side_name(xdp), measure_veth(env, xdp));
        signal::check()?;
        sc.sides.push(side);
    }
    // No aim: the gate is blocklist_drops (live frames), see the note.
    sc.ratio("xdp", "nftables", "drops_per_path_cpu_s", None);
    sc.ratio("xdp", "nftables", "drops_per_softirq_cpu_s", None);
    sc.notes.push(
        "path_cpu_s = the sender thread's CPU time (which includes the receive path the kernel \
         runs inline after each send) + ksoftirqd's runtime; it includes the send itself, the \
         same for both sides. softirq_cpu_s is machine-wide and tick-sampled (no IRQ time \
         accounting in this kernel), so other work on the box adds noise to it."
            .into(),
    );
    sc.notes.push(
        "Why this view understates XDP (and has no aim; the gate is blocklist_drops): on a \
         veth pair XDP does not run on a NIC's DMA buffers: veth hands it the socket buffers \
         the sender built, and copies each into a fresh page first when its headroom is short \
         of the 256 bytes XDP needs (as here: a raw socket leaves a few dozen bytes), then \
         frees the skb. nftables' ingress hook runs on the sender's skb as it is and pays no \
         such copy. BPF run-time statistics are on during the XDP side (for \
         xdp_ns_per_packet), which adds two clock reads per packet to it."
            .into(),
    );
    Ok(sc)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let live = blocklist_live::scenario(env)?;
    let veth = veth(env)?;
    Ok(vec![live, veth])
}
