//! The agent under measurement: `tarpit run` inside a bench's server
//! namespace, with a config written for the scenario.
//!
//! The agent grows during the project, so the bench asks the binary which
//! settings it takes (`tarpit check-config` on the scenario's config, then
//! section by section and key by key), writes only those, and reports a
//! side as "not available" when a setting it needs is refused. It never
//! measures something other than what it says.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::netns::BenchNet;
use super::{procstat, signal};
use crate::paths;

/// Logged by the agent once it is attached and serving.
const READY_LINE: &str = "tarpit agent running";

/// The binary to measure, or why there is none.
pub enum TarpitBin {
    Ready(PathBuf),
    Unavailable(String),
}

impl TarpitBin {
    pub fn prepare(explicit: Option<PathBuf>, smoke: bool) -> TarpitBin {
        if let Some(p) = explicit {
            return if p.is_file() {
                TarpitBin::Ready(p)
            } else {
                TarpitBin::Unavailable(format!("{} does not exist", p.display()))
            };
        }
        if smoke {
            let p = paths::root().join("target/debug/tarpit");
            return if p.is_file() {
                TarpitBin::Ready(p)
            } else {
                TarpitBin::Unavailable(format!("{} not built", p.display()))
            };
        }
        match crate::release::build() {
            Ok(p) => TarpitBin::Ready(p),
            Err(e) => TarpitBin::Unavailable(format!("{e:#}")),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TarpitBin::Ready(p) => p.display().to_string(),
            TarpitBin::Unavailable(why) => format!("not available ({why})"),
        }
    }

    pub fn path(&self) -> Result<&PathBuf> {
        match self {
            TarpitBin::Ready(p) => Ok(p),
            TarpitBin::Unavailable(why) => bail!("no tarpit binary: {why}"),
        }
    }

    /// The `tarpit` subcommands this binary has (from `tarpit --help`).
    pub fn subcommands(&self) -> Vec<String> {
        let Ok(p) = self.path() else {
            return Vec::new();
        };
        let Ok(out) = Command::new(p).arg("--help").output() else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

/// A config under construction: `section.key` -> TOML value text.
#[derive(Debug, Default, Clone)]
pub struct AgentConfig {
    values: BTreeMap<String, String>,
    /// Keys the scenario cannot do without.
    required: Vec<String>,
}

/// TOML text of `section.key -> value` pairs.
fn to_toml(values: &[(&String, &String)]) -> String {
    let mut sections: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for (k, v) in values {
        let (section, key) = k.rsplit_once('.').unwrap_or(("", k.as_str()));
        sections.entry(section).or_default().push((key, v.as_str()));
    }
    let mut out = String::from("# written by cargo xtask bench\n");
    if let Some(top) = sections.remove("") {
        for (k, v) in top {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
    for (s, kv) in sections {
        let _ = writeln!(out, "\n[{s}]");
        for (k, v) in kv {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
    out
}

/// Does the agent take these keys together? `Err` holds its reason.
fn probe(bin: &Path, scratch: &Path, values: &[(&String, &String)]) -> Result<()> {
    let text = to_toml(values).replace("@AGENT_DIR@", &scratch.display().to_string());
    let file = scratch.join("probe.toml");
    std::fs::write(&file, text)?;
    let out = Command::new(bin)
        .arg("check-config")
        .arg("-c")
        .arg(&file)
        .output()
        .context("cannot run tarpit check-config")?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim().trim_start_matches("tarpit: ");
        // "<file>: key: reason" -> "key: reason"
        let err = err.split_once(".toml: ").map(|(_, e)| e).unwrap_or(err);
        bail!("{err}")
    }
}

impl AgentConfig {
    /// Sets a key the scenario needs; a missing key makes the side
    /// unavailable.
    pub fn need(mut self, key: &str, value: impl Into<String>) -> Self {
        self.values.insert(key.to_string(), value.into());
        self.required.push(key.to_string());
        self
    }

    /// Sets a key if the agent knows it (a limit, a tuning knob).
    pub fn want(mut self, key: &str, value: impl Into<String>) -> Self {
        self.values.insert(key.to_string(), value.into());
        self
    }

    /// The TOML text with the keys the agent takes; an error naming the
    /// required keys it does not take (yet). The whole set is checked with
    /// `tarpit check-config`; when refused, each section on its own, and
    /// in a refused section each key on its own, so that settings the
    /// agent does not have (yet) are left out and the rest still runs.
    pub fn render(&self, bin: &Path, scratch: &Path) -> Result<String> {
        let all: Vec<(&String, &String)> = self.values.iter().collect();
        if probe(bin, scratch, &all).is_ok() {
            return Ok(to_toml(&all));
        }
        let mut kept = Vec::new();
        let mut refused: Vec<(String, String)> = Vec::new();
        let mut sections: BTreeMap<&str, Vec<(&String, &String)>> = BTreeMap::new();
        for (k, v) in &all {
            let section = k.rsplit_once('.').map(|(s, _)| s).unwrap_or("");
            sections.entry(section).or_default().push((k, v));
        }
        for (_, kv) in sections {
            if probe(bin, scratch, &kv).is_ok() {
                kept.extend(kv);
                continue;
            }
            for pair in kv {
                match probe(bin, scratch, &[pair]) {
                    Ok(()) => kept.push(pair),
                    Err(e) => refused.push((pair.0.clone(), format!("{e:#}"))),
                }
            }
        }
        let missing: Vec<String> = refused
            .iter()
            .filter(|(k, _)| self.required.contains(k))
            .map(|(k, e)| format!("{k} ({e})"))
            .collect();
        if !missing.is_empty() {
            bail!("the agent does not take {} yet", missing.join(", "));
        }
        Ok(to_toml(&kept))
    }
}

/// The base config of every agent side: listen on the server addresses,
/// relay to the PROXY listener of the namespace's Postfix, attach the
/// kernel programs to the server veth, pins in a bpffs dir of our own.
pub fn base_config(net: &BenchNet, port: u16, backend_port: u16) -> AgentConfig {
    AgentConfig::default()
        .need(
            "listen.addrs",
            format!(
                "[\"{}:{port}\", \"[{}]:{port}\"]",
                super::netns::SERVER_V4,
                super::netns::SERVER_V6
            ),
        )
        .need("backend.addr", format!("\"127.0.0.1:{backend_port}\""))
        .want("backend.client_address", "\"proxy-v2\"")
        .want("kernel.interfaces", format!("[\"{}\"]", net.server_if))
        .want("kernel.smtp_ports", format!("[{port}]"))
        .want("kernel.pin_path", format!("\"{}\"", pin_dir(net).display()))
        .want("kernel.detach_on_exit", "true")
        .need("state.file", "\"@AGENT_DIR@/state.json\"")
}

/// `tarpit -c CONFIG ARGS` next to a running agent (a list change, a
/// look-up), as an operator runs it; its output.
pub fn cli(bin: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .context("cannot run tarpit")?;
    if !out.status.success() {
        bail!(
            "tarpit {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The agent's own directory (config, log, state file): a scenario may
/// put files there before [`Agent::start`].
pub fn agent_dir(net: &BenchNet) -> PathBuf {
    std::env::temp_dir().join(format!("tarpit-bench-agent-{}", net.id))
}

pub fn pin_dir(net: &BenchNet) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/tarpit-bench-{}", net.id))
}

/// A running agent; Drop kills it and removes its files and pins.
pub struct Agent {
    pub dir: PathBuf,
    /// The config file, for `tarpit -c FILE <command>` next to the agent.
    pub config: PathBuf,
    pin_dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts the agent and waits until it serves on `probe_port`.
    pub fn start(
        bin: &TarpitBin,
        net: &BenchNet,
        config: &AgentConfig,
        probe_port: Option<u16>,
    ) -> Result<Agent> {
        let bin = bin.path()?;
        let dir = agent_dir(net);
        std::fs::create_dir_all(&dir)?;
        let text = match config.render(bin, &dir) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let cfg = dir.join("tarpit.toml");
        // Run-time list entries go to a state file of our own.
        let text = text.replace("@AGENT_DIR@", &dir.display().to_string());
        std::fs::write(&cfg, &text)?;
        let check = Command::new(bin)
            .arg("check-config")
            .arg("-c")
            .arg(&cfg)
            .output()
            .context("cannot run tarpit check-config")?;
        if !check.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "the agent refuses the bench config: {}",
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        let mut agent = Agent {
            config: cfg,
            dir,
            pin_dir: pin_dir(net),
            child: None,
        };
        agent.spawn(bin, net)?;
        let Some(probe_port) = probe_port else {
            return Ok(agent);
        };
        let listening =
            signal::wait_until(Duration::from_secs(5), || net.listening_on(probe_port))?;
        if !listening {
            bail!("the agent runs but does not listen on port {probe_port} (no SMTP front yet)");
        }
        Ok(agent)
    }

    /// Runs `tarpit run` with this agent's config (its log appended to)
    /// and waits until it says it is ready.
    fn spawn(&mut self, bin: &Path, net: &BenchNet) -> Result<()> {
        let readies = self.log().matches(READY_LINE).count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = net
            .server_cmd(&bin.display().to_string())
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("RUST_LOG", "warn,tarpit=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start tarpit")?;
        self.child = Some(child);
        let mut exited = None;
        let ready = signal::wait_until(Duration::from_secs(30), || {
            if self.log().matches(READY_LINE).count() > readies {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(s)) = c.try_wait()
            {
                exited = Some(s);
                return true;
            }
            false
        })?;
        if let Some(s) = exited {
            self.child = None;
            bail!("the agent exited at start ({s}): {}", self.log_tail());
        }
        if !ready {
            bail!("the agent was not ready within 30 s: {}", self.log_tail());
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash or the OOM killer does:
    /// none of its own clean-up runs, its pins and links stay.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent again after [`Agent::kill_hard`], with the same
    /// config, pins and state file; returns once it is ready.
    pub fn restart(&mut self, bin: &TarpitBin, net: &BenchNet) -> Result<()> {
        self.kill_hard();
        self.spawn(bin.path()?, net)
    }

    /// Sends SIGHUP: the agent reloads its config, as `tarpit reload` does.
    pub fn reload(&self) -> Result<()> {
        let pid = self.pid().context("the agent is not running")?;
        // SAFETY: kill(2) of our own child.
        if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
            bail!(
                "cannot signal the agent: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Open file descriptors of the agent now.
    pub fn fd_count(&self) -> Option<u64> {
        let pid = self.pid()?;
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        Some(dir.count() as u64)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn cpu_seconds(&self) -> f64 {
        self.pid().and_then(procstat::cpu_seconds).unwrap_or(0.0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let stopped = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // detach_on_exit removes the pins; a killed agent leaves them.
        if self.pin_dir.exists() {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        // TARPIT_BENCH_KEEP_LOGS=DIR keeps each agent's log for a look later.
        if let Some(keep) = std::env::var_os("TARPIT_BENCH_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let name = self.dir.file_name().unwrap_or_default().to_owned();
            if std::fs::create_dir_all(&keep).is_ok() {
                let _ = std::fs::copy(
                    self.dir.join("agent.log"),
                    keep.join(name).with_extension("log"),
                );
                let _ = std::fs::copy(
                    &self.config,
                    keep.join(self.dir.file_name().unwrap_or_default())
                        .with_extension("toml"),
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
