//! `tarpit top`: a live view of the busiest and worst addresses, in the
//! terminal, refreshed every interval. q, Esc or Ctrl-C quit; s changes the
//! sort column; p pauses.
//!
//! Reading is split from drawing: [`Snapshot`] reads the maps, [`View`]
//! draws two snapshots (for rates) into any ratatui backend, so the drawing
//! is tested against ratatui's `TestBackend` without a terminal.
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use super::Context;
use super::args::parse_interval;
use super::kernel_glue::{AdminMaps, Clock, IpRow, List};
use super::output::{count, relative};

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Time between refreshes (at least 100ms).
    #[arg(long, short = 'n', value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// How many addresses to show (default: as many as fit).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Sort column at start: strikes, live, total or recent.
    #[arg(long, value_enum, default_value_t = SortBy::Strikes)]
    pub sort: SortBy,
}

/// Columns `tarpit top` can rank by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Pre-greet strikes, then live, then total connections.
    Strikes,
    /// Live connections first.
    Live,
    /// Connections in total first.
    Total,
    /// Most recently seen first.
    Recent,
}

impl SortBy {
    fn next(self) -> SortBy {
        match self {
            SortBy::Strikes => SortBy::Live,
            SortBy::Live => SortBy::Total,
            SortBy::Total => SortBy::Recent,
            SortBy::Recent => SortBy::Strikes,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortBy::Strikes => "strikes",
            SortBy::Live => "live",
            SortBy::Total => "total",
            SortBy::Recent => "recent",
        }
    }
}

/// The counters shown in the header, with their rates.
const HEADLINE: [(&str, &str); 6] = [
    ("xdp_drop", "dropped"),
    ("tc_flow_new", "SMTP flows"),
    ("tc_pregreet", "pre-greet"),
    ("sock_established", "connections"),
    ("xdp_allowed", "allow wins"),
    ("events_lost", "events lost"),
];

/// One reading of the maps.
pub struct Snapshot {
    pub at: Instant,
    pub wall: SystemTime,
    pub counters: Vec<(String, u64)>,
    pub ips: Vec<IpRow>,
    pub allow_entries: usize,
    pub block_entries: usize,
    pub auth_entries: usize,
}

impl Snapshot {
    pub fn read(maps: &AdminMaps) -> Result<Snapshot> {
        let clock = Clock::now();
        Ok(Snapshot {
            at: Instant::now(),
            wall: clock.wall,
            counters: maps.counters()?,
            ips: maps.ip_states(&clock)?,
            allow_entries: maps
                .list(List::Allow, &clock)?
                .iter()
                .filter(|r| r.active)
                .count(),
            block_entries: maps
                .list(List::Block, &clock)?
                .iter()
                .filter(|r| r.active)
                .count(),
            auth_entries: maps.auth_list(&clock)?.iter().filter(|r| r.active).count(),
        })
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// What is on screen: the newest snapshot, the one before (for rates), and
/// the user's choices.
pub struct View {
    pub now: Snapshot,
    pub before: Option<Snapshot>,
    pub sort: SortBy,
    pub paused: bool,
    pub limit: Option<usize>,
    pub pin_path: String,
}

fn sort_rows(rows: &mut [IpRow], by: SortBy) {
    let key = |r: &IpRow| match by {
        SortBy::Strikes => (u64::from(r.strikes), r.conns_live, r.conns_total),
        SortBy::Live => (r.conns_live, u64::from(r.strikes), r.conns_total),
        SortBy::Total => (r.conns_total, r.conns_live, u64::from(r.strikes)),
        SortBy::Recent => (
            r.last_seen
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            0,
            0,
        ),
    };
    // Highest first; ties by address so the order does not flicker.
    rows.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.ip.cmp(&b.ip)));
}

impl View {
    fn rate(&self, name: &str) -> Option<f64> {
        let before = self.before.as_ref()?;
        let secs = self.now.at.duration_since(before.at).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let delta = self.now.counter(name).saturating_sub(before.counter(name));
        Some(delta as f64 / secs)
    }

    pub fn draw(&self, f: &mut Frame) {
        let [head, body, foot] = Layout::vertical([
            Constraint::Length(5),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(f.area());

        let mut spans = Vec::new();
        for (name, label) in HEADLINE {
            let rate = self
                .rate(name)
                .map(|r| format!(" ({r:.1}/s)"))
                .unwrap_or_default();
            spans.push(format!("{label}: {}{rate}", count(self.now.counter(name))));
        }
        let live: u64 = self.now.ips.iter().map(|r| r.conns_live).sum();
        let head_lines = vec![
            Line::from(spans[..3].join("   ")),
            Line::from(spans[3..].join("   ")),
            Line::from(format!(
                "addresses: {}   live connections: {}   allow: {}   block: {}   authenticated: {}",
                count(self.now.ips.len() as u64),
                count(live),
                count(self.now.allow_entries as u64),
                count(self.now.block_entries as u64),
                count(self.now.auth_entries as u64)
            )),
        ];
        f.render_widget(
            Paragraph::new(head_lines).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" tarpit top - {} ", self.pin_path)),
            ),
            head,
        );

        let mut rows: Vec<IpRow> = self.now.ips.clone();
        sort_rows(&mut rows, self.sort);
        let fit = body.height.saturating_sub(3) as usize;
        let n = self.limit.unwrap_or(fit).min(fit);
        let header = Row::new(
            ["ADDRESS", "STRIKES", "LIVE", "TOTAL", "LAST SEEN", "FLAGS"]
                .into_iter()
                .map(Cell::from),
        )
        .style(Style::default().add_modifier(Modifier::BOLD));
        let table_rows = rows.iter().take(n).map(|r| {
            Row::new(vec![
                Cell::from(r.ip.to_string()),
                Cell::from(r.strikes.to_string()),
                Cell::from(r.conns_live.to_string()),
                Cell::from(r.conns_total.to_string()),
                Cell::from(
                    r.last_seen
                        .map(|t| relative(t, self.now.wall))
                        .unwrap_or_else(|| "-".into()),
                ),
                Cell::from(r.flags.join(",")),
            ])
        });
        let widths = [
            Constraint::Length(39),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(12),
            Constraint::Min(10),
        ];
        f.render_widget(
            Table::new(table_rows, widths).header(header).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" addresses by {} ", self.sort.name())),
            ),
            body,
        );
        let status = if self.paused { "PAUSED  " } else { "" };
        f.render_widget(
            Paragraph::new(format!(
                "{status}q quit   s sort ({})   p pause",
                self.sort.name()
            )),
            foot,
        );
    }
}

/// Restores the terminal however `run` ends (error, panic, q).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub fn run(ctx: &Context, args: TopArgs) -> Result<()> {
    let maps = ctx.open()?;
    if !std::io::stdout().is_terminal() {
        bail!(
            "tarpit top needs a terminal; for scripts use `tarpit stats --json` or `tarpit ip --json`"
        );
    }
    let mut view = View {
        now: Snapshot::read(&maps)?,
        before: None,
        sort: args.sort,
        paused: false,
        limit: args.limit,
        pin_path: ctx.pin_path.display().to_string(),
    };
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let _guard = TerminalGuard;
    let mut next_read = Instant::now() + args.interval;
    loop {
        terminal
            .draw(|f| view.draw(f))
            .context("cannot draw on the terminal")?;
        let wait = next_read.saturating_duration_since(Instant::now());
        if event::poll(wait).context("cannot read the keyboard")? {
            if let Event::Key(key) = event::read().context("cannot read the keyboard")?
                && key.kind != KeyEventKind::Release
            {
                let ctrl_c =
                    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
                match key.code {
                    _ if ctrl_c => break,
                    KeyCode::Char('q') | KeyCode::Esc => break,
                    KeyCode::Char('s') => view.sort = view.sort.next(),
                    KeyCode::Char('p') => view.paused = !view.paused,
                    _ => {}
                }
            }
            continue;
        }
        next_read = Instant::now() + args.interval;
        if !view.paused {
            let fresh = Snapshot::read(&maps)?;
            view.before = Some(std::mem::replace(&mut view.now, fresh));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::{Terminal, backend::TestBackend};

    fn ip_row(ip: &str, strikes: u32, live: u64, total: u64) -> IpRow {
        IpRow {
            ip: ip.parse().unwrap(),
            first_seen: Some(SystemTime::now()),
            last_seen: Some(SystemTime::now()),
            last_strike: None,
            conns_live: live,
            conns_total: total,
            strikes,
            flags: if strikes > 0 {
                vec!["pregreet"]
            } else {
                vec![]
            },
        }
    }

    fn snapshot(at: Instant, drops: u64, ips: Vec<IpRow>) -> Snapshot {
        Snapshot {
            at,
            wall: SystemTime::now(),
            counters: vec![("xdp_drop".into(), drops), ("tc_pregreet".into(), 4)],
            ips,
            allow_entries: 1,
            block_entries: 2,
            auth_entries: 0,
        }
    }

    fn render(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(110, 20)).unwrap();
        t.draw(|f| view.draw(f)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut s = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                s.push_str(buf[(x, y)].symbol());
            }
            s.push('\n');
        }
        s
    }

    #[test]
    fn shows_worst_first_and_rates() {
        let t0 = Instant::now();
        let before = snapshot(t0, 10, vec![]);
        let now = snapshot(
            t0 + Duration::from_secs(2),
            30,
            vec![
                ip_row("198.51.100.2", 0, 1, 9),
                ip_row("fd5b:1e00::2", 3, 0, 3),
            ],
        );
        let view = View {
            now,
            before: Some(before),
            sort: SortBy::Strikes,
            paused: false,
            limit: None,
            pin_path: "/sys/fs/bpf/t".into(),
        };
        let screen = render(&view);
        assert!(screen.contains("dropped: 30 (10.0/s)"), "{screen}");
        let v6 = screen.find("fd5b:1e00::2").expect("v6 row");
        let v4 = screen.find("198.51.100.2").expect("v4 row");
        assert!(v6 < v4, "the address with strikes comes first:\n{screen}");
        assert!(screen.contains("block: 2"), "{screen}");
    }

    #[test]
    fn sort_cycles_and_orders() {
        let mut rows = vec![
            ip_row("198.51.100.2", 0, 5, 9),
            ip_row("198.51.100.3", 1, 0, 1),
            ip_row("198.51.100.4", 0, 0, 50),
        ];
        sort_rows(&mut rows, SortBy::Live);
        assert_eq!(rows[0].ip.to_string(), "198.51.100.2");
        sort_rows(&mut rows, SortBy::Total);
        assert_eq!(rows[0].ip.to_string(), "198.51.100.4");
        sort_rows(&mut rows, SortBy::Strikes);
        assert_eq!(rows[0].ip.to_string(), "198.51.100.3");
        let mut s = SortBy::Strikes;
        for _ in 0..4 {
            s = s.next();
        }
        assert_eq!(s, SortBy::Strikes);
    }
}
