//! Putting the flood's prefixes on the agent's XDP block list, and reading
//! how many packets XDP dropped, through the interfaces the kernel data
//! plane offers.
use anyhow::{Result, bail};

use super::Env;
use super::agent::Agent;
use super::netns::BenchNet;

pub struct XdpBlock {}

impl XdpBlock {
    pub fn install(env: &Env, _net: &BenchNet, _agent: &Agent) -> Result<XdpBlock> {
        let cmds = env.tarpit.subcommands();
        if !cmds.iter().any(|c| c == "block") {
            bail!(
                "the kernel block list has no interface yet (tarpit has no `block` subcommand; \
                 subcommands: {})",
                cmds.join(", ")
            );
        }
        bail!("block-list interface found but not wired into the bench yet")
    }

    pub fn dropped(&self, _net: &BenchNet) -> Result<u64> {
        bail!("no XDP drop counter interface yet")
    }
}
