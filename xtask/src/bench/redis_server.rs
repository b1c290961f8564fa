//! A `redis-server` of the bench's own (Debian's package) for the cluster
//! scenario: in one bench server namespace, on its loopback at a free port
//! and on a Unix socket in a temporary directory (the other namespaces
//! share the file system, so agents elsewhere reach it there), with no
//! persistence. Killed on drop; a killed run's leftovers go with its
//! namespace and `netns::sweep_stale`.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::BenchNet;
use super::signal;

pub struct RedisServer {
    pub dir: PathBuf,
    /// The TCP port on the namespace's 127.0.0.1.
    pub port: u16,
    child: Child,
}

impl RedisServer {
    pub fn start(net: &BenchNet) -> Result<RedisServer> {
        let dir = std::env::temp_dir().join(format!("tarpit-bench-redis-{}", net.id));
        std::fs::create_dir_all(&dir)?;
        let port = net
            .in_server(|| {
                TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
            })?
            .context("no free port in the server namespace")?;
        let log = std::fs::File::create(dir.join("redis.log"))?;
        let child = net
            .server_cmd("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--unixsocket")
            .arg(dir.join("redis.sock"))
            .args(["--unixsocketperm", "777", "--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start redis-server (Debian's redis-server package)")?;
        let r = RedisServer { dir, port, child };
        let sock = r.socket();
        let up = signal::wait_until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })?;
        if !up {
            bail!(
                "redis-server not up within 10 s: {}",
                std::fs::read_to_string(r.dir.join("redis.log")).unwrap_or_default()
            );
        }
        Ok(r)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// `redis://127.0.0.1:PORT`, from inside the server namespace.
    pub fn tcp_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `unix:///...`, from any namespace.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
