//! The scenarios of issue 10, each in its own module. A scenario returns
//! one report object per scenario id it measures (the good-mail run also
//! yields the kernel cost, measured during it).
mod blocklist;
mod hold;
mod lateness;
mod pregreet;
mod throughput;

use anyhow::Result;

use super::Env;
use super::report::Scenario;

pub struct Def {
    pub ids: &'static [&'static str],
    pub run: fn(&Env) -> Result<Vec<Scenario>>,
}

pub const ALL: &[Def] = &[
    Def {
        ids: &["good_mail_throughput", "kernel_cost"],
        run: throughput::run,
    },
    Def {
        ids: &["hold_capacity"],
        run: hold::run,
    },
    Def {
        ids: &["pregreet_flood"],
        run: pregreet::run,
    },
    Def {
        ids: &["blocklist_drops"],
        run: blocklist::run,
    },
    Def {
        ids: &["delay_lateness"],
        run: lateness::run,
    },
];

/// Median of a non-empty list (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The q-quantile (0..=1) by nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Agent config keys that make every delay zero (set when the agent knows them).
pub fn zero_delays(c: super::agent::AgentConfig) -> super::agent::AgentConfig {
    c.want("greeting.delay", "\"0s\"")
        .want("helo.delay", "\"0s\"")
        .want("rcpt.delay", "\"0s\"")
        .want("reject.delay", "\"0s\"")
        .want("limits.sessions", "20000")
        .want("limits.per_ip", "20000")
}
