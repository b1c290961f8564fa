//! Postfix's smtp-sink as an instant backend: one event-driven process
//! that greets every connection at once. Behind the agent it takes the
//! MTA's own cost (a new smtpd per session, at most 100 at a time) out of
//! a measurement of the agent's timers.
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::BenchNet;
use super::signal;

pub struct SmtpSink {
    child: Child,
}

impl SmtpSink {
    pub fn start(net: &BenchNet, addr: SocketAddr) -> Result<SmtpSink> {
        let child = net
            .server_cmd("smtp-sink")
            // As root it must drop privileges; 4096 = listen backlog.
            .args(["-u", "nobody", &addr.to_string(), "4096"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run smtp-sink")?;
        let mut sink = SmtpSink { child };
        let up = signal::wait_until(Duration::from_secs(10), || net.listening_on(addr.port()))?;
        if !up {
            if let Ok(Some(s)) = sink.child.try_wait() {
                bail!("smtp-sink exited at start ({s})");
            }
            bail!("smtp-sink does not listen on {addr}");
        }
        Ok(sink)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
