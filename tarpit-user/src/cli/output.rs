//! How the command line prints: aligned tables for people, JSON for
//! scripts, dates and durations in a form a person reads at a glance.
//!
//! Every `--json` field name is part of the interface (docs/cli.md lists
//! them); human output may change between versions, JSON may only grow.
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

/// Column alignment in a [`Table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A plain-text table: a header line, then one line per row, each column
/// as wide as its widest cell, two spaces between columns, no trailing
/// blanks (so `grep`, `awk` and `column` keep working on it).
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }

    /// Prints the table, or `empty` when it has no rows.
    pub fn print(&self, empty: &str) {
        if self.is_empty() {
            println!("{empty}");
        } else {
            print!("{}", self.render());
        }
    }
}

/// A duration the way a person says it: the two largest units, e.g.
/// `45s`, `3m 20s`, `2h 5m`, `4d 1h`. Sub-second parts are dropped.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            "<1s".into()
        };
    }
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in UNITS {
        if rest >= size {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            // Keep the two units adjacent: "2h 0m", not "2h 5s".
            parts.push(format!("0{name}"));
        }
        if parts.len() == 2 {
            break;
        }
    }
    if parts.len() == 2 && parts[1].starts_with('0') {
        parts.pop();
    }
    parts.join(" ")
}

/// A wall-clock time as `2026-11-23 12:09:00 UTC`.
pub fn human_time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    // "2026-11-23T12:09:00Z" -> "2026-11-23 12:09:00 UTC"
    s.replacen('T', " ", 1).trim_end_matches('Z').to_string() + " UTC"
}

/// A wall-clock time with how far it is from `now`: `... (in 2h 5m)` or
/// `... (3m 10s ago)`.
pub fn human_time_rel(t: SystemTime, now: SystemTime) -> String {
    format!("{} ({})", human_time(t), relative(t, now))
}

/// `in 2h 5m`, `3m 10s ago`, `now`.
pub fn relative(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(ahead) if ahead.as_secs() > 0 => format!("in {}", human_duration(ahead)),
        Ok(_) => "now".into(),
        Err(e) if e.duration().as_secs() == 0 => "now".into(),
        Err(e) => format!("{} ago", human_duration(e.duration())),
    }
}

/// An expiry for a table cell: `never`, `in 2h 5m`, or `expired 3m ago`.
pub fn expiry_cell(expires: Option<SystemTime>, now: SystemTime) -> String {
    match expires {
        None => "never".into(),
        Some(t) if t > now => format!(
            "in {}",
            human_duration(t.duration_since(now).unwrap_or_default())
        ),
        Some(t) => format!(
            "expired {} ago",
            human_duration(now.duration_since(t).unwrap_or_default())
        ),
    }
}

/// RFC 3339 in UTC with seconds (`2026-11-23T12:09:00Z`), the form every
/// time has in `--json` output.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Seconds from `now` until `t`, 0 when `t` has passed (JSON `*_in_secs`).
pub fn secs_until(t: SystemTime, now: SystemTime) -> u64 {
    t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0)
}

/// Whole seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Prints a value as pretty JSON followed by a newline.
pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").context("cannot write to stdout")?;
    Ok(())
}

/// A count with thousands separators: `1 234 567` (thin and unambiguous in
/// every locale).
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_use_the_two_largest_units() {
        assert_eq!(human_duration(Duration::ZERO), "0s");
        assert_eq!(human_duration(Duration::from_millis(300)), "<1s");
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(200)), "3m 20s");
        assert_eq!(human_duration(Duration::from_secs(7_500)), "2h 5m");
        assert_eq!(human_duration(Duration::from_secs(7_205)), "2h");
        assert_eq!(human_duration(Duration::from_secs(3_600)), "1h");
        assert_eq!(human_duration(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(human_duration(Duration::from_secs(86_400 * 3 + 59)), "3d");
    }

    #[test]
    fn times_are_utc_and_readable() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_435_740);
        assert_eq!(rfc3339(t), "2026-11-23T12:09:00Z");
        assert_eq!(human_time(t), "2026-11-23 12:09:00 UTC");
        let now = t - Duration::from_secs(125);
        assert_eq!(relative(t, now), "in 2m 5s");
        assert_eq!(relative(now, t), "2m 5s ago");
        assert_eq!(relative(t, t), "now");
        assert_eq!(human_time_rel(t, now), "2026-11-23 12:09:00 UTC (in 2m 5s)");
    }

    #[test]
    fn expiry_cells() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(expiry_cell(None, now), "never");
        assert_eq!(
            expiry_cell(Some(now + Duration::from_secs(3_600)), now),
            "in 1h"
        );
        assert_eq!(
            expiry_cell(Some(now - Duration::from_secs(61)), now),
            "expired 1m 1s ago"
        );
        assert_eq!(secs_until(now - Duration::from_secs(5), now), 0);
        assert_eq!(secs_until(now + Duration::from_secs(5), now), 5);
    }

    #[test]
    fn tables_align_and_have_no_trailing_blanks() {
        let mut t = Table::new(&[
            ("PREFIX", Align::Left),
            ("HITS", Align::Right),
            ("NOTE", Align::Left),
        ]);
        t.row(vec!["198.51.100.0/24".into(), "7".into(), String::new()]);
        t.row(vec![
            "fd5b:1e00::/64".into(),
            "12345".into(),
            "partner".into(),
        ]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "PREFIX            HITS  NOTE");
        assert_eq!(lines[1], "198.51.100.0/24      7");
        assert_eq!(lines[2], "fd5b:1e00::/64   12345  partner");
    }

    #[test]
    fn counts_group_thousands() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1 000");
        assert_eq!(count(1_234_567), "1 234 567");
    }
}
