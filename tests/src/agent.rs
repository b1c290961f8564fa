//! The agent under test: `tarpit run` inside a test's server namespace.
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::{tarpit_bin, unique_id};
use crate::netns::TestNet;
use crate::pins::TestCgroup;
use crate::wait;

/// The line the agent logs once it is attached and serving.
pub const READY_LINE: &str = "tarpit agent running";

/// A running agent. Drop kills it (SIGKILL) if it still runs and removes
/// its temp files; use [`Agent::stop`] for a graceful stop.
pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts `tarpit run -c <config>` in the server namespace and waits
    /// until it is ready.
    pub fn start(net: &TestNet, config_toml: &str) -> Result<Agent> {
        Agent::start_with(net, config_toml, None)
    }

    /// Like [`Agent::start`], with the agent inside a test cgroup.
    pub fn start_with(
        net: &TestNet,
        config_toml: &str,
        cgroup: Option<&TestCgroup>,
    ) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("tarpit-agent-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("tarpit.toml");
        std::fs::write(&config, config_toml)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = net.server_cmd(&tarpit_bin().display().to_string());
        cmd.arg("run").arg("-c").arg(&config);
        let mut cmd = match cgroup {
            Some(cg) => cg.wrap(&cmd),
            None => cmd,
        };
        cmd.env(
            "RUST_LOG",
            std::env::var("TARPIT_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        let child = cmd.spawn().context("cannot start tarpit")?;
        let mut agent = Agent {
            dir,
            config,
            child: Some(child),
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<()> {
        // Loading the programs is CPU-bound (the verifier): under software
        // emulation (`cargo xtask test --kernel`) it takes several times longer.
        let limit = std::env::var("TARPIT_TEST_AGENT_READY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        let mut exited = None;
        let ready = wait::until(Duration::from_secs(limit), || {
            if self.log().contains(READY_LINE) {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(status);
                return true;
            }
            false
        });
        if let Some(status) = exited {
            self.child = None;
            bail!(
                "tarpit exited before it was ready ({status}); log:\n{}",
                self.log()
            );
        }
        if !ready {
            bail!(
                "tarpit was not ready within {limit} s; log:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().context("agent not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// Graceful stop: SIGTERM, then waits up to 30 s for the exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let mut child = self.child.take().context("agent not running")?;
        let mut status = None;
        wait::until(Duration::from_secs(30), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        match status {
            Some(s) => Ok(s),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "tarpit did not stop within 30 s of SIGTERM; log:\n{}",
                    self.log()
                )
            }
        }
    }

    /// Kills the agent with SIGKILL (crash tests).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
