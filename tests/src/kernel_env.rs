//! A world for the kernel data-plane tests: the test network, a pin
//! directory, a cgroup, the real kernel programs loaded by the real loader
//! (in this process), and a small scripted SMTP-like server in the server
//! namespace whose greeting timing the tests control.
//!
//! Included by the `kernel_*` test files with `#[path]`, so it lives next
//! to the harness without widening its public API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use socket2::Socket;
use tarpit::config::KernelConfig;
use tarpit::kernel::{Kernel, KernelMaps, PreGreetVerdict};
use tarpit_tests::wait::until;
use tarpit_tests::{PinDir, TestCgroup, TestNet};

/// Greeting delay of the scripted server (port 25 and the 465 banner; the
/// 587 final line comes this long after its `220-` teaser).
pub const GREETING_DELAY: Duration = Duration::from_millis(1500);
/// A port that is not watched as SMTP, for "other ports still work".
pub const OTHER_PORT: u16 = 2600;
/// A watched port whose server greets only after [`SLOW_GREETING`].
pub const SLOW_PORT: u16 = 2525;
pub const SLOW_GREETING: Duration = Duration::from_secs(8);
/// A watched port whose server greets at once (load generation).
pub const FAST_PORT: u16 = 2526;
/// Ports watched by the kernel programs in these tests.
pub const SMTP_PORTS: [u16; 5] = [25, 465, 587, SLOW_PORT, FAST_PORT];

const SERVER_PY: &str = r#"
import socket, sys, threading, time
DELAY = float(sys.argv[1])
PORTS = [int(p) for p in sys.argv[2:]]
def handle(c, port):
    try:
        if port == 25 or port == 465:
            time.sleep(DELAY)
            c.sendall(b"220 test ESMTP\r\n")
        elif port == 2525:
            time.sleep(8)
            c.sendall(b"220 slow ESMTP\r\n")
        elif port == 2526:
            c.sendall(b"220 fast ESMTP\r\n")
        elif port == 587:
            c.sendall(b"220-teaser\r\n")
            time.sleep(DELAY)
            c.sendall(b"220 test ESMTP\r\n")
        else:
            c.sendall(b"hello\r\n")
        f = c.makefile("rb")
        for line in f:
            c.sendall(b"250 ok\r\n")
            if line.strip().upper() == b"QUIT":
                break
    except OSError:
        pass
    finally:
        c.close()
def serve(s, port):
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c, port), daemon=True).start()
for p in PORTS:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", p))
    s.listen(1024)
    threading.Thread(target=serve, args=(s, p), daemon=True).start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"#;

/// The scripted server: a python3 process in the server namespace, inside
/// the test's cgroup (so sock_ops sees its sockets). Killed on drop.
pub struct ScriptServer {
    child: Child,
}

impl ScriptServer {
    pub fn start(net: &TestNet, cgroup: &TestCgroup) -> Result<ScriptServer> {
        let mut cmd = net.server_cmd("python3");
        cmd.arg("-c")
            .arg(SERVER_PY)
            .arg(format!("{}", GREETING_DELAY.as_secs_f64()));
        for p in SMTP_PORTS.iter().chain([&OTHER_PORT]) {
            cmd.arg(p.to_string());
        }
        let mut child = cgroup
            .wrap(&cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start python3 server")?;
        let out = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("scripted server did not start: {line:?}");
        }
        Ok(ScriptServer { child })
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Network, pins, cgroup, server and the loaded kernel programs.
pub struct World {
    // Drop order: kernel first (detach), then server, cgroup, pins, net.
    pub kernel: Option<Kernel>,
    pub server: Option<ScriptServer>,
    pub cgroup: TestCgroup,
    pub pins: PinDir,
    pub net: TestNet,
}

impl World {
    /// A world with the default test config (see [`World::config`]).
    pub fn new() -> Result<World> {
        Self::with(|_| {})
    }

    /// A world whose kernel config is adjusted by `tweak` before loading.
    pub fn with(tweak: impl FnOnce(&mut KernelConfig)) -> Result<World> {
        let mut world = World::unloaded()?;
        world.load(tweak)?;
        Ok(world)
    }

    /// Network, pins, cgroup and server, but no kernel programs yet.
    pub fn unloaded() -> Result<World> {
        let net = TestNet::new()?;
        let pins = PinDir::new()?;
        let cgroup = TestCgroup::new()?;
        let server = ScriptServer::start(&net, &cgroup)?;
        Ok(World {
            kernel: None,
            server: Some(server),
            cgroup,
            pins,
            net,
        })
    }

    /// Loads the kernel programs with this world's config, adjusted.
    pub fn load(&mut self, tweak: impl FnOnce(&mut KernelConfig)) -> Result<()> {
        let mut cfg = self.config();
        tweak(&mut cfg);
        self.kernel = Some(Kernel::load(&cfg).context("kernel programs load")?);
        Ok(())
    }

    /// The kernel config of this world: the server veth in the server
    /// namespace, the test's pins and cgroup, everything removed on exit.
    pub fn config(&self) -> KernelConfig {
        KernelConfig {
            interfaces: vec![self.net.server_if.clone()],
            netns: Some(self.net.server_ns.clone()),
            smtp_ports: SMTP_PORTS.to_vec(),
            pin_path: self.pins.path.clone(),
            detach_on_exit: true,
            cgroup: self.cgroup.path.clone(),
            log: false,
            ..KernelConfig::default()
        }
    }

    pub fn maps(&self) -> KernelMaps {
        KernelMaps::open(&self.pins.path).expect("pinned maps open")
    }

    /// Opens a TCP connection from `src` (in the client namespace).
    pub fn connect(&self, src: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        connect_from(&self.net, src, dst, timeout)
    }

    /// Opens a connection and waits until sock_ops has made its flow
    /// (still awaiting the greeting). The client's `connect` returns once
    /// its ACK is sent; the server takes that ACK, and so makes the flow,
    /// a little later (much later under qemu's emulation), so a test that
    /// reads or judges the flow must wait for it, not race it. `dst` must
    /// greet late enough for the wait ([`SLOW_PORT`]).
    pub fn connect_tracked(&self, src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
        let s = self.connect(src, dst, Duration::from_secs(5))?;
        let me = s.local_addr()?;
        let tracked = || self.maps().flow_verdict(me, dst).ok();
        if !until(Duration::from_secs(5), || {
            tracked() == Some(PreGreetVerdict::AwaitingGreeting)
        }) {
            bail!(
                "no flow for {me} -> {dst} (verdict {:?})\n{}",
                tracked(),
                self.diagnosis()
            );
        }
        Ok(s)
    }

    /// What a failed kernel test needs to say why: the programs' counters,
    /// and whether the server is in the test's cgroup (sock_ops, which
    /// makes flows and counts connections, sees only that cgroup).
    pub fn diagnosis(&self) -> String {
        let counters = self
            .maps()
            .counters()
            .map_or_else(|e| format!("unreadable: {e}"), |c| format!("{c:?}"));
        let server = self.server.as_ref().map(|s| s.child.id());
        let server_cgroup = server
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok())
            .unwrap_or_default();
        let attached = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup.path)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "kernel counters: {counters}\nserver pid {server:?} in cgroup {:?} (the test's: {})\nprograms on it:\n{attached}",
            server_cgroup.trim(),
            self.cgroup.path.display()
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(k) = self.kernel.take()
            && let Err(e) = k.shutdown()
        {
            eprintln!("kernel shutdown: {e:#}");
        }
        // Pins left by a test that turned detach_on_exit off.
        let _ = tarpit::kernel::detach(&self.pins.path);
    }
}

/// A TCP connection from `src` to `dst`, made in the client namespace.
pub fn connect_from(
    net: &TestNet,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let s = tarpit_tests::smtp_client::tcp_connect_within(net, src, dst, timeout)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Reads CRLF lines until one starts with `prefix` (returns it).
pub fn read_until(s: &mut TcpStream, prefix: &str) -> Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte)?;
        if n == 0 {
            bail!("connection closed before {prefix:?}");
        }
        buf.push(byte[0]);
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&buf).into_owned();
            buf.clear();
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }
}

/// Sends a line.
pub fn send(s: &mut TcpStream, line: &str) -> Result<()> {
    s.write_all(line.as_bytes())?;
    s.write_all(b"\r\n")?;
    Ok(())
}

/// Closes with an RST (SO_LINGER 0).
pub fn reset(s: TcpStream) {
    let sock = Socket::from(s);
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// The MAC address of an interface in a namespace.
pub fn mac_of(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = v[0]["address"].as_str().context("no address")?;
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Sends raw Ethernet frames out of the client veth (AF_PACKET, so the
/// kernel fixes nothing up: lengths and headers arrive as written).
pub fn send_frames(net: &TestNet, frames: &[Vec<u8>]) -> Result<()> {
    send_frames_on(net, frames, None)
}

/// Like [`send_frames`], from a process pinned to one CPU (the receive
/// path then runs there too: per-CPU map behaviour becomes predictable).
pub fn send_frames_on(net: &TestNet, frames: &[Vec<u8>], cpu: Option<usize>) -> Result<()> {
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
         s.bind(('{}',0))\nfor l in sys.stdin.read().split():\n    s.send(bytes.fromhex(l))\n",
        net.client_if
    );
    let mut cmd = net.client_cmd("python3");
    cmd.arg("-c").arg(script);
    if let Some(cpu) = cpu {
        let mut pinned = Command::new("taskset");
        pinned
            .args(["-c", &cpu.to_string()])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        cmd = pinned;
    }
    let mut child = cmd.stdin(Stdio::piped()).spawn()?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for f in frames {
            let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(stdin, "{hex}")?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("raw frame sender failed: {status}");
    }
    Ok(())
}

/// A TCP info field (e.g. `snd_wnd`) of the one connection from `src` to
/// `dst` port, read with `ss -ti` in the client namespace.
pub fn client_tcp_info(net: &TestNet, src: IpAddr, dport: u16, field: &str) -> Option<u64> {
    let src = match src {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let out = net
        .client_cmd("ss")
        .args(["-Htin", "src", &src, "dport", &format!("= :{dport}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = format!("{field}:");
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()))
        .and_then(|v| v.parse().ok())
}

/// Runs a future on a small runtime (event stream reads).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
