//! Putting the flood's prefixes on the agent's XDP block list and reading
//! how many packets XDP dropped, through tarpit's own command line
//! (`tarpit block add`, `tarpit stats --json`), as an operator would.
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Env;
use super::agent::Agent;
use super::synflood::{BLOCK_V4, BLOCK_V6};

pub struct XdpBlock {
    bin: std::path::PathBuf,
    config: std::path::PathBuf,
}

impl XdpBlock {
    pub fn install(env: &Env, agent: &Agent) -> Result<XdpBlock> {
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
        for net in [
            format!("{}/{}", BLOCK_V4.0, BLOCK_V4.1),
            format!("{}/{}", BLOCK_V6.0, BLOCK_V6.1),
        ] {
            b.tarpit(&["block", "add", &net, "--comment", "cargo xtask bench"])?;
        }
        Ok(b)
    }

    fn tarpit(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
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

    /// Packets XDP dropped for the block list (all reasons, all CPUs).
    pub fn dropped(&self) -> Result<u64> {
        let text = self.tarpit(&["stats", "--json", "--kernel-only"])?;
        let v: serde_json::Value =
            serde_json::from_str(&text).context("tarpit stats --json is not JSON")?;
        v["kernel"]["xdp_drop"]
            .as_u64()
            .context("tarpit stats --json has no kernel.xdp_drop counter")
    }
}
