//! Benchmark, not a test (ignored by default): the average run time per
//! packet of each kernel program under a stream of SMTP sessions, read
//! from the kernel's own statistics (`kernel.bpf_stats_enabled=1`).
//!
//! Run: `cargo test -p tarpit-tests --test kernel_bench -- --ignored --nocapture`
#[path = "../src/kernel_env.rs"]
mod kernel_env;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use kernel_env::{FAST_PORT, World, read_until, send};
use tarpit::kernel::{BlockSpec, IpNet, ProgramStats};
use tarpit_common::BlockReason;
use tarpit_tests::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, require_root};

const SESSIONS: usize = 400;

fn sysctl(value: &str) -> String {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let old = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, value).expect("set kernel.bpf_stats_enabled");
    old.trim().to_string()
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn per_packet_cost_of_each_program() {
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    // Realistic list sizes: every lookup walks a populated trie.
    let mut maps = w.maps();
    let prefixes: u32 = std::env::var("BENCH_PREFIXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    for i in 0..prefixes {
        let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        maps.block_add(
            net,
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
            },
        )
        .unwrap();
        let net6: IpNet = format!("2001:db8:{i:x}::/48").parse().unwrap();
        maps.allow_add(net6, None).unwrap();
    }
    let old = sysctl("1");
    let line = format!("X-Fill: {}\r\n", "y".repeat(200));
    for i in 0..SESSIONS {
        let (src, server) = if i % 2 == 0 {
            (CLIENT_V4.into(), SERVER_V4.into())
        } else {
            (CLIENT_V6.into(), SERVER_V6.into())
        };
        let mut s = w
            .connect(
                src,
                SocketAddr::new(server, FAST_PORT),
                Duration::from_secs(5),
            )
            .unwrap();
        read_until(&mut s, "220 ").unwrap();
        send(&mut s, "EHLO bench.example").unwrap();
        read_until(&mut s, "250").unwrap();
        for _ in 0..10 {
            s.write_all(line.as_bytes()).unwrap();
        }
        send(&mut s, "QUIT").unwrap();
        for _ in 0..11 {
            read_until(&mut s, "250").unwrap();
        }
    }
    let sessions = w.kernel.as_ref().unwrap().program_stats().unwrap();
    // A dense stream: one DATA-like body of 20 MB on a watched port.
    let mut s = w
        .connect(
            CLIENT_V4.into(),
            SocketAddr::new(SERVER_V4.into(), FAST_PORT),
            Duration::from_secs(5),
        )
        .unwrap();
    read_until(&mut s, "220 ").unwrap();
    let chunk = vec![b'z'; 64 * 1024];
    for _ in 0..320 {
        s.write_all(&chunk).unwrap();
    }
    send(&mut s, "").unwrap();
    read_until(&mut s, "250").unwrap();
    let total = w.kernel.as_ref().unwrap().program_stats().unwrap();
    sysctl(if old.is_empty() { "0" } else { &old });
    println!(
        "{SESSIONS} SMTP sessions (v4/v6 alternating), {prefixes} block + {prefixes} allow prefixes:"
    );
    print_stats(&sessions, None);
    println!("then one 20 MB body on a watched port (dense stream):");
    print_stats(&total, Some(&sessions));
    assert!(sessions.iter().all(|s| s.run_count > 0), "{sessions:?}");
}

fn print_stats(now: &[ProgramStats], before: Option<&[ProgramStats]>) {
    for s in now {
        let (runs, time) = match before.and_then(|b| b.iter().find(|p| p.name == s.name)) {
            Some(b) => (s.run_count - b.run_count, s.run_time - b.run_time),
            None => (s.run_count, s.run_time),
        };
        let ns = if runs == 0 {
            0.0
        } else {
            time.as_nanos() as f64 / runs as f64
        };
        println!(
            "  {:16} runs {runs:8}  total {time:>12?}  {ns:7.1} ns/run",
            s.name
        );
    }
}
