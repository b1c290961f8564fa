//! The `tarpit` command line: `tarpit run` is the agent; the other
//! subcommands check the configuration and inspect or change the kernel's
//! state.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

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
/// Most subcommands need root (or CAP_BPF and CAP_NET_ADMIN).
#[derive(Debug, Parser)]
#[command(name = "tarpit", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the kernel programs, pin their maps,
    /// and serve SMTP clients in front of the MTA.
    ///
    /// Stops on Ctrl-C or SIGTERM. With `kernel.detach_on_exit = true` the
    /// programs and pins are removed on exit; otherwise they stay.
    Run {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit: 0 if it is valid, 1 with the
    /// key and the reason if it is not.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// Entry point of the binary; turns every error into one clear line and a
/// non-zero exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => {
            crate::logging::init();
            crate::run::run(&config)
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tarpit: {e:#}");
            ExitCode::FAILURE
        }
    }
}
