//! A raw-socket SMTP client for agent tests: exact bytes out, whole
//! replies in, and the time each reply took. Also the agent's test config
//! and a helper that kills the MTA's smtpd processes mid-session.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};

use crate::netns::{SERVER_V4, SERVER_V6, TestNet};
use crate::pins::PinDir;

/// The agent's SMTP port in the server namespace.
pub const AGENT_PORT: u16 = 25;

/// The agent's v4 and v6 addresses.
pub fn agent_v4() -> SocketAddr {
    SocketAddr::from((SERVER_V4, AGENT_PORT))
}

pub fn agent_v6() -> SocketAddr {
    SocketAddr::from((SERVER_V6, AGENT_PORT))
}

/// An agent config listening on the server veth (v4 and v6), with the
/// kernel programs on the test's veth and its own pin directory. `rest`
/// holds every other section (greeting, rcpt, ...), each at most once;
/// top-level keys (`enabled = false`) before its first section go first.
pub fn agent_config(net: &TestNet, pins: &PinDir, backend: &str, rest: &str) -> String {
    let split = rest
        .find("\n[")
        .map(|i| i + 1)
        .unwrap_or(if rest.starts_with('[') { 0 } else { rest.len() });
    let (top, rest) = rest.split_at(if rest.starts_with('[') { 0 } else { split });
    format!(
        r#"
{top}
[listen]
addrs = ["{v4}", "{v6}"]
[kernel]
interfaces = ["{iface}"]
pin_path = "{pins}"
detach_on_exit = true
{backend}
{rest}
"#,
        v4 = agent_v4(),
        v6 = agent_v6(),
        iface = net.server_if,
        pins = pins.path.display(),
    )
}

/// `[backend]` for Postfix's PROXY listener.
pub fn proxy_backend() -> String {
    format!(
        "[backend]\naddr = \"127.0.0.1:{}\"\nclient_address = \"proxy-v2\"\n",
        crate::postfix::PROXY
    )
}

/// `[backend]` for the same PROXY smtpd on a Unix socket
/// (`tarpit-smtpd unix` in master.cf, under the instance's queue/public/).
pub fn unix_backend(pf: &crate::Postfix) -> String {
    format!(
        "[backend]\naddr = \"unix:{}\"\nclient_address = \"proxy-v2\"\n",
        pf.dir.join("queue/public/tarpit-smtpd").display()
    )
}

/// One reply: code and full text (all lines, CRLF kept).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

/// A plain TCP connection from `src` (any address of the client
/// namespace) to `dst`, given 5 s.
pub fn tcp_connect(net: &TestNet, src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    tcp_connect_within(net, src, dst, Duration::from_secs(5))
}

/// [`tcp_connect`], given `timeout`.
pub fn tcp_connect_within(
    net: &TestNet,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    net.in_client(|| -> Result<TcpStream> {
        let domain = if src.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let s = Socket::new(domain, Type::STREAM, None)?;
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&dst.into(), timeout)
            .with_context(|| format!("connect {src} -> {dst}"))?;
        Ok(s.into())
    })
    .context("client namespace")?
}

/// A client connection from a chosen source address in the client namespace.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Just before `connect()`: no server clock can start earlier.
    started: Instant,
}

impl SmtpClient {
    /// Connects from `src` (any address of the client namespace) to `dst`.
    pub fn connect(net: &TestNet, src: IpAddr, dst: SocketAddr) -> Result<SmtpClient> {
        let started = Instant::now();
        let stream = tcp_connect(net, src, dst)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(SmtpClient {
            reader: BufReader::new(stream),
            writer,
            started,
        })
    }

    pub fn set_read_timeout(&self, t: Duration) -> Result<()> {
        self.writer.set_read_timeout(Some(t))?;
        Ok(())
    }

    /// Reads one complete (possibly multi-line) reply.
    pub fn reply(&mut self) -> Result<Reply> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line)?;
            if n == 0 {
                bail!("connection closed; read so far: {text:?}");
            }
            text.push_str(&line);
            let b = line.as_bytes();
            if b.len() < 4 || !b[..3].iter().all(u8::is_ascii_digit) {
                bail!("not a reply line: {line:?}");
            }
            if b[3] != b'-' {
                let code = line[..3].parse()?;
                return Ok(Reply { code, text });
            }
        }
    }

    /// Reads one line (a single line of a multi-line reply).
    pub fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line)
    }

    /// Reads one reply and how long it took.
    /// The banner, timed from before the connect: a greeting delay the
    /// server counts from its accept can never look shorter than it is
    /// (timed from after the connect returned, a busy client thread could
    /// start its clock after the server's).
    pub fn timed_banner(&mut self) -> Result<(Reply, Duration)> {
        let r = self.reply()?;
        Ok((r, self.started.elapsed()))
    }

    pub fn timed_reply(&mut self) -> Result<(Reply, Duration)> {
        let t = Instant::now();
        let r = self.reply()?;
        Ok((r, t.elapsed()))
    }

    pub fn send(&mut self, data: &[u8]) -> Result<()> {
        self.writer.write_all(data)?;
        Ok(())
    }

    /// Sends `line` + CRLF and reads the reply, timed from the send.
    pub fn cmd(&mut self, line: &str) -> Result<(Reply, Duration)> {
        let t = Instant::now();
        self.send(format!("{line}\r\n").as_bytes())?;
        let r = self.reply()?;
        Ok((r, t.elapsed()))
    }

    /// Sends a command and checks the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Result<Reply> {
        let (r, _) = self.cmd(line)?;
        if r.code != code {
            bail!("{line:?}: expected {code}, got {:?}", r.text);
        }
        Ok(r)
    }

    /// True when the server closed the connection (EOF within `t`).
    pub fn closed_within(&mut self, t: Duration) -> bool {
        let _ = self.writer.set_read_timeout(Some(t));
        let mut buf = [0u8; 256];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// A small message with a unique Subject.
pub fn message(subject: &str) -> String {
    format!(
        "From: <sender@client.example>\r\nTo: <sink@tarpit.test>\r\nSubject: {subject}\r\n\r\nhello from the tarpit tests\r\n..dot-stuffed line\r\n"
    )
}

/// Kills (-9) every Postfix process of the server namespace: the MTA dies
/// with whatever sessions it had.
pub fn kill_postfix(net: &TestNet) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", &net.server_ns])
        .output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if matches!(
            comm,
            "master" | "smtpd" | "cleanup" | "qmgr" | "pickup" | "trivial-rewrite"
        ) && let Ok(pid) = pid.parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads the agent's metrics endpoint (127.0.0.1:9325 in the server
/// namespace) and returns the value of the sample named exactly `name`
/// (with labels, e.g. `tarpit_sessions_total{outcome="quit"}`).
pub fn metric(net: &TestNet, name: &str) -> Option<f64> {
    let text = scrape_metrics(net).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The whole exposition of the agent's metrics endpoint (127.0.0.1:9325
/// in the server namespace).
pub fn scrape_metrics(net: &TestNet) -> Result<String> {
    net.in_server(|| -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", 9325))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?
}
