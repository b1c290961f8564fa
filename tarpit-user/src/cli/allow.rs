//! `tarpit allow add|del|list`.
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use ipnet::IpNet;

use super::Context;
use super::args::{parse_net, parse_ttl};
use super::help;
use super::kernel_glue::List;
use super::lists::{self, AddRequest};

#[derive(Debug, Subcommand)]
pub enum AllowCommand {
    /// Add an address or network to the allow list, or replace its entry.
    ///
    /// The entry takes effect in the kernel at once and is saved in the
    /// state file, so it survives a reboot.
    #[command(after_long_help = help::ALLOW)]
    Add {
        /// Address or network in CIDR form: 198.51.100.0/24, 198.51.100.7,
        /// 2001:db8::/48.
        #[arg(value_name = "CIDR", value_parser = parse_net)]
        cidr: IpNet,
        /// Remove the entry after this long (90s, 30m, 12h, 7d). Default:
        /// never.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Why the entry is there (kept in the state file, shown by `list`).
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Remove the entry for exactly this network from the kernel and the
    /// state file. Exit status 1 if there is none.
    #[command(after_long_help = help::ALLOW)]
    #[command(visible_alias = "rm")]
    Del {
        /// The network as it was added (see `tarpit allow list`).
        #[arg(value_name = "CIDR", value_parser = parse_net)]
        cidr: IpNet,
    },
    /// List the allow list: kernel entries with their expiry and comment,
    /// and saved entries the agent has not restored yet (status pending).
    #[command(after_long_help = help::ALLOW)]
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON (an array of entries; fields in docs/cli.md).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(ctx: &Context, cmd: AllowCommand) -> Result<()> {
    match cmd {
        AllowCommand::Add { cidr, ttl, comment } => lists::add(
            ctx,
            List::Allow,
            AddRequest {
                net: cidr,
                ttl,
                comment,
                all_ports: false,
                hold: false,
            },
        ),
        AllowCommand::Del { cidr } => lists::del(ctx, List::Allow, cidr),
        AllowCommand::List { json } => lists::list(ctx, List::Allow, json),
    }
}
