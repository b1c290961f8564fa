//! Putting the flood's prefixes on the agent's XDP block list (or the
//! bots' on its kernel hold) and reading the kernel's counters, through
//! tarpit's own command line
//! (`tarpit block add`, `tarpit stats --json`), as an operator would.
use anyhow::{Context, Result, bail};

use super::Env;
use super::agent::Agent;
use super::synflood::{BLOCK_V4, BLOCK_V6};

pub struct XdpBlock {
    bin: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl XdpBlock {
    /// Blocks the SYN flood's prefixes (dropped in XDP).
    pub fn install(env: &Env, agent: &Agent) -> Result<XdpBlock> {
        let nets = [
            format!("{}/{}", BLOCK_V4.0, BLOCK_V4.1),
            format!("{}/{}", BLOCK_V6.0, BLOCK_V6.1),
        ];
        XdpBlock::add(env, agent, &nets, false)
    }

    /// Holds `nets` in the kernel (`tarpit block add --hold`).
    pub fn hold(env: &Env, agent: &Agent, nets: &[String]) -> Result<XdpBlock> {
        XdpBlock::add(env, agent, nets, true)
    }

    fn add(env: &Env, agent: &Agent, nets: &[String], hold: bool) -> Result<XdpBlock> {
        let cmds = env.tarpit.subcommands();
        for needed in ["block", "stats"] {
            if !cmds.iter().any(|c| c == needed) {
                bail!(
                    "the kernel block list has no interface yet (tarpit has no `{needed}` \
                     subcommand; it has: {})",
                    cmds.join(", ")
                );
            }
        }
        let b = XdpBlock {
            bin: env.tarpit.path()?.clone(),
            config: agent.config.clone(),
        };
        for net in nets {
            let mut args = vec![
                "block",
                "add",
                net.as_str(),
                "--comment",
                "cargo xtask bench",
            ];
            if hold {
                args.push("--hold");
            }
            b.tarpit(&args)?;
        }
        Ok(b)
    }

    fn tarpit(&self, args: &[&str]) -> Result<String> {
        super::agent::cli(&self.bin, &self.config, args)
    }

    /// Packets XDP dropped for the block list (all reasons, all CPUs).
    pub fn dropped(&self) -> Result<u64> {
        self.counter("xdp_drop")
    }

    /// One kernel counter (summed over the CPUs), as `tarpit stats` shows it.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let text = self.tarpit(&["stats", "--json", "--kernel-only"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).context("tarpit stats --json is not JSON")?;
        v["kernel"][name]
            .as_u64()
            .with_context(|| format!("tarpit stats --json has no kernel.{name} counter"))
    }
}
