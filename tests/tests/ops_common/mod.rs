//! Shared by the ops_* tests: a world (namespaces, Postfix, agent), the
//! full metrics text, and a plain SMTP exchange.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use tarpit_tests::smtp_client::{SmtpClient, agent_config, message, proxy_backend, scrape_metrics};
use tarpit_tests::{Agent, PinDir, Postfix, TestNet};

pub struct World {
    pub net: TestNet,
    pub pins: PinDir,
    pub pf: Postfix,
    pub agent: Option<Agent>,
}

impl World {
    /// Postfix behind the agent (PROXY v2), `rest` = the agent's other
    /// config sections.
    pub fn new(rest: &str) -> World {
        let net = TestNet::new().expect("test network");
        let pins = PinDir::new().expect("pin dir");
        let pf = Postfix::start(&net).expect("postfix");
        let agent = Agent::start(&net, &config(&net, &pins, rest)).expect("agent");
        World {
            net,
            pins,
            pf,
            agent: Some(agent),
        }
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// Rewrites the agent's config file (for reload tests).
    pub fn rewrite_config(&self, rest: &str) {
        std::fs::write(&self.agent().config, config(&self.net, &self.pins, rest))
            .expect("rewrite config");
    }

    /// Waits until the agent's log contains `needle` `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, t: Duration) -> bool {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.agent().log().matches(needle).count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

pub fn config(net: &TestNet, pins: &PinDir, rest: &str) -> String {
    agent_config(net, pins, &proxy_backend(), rest)
}

/// The whole exposition of the agent's metrics endpoint.
pub fn scrape(net: &TestNet) -> String {
    scrape_metrics(net).expect("metrics endpoint")
}

/// The value of the sample named exactly `name` (labels included).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every sample of a family as (labels, value), e.g. for `tarpit_map_capacity`.
pub fn samples(text: &str, family: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// One complete message: banner, EHLO, MAIL, `rcpts` RCPTs, DATA, QUIT.
/// Returns whether the end of DATA got 250.
pub fn send_message(
    net: &TestNet,
    src: IpAddr,
    dst: SocketAddr,
    rcpts: usize,
    subject: &str,
) -> Result<bool> {
    let mut c = SmtpClient::connect(net, src, dst)?;
    c.set_read_timeout(Duration::from_secs(30))?;
    let banner = c.reply()?;
    anyhow::ensure!(banner.code == 220, "banner {:?}", banner.text);
    c.expect("EHLO client.example", 250)?;
    c.expect("MAIL FROM:<sender@client.example>", 250)?;
    for _ in 0..rcpts {
        c.expect("RCPT TO:<sink@tarpit.test>", 250)?;
    }
    c.expect("DATA", 354)?;
    c.send(message(subject).as_bytes())?;
    let (r, _) = c.cmd(".")?;
    let ok = r.code == 250;
    let _ = c.cmd("QUIT");
    Ok(ok)
}

/// An agent started by hand, for tests that need their own environment
/// (no RUST_LOG, a NOTIFY_SOCKET). Drop kills it and removes its files.
pub struct OwnAgent {
    pub child: Option<std::process::Child>,
    pub dir: std::path::PathBuf,
    pub config: std::path::PathBuf,
}

impl OwnAgent {
    /// `tarpit run -c <dir>/tarpit.toml` in the server namespace with
    /// `env` set and RUST_LOG unset; waits for the ready line when `wait`.
    pub fn start(net: &TestNet, config_toml: &str, env: &[(&str, &str)], wait: bool) -> OwnAgent {
        let dir = std::env::temp_dir().join(format!("tarpit-own-{}", tarpit_tests::unique_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("tarpit.toml");
        std::fs::write(&config, config_toml).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut cmd = net.server_cmd(&tarpit_tests::tarpit_bin().display().to_string());
        cmd.arg("run")
            .arg("-c")
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let agent = OwnAgent {
            child: Some(cmd.spawn().unwrap()),
            dir,
            config,
        };
        if wait {
            let end = Instant::now() + Duration::from_secs(30);
            while !agent.log().contains(tarpit_tests::agent::READY_LINE) {
                assert!(Instant::now() < end, "not ready:\n{}", agent.log());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    pub fn wait_log_count(&self, needle: &str, n: usize, t: Duration) -> bool {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.log().matches(needle).count() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// SIGTERM, then waits (30 s at most) for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().expect("running");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
