//! `cargo xtask bench`: side-by-side numbers for tarpit against direct
//! delivery, postscreen and nftables, measured in one run on one box so
//! that the ratios mean something on a noisy machine.
//!
//! Every scenario builds its own world (network namespaces joined by a
//! veth pair in 198.51.100.0/24 and fd5b:1e00::/64, its own Postfix, its own
//! agent), bounds its load in count and time, and tears everything down
//! through `Drop` guards, also on error and on Ctrl-C. A side that cannot
//! run (the agent or a kernel feature not built yet, a missing tool) is
//! reported as "not available" with the reason, never with made-up numbers.
//!
//! Load generators that need many sockets run as worker processes: this
//! same binary re-executed with `bench --worker SPEC` inside the client
//! namespace, because one process may hold at most `ulimit -n` (20000) fds.
mod agent;
mod bpfstats;
mod liveframes;
mod netns;
mod nft;
mod pinned_lpm;
mod postfix;
mod procstat;
mod profile;
mod redis_server;
mod report;
mod scenarios;
mod signal;
mod sink;
mod soak;
mod synflood;
mod worker;
mod xdpblock;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{paths, shell};
pub use profile::Profile;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Shorter runs (under 3 minutes): one round, smaller counts.
    #[arg(long, conflicts_with = "smoke")]
    pub quick: bool,
    /// A few seconds per scenario with tiny counts: checks that the
    /// benchmark still works (the test suite runs it), measures nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Run only the scenarios whose id contains this string
    /// (throughput, hold, pregreet, blocklist, kernel_cost, lateness,
    /// kernel_hold, cluster).
    #[arg(long)]
    pub only: Option<String>,
    /// Instead of the scenarios: a soak of this many minutes (30 for the
    /// issue's figure). Bots are dropped and held while a real Postfix
    /// sends good mail through the agent, which is reloaded, killed (-9)
    /// and restarted at intervals; the report counts the messages sent,
    /// delivered once, lost and delivered twice, and the agent's RSS and
    /// descriptors over time.
    #[arg(long, value_name = "MINUTES", conflicts_with_all = ["only", "smoke"])]
    pub soak: Option<u32>,
    /// Directory for report.md and report.json (default target/bench).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The `tarpit` binary to measure. Default: build target/release/tarpit
    /// (with --smoke: target/debug/tarpit as built by the test suite).
    /// Also taken from the environment variable TARPIT_BIN.
    #[arg(long)]
    pub tarpit_bin: Option<PathBuf>,
    /// Internal: run as a load-generating worker (JSON spec).
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(spec) = &args.worker {
        return worker::main(spec);
    }
    if !shell::is_root() {
        bail!(
            "`cargo xtask bench` must run as root: it creates network namespaces, \
             starts Postfix and loads eBPF programs"
        );
    }
    let profile = if args.smoke {
        Profile::smoke()
    } else if args.quick {
        Profile::quick()
    } else {
        Profile::full()
    };
    signal::install();
    netns::sweep_stale();
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| paths::root().join("target/bench"));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let explicit = args
        .tarpit_bin
        .clone()
        .or_else(|| std::env::var_os("TARPIT_BIN").map(PathBuf::from));
    let tarpit = agent::TarpitBin::prepare(explicit, args.smoke);
    let exe = SelfCopy::new(args.smoke)?;
    let env = Env {
        profile,
        tarpit,
        self_exe: exe.0.clone(),
    };
    shell::say(
        "Bench",
        &format!(
            "profile {}, tarpit: {}",
            env.profile.name,
            env.tarpit.describe()
        ),
    );
    let started = std::time::Instant::now();
    let mut results = Vec::new();
    let mut interrupted = false;
    if let Some(minutes) = args.soak {
        shell::step("soak");
        match soak::run(&env, minutes, &out_dir) {
            Ok(mut r) => results.append(&mut r),
            Err(e) => {
                interrupted = signal::interrupted();
                results.push(report::Scenario::failed("soak", &e));
            }
        }
    }
    for scenario in scenarios::ALL.iter().filter(|_| args.soak.is_none()) {
        if let Some(f) = &args.only
            && !scenario.ids.iter().any(|id| id.contains(f.as_str()))
        {
            continue;
        }
        shell::step(scenario.ids[0]);
        let load = loadavg();
        match (scenario.run)(&env) {
            Ok(mut r) => {
                // Other work on the box skews every figure: say how busy it was.
                for s in &mut r {
                    s.param("loadavg_1m_before", load);
                    s.param("loadavg_1m_after", loadavg());
                }
                results.append(&mut r)
            }
            Err(e) if signal::interrupted() => {
                shell::say("Interrupted", &format!("{e:#}"));
                interrupted = true;
                break;
            }
            Err(e) => {
                shell::say("Failed", &format!("{}: {e:#}", scenario.ids[0]));
                results.extend(
                    scenario
                        .ids
                        .iter()
                        .map(|id| report::Scenario::failed(id, &e)),
                );
            }
        }
    }
    let report = report::Report::new(&env, results, started.elapsed(), interrupted);
    let (md, json) = report.write(&out_dir)?;
    println!("{}", report.markdown());
    shell::say("Wrote", &format!("{} and {}", md.display(), json.display()));
    if interrupted {
        bail!("interrupted; the report holds what finished");
    }
    Ok(())
}

/// What every scenario needs: the load profile and the binaries.
pub struct Env {
    pub profile: Profile,
    pub tarpit: agent::TarpitBin,
    pub self_exe: PathBuf,
}

/// Says that a side could not run, as it happens.
fn shell_say_unavailable(name: &str, e: &anyhow::Error) {
    shell::say("Unavailable", &format!("{name}: {e:#}"));
}

/// A private copy of this executable for the worker processes: a rebuild
/// of xtask during a long run (others share this target dir) replaces
/// target/debug/xtask, and re-executing the deleted original would fail.
struct SelfCopy(PathBuf);

impl SelfCopy {
    /// Outside smoke runs the workers are an optimized build of xtask, so
    /// that the load generators take as little as possible of the CPU the
    /// measured servers share with them (two cores here).
    fn new(smoke: bool) -> Result<SelfCopy> {
        let mut me = std::env::current_exe().context("cannot find the xtask executable")?;
        if !smoke {
            shell::say(
                "Building",
                "an optimized xtask for the load-generating workers",
            );
            let built = shell::run(Command::new("cargo").current_dir(paths::root()).args([
                "build",
                "--release",
                "--quiet",
                "--package",
                "xtask",
            ]));
            match built {
                Ok(()) => me = paths::target_dir().join("release/xtask"),
                Err(e) => shell::say(
                    "Using",
                    &format!("this debug xtask for the workers ({e:#})"),
                ),
            }
        }
        let copy =
            std::env::temp_dir().join(format!("tarpit-bench-xtask-{:x}", std::process::id()));
        std::fs::copy(&me, &copy)
            .with_context(|| format!("cannot copy {} to {}", me.display(), copy.display()))?;
        Ok(SelfCopy(copy))
    }
}

impl Drop for SelfCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The 1-minute load average of the machine.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
