//! Least privilege: after start-up the agent is an unprivileged user with
//! CAP_BPF only (CAP_NET_ADMIN too with detach_on_exit), on every thread,
//! exactly as docs/operations.md says.
use std::process::Command;
use std::time::Duration;

use tarpit::config::Config;
use tarpit::ops::privileges::{self, CAP_BPF, CAP_NET_ADMIN, CapSet, ProcStatus};
use tarpit_tests::require_root;

const NOBODY: u32 = 65534;
const CHILD_ENV: &str = "TARPIT_TEST_PRIVILEGE_CHILD";

/// Every thread of this process, as /proc shows it.
fn threads() -> Vec<(String, ProcStatus)> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| {
            let e = e.ok()?;
            let text = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                ProcStatus::parse(&text).expect("status parses"),
            ))
        })
        .collect()
}

fn assert_dropped(who: &str, st: &ProcStatus, keep: CapSet) {
    assert_eq!(st.uid, [NOBODY; 4], "{who}: uids");
    assert_eq!(st.gid, [NOBODY; 4], "{who}: gids");
    assert_eq!(st.groups, vec![NOBODY], "{who}: supplementary groups");
    assert_eq!(st.cap_prm, keep, "{who}: permitted {}", st.cap_prm.names());
    assert_eq!(st.cap_eff, keep, "{who}: effective {}", st.cap_eff.names());
    assert_eq!(st.cap_bnd, keep, "{who}: bounding {}", st.cap_bnd.names());
    assert_eq!(st.cap_inh, CapSet(0), "{who}: inheritable");
    assert_eq!(st.cap_amb, CapSet(0), "{who}: ambient");
    assert!(st.no_new_privs, "{who}: no_new_privs");
}

/// Runs in a child process (this test binary again): the drop is
/// irreversible, so it must not happen in the test runner itself. As in
/// the agent (`tarpit run`), the drop comes before the tokio runtime and
/// any other thread: capabilities belong to threads, and threads started
/// afterwards (runtime workers, busy threads) inherit the dropped sets.
/// With other threads already running the drop is refused and changes
/// nothing. libtest runs each test on a thread of its own, so the
/// single-threaded start is a fork of that thread.
#[test]
#[ignore = "helper: run by drop_reaches_every_thread in a child process"]
fn privilege_drop_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let detach: bool = std::env::var(CHILD_ENV).unwrap() == "detach";
    let mut config = Config::default();
    config.daemon.user = Some("nobody".into());
    config.kernel.detach_on_exit = detach;
    let keep = if detach {
        CapSet::of(&[CAP_BPF, CAP_NET_ADMIN])
    } else {
        CapSet::of(&[CAP_BPF])
    };
    // libtest's main thread and this one, plus a sleeper: refused.
    let sleeper = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(1)));
    let e = privileges::drop_privileges(&config).expect_err("refused with threads running");
    assert!(format!("{e:#}").contains("threads"), "{e:#}");
    for (tid, st) in threads() {
        assert_eq!(st.uid, [0; 4], "thread {tid} changed by a refused drop");
    }
    sleeper.join().unwrap();

    // SAFETY: the child has this thread only; it runs the checks below
    // and leaves with exit(), never returning into libtest.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let ok = std::panic::catch_unwind(|| drop_then_start_threads(&config, keep)).is_ok();
            std::process::exit(if ok { 0 } else { 1 });
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the forked child failed (its panic is above)"
            );
        }
    }
    println!("CHILD-OK");
}

/// In a process of one thread: the drop, then a tokio runtime and busy
/// threads, all of them `nobody` with exactly `keep`.
fn drop_then_start_threads(config: &Config, keep: CapSet) {
    let dropped = privileges::drop_privileges(config)
        .expect("drop")
        .expect("a user was configured");
    assert_eq!(dropped.kept, keep);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let all = threads();
    assert!(all.len() >= 5, "threads: {}", all.len());
    for (tid, st) in &all {
        assert_dropped(&format!("thread {tid}"), st, keep);
    }
    // threads born later, from a worker, inherit it too; root is out of reach
    let later = runtime.block_on(async { tokio::task::spawn_blocking(threads).await.unwrap() });
    for (tid, st) in &later {
        assert_dropped(&format!("later thread {tid}"), st, keep);
    }
    assert!(nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_err());
    // the runtime works
    assert_eq!(
        runtime.block_on(async { tokio::spawn(async { 7 }).await.unwrap() }),
        7
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
}

fn run_child(mode: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "privilege_drop_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .output()
        .expect("re-run this test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("CHILD-OK"),
        "child failed:\n{text}"
    );
}

#[test]
fn drop_reaches_every_thread() {
    if !require_root() {
        return;
    }
    run_child("keep");
}

#[test]
fn drop_with_detach_on_exit_keeps_net_admin() {
    if !require_root() {
        return;
    }
    run_child("detach");
}

mod ops_common;

/// The real agent, started as root with `[daemon] user = "nobody"`: its
/// threads are nobody with CAP_BPF + CAP_NET_ADMIN (detach_on_exit is on in
/// the test config) and nothing else, and it still does its work: relays
/// mail, reads the kernel maps for /metrics, removes its pins at exit.
#[test]
fn running_agent_is_nobody_with_only_the_documented_capabilities() {
    if !require_root() {
        return;
    }
    use tarpit_tests::smtp_client::agent_v4;
    let mut w = ops_common::World::new("[greeting]\ndelay = \"0s\"\n[daemon]\nuser = \"nobody\"\n");
    let pid = w.agent().pid().expect("pid");
    assert!(
        w.agent().log().contains("privileges dropped"),
        "{}",
        w.agent().log()
    );
    let keep = CapSet::of(&[CAP_BPF, CAP_NET_ADMIN]);
    let main = ProcStatus::read(pid).expect("status");
    assert_dropped("agent", &main, keep);
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let p = e.unwrap().path().join("status");
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let st = ProcStatus::parse(&text).unwrap();
        assert_eq!(st.uid, [NOBODY; 4], "{}", p.display());
        assert!(
            st.cap_prm.is_subset_of(keep),
            "{}: {}",
            p.display(),
            st.cap_prm.names()
        );
        n += 1;
    }
    assert!(n > 1, "a multi-threaded agent");

    // still working: a message goes through, the kernel maps are readable
    assert!(
        ops_common::send_message(
            &w.net,
            tarpit_tests::CLIENT_V4.into(),
            agent_v4(),
            1,
            "as nobody"
        )
        .unwrap()
    );
    assert!(
        w.pf.wait_delivered(1, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );
    let text = ops_common::scrape(&w.net);
    assert!(
        ops_common::sample(&text, "tarpit_map_capacity{map=\"IP_STATE\"}").unwrap_or(0.0) > 0.0,
        "maps unreadable after the drop:\n{text}"
    );
    assert!(
        ops_common::sample(&text, "tarpit_kernel_total{counter=\"tc_flow_new\"}").unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );

    // a clean stop: the pins it made are gone (detach_on_exit)
    let pins = w.pins.path.clone();
    let status = w.agent.take().unwrap().stop().unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left after the stop: {left:?}");
}

/// The production layout (`detach_on_exit = false`): CAP_BPF alone, as the
/// docs show, and a stop as `nobody` leaves programs and pins in place and
/// exits 0 (systemd would otherwise report a failed stop). `tarpit detach`
/// (root) cleans up afterwards.
#[test]
fn production_layout_keeps_cap_bpf_only_and_stops_cleanly() {
    if !require_root() {
        return;
    }
    use tarpit_tests::smtp_client::{agent_v4, agent_v6, proxy_backend};
    let net = tarpit_tests::TestNet::new().expect("test network");
    let pins = tarpit_tests::PinDir::new().expect("pin dir");
    let _pf = tarpit_tests::Postfix::start(&net).expect("postfix");
    let config = format!(
        "[listen]\naddrs = [\"{}\", \"{}\"]\n[kernel]\ninterfaces = [\"{}\"]\npin_path = \"{}\"\n\
         detach_on_exit = false\n{}[greeting]\ndelay = \"0s\"\n[daemon]\nuser = \"nobody\"\n",
        agent_v4(),
        agent_v6(),
        net.server_if,
        pins.path.display(),
        proxy_backend()
    );
    let agent = tarpit_tests::Agent::start(&net, &config).expect("agent");
    let st = ProcStatus::read(agent.pid().unwrap()).unwrap();
    assert_dropped("agent", &st, CapSet::of(&[CAP_BPF]));
    assert_eq!(format!("{:016x}", st.cap_eff.0), "0000008000000000");
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
    let left = std::fs::read_dir(&pins.path)
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(left > 0, "pins kept across the stop");
    let out = Command::new(tarpit_tests::tarpit_bin())
        .arg("--pin-path")
        .arg(&pins.path)
        .arg("detach")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
