//! Measurement, not a test (`--ignored`): the sk_lookup program's cost per
//! connection, from the kernel's own run-time statistics (BPF_ENABLE_STATS,
//! held only while measuring), for steered and agent-bound connections.
//!
//! `cargo test -p tarpit-tests --test loop_bench -- --ignored --nocapture`
#[path = "loop_common/mod.rs"]
mod common;

use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Attempt, agent_for, attempt};
use tarpit::kernel::SteerMaps;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, TestNet, require_root};

/// Keeps the kernel's BPF run-time statistics on while it lives.
fn enable_stats() -> OwnedFd {
    let mut attr = [0u64; 2];
    // union bpf_attr { struct { __u32 type; } enable_stats; }: BPF_STATS_RUN_TIME = 0
    attr[0] = 0;
    // SAFETY: BPF_ENABLE_STATS (32) with a zeroed attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 32, attr.as_mut_ptr(), 8) };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd of ours.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// (run_time_ns, run_cnt) of the program behind a pinned link.
fn prog_stats(link_pin: &std::path::Path) -> (u64, u64) {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(link_pin)
        .output()
        .unwrap();
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = link["prog_id"].as_u64().expect("prog_id");
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .unwrap();
    let prog: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        prog["run_time_ns"].as_u64().unwrap_or(0),
        prog["run_cnt"].as_u64().unwrap_or(0),
    )
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn sk_lookup_cost_per_connection() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("net");
    let pins = PinDir::new().expect("pins");
    let _pf = Postfix::start(&net).expect("postfix");
    let other: IpAddr = "198.51.100.80".parse().unwrap();
    net.add_client_addr(other).unwrap();
    let rest = format!(
        "[greeting]\ndelay = \"0s\"\n[offenders]\nenabled = false\nslowdown = false\n\
         [allow]\nips = [\"{CLIENT_V4}/32\", \"{CLIENT_V6}/128\"]\n\
         [bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:2525\", \"[::1]:2525\"]\n"
    );
    let _agent = Agent::start(&net, &common::config(&net, &pins, None, false, &rest)).unwrap();
    let link = std::fs::read_dir(pins.path.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("sk_lookup"))
        .expect("sk_lookup link pin");
    let _stats = enable_stats();
    const N: usize = 300;
    for (what, src) in [
        ("steered v4", IpAddr::from(CLIENT_V4)),
        ("steered v6", IpAddr::from(CLIENT_V6)),
        ("to the agent", other),
    ] {
        let (t0, c0) = prog_stats(&link);
        let started = Instant::now();
        for _ in 0..N {
            assert_eq!(
                attempt(&net, src, agent_for(src), Duration::from_secs(2)),
                Attempt::Connected
            );
        }
        let (t1, c1) = prog_stats(&link);
        let runs = c1 - c0;
        println!(
            "sk_lookup {what}: {runs} runs, {:.0} ns per run ({N} connections in {:?})",
            (t1 - t0) as f64 / runs.max(1) as f64,
            started.elapsed()
        );
    }
    println!(
        "steering counters: {:?}",
        SteerMaps::open(&pins.path).unwrap().counters().unwrap()
    );
}
