//! Live reload: SIGHUP (and `tarpit reload`) with a bad file keeps the
//! running configuration; with a good one the next session gets the new
//! values, and a session in flight is neither dropped nor changed.
mod ops_common;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use ops_common::{World, sample, scrape};
use tarpit_tests::smtp_client::{SmtpClient, agent_v4, message};
use tarpit_tests::{CLIENT_V4, require_root, tarpit_bin};

/// Slack on top of a configured delay: scheduling, the MTA's banner.
const SLACK: Duration = Duration::from_millis(2500);

fn greeting(delay: &str, extra: &str) -> String {
    format!("[greeting]\ndelay = \"{delay}\"\n{extra}")
}

/// A new session's banner delay.
fn banner_delay(w: &World) -> (SmtpClient, Duration) {
    let mut c = SmtpClient::connect(&w.net, CLIENT_V4.into(), agent_v4()).expect("connect");
    let (r, took) = c.timed_banner().expect("banner");
    assert_eq!(r.code, 220, "{}", r.text);
    (c, took)
}

fn assert_delay(took: Duration, want: Duration, what: &str) {
    assert!(
        took >= want && took < want + SLACK,
        "{what}: banner after {took:?}, configured {want:?}"
    );
}

#[test]
fn sighup_bad_file_keeps_old_config_good_file_applies_to_next_session() {
    if !require_root() {
        return;
    }
    let mut w = World::new(&greeting("1s", ""));
    // a session in flight across both reloads
    let (mut inflight, took) = banner_delay(&w);
    assert_delay(took, Duration::from_secs(1), "first session");
    inflight.expect("EHLO client.example", 250).unwrap();
    inflight
        .expect("MAIL FROM:<sender@client.example>", 250)
        .unwrap();

    // bad: a delay over the 600 s cap
    w.rewrite_config(&greeting("900s", ""));
    w.agent().signal(Signal::SIGHUP).unwrap();
    assert!(
        w.wait_log_count("configuration reload refused", 1, Duration::from_secs(10)),
        "{}",
        w.agent().log()
    );
    let log = w.agent().log();
    let line = log
        .lines()
        .find(|l| l.contains("configuration reload refused"))
        .unwrap();
    assert!(line.contains("greeting.delay"), "the key is named: {line}");
    assert!(line.contains("600s"), "the reason is given: {line}");
    let (mut c, took) = banner_delay(&w);
    assert_delay(took, Duration::from_secs(1), "after the refused reload");
    c.expect("QUIT", 221).unwrap();

    // bad syntax is refused the same way
    w.rewrite_config("[greeting\ndelay = 3s\n");
    w.agent().signal(Signal::SIGHUP).unwrap();
    assert!(w.wait_log_count("configuration reload refused", 2, Duration::from_secs(10)));

    // good: 3 s applies to the next session
    w.rewrite_config(&greeting("3s", ""));
    w.agent().signal(Signal::SIGHUP).unwrap();
    assert!(
        w.wait_log_count("configuration reloaded", 1, Duration::from_secs(10)),
        "{}",
        w.agent().log()
    );
    let (mut c, took) = banner_delay(&w);
    assert_delay(took, Duration::from_secs(3), "after the applied reload");
    c.expect("QUIT", 221).unwrap();

    // the session from before both reloads finishes its message
    inflight.expect("RCPT TO:<sink@tarpit.test>", 250).unwrap();
    inflight.expect("DATA", 354).unwrap();
    inflight.send(message("in flight").as_bytes()).unwrap();
    inflight.expect(".", 250).unwrap();
    inflight.expect("QUIT", 221).unwrap();
    assert!(
        w.pf.wait_delivered(1, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );

    let text = scrape(&w.net);
    assert_eq!(
        sample(&text, "tarpit_config_reloads_total{result=\"refused\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tarpit_config_reloads_total{result=\"applied\"}"),
        Some(1.0),
        "{text}"
    );
    // the agent is still serving and stops cleanly
    let status = w.agent.take().unwrap().stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn tarpit_reload_command_checks_the_file_then_signals_the_agent() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tarpit-reload-{}", tarpit_tests::unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("tarpit.pid");
    let daemon = format!("[daemon]\npid_file = \"{}\"\n", pid_file.display());
    let mut w = World::new(&greeting("0s", &daemon));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(Some(pid), w.agent().pid(), "the pid file names the agent");
    let reload = || {
        Command::new(tarpit_bin())
            .arg("reload")
            .arg("-c")
            .arg(&w.agent().config)
            .output()
            .unwrap()
    };

    // a bad file: refused by the command itself, the agent is not disturbed
    w.rewrite_config(&greeting("0s", &format!("{daemon}[rcpt]\nscaling = 0.5\n")));
    let out = reload();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rcpt.scaling"), "{err}");
    assert!(
        !w.agent().log().contains("SIGHUP"),
        "the agent was signalled"
    );

    // a good one: signalled, applied
    w.rewrite_config(&greeting("2s", &daemon));
    let out = reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {pid}")));
    assert!(
        w.wait_log_count("configuration reloaded", 1, Duration::from_secs(10)),
        "{}",
        w.agent().log()
    );
    let (mut c, took) = banner_delay(&w);
    assert_delay(took, Duration::from_secs(2), "after tarpit reload");
    c.expect("QUIT", 221).unwrap();

    // a restart-only key changes: kept, and the log says so
    w.rewrite_config(&format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:9326\"\n",
        greeting("2s", &daemon)
    ));
    assert!(reload().status.success());
    assert!(w.wait_log_count("configuration reloaded", 2, Duration::from_secs(10)));
    assert!(
        w.agent().log().contains("metrics.listen changed"),
        "{}",
        w.agent().log()
    );
    assert!(
        sample(&scrape(&w.net), "tarpit_sessions_active").is_some(),
        "still on 9325"
    );

    let status = w.agent.take().unwrap().stop().unwrap();
    assert!(status.success());
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}
