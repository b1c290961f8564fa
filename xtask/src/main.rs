//! `cargo xtask`: the developer entry points.
//!
//! - `build-ebpf`: builds the kernel programs, bootstrapping the nightly
//!   `rust-src` component and a project-local `bpf-linker` when missing.
//! - `run`: builds everything and shows the agent at work in front of a
//!   throw-away MTA on loopback (or runs it with `--config FILE`).
//! - `test`: installs what the tests need, then fmt, clippy, unit and
//!   end-to-end tests, ending with one `N passed, N failed` line.
//! - `bench`: side-by-side numbers against direct delivery, postscreen and
//!   nftables, in target/bench/report.md and report.json.
mod bench;
mod deb;
mod ebpf;
mod install;
mod leaks;
mod paths;
mod release;
mod run;
mod shell;
mod test;
mod toolchain;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "tarpit's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the kernel programs (release, bpfel-unknown-none), bootstrapping
    /// rust-src and bpf-linker first when they are missing.
    BuildEbpf,
    /// Build everything and show the tarpit at work (as root): the agent
    /// with config/demo.toml in front of a throw-away MTA on loopback, and
    /// three commands to try. Ctrl-C removes everything.
    Run {
        /// Run the agent with this configuration file instead of the demo
        /// (e.g. config/tarpit.toml, which expects an MTA at 127.0.0.1:10025).
        #[arg(short, long)]
        config: Option<std::path::PathBuf>,
        /// Build in release mode.
        #[arg(long)]
        release: bool,
        /// Use the binaries already built (target/debug or target/release)
        /// instead of building them first.
        #[arg(long)]
        no_build: bool,
    },
    /// Install the release binary, the systemd unit, the sysusers entry and
    /// the docs under PREFIX, and the default config as
    /// /etc/tarpit/tarpit.toml unless one exists.
    Install(install::InstallArgs),
    /// Build a Debian package with dpkg-deb (target/deb/tarpit_VERSION_ARCH.deb):
    /// the binary with its kernel programs, the unit, the sysusers entry,
    /// man pages, /etc/tarpit/tarpit.toml as a conffile, the docs and the
    /// Grafana dashboard; maintainer scripts from config/debian.
    Deb(deb::DebArgs),
    /// Run the whole test suite: install test dependencies, fmt, clippy,
    /// unit tests and end-to-end tests.
    Test(test::TestArgs),
    /// Benchmarks against direct delivery, postscreen and nftables:
    /// writes target/bench/report.md and report.json (--quick, --smoke).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::BuildEbpf => ebpf::build().map(|_| ()),
        Command::Run {
            config,
            release,
            no_build,
        } => run::run(config, release, no_build),
        Command::Test(args) => test::run(args),
        Command::Install(args) => install::run(args),
        Command::Deb(args) => deb::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
