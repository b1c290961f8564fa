//! `tarpit block add|del|list`.
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
pub enum BlockCommand {
    /// Add an address or network to the block list, or replace its entry.
    ///
    /// XDP drops its packets to the SMTP ports (every port with
    /// --all-ports) from now on, unless an allow-list entry matches too.
    /// Saved in the state file, so it survives a reboot.
    #[command(after_long_help = help::BLOCK)]
    Add {
        /// Address or network in CIDR form: 203.0.113.0/24, 203.0.113.9,
        /// 2001:db8:bad::/48.
        #[arg(value_name = "CIDR", value_parser = parse_net)]
        cidr: IpNet,
        /// Expire the entry after this long (90s, 30m, 12h, 7d); the kernel
        /// stops dropping by itself. Default: never.
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// Drop every port, not only the SMTP ports (kernel.smtp_ports).
        #[arg(long)]
        all_ports: bool,
        /// Hold TCP connections to the SMTP ports in the kernel instead of
        /// dropping them: XDP answers with a zero window and a SYN cookie,
        /// the bot keeps its socket and waits, this host keeps nothing
        /// (Linux 6.0+; elsewhere dropped as without it).
        #[arg(long)]
        hold: bool,
        /// Why the entry is there (kept in the state file, shown by `list`).
        #[arg(long, value_name = "TEXT")]
        comment: Option<String>,
    },
    /// Remove the entry for exactly this network from the kernel and the
    /// state file. Exit status 1 if there is none.
    #[command(after_long_help = help::BLOCK)]
    #[command(visible_alias = "rm")]
    Del {
        /// The network as it was added (see `tarpit block list`).
        #[arg(value_name = "CIDR", value_parser = parse_net)]
        cidr: IpNet,
    },
    /// List the block list: entries added here and by the agent (repeat
    /// offenders), with reason, ports, expiry and comment.
    #[command(after_long_help = help::BLOCK)]
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON (an array of entries; fields in docs/cli.md).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(ctx: &Context, cmd: BlockCommand) -> Result<()> {
    match cmd {
        BlockCommand::Add {
            cidr,
            ttl,
            all_ports,
            hold,
            comment,
        } => lists::add(
            ctx,
            List::Block,
            AddRequest {
                net: cidr,
                ttl,
                comment,
                all_ports,
                hold,
            },
        ),
        BlockCommand::Del { cidr } => lists::del(ctx, List::Block, cidr),
        BlockCommand::List { json } => lists::list(ctx, List::Block, json),
    }
}
