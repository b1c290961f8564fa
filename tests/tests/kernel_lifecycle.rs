//! The loader's life cycle: after a restart the per-IP state and block
//! entries are still there and exactly one copy of each program is
//! attached (replaced in place, old copies gone); `detach` removes every
//! program, link, pin and qdisc of ours and leaves a qdisc it did not make;
//! maps of another layout are refused, never misread.
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use aya::maps::{Array, Map, MapData};
use aya::programs::{SchedClassifier, TcAttachType};
use kernel_env::{SLOW_PORT, World, send};
use tarpit::kernel::{BlockSpec, Kernel, KernelError, KernelMaps, detach, in_netns};
use tarpit_common::{BlockReason, maps as names};
use tarpit_tests::hooks;
use tarpit_tests::{PinDir, SERVER_V4, SERVER_V6, require_root, wait::until};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn xdp_prog_id(w: &World) -> Option<u32> {
    hooks::xdp_prog_id(&w.net)
}

/// (name, id) of the TCX programs in one direction.
fn tcx_progs(w: &World, dir: TcAttachType) -> Vec<(String, u32)> {
    let iface = w.net.server_if.clone();
    in_netns(&w.net.server_ns, move || {
        SchedClassifier::query_tcx(&iface, dir)
            .map(|(_, progs)| {
                progs
                    .iter()
                    .map(|p| (p.name_as_str().unwrap_or("").to_string(), p.id()))
                    .collect()
            })
            .unwrap_or_default()
    })
    .unwrap()
}

/// (name, id) of the programs attached to the test cgroup.
fn cgroup_progs(w: &World) -> Vec<(String, u64)> {
    hooks::cgroup_progs(&w.cgroup)
}

fn prog_loaded(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// How many of our tc programs are attached at ingress, whichever way this
/// kernel attaches them: TCX links from 6.6, netlink filters below.
fn ingress_programs(w: &World) -> usize {
    let filters = tc_show(w, &["filter", "show", "dev", &w.net.server_if, "ingress"]);
    let netlink = filters
        .lines()
        .filter(|l| l.contains(" handle ") && l.contains("tarpit_tc_in"))
        .count();
    tcx_progs(w, TcAttachType::Ingress).len() + netlink
}

fn tc_show(w: &World, what: &[&str]) -> String {
    let out = Command::new("tc")
        .args(["-n", &w.net.server_ns])
        .args(what)
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bot earns its `n`th strike: it talks on a watched port whose server
/// greets late ([`SLOW_PORT`]), once the kernel tracks its flow, so the
/// strike depends on the programs under test and not on how fast qemu
/// hands the handshake's ACK to the server.
fn strike(w: &World, bot: IpAddr, n: u32) {
    let server: IpAddr = if bot.is_ipv4() {
        SERVER_V4.into()
    } else {
        SERVER_V6.into()
    };
    let mut s = w
        .connect_tracked(bot, SocketAddr::new(server, SLOW_PORT))
        .unwrap();
    send(&mut s, "EHLO early").unwrap();
    assert!(
        until(Duration::from_secs(15), || strikes(w, bot) == n),
        "strike {n} of {bot} not counted ({})\n{}",
        strikes(w, bot),
        w.diagnosis()
    );
}

fn strikes(w: &World, who: IpAddr) -> u32 {
    w.maps()
        .ip_state(who)
        .unwrap()
        .map(|s| s.strikes)
        .unwrap_or(0)
}

#[test]
fn restart_keeps_state_and_replaces_every_program_in_place() {
    if !require_root() {
        return;
    }
    let persist = |c: &mut tarpit::config::KernelConfig| {
        c.detach_on_exit = false;
        c.tc_attach = tarpit::config::TcAttachSetting::Tcx;
    };
    // TCX exists from 6.6 on. Below it a forced `tc_attach = "tcx"` must be
    // refused at load (not half-attached); the netlink path's in-place
    // replacement is `netlink_tc_makes_and_removes_its_qdisc_and_never_stacks`.
    if !aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
    {
        match World::with(persist) {
            Err(err) => assert!(format!("{err:#}").contains("TCX"), "{err:#}"),
            // A loader that degraded tc away (old verifier) attached no
            // TCX link either: nothing half-attached.
            Ok(w) => {
                assert!(tcx_progs(&w, TcAttachType::Ingress).is_empty());
                assert!(tcx_progs(&w, TcAttachType::Egress).is_empty());
            }
        }
        return;
    }
    let mut w = World::with(persist).expect("world");
    let bot = ip("198.51.100.110");
    let bot6 = ip("fd5b:1e00::110");
    w.net.add_client_addr(bot).unwrap();
    w.net.add_client_addr(bot6).unwrap();
    strike(&w, bot, 1);
    strike(&w, bot6, 1);
    let blocked: tarpit::kernel::IpNet = "198.51.100.224/27".parse().unwrap();
    w.maps()
        .block_add(
            blocked,
            BlockSpec {
                ttl: Some(Duration::from_secs(3600)),
                reason: BlockReason::Dnsbl,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap();

    let old_xdp = xdp_prog_id(&w).expect("XDP attached");
    let old_in = tcx_progs(&w, TcAttachType::Ingress);
    let old_out = tcx_progs(&w, TcAttachType::Egress);
    let old_cg = cgroup_progs(&w);
    assert_eq!(old_in.len(), 1, "{old_in:?}");
    assert_eq!(old_out.len(), 1, "{old_out:?}");
    assert_eq!(old_cg.len(), 1, "{old_cg:?}");

    // The loader goes away without detaching (agent exit, crash or
    // upgrade): programs keep running from their pinned links.
    drop(w.kernel.take());
    assert_eq!(xdp_prog_id(&w), Some(old_xdp));
    assert_eq!(tcx_progs(&w, TcAttachType::Ingress), old_in);
    let bot2 = ip("198.51.100.111");
    w.net.add_client_addr(bot2).unwrap();
    // No loader running: the kernel still flags.
    strike(&w, bot2, 1);

    // A new loader: same maps, programs swapped in place.
    w.load(persist).expect("reload");
    assert_eq!(strikes(&w, bot), 1, "per-IP state lost over the restart");
    assert_eq!(strikes(&w, bot6), 1);
    assert_eq!(strikes(&w, bot2), 1);
    let b = w.maps().block_list().unwrap();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].net, blocked);
    assert_eq!(b[0].reason(), Some(BlockReason::Dnsbl));

    let new_xdp = xdp_prog_id(&w).expect("XDP attached");
    assert_ne!(new_xdp, old_xdp, "XDP program not replaced");
    for (dir, old) in [
        (TcAttachType::Ingress, &old_in),
        (TcAttachType::Egress, &old_out),
    ] {
        let now = tcx_progs(&w, dir);
        assert_eq!(now.len(), 1, "exactly one tc program ({dir:?}): {now:?}");
        assert_eq!(now[0].0, old[0].0);
        assert_ne!(now[0].1, old[0].1, "tc program not replaced");
        assert!(!prog_loaded(old[0].1 as u64), "old tc program still loaded");
    }
    let cg = cgroup_progs(&w);
    assert_eq!(cg.len(), 1, "exactly one sock_ops program: {cg:?}");
    assert_ne!(cg[0].1, old_cg[0].1);
    assert!(!prog_loaded(old_xdp as u64), "old XDP program still loaded");

    // The replaced programs work: a new strike counts.
    strike(&w, bot, 2);

    // detach removes everything of ours.
    let k = w.kernel.take().unwrap();
    k.shutdown().unwrap();
    assert!(
        xdp_prog_id(&w).is_some(),
        "shutdown without detach_on_exit keeps programs"
    );
    let report = detach(&w.pins.path).unwrap();
    assert_eq!(report.links, 4, "{report:?}");
    assert_eq!(xdp_prog_id(&w), None);
    assert!(tcx_progs(&w, TcAttachType::Ingress).is_empty());
    assert!(tcx_progs(&w, TcAttachType::Egress).is_empty());
    assert!(cgroup_progs(&w).is_empty());
    assert!(!w.pins.path.exists(), "pins left: {:?}", w.pins.entries());
    assert!(!prog_loaded(new_xdp as u64));
}

#[test]
fn netlink_tc_makes_and_removes_its_qdisc_and_never_stacks() {
    if !require_root() {
        return;
    }
    let netlink = |c: &mut tarpit::config::KernelConfig| {
        c.detach_on_exit = false;
        c.tc_attach = tarpit::config::TcAttachSetting::Netlink;
    };
    let mut w = World::with(netlink).expect("world");
    assert!(tc_show(&w, &["qdisc", "show", "dev", &w.net.server_if]).contains("clsact"));
    let bot = ip("198.51.100.112");
    w.net.add_client_addr(bot).unwrap();
    strike(&w, bot, 1);

    drop(w.kernel.take());
    w.load(netlink).expect("reload");
    for dir in ["ingress", "egress"] {
        let f = tc_show(&w, &["filter", "show", "dev", &w.net.server_if, dir]);
        let ours = f
            .lines()
            .filter(|l| l.contains(" handle ") && l.contains("tarpit_tc_"))
            .count();
        assert_eq!(ours, 1, "exactly one {dir} filter after restart:\n{f}");
    }
    strike(&w, bot, 2);

    w.kernel.take().unwrap().shutdown().unwrap();
    detach(&w.pins.path).unwrap();
    let q = tc_show(&w, &["qdisc", "show", "dev", &w.net.server_if]);
    assert!(!q.contains("clsact"), "our qdisc was left:\n{q}");
    assert_eq!(xdp_prog_id(&w), None);
    assert!(!w.pins.path.exists());
}

#[test]
fn detach_leaves_a_qdisc_it_did_not_make() {
    if !require_root() {
        return;
    }
    let mut w = World::unloaded().expect("world");
    let st = Command::new("tc")
        .args([
            "-n",
            &w.net.server_ns,
            "qdisc",
            "add",
            "dev",
            &w.net.server_if,
            "clsact",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    w.load(|c| c.tc_attach = tarpit::config::TcAttachSetting::Netlink)
        .expect("load");
    let f = tc_show(&w, &["filter", "show", "dev", &w.net.server_if, "ingress"]);
    assert!(f.contains("tarpit_tc_in"), "{f}");
    // detach_on_exit = true: shutdown removes everything of ours.
    w.kernel.take().unwrap().shutdown().unwrap();
    let f = tc_show(&w, &["filter", "show", "dev", &w.net.server_if, "ingress"]);
    assert!(!f.contains("tarpit"), "filter left:\n{f}");
    let q = tc_show(&w, &["qdisc", "show", "dev", &w.net.server_if]);
    assert!(q.contains("clsact"), "the admin's qdisc was removed:\n{q}");
    assert!(!w.pins.path.exists());
}

#[test]
fn maps_of_another_layout_are_refused() {
    if !require_root() {
        return;
    }
    let missing = PinDir::new().unwrap();
    assert!(matches!(
        KernelMaps::open(&missing.path),
        Err(KernelError::NoMaps { .. })
    ));

    let mut w = World::with(|c| c.detach_on_exit = false).expect("world");
    let cfg = {
        let mut c = w.config();
        c.detach_on_exit = false;
        c
    };
    w.kernel.take().unwrap().shutdown().unwrap();
    // Pretend another tarpit version made these maps.
    let data = MapData::from_pin(w.pins.path.join(names::LAYOUT)).unwrap();
    let mut marker: Array<_, u64> = Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    marker.set(0, names::LAYOUT_MAGIC + 1, 0).unwrap();

    let e = KernelMaps::open(&w.pins.path).err().expect("refused");
    assert!(matches!(e, KernelError::LayoutMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("tarpit detach"), "{e}");
    let e = Kernel::load(&cfg).err().expect("loader refuses too");
    assert!(format!("{e:#}").contains("another layout"), "{e:#}");
    // Still exactly the old programs attached, nothing stacked.
    assert!(xdp_prog_id(&w).is_some());
    assert_eq!(ingress_programs(&w), 1);

    detach(&w.pins.path).unwrap();
    assert_eq!(xdp_prog_id(&w), None);
    assert!(!w.pins.path.exists());
}
