//! The `tarpit` command line: `tarpit run` is the agent; the other
//! subcommands check the configuration and inspect or change the kernel's
//! state through the maps the agent pinned, with the agent running or not.
//!
//! One file per subcommand; `output` formats, `context` finds the config,
//! the pin directory and the state file and opens the kernel's maps with
//! clear errors, `kernel_glue` reads and writes the pinned maps.
mod allow;
mod args;
mod auth;
mod block;
mod context;
mod detach;
mod help;
mod ip;
pub(crate) mod kernel_glue;
mod lists;
mod man;
mod maps;
pub mod output;
mod stats;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

pub use context::Context;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/tarpit/tarpit.toml";

/// tarpit - an eBPF/XDP-assisted SMTP tarpit for Linux mail servers.
///
/// tarpit sits in front of the real MTA (Postfix, Exim, ...). Its kernel
/// programs see every SMTP connection cheaply and drop block-listed sources
/// before a socket exists; its agent (`tarpit run`) delays and drops spam
/// bots, address harvesters and protocol violators, and hands every other
/// session to the MTA with the real client address.
///
/// The other subcommands inspect and change the kernel's state (allow and
/// block lists, authenticated addresses, per-address history, counters)
/// through the maps pinned under the pin directory. They work whether the
/// agent runs or not, and changes take effect in the kernel at once.
///
/// Most subcommands need root (or CAP_BPF; `run` and `detach` also need
/// CAP_NET_ADMIN and CAP_SYS_ADMIN).
#[derive(Debug, Parser)]
#[command(
    name = "tarpit",
    version,
    about,
    long_about,
    max_term_width = 100,
    after_long_help = help::MAIN
)]
pub struct Cli {
    /// Configuration file. Default: /etc/tarpit/tarpit.toml; the inspection
    /// commands fall back to built-in defaults when it does not exist.
    #[arg(short, long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// bpffs directory of the pinned maps. Default: `kernel.pin_path` of the
    /// configuration (/sys/fs/bpf/tarpit).
    #[arg(long, value_name = "DIR", global = true)]
    pub pin_path: Option<PathBuf>,

    #[command(subcommand)]
    pub command: CliCommand,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the agent: load and attach the kernel programs, pin their maps,
    /// and serve SMTP clients in front of the MTA.
    ///
    /// Stops on Ctrl-C or SIGTERM. With `kernel.detach_on_exit = true` the
    /// programs and pins are removed on exit; otherwise they stay, and the
    /// kernel keeps dropping block-listed sources while the agent is away.
    /// At start the agent puts the unexpired allow and block entries of the
    /// state file (`state.file`) back into the kernel.
    #[command(after_long_help = help::RUN)]
    Run,
    /// Validate a configuration file and exit: 0 if it is valid, 1 with the
    /// key and the reason if it is not. Valid settings that will cost real
    /// senders (a hold longer than they wait for that reply) are printed as
    /// `warning: KEY: ...` on stderr; the status stays 0.
    #[command(after_long_help = help::CHECK_CONFIG)]
    CheckConfig,
    /// Reload the running agent's configuration: checks the file first
    /// (refusing, with the key and the reason, a file the agent would
    /// refuse), then sends SIGHUP to the pid in `daemon.pid_file`. The
    /// agent logs whether it applied the file; sessions in flight keep the
    /// configuration they started with. Under systemd: `systemctl reload
    /// tarpit`.
    #[command(after_long_help = crate::ops::reload::HELP)]
    Reload {
        /// The agent's pid file (default: `daemon.pid_file` of the
        /// configuration).
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Everything known about one address: allow and block entries that
    /// match it, authenticated until, per-address history, and the policy
    /// that applies to it now.
    #[command(after_long_help = help::IP)]
    Ip(ip::IpArgs),
    /// Add, remove or list allow-list entries (always passed by XDP, never
    /// tarpitted).
    #[command(subcommand, after_long_help = help::ALLOW)]
    Allow(allow::AllowCommand),
    /// Add, remove or list block-list entries (dropped by XDP before a
    /// socket exists).
    #[command(subcommand, after_long_help = help::BLOCK)]
    Block(block::BlockCommand),
    /// List, add or remove authenticated addresses (clients that passed SMTP
    /// AUTH recently and are spared the tarpit).
    #[command(subcommand, after_long_help = help::AUTH)]
    Auth(auth::AuthCommand),
    /// Each pinned map: type, entries in use, capacity.
    #[command(after_long_help = help::MAPS)]
    Maps(maps::MapsArgs),
    /// Kernel counters (XDP verdicts by reason, flows, pre-greet talkers,
    /// connections), plus the agent's metrics when it runs.
    #[command(after_long_help = help::STATS)]
    Stats(stats::StatsArgs),
    /// Live view of the busiest and worst addresses; q or Ctrl-C quits.
    #[command(after_long_help = help::TOP)]
    Top(top::TopArgs),
    /// Remove every program, link, pin and qdisc of ours from the system.
    #[command(after_long_help = help::DETACH)]
    Detach(detach::DetachArgs),
    /// Write the manual pages (tarpit.1, tarpit-SUBCOMMAND.1, ...) into DIR;
    /// `cargo xtask install` puts them in PREFIX/share/man/man1.
    #[command(hide = true, after_long_help = help::MAN)]
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
}

/// Entry point of the binary; turns every error into one clear line and a
/// non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = dispatch(cli);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tarpit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let explicit_config = cli.config.is_some();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let pin_path = cli.pin_path;
    // The inspection commands' settings, resolved only for them.
    let ctx = || Context::new(&config_path, explicit_config, pin_path.clone());
    match cli.command {
        CliCommand::Run => {
            if pin_path.is_some() {
                anyhow::bail!(
                    "--pin-path is for the inspection commands; the agent pins where \
                     kernel.pin_path in {} says",
                    config_path.display()
                );
            }
            crate::logging::init();
            crate::run::run(&config_path)
        }
        CliCommand::CheckConfig => {
            let config = Config::load(&config_path)?;
            // Valid, so "ok" and exit 0; what will cost real senders goes
            // to stderr, where scripts that only check the status ignore it.
            for w in config.warnings() {
                eprintln!("warning: {w}");
            }
            println!("{}: ok", config_path.display());
            Ok(())
        }
        CliCommand::Reload { pid_file } => {
            let pid = crate::ops::reload::signal_agent(&config_path, pid_file.as_deref())?;
            println!(
                "sent SIGHUP to the tarpit agent (pid {pid}); its log says whether it applied the file"
            );
            Ok(())
        }
        CliCommand::Ip(args) => ip::run(&ctx()?, args),
        CliCommand::Allow(cmd) => allow::run(&ctx()?, cmd),
        CliCommand::Block(cmd) => block::run(&ctx()?, cmd),
        CliCommand::Auth(cmd) => auth::run(&ctx()?, cmd),
        CliCommand::Maps(args) => maps::run(&ctx()?, args),
        CliCommand::Stats(args) => stats::run(&ctx()?, args),
        CliCommand::Top(args) => top::run(&ctx()?, args),
        CliCommand::Detach(args) => detach::run(&ctx()?, args),
        CliCommand::Man { dir } => {
            for page in man::write_pages(&dir)? {
                println!("{}", page.display());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_option_works_before_and_after_the_subcommand() {
        let a = Cli::try_parse_from(["tarpit", "-c", "/x.toml", "run"]).unwrap();
        let b = Cli::try_parse_from(["tarpit", "run", "-c", "/x.toml"]).unwrap();
        assert_eq!(a.config, b.config);
        let c = Cli::try_parse_from(["tarpit", "block", "list", "--pin-path", "/p"]).unwrap();
        assert_eq!(c.pin_path, Some(PathBuf::from("/p")));
    }

    #[test]
    fn every_subcommand_help_has_examples_and_exit_status() {
        let mut cmd = Cli::command();
        cmd.build();
        fn walk(cmd: &mut clap::Command, path: String) {
            let help = cmd.render_long_help().to_string();
            for section in ["EXAMPLES", "EXIT STATUS"] {
                assert!(
                    help.contains(section),
                    "`{path} --help` lacks {section}:\n{help}"
                );
            }
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .filter(|n| n != "help")
                .collect();
            for name in names {
                let sub = cmd.find_subcommand_mut(&name).unwrap();
                walk(sub, format!("{path} {name}"));
            }
        }
        walk(&mut cmd, "tarpit".into());
    }
}
