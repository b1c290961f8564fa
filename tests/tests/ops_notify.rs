//! systemd's notify protocol as the real agent speaks it (the shipped
//! unit is `Type=notify` with `WatchdogSec=`): READY=1 once serving,
//! WATCHDOG=1 pings, RELOADING=1 + READY=1 around a reload, STOPPING=1 on
//! SIGTERM. The test plays systemd: it owns the socket and the env.
mod ops_common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tarpit_tests::{PinDir, TestNet, require_root, tarpit_bin, unique_id};

/// Kills the agent if the test fails half-way.
struct Guard(Option<Child>, std::path::PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}",
                std::fs::read_to_string(self.1.join("agent.log")).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The next notification that is not a watchdog ping.
fn next_state(sock: &UnixDatagram, pings: &mut usize) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg == "WATCHDOG=1" {
                *pings += 1;
                continue;
            }
            return msg;
        }
    }
    panic!("no notification within 30 s");
}

#[test]
fn agent_speaks_sd_notify_ready_watchdog_reloading_stopping() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let dir = std::env::temp_dir().join(format!("tarpit-notify-{}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tarpit.toml");
    std::fs::write(
        &config,
        ops_common::config(&net, &pins, "[greeting]\ndelay = \"0s\"\n"),
    )
    .unwrap();
    let sock_path = dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = net
        .server_cmd(&tarpit_bin().display().to_string())
        .arg("run")
        .arg("-c")
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let mut guard = Guard(Some(child), dir.clone());
    let mut pings = 0;

    let ready = next_state(&sock, &mut pings);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=serving"), "{ready:?}");
    let agent_log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(
        agent_log.contains("tarpit agent running") || agent_log.contains("listening"),
        "READY before serving?\n{agent_log}"
    );

    // pings every WATCHDOG_USEC / 2
    let t = Instant::now();
    let mut buf = [0u8; 256];
    while pings < 2 && t.elapsed() < Duration::from_secs(5) {
        if let Ok(n) = sock.recv(&mut buf)
            && &buf[..n] == b"WATCHDOG=1"
        {
            pings += 1;
        }
    }
    assert!(pings >= 2, "{pings} watchdog pings in {:?}", t.elapsed());

    kill(pid, Signal::SIGHUP).unwrap();
    let reloading = next_state(&sock, &mut pings);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC");
    assert!(usec > 0);
    let ready = next_state(&sock, &mut pings);
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("configuration reloaded"), "{ready:?}");

    kill(pid, Signal::SIGTERM).unwrap();
    let stopping = next_state(&sock, &mut pings);
    assert!(stopping.starts_with("STOPPING=1"), "{stopping:?}");
    let mut child = guard.0.take().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
