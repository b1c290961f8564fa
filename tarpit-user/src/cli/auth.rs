//! `tarpit auth list|add|del`: the authenticated addresses.
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde::Serialize;

use super::Context;
use super::args::{parse_ip, parse_ttl};
use super::help;
use super::kernel_glue::{AuthRow, Clock};
use super::output::{self, Align, Table};

/// How long an authenticated address is remembered when `--ttl` is not
/// given: a day, as the once-per-day HELO rule assumes.
const DEFAULT_AUTH_TTL: Duration = Duration::from_secs(86_400);

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// List the authenticated addresses with when they expire.
    #[command(after_long_help = help::AUTH)]
    #[command(visible_alias = "ls")]
    List {
        /// Print JSON (an array of entries; fields in docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Mark an address as authenticated, as the agent does when the MTA
    /// accepts its AUTH (e.g. for a client that authenticates elsewhere).
    #[command(after_long_help = help::AUTH)]
    Add {
        /// IPv4 or IPv6 address.
        #[arg(value_name = "ADDR", value_parser = parse_ip)]
        addr: IpAddr,
        /// How long it stays authenticated (default 24h).
        #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
        ttl: Option<Duration>,
    },
    /// Forget that an address authenticated: from its next connection on it
    /// is treated like any client. Exit status 1 if it was not there.
    #[command(after_long_help = help::AUTH)]
    #[command(visible_alias = "rm")]
    Del {
        /// IPv4 or IPv6 address.
        #[arg(value_name = "ADDR", value_parser = parse_ip)]
        addr: IpAddr,
    },
}

/// One entry of `auth list --json` (docs/cli.md).
#[derive(Debug, Serialize)]
pub struct AuthJson {
    pub ip: String,
    pub family: &'static str,
    pub added_at: String,
    pub expires_at: Option<String>,
    pub expires_in_secs: Option<u64>,
    pub active: bool,
}

impl AuthJson {
    pub fn new(r: &AuthRow, now: std::time::SystemTime) -> AuthJson {
        AuthJson {
            ip: r.ip.to_string(),
            family: if r.ip.is_ipv4() { "ipv4" } else { "ipv6" },
            added_at: output::rfc3339(r.added),
            expires_at: r.expires.map(output::rfc3339),
            expires_in_secs: r.expires.map(|e| output::secs_until(e, now)),
            active: r.active,
        }
    }
}

pub fn run(ctx: &Context, cmd: AuthCommand) -> Result<()> {
    match cmd {
        AuthCommand::List { json } => {
            let maps = ctx.open()?;
            let clock = Clock::now();
            let rows = maps.auth_list(&clock)?;
            if json {
                let v: Vec<AuthJson> = rows.iter().map(|r| AuthJson::new(r, clock.wall)).collect();
                return output::print_json(&v);
            }
            let mut table = Table::new(&[
                ("ADDRESS", Align::Left),
                ("AUTHENTICATED", Align::Left),
                ("EXPIRES", Align::Left),
                ("STATUS", Align::Left),
            ]);
            for r in &rows {
                table.row(vec![
                    r.ip.to_string(),
                    output::human_time(r.added),
                    output::expiry_cell(r.expires, clock.wall),
                    if r.active { "active" } else { "expired" }.into(),
                ]);
            }
            table.print("no authenticated addresses");
            Ok(())
        }
        AuthCommand::Add { addr, ttl } => {
            let mut maps = ctx.open()?;
            let clock = Clock::now();
            let ttl = ttl.unwrap_or(DEFAULT_AUTH_TTL);
            maps.auth_insert(addr, Some(ttl))?;
            println!(
                "auth: added {addr} until {}",
                output::human_time_rel(clock.wall + ttl, clock.wall)
            );
            Ok(())
        }
        AuthCommand::Del { addr } => {
            let mut maps = ctx.open()?;
            if !maps.auth_remove(addr)? {
                bail!("{addr} is not an authenticated address (see `tarpit auth list`)");
            }
            println!("auth: removed {addr}");
            Ok(())
        }
    }
}
