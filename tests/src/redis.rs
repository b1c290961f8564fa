//! A `redis-server` of a test's own (Debian's `redis-server` package):
//! in a test's server namespace, on its loopback at a free port and on a
//! Unix socket in its own temporary directory (reachable from the other
//! test namespaces, which share the file system), with no persistence.
//! With [`Redis::start_tls`], a TLS port as well, with a certificate from
//! a CA the test makes. Killed on drop; [`Redis::kill`] and [`Redis::start_again`] let a test
//! take it away mid-run and bring it back at the same address.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::unique_id;
use crate::netns::TestNet;
use crate::wait;

pub struct Redis {
    pub dir: PathBuf,
    pub port: u16,
    /// The TLS port, when started with [`Redis::start_tls`].
    pub tls_port: Option<u16>,
    ns_cmd: Box<dyn Fn() -> std::process::Command + Send + Sync>,
    /// More `redis-server` arguments (ACL users, ...), at every start.
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server in `net`'s server namespace.
    pub fn start(net: &TestNet) -> Result<Redis> {
        Redis::start_with(net, &[])
    }

    /// Like [`Redis::start`], with more `redis-server` arguments (e.g.
    /// `--user NAME on >PASSWORD ~prefix:* ...`).
    pub fn start_with(net: &TestNet, extra: &[&str]) -> Result<Redis> {
        Redis::start_inner(net, extra, false)
    }

    /// Like [`Redis::start_with`], with a TLS port too: its certificate
    /// (for 127.0.0.1) is signed by a CA the test makes ([`Redis::ca_file`]).
    pub fn start_tls(net: &TestNet, extra: &[&str]) -> Result<Redis> {
        Redis::start_inner(net, extra, true)
    }

    fn start_inner(net: &TestNet, extra: &[&str], tls: bool) -> Result<Redis> {
        let dir = std::env::temp_dir().join(format!("tarpit-redis-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        // A free port of the namespace's loopback, found from inside it.
        let free_port = || -> Result<u16> {
            net.in_server(|| {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
            })?
            .context("no free port")
        };
        let port = free_port()?;
        let mut extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut tls_port = None;
        if tls {
            let p = loop {
                let p = free_port()?;
                if p != port {
                    break p;
                }
            };
            make_certs(&dir)?;
            for a in [
                "--tls-port".to_string(),
                p.to_string(),
                "--tls-cert-file".into(),
                dir.join("server.pem").display().to_string(),
                "--tls-key-file".into(),
                dir.join("server.key").display().to_string(),
                "--tls-ca-cert-file".into(),
                dir.join("ca.pem").display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ] {
                extra.push(a);
            }
            tls_port = Some(p);
        }
        let ns = net.server_cmd("redis-server");
        let program = ns.get_program().to_owned();
        let args: Vec<_> = ns.get_args().map(|a| a.to_owned()).collect();
        let mut r = Redis {
            dir,
            port,
            tls_port,
            ns_cmd: Box::new(move || {
                let mut c = std::process::Command::new(&program);
                c.args(&args);
                c
            }),
            extra,
            child: None,
        };
        r.start_again()?;
        Ok(r)
    }

    /// The Unix socket (`unix://` URL for agents in other namespaces).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// `redis://127.0.0.1:PORT` (from inside the server namespace).
    pub fn tcp_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT` (from inside the server namespace).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// (Re)starts the server on the same port and socket, empty.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("redis-server already runs");
        }
        let log = std::fs::File::create(self.dir.join("redis.log"))?;
        let mut cmd = (self.ns_cmd)();
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "777", "--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("cannot start redis-server")?);
        let sock = self.socket();
        if !wait::until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        }) {
            bail!(
                "redis-server not up within 10 s: {}",
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Kills the server (SIGKILL): its data is gone, as after a crash of a
    /// Redis without persistence.
    pub fn kill(&mut self) {
        self.thaw();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Freezes the server (SIGSTOP): connections stay open and requests
    /// go unanswered, as with an overloaded or hung Redis.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Runs `redis-cli` against the server (over its socket).
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .context("redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`
/// (`ca.pem`, `server.pem`, `server.key`). rustls wants a subjectAltName
/// and will not take a CA certificate as the server's own.
fn make_certs(dir: &std::path::Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tarpit test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ])
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `redis-server` process in a test's server namespace on a TCP
/// address of its own choosing (a server, a replica, or a Sentinel with
/// `--sentinel`): for tests with several Redis processes. Killed on drop.
pub struct RedisProc {
    pub dir: PathBuf,
    pub addr: std::net::SocketAddr,
    ns: String,
    child: Option<Child>,
}

impl RedisProc {
    /// A Redis server on `bind` (an address of `net`'s server namespace)
    /// at a free port, no persistence, with `extra` arguments.
    pub fn server(net: &TestNet, bind: std::net::IpAddr, extra: &[&str]) -> Result<RedisProc> {
        let dir = std::env::temp_dir().join(format!("tarpit-redis-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr(net, bind)?;
        let mut args: Vec<String> = vec![
            "--port".into(),
            addr.port().to_string(),
            "--bind".into(),
            bind.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        RedisProc::spawn(net, dir, addr, args)
    }

    /// A Sentinel on `bind` watching `master` as `service` (quorum 1,
    /// down after 1 s: a fail-over within seconds).
    pub fn sentinel(
        net: &TestNet,
        bind: std::net::IpAddr,
        master: std::net::SocketAddr,
        service: &str,
    ) -> Result<RedisProc> {
        let dir = std::env::temp_dir().join(format!("tarpit-sentinel-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr(net, bind)?;
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind {bind}\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {service} {mip} {mport} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 4000\n",
                port = addr.port(),
                dir = dir.display(),
                mip = master.ip(),
                mport = master.port(),
            ),
        )?;
        let args = vec![conf.display().to_string(), "--sentinel".into()];
        RedisProc::spawn(net, dir, addr, args)
    }

    fn spawn(
        net: &TestNet,
        dir: PathBuf,
        addr: std::net::SocketAddr,
        args: Vec<String>,
    ) -> Result<RedisProc> {
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let mut cmd = net.server_cmd("redis-server");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("cannot start redis-server")?;
        let p = RedisProc {
            dir,
            addr,
            ns: net.server_ns.clone(),
            child: Some(child),
        };
        let up = wait::until(Duration::from_secs(10), || {
            net.in_server(|| std::net::TcpStream::connect(addr).is_ok())
                .unwrap_or(false)
        });
        if !up {
            bail!("redis-server at {addr} not up within 10 s: {}", p.log());
        }
        Ok(p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis-cli` against this process, from inside its namespace.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = testkit::netns::nsenter(&self.ns, "redis-cli")
            .args(["-h", &self.addr.ip().to_string()])
            .args(["-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .context("redis-cli")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on `bind` inside `net`'s server namespace.
pub fn free_addr(net: &TestNet, bind: std::net::IpAddr) -> Result<std::net::SocketAddr> {
    net.in_server(|| TcpListener::bind((bind, 0)).and_then(|l| l.local_addr()))?
        .context("no free port")
}

/// A veth pair between the two server namespaces: fd5b:1e00:ff::1 in
/// mx1's, ::2 in mx2's. Goes with the namespaces.
pub fn link_servers(net1: &TestNet, net2: &TestNet) -> Result<()> {
    let id = unique_id().replace('-', "");
    let (a, b) = (format!("tcl{id}a"), format!("tcl{id}b"));
    anyhow::ensure!(a.len() <= 15, "interface name {a} too long");
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .context("ip")?;
        anyhow::ensure!(out.status.success(), "ip {args:?}: {out:?}");
        Ok(())
    };
    run(&[
        "link",
        "add",
        &a,
        "netns",
        &net1.server_ns,
        "type",
        "veth",
        "peer",
        "name",
        &b,
        "netns",
        &net2.server_ns,
    ])?;
    for (ns, dev, addr) in [
        (&net1.server_ns, &a, "fd5b:1e00:ff::1/64"),
        (&net2.server_ns, &b, "fd5b:1e00:ff::2/64"),
    ] {
        run(&["-n", ns, "addr", "add", addr, "dev", dev, "nodad"])?;
        run(&["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(())
}
