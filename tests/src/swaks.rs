//! swaks, the real SMTP client of the agent tests, from a client address
//! to the agent on port 25 of the server.
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::netns::{SERVER_V4, SERVER_V6, TestNet};

/// What one swaks session saw.
pub struct Swaks {
    /// stdout and stderr, `\r` removed.
    pub out: String,
    /// The server's time: the sum of swaks' "response in" lapses (banner
    /// counted from connect), so perl's start-up on a busy box is not in it.
    pub took: Duration,
    /// Wall-clock time of the whole swaks run.
    pub wall: Duration,
    /// swaks exited 0 (every reply was what it expected).
    pub ok: bool,
}

/// One swaks session from `src` to the agent (port 25 of the server, in
/// the family of `src`), with `extra` arguments appended. From
/// `swaks@client.example` to `sink@tarpit.test` unless `extra` says
/// `--from` or `--to`.
pub fn swaks(net: &TestNet, src: IpAddr, extra: &[&str]) -> Swaks {
    let (flag, server) = match src {
        IpAddr::V4(_) => ("-4", SERVER_V4.to_string()),
        IpAddr::V6(_) => ("-6", SERVER_V6.to_string()),
    };
    let src = src.to_string();
    let mut args = vec![
        flag,
        "--server",
        &server,
        "--port",
        "25",
        "--local-interface",
        &src,
        "--timeout",
        "40",
        "--show-time-lapse",
    ];
    if !extra.contains(&"--from") {
        args.extend(["--from", "swaks@client.example"]);
    }
    if !extra.contains(&"--to") {
        args.extend(["--to", "sink@tarpit.test"]);
    }
    args.extend(extra);
    let t = Instant::now();
    let out = net.client_cmd("swaks").args(&args).output().expect("swaks");
    let wall = t.elapsed();
    let ok = out.status.success();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .replace('\r', "");
    let took = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("=== response in ")?
                .strip_suffix('s')?
                .parse::<f64>()
                .ok()
        })
        .map(Duration::from_secs_f64)
        .sum();
    Swaks {
        took,
        wall,
        ok,
        out,
    }
}
