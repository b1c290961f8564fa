//! `cargo xtask run`'s first-run demo, as the README shows it: it starts
//! the agent in front of a throw-away Postfix on loopback and prints three
//! commands; run as printed, they show the greeting delay and a delivered
//! message (in Postfix's own mailbox, with the real client address in its
//! log), the 554 for a pre-greet talker, and `tarpit ip` with the strike.
//! Ctrl-C removes the agent's pins, the MTA and the demo's directory.
//!
//! The demo runs inside a test namespace of its own (its `lo`, its
//! 127.0.0.2), with the built xtask binary and `--no-build` (`cargo xtask`
//! would wait for the cargo lock that `cargo test` holds).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tarpit_tests::{TestNet, env::repo_root, require_root, tarpit_bin, wait};

fn xtask_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XTASK_BIN") {
        return PathBuf::from(p);
    }
    // next to the tarpit binary under test (same target directory)
    let p = tarpit_bin().with_file_name("xtask");
    assert!(
        p.is_file(),
        "{} not found: build it first (`cargo build -p xtask`) or set XTASK_BIN",
        p.display()
    );
    p
}

/// The running demo; Drop kills what is left and removes its pins and
/// directory (the test's namespace goes with the TestNet).
struct Demo {
    child: Option<Child>,
    out: PathBuf,
}

impl Demo {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// A path the demo printed after `marker`, up to `end`.
    fn printed_after(&self, marker: &str, end: char) -> PathBuf {
        let out = self.output();
        let rest = out
            .split_once(marker)
            .unwrap_or_else(|| panic!("no {marker:?} in the demo's output:\n{out}"))
            .1;
        PathBuf::from(rest.split(end).next().unwrap_or_default())
    }

    /// The directory the demo made (it holds demo.toml).
    fn dir(&self) -> PathBuf {
        let config = self.printed_after(" run -c ", '\n');
        config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| panic!("no demo directory in {}", config.display()))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of the demo's process group (it leads it).
            unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- demo output ---\n{}", self.output());
        }
        let out = self.output();
        if let Some(rest) = out.split_once(" run -c ") {
            let config = PathBuf::from(rest.1.lines().next().unwrap_or_default());
            if let Some(dir) = config.parent()
                && let Some(name) = dir.file_name()
            {
                let pins = Path::new("/sys/fs/bpf").join(name);
                if pins.exists() {
                    let _ = Command::new(tarpit_bin())
                        .arg("detach")
                        .arg("--pin-path")
                        .arg(&pins)
                        .status();
                    let _ = std::fs::remove_dir_all(&pins);
                }
                let _ = Command::new("pkill")
                    .args(["-9", "-f", &dir.display().to_string()])
                    .status();
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        let _ = std::fs::remove_file(&self.out);
    }
}

#[test]
fn the_demo_shows_the_greeting_delay_the_554_and_tarpit_ip() {
    if !require_root() {
        return;
    }
    demo(false);
}

/// Without Postfix the demo's MTA is a small sink in xtask: the same
/// commands work, the message lands in the sink's directory.
#[test]
fn without_postfix_the_demo_delivers_to_its_sink() {
    if !require_root() {
        return;
    }
    demo(true);
}

fn demo(sink: bool) {
    let net = TestNet::new().expect("test namespace");
    let out = std::env::temp_dir().join(format!("tarpit-demo-out-{}", net.id));
    let log = std::fs::File::create(&out).expect("output file");
    let mut cmd = net.server_cmd(&xtask_bin().display().to_string());
    cmd.args(["run", "--no-build"])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone"))
        .stderr(log);
    if sink {
        cmd.env("TARPIT_DEMO_SINK", "1");
    }
    // Its own process group, as a shell gives a foreground job: Ctrl-C
    // (SIGINT to the group) reaches xtask and the agent alike.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut demo = Demo {
        child: Some(cmd.spawn().expect("cannot start xtask run")),
        out,
    };

    let ready = wait::until(Duration::from_secs(120), || {
        demo.output().matches("\n    $ ").count() >= 3
            || demo
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    });
    let output = demo.output();
    assert!(
        ready && output.matches("\n    $ ").count() == 3,
        "the demo printed no three commands:\n{output}"
    );
    assert!(output.contains("tarpit agent running"), "{output}");
    let tries: Vec<String> = output
        .lines()
        .filter_map(|l| l.strip_prefix("    $ "))
        .map(str::to_string)
        .collect();
    let (mailbox, maillog) = if sink {
        (demo.printed_after("messages land in ", ')'), None)
    } else {
        (
            demo.printed_after("mailbox ", ')'),
            Some(demo.printed_after("; log ", ',')),
        )
    };
    let dir = demo.dir();
    let pins = Path::new("/sys/fs/bpf").join(dir.file_name().expect("dir name"));
    assert!(
        pins.is_dir(),
        "the agent pinned its maps at {}",
        pins.display()
    );

    let sh = |line: &str| {
        let o = net
            .server_cmd("bash")
            .arg("-c")
            .arg(line)
            .output()
            .expect("bash");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // 1. The good client: the greeting comes only after the 5 s delay,
    // and the message lands in Postfix's mailbox, once, from 127.0.0.2.
    let start = Instant::now();
    let good = sh(&tries[0]);
    let took = start.elapsed();
    assert!(good.contains("< 220 "), "no greeting:\n{good}");
    let queued = if sink {
        "250 2.0.0 stored"
    } else {
        "250 2.0.0 Ok: queued"
    };
    assert!(good.contains(queued), "not queued:\n{good}");
    assert!(
        took >= Duration::from_millis(4900),
        "the greeting was not delayed (whole session {took:?}):\n{good}"
    );
    assert!(
        wait::until(Duration::from_secs(20), || count(&mailbox) == 1),
        "the message did not reach the mailbox {}",
        mailbox.display()
    );
    if let Some(maillog) = &maillog {
        let pf_log = std::fs::read_to_string(maillog).unwrap_or_default();
        assert!(
            pf_log.contains("client=unknown[127.0.0.2]"),
            "Postfix did not see the real client address:\n{pf_log}"
        );
    } else {
        let stored: Vec<String> = std::fs::read_dir(&mailbox)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            stored
                .iter()
                .any(|m| m.contains("Subject: through the tarpit")),
            "the sink stored {stored:?}"
        );
    }

    // 2. The pre-greet talker gets 554 and is dropped.
    let bot = sh(&tries[1]);
    assert!(bot.contains("554 5.5.1"), "the talker got {bot:?}");
    assert_eq!(count(&mailbox), 1, "the bot delivered nothing");

    // 3. tarpit ip shows the strike and the policy.
    let info = sh(&tries[2]);
    assert!(info.starts_with("127.0.0.2"), "{info}");
    let strikes = info
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("pre-greet strikes"))
        .unwrap_or_else(|| panic!("no strikes line:\n{info}"));
    assert!(strikes.trim().starts_with('1'), "{info}");
    let policy = info
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("policy now"))
        .unwrap_or_else(|| panic!("no policy line:\n{info}"));
    assert!(policy.trim().starts_with("tarpit"), "{info}");

    // Ctrl-C: everything goes.
    let mut child = demo.child.take().expect("running");
    // SAFETY: kill(2) of the demo's process group, as a terminal's Ctrl-C.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGINT) };
    let mut status = None;
    wait::until(Duration::from_secs(60), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    let Some(status) = status else {
        demo.child = Some(child);
        panic!("the demo did not stop within 60 s of Ctrl-C");
    };
    assert!(status.success(), "demo exited with {status}");
    assert!(!pins.exists(), "pins left at {}", pins.display());
    assert!(!dir.exists(), "demo directory left at {}", dir.display());
    let left = Command::new("pgrep")
        .args(["-af", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        left.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

fn count(maildir: &Path) -> usize {
    std::fs::read_dir(maildir).map(|d| d.count()).unwrap_or(0)
}
