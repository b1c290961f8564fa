//! `tarpit top` in a real terminal (tmux): live numbers change while a test
//! client misbehaves, keys work, and q and Ctrl-C both end it cleanly with
//! exit status 0.
mod cli_common;

use std::io::Write;
use std::net::{IpAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use cli_common::{CliWorld, Opts, SMTP, ip, server_for};
use socket2::{Domain, Socket, Type};
use tarpit_tests::{require_root, tarpit_bin, unique_id};

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("tarpit-test-{}", unique_id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `command` in a new 120x40 session; the shell line after it
    /// prints its exit status and keeps the pane open for reading.
    fn start(&self, command: &str) {
        let script = format!("{command}; echo TOP-EXITED $?; sleep 60");
        self.cmd(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "120",
            "-y",
            "40",
            "sh",
            "-c",
            &script,
        ]);
    }

    fn screen(&self) -> String {
        self.cmd(&["capture-pane", "-p", "-t", "top"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }

    /// Waits (up to 15 s) for the screen to satisfy `f`; returns it.
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            if start.elapsed() > Duration::from_secs(15) {
                panic!("tmux screen never showed {what}:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server's socket file outlives kill-server: remove it too.
        let path = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(["list-sessions", "-F", "#{socket_path}"])
            .output()
            .map(|o| {
                let out = String::from_utf8_lossy(&o.stdout);
                out.lines().next().unwrap_or_default().trim().to_string()
            })
            .unwrap_or_default();
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        if path.ends_with(&self.socket) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The number after `label: ` in the header (`pre-greet: 3 (1.5/s)`).
fn headline(screen: &str, label: &str) -> u64 {
    let needle = format!("{label}: ");
    let at = screen
        .find(&needle)
        .unwrap_or_else(|| panic!("no {label:?} on screen:\n{screen}"));
    screen[at + needle.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ' ')
        .filter(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{label} is not a number:\n{screen}"))
}

/// A client that talks before the banner and waits for the agent to hang up.
fn pregreet(w: &CliWorld, src: IpAddr) {
    let dst = server_for(src, SMTP);
    w.net
        .in_client(|| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&std::net::SocketAddr::new(src, 0).into()).unwrap();
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .unwrap();
            let mut s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"EHLO bot.example\r\n").unwrap();
            let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
        })
        .unwrap();
}

fn top_command(w: &CliWorld) -> String {
    format!(
        "nsenter --net=/var/run/netns/{ns} {bin} -c {config} top --interval 300ms",
        ns = w.net.server_ns,
        bin = tarpit_bin().display(),
        config = w.config_path.display()
    )
}

#[test]
fn top_shows_live_numbers_change_and_quits_on_q_and_ctrl_c() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts {
        greeting: "1s",
        // The agent blocks the bot after its third strike.
        extra: "[offenders]\npregreet_strikes = 3\nblock_ttl = \"10m\"\n",
        ..Opts::detached()
    });
    let bot = ip("198.51.100.75");
    w.net.add_client_addr(bot).unwrap();
    w.start_agent();

    let tmux = Tmux::new();
    tmux.start(&top_command(&w));
    let first = tmux.wait_for("the top header", |s| {
        s.contains("tarpit top") && s.contains("pre-greet: ")
    });
    let before = headline(&first, "pre-greet");
    assert!(!first.contains("198.51.100.75"), "{first}");

    for _ in 0..3 {
        pregreet(&w, bot);
    }
    let after = tmux.wait_for("three more pre-greet talkers and the bot's row", |s| {
        s.contains("pre-greet: ")
            && headline(s, "pre-greet") >= before + 3
            && s.contains("198.51.100.75")
    });
    // The bot leads the table (sorted by strikes) with its 3 strikes.
    let row = after.lines().find(|l| l.contains("198.51.100.75")).unwrap();
    let cols: Vec<&str> = row
        .trim_matches(|c: char| c == '│' || c.is_whitespace())
        .split_whitespace()
        .collect();
    assert_eq!(cols[0], "198.51.100.75", "{row}");
    assert_eq!(cols[1], "3", "strikes column: {row}");
    assert!(row.contains("pregreet"), "{row}");
    assert!(headline(&after, "addresses") >= 1, "{after}");

    // The agent's own block shows up as such in the block list.
    let start = Instant::now();
    let entry = loop {
        let list = w.json(&["block", "list"]);
        if let Some(e) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["cidr"] == "198.51.100.75/32")
        {
            break e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the agent never blocked the bot: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entry["reason"], "pregreet", "{entry}");
    assert_eq!(entry["source"], "agent", "{entry}");
    assert_eq!(entry["saved"], false, "{entry}");
    cli_common::assert_list_matches(&w, "block");
    tmux.wait_for("the block in the header", |s| s.contains("block: 1"));

    // s changes the sort column; p pauses.
    tmux.keys(&["s"]);
    tmux.wait_for("sort by live", |s| s.contains("addresses by live"));
    tmux.keys(&["p"]);
    tmux.wait_for("PAUSED", |s| s.contains("PAUSED"));
    tmux.keys(&["p"]);

    // q ends it with status 0 and gives the terminal back.
    tmux.keys(&["q"]);
    let end = tmux.wait_for("exit after q", |s| s.contains("TOP-EXITED"));
    assert!(end.contains("TOP-EXITED 0"), "{end}");
    assert!(
        !end.contains("tarpit top -"),
        "the alternate screen is gone:\n{end}"
    );
    drop(tmux);

    // Ctrl-C ends it the same way.
    let tmux = Tmux::new();
    tmux.start(&top_command(&w));
    tmux.wait_for("the top header", |s| s.contains("tarpit top"));
    tmux.keys(&["C-c"]);
    let end = tmux.wait_for("exit after Ctrl-C", |s| s.contains("TOP-EXITED"));
    assert!(end.contains("TOP-EXITED 0"), "{end}");
}

#[test]
fn top_refuses_without_a_terminal() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::detached());
    w.start_agent();
    let err = w.fails(&["top"], 1);
    assert!(err.contains("needs a terminal"), "{err}");
}
