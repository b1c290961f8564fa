//! Scenario 4, block-list drops: the same bounded SYN flood from
//! block-listed sources (IPv4 and IPv6 alternating) on a veth pair, dropped
//! by our XDP program (the agent's block list) or by an nftables set-based
//! rule. Figure of merit: packets dropped per CPU-second of the receive
//! path. Both drop in softirq context (veth NAPI for XDP, the backlog for
//! nftables), which the kernel runs inline right after each send, on the
//! sender's own thread, or else in ksoftirqd. So the cost of a packet is
//! measured precisely as the sender thread's CPU time plus ksoftirqd's
//! runtime, untouched by whatever else runs on the box; it includes the
//! send itself, the same for both sides, which makes the ratio an
//! understatement of the difference in drop cost. The machine-wide
//! tick-sampled `softirq` time of /proc/stat is reported as a second view.
use std::time::Duration;

use anyhow::{Result, bail};

use super::super::agent::{Agent, base_config};
use super::super::netns::{BenchNet, link_mac};
use super::super::postfix;
use super::super::procstat::MachineCpu;
use super::super::report::{Aim, Scenario, Side};
use super::super::{Env, bpfstats, nft, procstat, signal, synflood};

const PORT: u16 = 25;

fn measure(env: &Env, xdp: bool) -> Result<Side> {
    let p = &env.profile;
    let name = if xdp { "xdp" } else { "nftables" };
    let net = BenchNet::new()?;
    let src_mac = link_mac(&net.client_ns, &net.client_if)?;
    let dst_mac = link_mac(&net.server_ns, &net.server_if)?;
    let mut agent = None;
    let mut xdp_block = None;
    if xdp {
        let cfg = base_config(&net, PORT, postfix::PROXY);
        let a = Agent::start(&env.tarpit, &net, &cfg, None)?;
        xdp_block = Some(super::super::xdpblock::XdpBlock::install(env, &a)?);
        agent = Some(a);
    } else {
        nft::install(&net, PORT)?;
    }
    let dropped = |net: &BenchNet| -> Result<u64> {
        match &xdp_block {
            Some(b) => b.dropped(),
            None => nft::dropped(net),
        }
    };
    let (ifname, count, limit) = (net.client_if.clone(), p.syn_packets, p.syn_time);
    // Warm-up: caches, NAPI, the rule's first match.
    net.in_client(|| synflood::flood(&ifname, src_mac, dst_mac, PORT, 20_000, limit))??;
    signal::sleep(Duration::from_millis(300))?;
    // XDP's own run time per packet, from the agent's programs.
    let stats = agent
        .as_ref()
        .and_then(|_| bpfstats::StatsOn::enable().ok());
    let ids = agent
        .as_ref()
        .and_then(|a| a.pid())
        .map(bpfstats::prog_ids_of)
        .unwrap_or_default();
    let prog0 = bpfstats::snapshot(&ids);
    let d0 = dropped(&net)?;
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
    let d = dropped(&net)?.saturating_sub(d0);
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
    drop(agent);
    drop(net);
    Ok(s)
}

pub fn run(env: &Env) -> Result<Vec<Scenario>> {
    let p = &env.profile;
    let mut sc = Scenario::new(
        "blocklist_drops",
        "Block-list SYN flood on a veth pair: XDP drops vs an nftables set rule (netdev ingress)",
    );
    sc.param("packets_max", p.syn_packets)
        .param("time_max_s", p.syn_time.as_secs_f64())
        .param(
            "sources_v4",
            format!("{}/{}", synflood::BLOCK_V4.0, synflood::BLOCK_V4.1),
        )
        .param(
            "sources_v6",
            format!("{}/{}", synflood::BLOCK_V6.0, synflood::BLOCK_V6.1),
        );
    sc.baseline = Some("nftables".into());
    for xdp in [false, true] {
        signal::check()?;
        let name = if xdp { "xdp" } else { "nftables" };
        let side = Side::from_result(name, measure(env, xdp));
        signal::check()?;
        sc.sides.push(side);
    }
    sc.ratio(
        "xdp",
        "nftables",
        "drops_per_path_cpu_s",
        Aim::at_least(3.0),
    );
    sc.ratio("xdp", "nftables", "drops_per_softirq_cpu_s", None);
    sc.notes.push(
        "path_cpu_s = the sender thread's CPU time (which includes the receive path the kernel \
         runs inline after each send) + ksoftirqd's runtime; it includes the send itself, the \
         same for both sides. softirq_cpu_s is machine-wide and tick-sampled (no IRQ time \
         accounting in this kernel), so other work on the box adds noise to it."
            .into(),
    );
    sc.notes.push(
        "On a veth pair XDP does not run on a NIC's DMA buffers: veth hands it the socket \
         buffers the sender built, and copies each into a fresh page first when its headroom is \
         short of the 256 bytes XDP needs (as here: a raw socket leaves a few dozen bytes). nftables' \
         ingress hook pays no such copy. This rig therefore understates XDP against a NIC driver; \
         xdp_ns_per_packet is the program's own run time."
            .into(),
    );
    Ok(vec![sc])
}
