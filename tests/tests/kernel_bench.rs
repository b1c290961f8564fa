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
                hold: false,
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

/// `BPF_PROG_TEST_RUN` of one program on one frame, `repeat` times in the
/// kernel: average ns per run, without the per-run clock reads that
/// `bpf_stats_enabled` adds. Returns (ns per run, return value).
fn test_run(prog_id: u32, frame: &[u8], repeat: u32) -> (u32, u32) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut attr = [0u64; 16];
    attr[0] = prog_id as u64;
    // BPF_PROG_GET_FD_BY_ID
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 13, attr.as_mut_ptr(), 128u32) };
    assert!(fd >= 0, "prog fd: {}", std::io::Error::last_os_error());
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64; // prog_fd, retval
    attr[1] = frame.len() as u64; // data_size_in, data_size_out
    attr[2] = frame.as_ptr() as u64; // data_in
    attr[4] = repeat as u64; // repeat, duration
    // BPF_PROG_TEST_RUN
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 10, attr.as_mut_ptr(), 128u32) };
    assert!(rc == 0, "test run: {}", std::io::Error::last_os_error());
    ((attr[4] >> 32) as u32, (attr[0] >> 32) as u32)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn in_kernel_cost_per_packet_by_test_run() {
    use kernel_env::OTHER_PORT;
    #[path = "../src/packet.rs"]
    mod packet;
    use packet::{ACK, ETH_IPV4, ETH_IPV6, PSH, SYN, Tcp, V4, ether, v6_packet};
    if !require_root() {
        return;
    }
    let w = World::new().expect("world");
    let mut maps = w.maps();
    for i in 0..1000u32 {
        let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        maps.block_add(
            net,
            BlockSpec {
                ttl: None,
                reason: BlockReason::Manual,
                all_ports: false,
                hold: false,
            },
        )
        .unwrap();
    }
    let (c4, s4) = (CLIENT_V4, SERVER_V4);
    let (c6, s6) = (CLIENT_V6, SERVER_V6);
    let mac = [2u8, 0, 0, 0, 0, 1];
    let v4 = |t: Tcp| {
        ether(
            mac,
            mac,
            ETH_IPV4,
            &V4::default().packet(c4, s4, &t.v4_bytes(c4, s4)),
        )
    };
    let v6 = |t: Tcp| {
        ether(
            mac,
            mac,
            ETH_IPV6,
            &v6_packet(c6, s6, &[], 6, &t.v6_bytes(c6, s6)),
        )
    };
    let body = vec![b'x'; 1400];
    let cases = [
        (
            "IPv4 data to port 25",
            v4(Tcp::new(40000, 25, ACK | PSH, &body)),
        ),
        ("IPv4 ACK to port 25", v4(Tcp::new(40000, 25, ACK, b""))),
        ("IPv4 SYN to port 25", v4(Tcp::new(40001, 25, SYN, b""))),
        (
            "IPv4 data, other port",
            v4(Tcp::new(40002, OTHER_PORT, ACK, &body)),
        ),
        (
            "IPv6 data to port 25",
            v6(Tcp::new(40003, 25, ACK | PSH, &body)),
        ),
    ];
    let stats = w.kernel.as_ref().unwrap().program_stats().unwrap();
    println!("BPF_PROG_TEST_RUN, 1000000 runs each, 1000 block prefixes (ns/packet):");
    for (what, frame) in &cases {
        let mut line = format!("  {what:24}");
        for name in ["tarpit_xdp", "tarpit_tc_in"] {
            let id = stats.iter().find(|s| s.name == name).unwrap().id;
            let (ns, _) = test_run(id, frame, 1_000_000);
            line.push_str(&format!("  {name} {ns:4}"));
        }
        println!("{line}");
    }
    let reply = ether(
        mac,
        mac,
        ETH_IPV4,
        &V4::default().packet(
            s4,
            c4,
            &Tcp::new(25, 40000, ACK | PSH, b"250 ok\r\n").v4_bytes(s4, c4),
        ),
    );
    let id = stats.iter().find(|s| s.name == "tarpit_tc_out").unwrap().id;
    let (ns, _) = test_run(id, &reply, 1_000_000);
    println!("  {:24}  tarpit_tc_out {ns:4}", "IPv4 reply from port 25");
}
