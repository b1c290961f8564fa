//! An instant backend: one event-driven process (this binary as a bench
//! worker, `Mode::Sink`) that greets every connection at once and answers
//! every command, as Postfix's smtp-sink does. Behind the agent it takes
//! the MTA's own cost (a new smtpd per session, at most 100 at a time) out
//! of a measurement of the agent's timers. smtp-sink itself cannot stand
//! in: it answers the PROXY v1 line as a command, and that 500 would be
//! taken for the reply to the client's EHLO.
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::BenchNet;
use super::signal;

/// The bench's own sink ([`super::worker::Mode::Sink`]): as instant as
/// smtp-sink, and it skips the PROXY v1 line instead of answering it, so
/// clients can go on to a transaction behind the agent.
pub struct BenchSink {
    child: Child,
}

impl BenchSink {
    pub fn start(
        self_exe: &std::path::Path,
        net: &BenchNet,
        addr: SocketAddr,
    ) -> Result<BenchSink> {
        let spec = super::worker::Spec {
            mode: super::worker::Mode::Sink,
            targets: vec![addr],
            sources: Vec::new(),
            count: 0,
            concurrency: 1,
            time_limit_ms: 0,
            talk: false,
            connect_rate: 0,
        };
        let child = net
            .server_cmd(&self_exe.display().to_string())
            .args(["bench", "--worker", &serde_json::to_string(&spec)?])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the bench sink")?;
        let mut sink = BenchSink { child };
        let up = signal::wait_until(Duration::from_secs(10), || net.listening_on(addr.port()))?;
        if !up {
            if let Ok(Some(s)) = sink.child.try_wait() {
                bail!("the bench sink exited at start ({s})");
            }
            bail!("the bench sink does not listen on {addr}");
        }
        Ok(sink)
    }
}

impl Drop for BenchSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
