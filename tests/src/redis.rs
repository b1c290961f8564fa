//! A `redis-server` of a test's own (Debian's `redis-server` package):
//! in the test's [`ServiceNet`], a namespace of its own that the MX hosts
//! reach over their veths, at [`ServiceNet::V4`] and [`ServiceNet::V6`]
//! on a free port, with no persistence. With [`Redis::start_tls`], a TLS
//! port as well, with a certificate for those two addresses from a CA the
//! test makes. It also listens on a Unix socket in its own temporary
//! directory, for the test's own `redis-cli`. Killed on drop;
//! [`Redis::kill`] and [`Redis::start_again`] let a test take it away
//! mid-run and bring it back at the same address.
//!
//! [`RedisProc`] runs one of several processes (servers, replicas,
//! Sentinels, Redis Cluster nodes); with a [`TestCa`], TLS only: no
//! plain port at all, replication, Sentinel's links and the cluster bus
//! over TLS too.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::unique_id;
use crate::netns::ServiceNet;
use crate::wait;

pub struct Redis {
    pub dir: PathBuf,
    pub port: u16,
    /// The TLS port, when started with [`Redis::start_tls`].
    pub tls_port: Option<u16>,
    /// The service namespace it runs in.
    ns: String,
    /// More `redis-server` arguments (ACL users, ...), at every start.
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server in `net`.
    pub fn start(net: &ServiceNet) -> Result<Redis> {
        Redis::start_with(net, &[])
    }

    /// Like [`Redis::start`], with more `redis-server` arguments (e.g.
    /// `--user NAME on >PASSWORD ~prefix:* ...`).
    pub fn start_with(net: &ServiceNet, extra: &[&str]) -> Result<Redis> {
        Redis::start_inner(net, extra, false)
    }

    /// Like [`Redis::start_with`], with a TLS port too: its certificate
    /// (for the service's addresses) is signed by a CA the test makes
    /// ([`Redis::ca_file`]).
    pub fn start_tls(net: &ServiceNet, extra: &[&str]) -> Result<Redis> {
        Redis::start_inner(net, extra, true)
    }

    fn start_inner(net: &ServiceNet, extra: &[&str], tls: bool) -> Result<Redis> {
        let dir = std::env::temp_dir().join(format!("tarpit-redis-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let port = free_addr(net, ServiceNet::V4.into())?.port();
        let mut extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut tls_port = None;
        if tls {
            let p = loop {
                let p = free_addr(net, ServiceNet::V4.into())?.port();
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
        let mut r = Redis {
            dir,
            port,
            tls_port,
            ns: net.ns.clone(),
            extra,
            child: None,
        };
        r.start_again()?;
        Ok(r)
    }

    /// The Unix socket (for the test's own `redis-cli`).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// `redis://[fd5b:1e00:ff::100]:PORT`, from the hosts' namespaces.
    pub fn tcp_url_v6(&self) -> String {
        format!("redis://[{}]:{}", ServiceNet::V6, self.port)
    }

    /// `rediss://198.51.100.200:TLS_PORT`, from the hosts' namespaces.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|p| format!("rediss://{}:{p}", ServiceNet::V4))
    }

    /// The TCP ports' addresses, as `CLIENT LIST` names them (`laddr=`).
    pub fn laddr_tls(&self) -> Option<String> {
        self.tls_port.map(|p| format!("{}:{p}", ServiceNet::V4))
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// (Re)starts the server on the same ports and socket, empty.
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("redis-server already runs");
        }
        let log = std::fs::File::create(self.dir.join("redis.log"))?;
        let mut cmd = testkit::netns::nsenter(&self.ns, "redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args([
                "--bind",
                &ServiceNet::V4.to_string(),
                &ServiceNet::V6.to_string(),
            ])
            .args(["--save", "", "--appendonly", "no"])
            // Reached from the hosts' namespaces, not over loopback.
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--daemonize", "no"])
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

/// A CA and a server certificate for the service's addresses signed by
/// it, in `dir` (`ca.pem`, `server.pem`, `server.key`). rustls wants a subjectAltName
/// and will not take a CA certificate as the server's own. It serves as a
/// client certificate too: Redis Cluster nodes present it to each other on
/// their TLS bus, which always asks for one.
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
        format!(
            "subjectAltName=IP:{},IP:{}\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
            ServiceNet::V4,
            ServiceNet::V6
        ),
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
        "/CN=tarpit test redis",
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

/// One `redis-server` process in a test's [`ServiceNet`] on a TCP
/// address of its own choosing (a server, a replica, or a Sentinel with
/// `--sentinel`): for tests with several Redis processes. Killed on drop.
pub struct RedisProc {
    pub dir: PathBuf,
    /// Its one port: the TLS port when started with a [`TestCa`].
    pub addr: SocketAddr,
    ns: String,
    /// The CA file its `redis-cli` trusts, when TLS only.
    ca: Option<PathBuf>,
    child: Option<Child>,
}

/// A CA and one server certificate for the service's addresses (both
/// [`ServiceNet::V4`] and [`ServiceNet::V6`]) signed by it, shared by all
/// the TLS [`RedisProc`]s of a test. Removed on drop.
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    pub fn make() -> Result<TestCa> {
        let dir = std::env::temp_dir().join(format!("tarpit-redis-ca-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let ca = TestCa { dir };
        make_certs(&ca.dir)?;
        Ok(ca)
    }

    /// The CA certificate (PEM): the agents' `cluster.ca_file`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The `redis-server` settings of a TLS-only process on `port`
    /// (no plain port; replication, Sentinel and cluster bus over TLS),
    /// as `(name, value)` pairs for the command line or a config file.
    fn settings(&self, port: u16) -> Vec<(&'static str, String)> {
        let f = |n: &str| self.dir.join(n).display().to_string();
        vec![
            ("port", "0".into()),
            ("tls-port", port.to_string()),
            ("tls-cert-file", f("server.pem")),
            ("tls-key-file", f("server.key")),
            ("tls-ca-cert-file", f("ca.pem")),
            ("tls-auth-clients", "no".into()),
            ("tls-replication", "yes".into()),
            ("tls-cluster", "yes".into()),
        ]
    }

    /// `redis-cli`'s arguments to reach a TLS-only process.
    pub fn cli_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--cacert".into(),
            self.ca_file().display().to_string(),
        ]
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisProc {
    /// A Redis server on `bind` (an address of `net`) at a free port, no
    /// persistence, with `extra` arguments.
    pub fn server(net: &ServiceNet, bind: IpAddr, extra: &[&str]) -> Result<RedisProc> {
        RedisProc::server_with(net, bind, None, extra)
    }

    /// Like [`RedisProc::server`], TLS only with `ca`'s certificate when
    /// given (`addr` is then its TLS port).
    pub fn server_with(
        net: &ServiceNet,
        bind: IpAddr,
        ca: Option<&TestCa>,
        extra: &[&str],
    ) -> Result<RedisProc> {
        let dir = std::env::temp_dir().join(format!("tarpit-redis-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr(net, bind)?;
        let ports = match ca {
            Some(ca) => ca.settings(addr.port()),
            None => vec![("port", addr.port().to_string())],
        };
        let mut args: Vec<String> = ports
            .into_iter()
            .flat_map(|(k, v)| [format!("--{k}"), v])
            .collect();
        args.extend([
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
        ]);
        args.extend(extra.iter().map(|a| a.to_string()));
        RedisProc::spawn(net, dir, addr, args, ca)
    }

    /// A Sentinel on `bind` watching `master` as `service` (quorum 1,
    /// down after 1 s: a fail-over within seconds).
    pub fn sentinel(
        net: &ServiceNet,
        bind: IpAddr,
        master: SocketAddr,
        service: &str,
    ) -> Result<RedisProc> {
        RedisProc::sentinel_with(net, bind, master, service, None)
    }

    /// Like [`RedisProc::sentinel`], TLS only with `ca`'s certificate
    /// when given, reaching the servers over TLS too.
    pub fn sentinel_with(
        net: &ServiceNet,
        bind: IpAddr,
        master: SocketAddr,
        service: &str,
        ca: Option<&TestCa>,
    ) -> Result<RedisProc> {
        let dir = std::env::temp_dir().join(format!("tarpit-sentinel-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let addr = free_addr(net, bind)?;
        let conf = dir.join("sentinel.conf");
        let ports: String = match ca {
            Some(ca) => ca
                .settings(addr.port())
                .into_iter()
                .filter(|(k, _)| *k != "tls-cluster")
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect(),
            None => format!("port {}\n", addr.port()),
        };
        std::fs::write(
            &conf,
            format!(
                "{ports}bind {bind}\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {service} {mip} {mport} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 4000\n",
                dir = dir.display(),
                mip = master.ip(),
                mport = master.port(),
            ),
        )?;
        let args = vec![conf.display().to_string(), "--sentinel".into()];
        RedisProc::spawn(net, dir, addr, args, ca)
    }

    fn spawn(
        net: &ServiceNet,
        dir: PathBuf,
        addr: SocketAddr,
        args: Vec<String>,
        ca: Option<&TestCa>,
    ) -> Result<RedisProc> {
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let mut cmd = net.cmd("redis-server");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("cannot start redis-server")?;
        let p = RedisProc {
            dir,
            addr,
            ns: net.ns.clone(),
            ca: ca.map(TestCa::ca_file),
            child: Some(child),
        };
        let up = wait::until(Duration::from_secs(10), || {
            net.in_ns(|| std::net::TcpStream::connect(addr).is_ok())
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
        let mut cmd = testkit::netns::nsenter(&self.ns, "redis-cli");
        if let Some(ca) = &self.ca {
            cmd.arg("--tls").arg("--cacert").arg(ca);
        }
        let out = cmd
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

/// A free TCP port on `bind` inside `net`.
pub fn free_addr(net: &ServiceNet, bind: IpAddr) -> Result<SocketAddr> {
    net.in_ns(|| TcpListener::bind((bind, 0)).and_then(|l| l.local_addr()))?
        .context("no free port")
}
