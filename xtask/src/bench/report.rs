//! The two reports: report.md for people, report.json for scripts. One
//! object per scenario with each side's raw figures, which side is the
//! baseline, and the ratios against it (with the aim, met or not).
//! A side that could not run says so, with the reason; it has no figures.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::Env;

#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub name: String,
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub figures: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Side {
    pub fn new(name: &str) -> Side {
        Side {
            name: name.to_string(),
            available: true,
            reason: None,
            figures: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    pub fn unavailable(name: &str, reason: impl std::fmt::Display) -> Side {
        Side {
            name: name.to_string(),
            available: false,
            reason: Some(reason.to_string()),
            figures: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// The side, or "not available" with the error when measuring failed.
    pub fn from_result(name: &str, r: Result<Side>) -> Side {
        match r {
            Ok(s) => s,
            Err(e) => {
                super::shell_say_unavailable(name, &e);
                Side::unavailable(name, format!("{e:#}"))
            }
        }
    }

    pub fn set(&mut self, key: &str, v: f64) -> &mut Self {
        if v.is_finite() {
            self.figures.insert(key.to_string(), v);
        }
        self
    }

    pub fn note(&mut self, n: impl Into<String>) -> &mut Self {
        self.notes.push(n.into());
        self
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).copied()
    }
}

/// An aim from the issue: `value op bound`.
#[derive(Debug, Clone, Serialize)]
pub struct Aim {
    pub op: &'static str,
    pub bound: f64,
}

impl Aim {
    pub fn at_least(bound: f64) -> Option<Aim> {
        Some(Aim { op: ">=", bound })
    }
    pub fn at_most(bound: f64) -> Option<Aim> {
        Some(Aim { op: "<=", bound })
    }
    pub fn below(bound: f64) -> Option<Aim> {
        Some(Aim { op: "<", bound })
    }
    fn met(&self, v: f64) -> bool {
        match self.op {
            ">=" => v >= self.bound,
            "<=" => v <= self.bound,
            "<" => v < self.bound,
            _ => false,
        }
    }
}

/// A comparison: side's metric / baseline's metric (or, without a
/// baseline, the side's own value against an absolute aim).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub side: String,
    pub against: Option<String>,
    pub metric: String,
    pub value: Option<f64>,
    pub aim: Option<Aim>,
    pub met: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_none: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub id: String,
    pub title: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub baseline: Option<String>,
    pub sides: Vec<Side>,
    pub ratios: Vec<Ratio>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Scenario {
    pub fn new(id: &str, title: &str) -> Scenario {
        Scenario {
            id: id.to_string(),
            title: title.to_string(),
            params: BTreeMap::new(),
            baseline: None,
            sides: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    /// A scenario whose set-up failed before any side was measured.
    pub fn failed(id: &str, e: &anyhow::Error) -> Scenario {
        let mut s = Scenario::new(id, id);
        s.error = Some(format!("{e:#}"));
        s
    }

    pub fn param(&mut self, k: &str, v: impl Serialize) -> &mut Self {
        self.params
            .insert(k.to_string(), serde_json::to_value(v).unwrap_or_default());
        self
    }

    pub fn side(&self, name: &str) -> Option<&Side> {
        self.sides.iter().find(|s| s.name == name)
    }

    /// Adds `side.metric / against.metric` (a ratio > 1 is more of the
    /// metric than the baseline; the aim says which way is better).
    pub fn ratio(&mut self, side: &str, against: &str, metric: &str, aim: Option<Aim>) {
        let a = self.side(side);
        let b = self.side(against);
        let (value, why) = match (a, b) {
            (Some(a), _) if !a.available => (None, Some(format!("{side} not available"))),
            (_, Some(b)) if !b.available => (None, Some(format!("{against} not available"))),
            (Some(a), Some(b)) => match (a.get(metric), b.get(metric)) {
                (Some(x), Some(y)) if y > 0.0 => (Some(x / y), None),
                _ => (None, Some(format!("{metric} missing or zero"))),
            },
            _ => (None, Some("side missing".to_string())),
        };
        let met = value.and_then(|v| aim.as_ref().map(|a| a.met(v)));
        self.ratios.push(Ratio {
            side: side.to_string(),
            against: Some(against.to_string()),
            metric: metric.to_string(),
            value,
            aim,
            met,
            why_none: why,
        });
    }

    /// An absolute aim on one side's own figure.
    pub fn absolute(&mut self, side: &str, metric: &str, aim: Option<Aim>) {
        let s = self.side(side);
        let (value, why) = match s {
            Some(s) if s.available => match s.get(metric) {
                Some(v) => (Some(v), None),
                None => (None, Some(format!("{metric} not measured"))),
            },
            _ => (None, Some(format!("{side} not available"))),
        };
        let met = value.and_then(|v| aim.as_ref().map(|a| a.met(v)));
        self.ratios.push(Ratio {
            side: side.to_string(),
            against: None,
            metric: metric.to_string(),
            value,
            aim,
            met,
            why_none: why,
        });
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub profile: String,
    pub started_unix: u64,
    pub elapsed_s: f64,
    pub interrupted: bool,
    pub machine: BTreeMap<String, String>,
    pub scenarios: Vec<Scenario>,
}

impl Report {
    pub fn new(
        env: &Env,
        scenarios: Vec<Scenario>,
        elapsed: Duration,
        interrupted: bool,
    ) -> Report {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut machine = BTreeMap::new();
        machine.insert(
            "cpus".into(),
            std::thread::available_parallelism()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        );
        machine.insert(
            "kernel".into(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        );
        machine.insert("tarpit".into(), env.tarpit.describe());
        Report {
            profile: env.profile.name.to_string(),
            started_unix: now.saturating_sub(elapsed.as_secs()),
            elapsed_s: elapsed.as_secs_f64(),
            interrupted,
            machine,
            scenarios,
        }
    }

    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let md = dir.join("report.md");
        let json = dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")?;
        std::fs::write(&md, self.markdown())?;
        Ok((md, json))
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# tarpit benchmark ({} profile)\n\nMachine: {} CPUs, kernel {}; tarpit: {}. \
             Run took {:.0} s{}. All sides of a scenario ran in this one run, on this box; \
             compare ratios, not absolute figures.\n",
            self.profile,
            self.machine.get("cpus").map(String::as_str).unwrap_or("?"),
            self.machine
                .get("kernel")
                .map(String::as_str)
                .unwrap_or("?"),
            self.machine
                .get("tarpit")
                .map(String::as_str)
                .unwrap_or("?"),
            self.elapsed_s,
            if self.interrupted {
                " (INTERRUPTED)"
            } else {
                ""
            }
        );
        if self.profile == "smoke" {
            o.push_str("Smoke profile: tiny counts, checks that the benchmark runs; the figures mean nothing.\n\n");
        }
        for s in &self.scenarios {
            let _ = writeln!(o, "## {}: {}\n", s.id, s.title);
            if !s.params.is_empty() {
                let p: Vec<String> = s.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(o, "Parameters: {}\n", p.join(", "));
            }
            if let Some(e) = &s.error {
                let _ = writeln!(o, "**Scenario failed:** {}\n", one_line(e));
            }
            if !s.sides.is_empty() {
                o.push_str("| side | figures |\n| --- | --- |\n");
                for side in &s.sides {
                    let base = if s.baseline.as_deref() == Some(side.name.as_str()) {
                        " (baseline)"
                    } else {
                        ""
                    };
                    let figs = if side.available {
                        side.figures
                            .iter()
                            .map(|(k, v)| format!("{k} {}", fmt_num(*v)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    } else {
                        format!(
                            "not available: {}",
                            one_line(side.reason.as_deref().unwrap_or("?"))
                        )
                    };
                    let notes = if side.notes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", side.notes.join("; "))
                    };
                    let _ = writeln!(o, "| {}{base} | {figs}{notes} |", side.name);
                }
                o.push('\n');
            }
            if !s.ratios.is_empty() {
                o.push_str("| comparison | value | aim | met |\n| --- | --- | --- | --- |\n");
                for r in &s.ratios {
                    let what = match &r.against {
                        Some(b) => format!("{} / {} ({})", r.side, b, r.metric),
                        None => format!("{} {}", r.side, r.metric),
                    };
                    let value = match r.value {
                        Some(v) => fmt_num(v),
                        None => format!(
                            "not available ({})",
                            one_line(r.why_none.as_deref().unwrap_or("?"))
                        ),
                    };
                    let aim = r
                        .aim
                        .as_ref()
                        .map(|a| format!("{} {}", a.op, fmt_num(a.bound)))
                        .unwrap_or_else(|| "-".into());
                    let met = match r.met {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "-",
                    };
                    let _ = writeln!(o, "| {what} | {value} | {aim} | {met} |");
                }
                o.push('\n');
            }
            for n in &s.notes {
                let _ = writeln!(o, "- {n}");
            }
            if !s.notes.is_empty() {
                o.push('\n');
            }
        }
        o
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// Keeps a table cell on one line.
fn one_line(s: &str) -> String {
    s.replace('|', "/").replace('\n', " ")
}
