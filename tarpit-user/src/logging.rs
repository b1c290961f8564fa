//! Logging with tracing: readable lines by default, JSON on request, and a
//! rate limit so that a botnet cannot fill the disk.
//!
//! [`init`] installs the subscriber early (human format, level from
//! `RUST_LOG` or "info"); [`configure`] applies the `[log]` section once
//! the config is loaded and again on every reload: format, level and rate
//! limit all change live.
//!
//! The rate limit is a token bucket over lines, not bytes: `rate_limit`
//! lines per second, bursts up to the same number. It applies to every
//! event except the agent's own life cycle ([`is_exempt`]): the lines a
//! flood can multiply are the per-session ones, and the lines an operator
//! must never lose are "reloaded", "refused", "stopping". Dropped lines are
//! counted and reported at most once a second as one WARN line
//! ("N log lines dropped by the rate limit"), written ahead of the next
//! line that passes or by [`flush_dropped`], which the daemon calls every
//! second so a count is never left unsaid when a flood stops.
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{Metadata, span};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::Context;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// Target of the one summary line per session (see [`session_summary!`]).
pub const SESSION_TARGET: &str = "tarpit::session";

/// Target of the "lines dropped" notices.
pub const DROP_NOTICE_TARGET: &str = "tarpit::logging";

/// Writes the one summary line per session, postscreen-style, at INFO with
/// the target [`SESSION_TARGET`], so that it is rate-limited under floods
/// and can be filtered on its own (`log.level = "warn,tarpit::session=info"`).
///
/// ```ignore
/// tarpit::session_summary!(client = %ip, helo = %helo, rcpts = n,
///     delays = %delays, outcome = "pregreet-554", "session");
/// ```
#[macro_export]
macro_rules! session_summary {
    ($($arg:tt)+) => {
        ::tracing::info!(target: "tarpit::session", $($arg)+)
    };
}

/// Targets whose lines are never rate-limited: the agent's life cycle,
/// configuration and signals. A flood cannot multiply them.
const EXEMPT_TARGETS: &[&str] = &[
    "tarpit::ops",
    "tarpit::run",
    "tarpit::config",
    "tarpit::cli",
    DROP_NOTICE_TARGET,
];

/// Whether lines of `target` bypass the rate limit.
pub fn is_exempt(target: &str) -> bool {
    EXEMPT_TARGETS
        .iter()
        .any(|t| target == *t || (target.starts_with(t) && target[t.len()..].starts_with("::")))
}

/// The token bucket and the count of lines it dropped.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Lines per second; 0 = unlimited.
    rate: u32,
    tokens: f64,
    last: Instant,
    /// Dropped since the last notice.
    dropped: u64,
    dropped_total: u64,
    last_notice: Option<Instant>,
    format: LogFormat,
}

/// Notices go out at most this often.
const NOTICE_EVERY: Duration = Duration::from_secs(1);

impl Limiter {
    pub fn new(rate: u32, format: LogFormat) -> Limiter {
        Limiter {
            state: Mutex::new(Bucket {
                rate,
                tokens: f64::from(rate),
                last: Instant::now(),
                dropped: 0,
                dropped_total: 0,
                last_notice: None,
                format,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A panic while holding this lock cannot leave the bucket
        // inconsistent (plain numbers), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the rate (and the format of the notices) live.
    pub fn set(&self, rate: u32, format: LogFormat) {
        let mut b = self.lock();
        if b.rate != rate {
            b.rate = rate;
            b.tokens = f64::from(rate);
        }
        b.format = format;
    }

    /// Takes one token at `now`; false (and counted) when the bucket is empty.
    pub fn admit_at(&self, now: Instant) -> bool {
        let mut b = self.lock();
        if b.rate == 0 {
            return true;
        }
        let rate = f64::from(b.rate);
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            b.dropped += 1;
            b.dropped_total += 1;
            false
        }
    }

    /// The notice line for the lines dropped since the last one, if any and
    /// if the last notice is at least a second old.
    pub fn take_notice_at(&self, now: Instant) -> Option<String> {
        let mut b = self.lock();
        if b.dropped == 0 {
            return None;
        }
        if let Some(last) = b.last_notice
            && now.saturating_duration_since(last) < NOTICE_EVERY
        {
            return None;
        }
        let n = std::mem::take(&mut b.dropped);
        b.last_notice = Some(now);
        Some(notice_line(b.format, n, b.rate))
    }

    /// Lines dropped since the start.
    pub fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }
}

/// The notice, in the same shape as tracing-subscriber's own lines.
fn notice_line(format: LogFormat, dropped: u64, rate: u32) -> String {
    let mut ts = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut ts));
    let message = "log lines dropped by the rate limit";
    match format {
        LogFormat::Human => format!(
            "{ts}  WARN {DROP_NOTICE_TARGET}: {dropped} {message} dropped={dropped} rate_limit={rate}\n"
        ),
        LogFormat::Json => {
            let v = serde_json::json!({
                "timestamp": ts,
                "level": "WARN",
                "fields": { "message": message, "dropped": dropped, "rate_limit": rate },
                "target": DROP_NOTICE_TARGET,
            });
            format!("{v}\n")
        }
    }
}

/// The rate limit, applied to an event before the layer inside formats
/// it: a dropped line costs a token check, not its formatting (a flood of
/// pre-greet talkers writes two lines each, nearly all dropped; formatted
/// and then dropped, they were a tenth of the agent's CPU per talker).
/// Exempt targets always pass. Everything else is the inner layer's.
pub struct RateLimited<L> {
    inner: L,
    limiter: Arc<Limiter>,
}

impl<L> RateLimited<L> {
    pub fn new(inner: L, limiter: Arc<Limiter>) -> Self {
        RateLimited { inner, limiter }
    }
}

impl<S, L> Layer<S> for RateLimited<L>
where
    S: tracing::Subscriber,
    L: Layer<S>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber)
    }
    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber)
    }
    fn register_callsite(
        &self,
        metadata: &'static Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.inner.register_callsite(metadata)
    }
    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_new_span(attrs, id, ctx)
    }
    fn on_record(&self, span: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.inner.on_record(span, values, ctx)
    }
    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_follows_from(span, follows, ctx)
    }
    fn event_enabled(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.event_enabled(event, ctx)
    }
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if is_exempt(event.metadata().target()) || self.limiter.admit_at(Instant::now()) {
            self.inner.on_event(event, ctx)
        }
    }
    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx)
    }
    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx)
    }
    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx)
    }
    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx)
    }
}

/// A [`MakeWriter`] that writes the pending "lines dropped" notice, if
/// one is due, before the line ([`RateLimited`] decided the line passes).
#[derive(Clone)]
pub struct NoticeWriter<M> {
    inner: M,
    limiter: Arc<Limiter>,
}

impl<M> NoticeWriter<M> {
    pub fn new(inner: M, limiter: Arc<Limiter>) -> Self {
        NoticeWriter { inner, limiter }
    }
}

/// One line's writer: the notice first, if any, then the line.
pub struct LineWriter<W> {
    notice: Option<String>,
    out: W,
}

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(n) = self.notice.take() {
            self.out.write_all(n.as_bytes())?;
        }
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for NoticeWriter<M> {
    type Writer = LineWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            notice: self.limiter.take_notice_at(Instant::now()),
            out: self.inner.make_writer(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            notice: self.limiter.take_notice_at(Instant::now()),
            out: self.inner.make_writer_for(meta),
        }
    }
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;
type Filtered = tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type FmtHandle = reload::Handle<Box<dyn Layer<Filtered> + Send + Sync>, Filtered>;

/// What [`configure`] changes after [`init`].
struct Installed {
    limiter: Arc<Limiter>,
    filter: FilterHandle,
    fmt: FmtHandle,
    /// What the fmt layer was last built with, so it is rebuilt only when
    /// the format changes.
    format: Mutex<LogFormat>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

fn fmt_layer(format: LogFormat, limiter: &Arc<Limiter>) -> Box<dyn Layer<Filtered> + Send + Sync> {
    let writer = NoticeWriter::new(io::stderr, limiter.clone());
    match format {
        LogFormat::Human => RateLimited::new(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(io::IsTerminal::is_terminal(&io::stderr())),
            limiter.clone(),
        )
        .boxed(),
        LogFormat::Json => RateLimited::new(
            tracing_subscriber::fmt::layer().json().with_writer(writer),
            limiter.clone(),
        )
        .boxed(),
    }
}

/// The level filter: `RUST_LOG` when set (it wins, for debugging a
/// running config), else the configured one.
fn env_filter(level: &str) -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::builder().parse_lossy(v),
        _ => EnvFilter::builder().parse_lossy(level),
    }
}

/// Installs the global subscriber with the defaults of `[log]`. Safe to
/// call more than once (later calls do nothing).
pub fn init() {
    let defaults = LogConfig::default();
    let limiter = Arc::new(Limiter::new(defaults.rate_limit, defaults.format));
    let (filter, filter_handle) = reload::Layer::new(env_filter(&defaults.level));
    let (fmt, fmt_handle) = reload::Layer::new(fmt_layer(defaults.format, &limiter));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = INSTALLED.set(Installed {
            limiter,
            filter: filter_handle,
            fmt: fmt_handle,
            format: Mutex::new(defaults.format),
        });
    }
}

/// Applies a `[log]` section: at start and on every reload.
pub fn configure(cfg: &LogConfig) {
    let Some(inst) = INSTALLED.get() else {
        return;
    };
    inst.limiter.set(cfg.rate_limit, cfg.format);
    if let Err(e) = inst.filter.reload(env_filter(&cfg.level)) {
        tracing::warn!(target: DROP_NOTICE_TARGET, "cannot change the log level: {e}");
    }
    let mut format = inst.format.lock().unwrap_or_else(|p| p.into_inner());
    if *format != cfg.format {
        match inst.fmt.reload(fmt_layer(cfg.format, &inst.limiter)) {
            Ok(()) => *format = cfg.format,
            Err(e) => {
                tracing::warn!(target: DROP_NOTICE_TARGET, "cannot change the log format: {e}")
            }
        }
    }
}

/// Writes the pending "lines dropped" notice, if any is due. The daemon
/// calls it every second and once at exit.
pub fn flush_dropped() {
    if let Some(inst) = INSTALLED.get()
        && let Some(line) = inst.limiter.take_notice_at(Instant::now())
    {
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Writes the pending notice now, however recent the last one: at exit.
pub fn flush_dropped_final() {
    if let Some(inst) = INSTALLED.get()
        && let Some(line) = inst.limiter.take_notice_at(Instant::now() + NOTICE_EVERY)
    {
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Log lines dropped by the rate limit since the start (a metric).
pub fn dropped_total() -> u64 {
    INSTALLED.get().map_or(0, |i| i.limiter.dropped_total())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer, for capturing what would reach stderr.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn exempt_targets_are_whole_path_segments() {
        assert!(is_exempt("tarpit::ops"));
        assert!(is_exempt("tarpit::ops::reload"));
        assert!(is_exempt("tarpit::run"));
        assert!(!is_exempt("tarpit::opsx"));
        assert!(!is_exempt(SESSION_TARGET));
        assert!(!is_exempt("tarpit::server"));
        assert!(!is_exempt("tarpit_ebpf"));
    }

    #[test]
    fn bucket_admits_rate_then_refills_with_time() {
        let l = Limiter::new(10, LogFormat::Human);
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| l.admit_at(t0)).count();
        assert_eq!(admitted, 10);
        // half a second later: five more tokens, not more
        let t1 = t0 + Duration::from_millis(500);
        let admitted = (0..100).filter(|_| l.admit_at(t1)).count();
        assert_eq!(admitted, 5);
        // a long pause refills only up to the burst (= rate)
        let t2 = t1 + Duration::from_secs(60);
        let admitted = (0..100).filter(|_| l.admit_at(t2)).count();
        assert_eq!(admitted, 10);
        assert_eq!(l.dropped_total(), 90 + 95 + 90);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = Limiter::new(0, LogFormat::Human);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.admit_at(t0)));
        assert!(l.take_notice_at(t0).is_none());
    }

    #[test]
    fn notice_counts_drops_at_most_once_a_second() {
        let l = Limiter::new(1, LogFormat::Human);
        let t0 = Instant::now();
        for _ in 0..8 {
            l.admit_at(t0);
        }
        let n = l.take_notice_at(t0).unwrap();
        assert!(n.contains(" 7 log lines dropped by the rate limit"), "{n}");
        assert!(n.contains("WARN tarpit::logging:"), "{n}");
        assert!(n.ends_with('\n'));
        for _ in 0..3 {
            l.admit_at(t0);
        }
        // the next notice waits a second, and then holds all three
        assert!(l.take_notice_at(t0 + Duration::from_millis(300)).is_none());
        let n = l.take_notice_at(t0 + Duration::from_secs(1)).unwrap();
        assert!(n.contains(" 3 log lines dropped"), "{n}");
        assert!(l.take_notice_at(t0 + Duration::from_secs(5)).is_none());
    }

    #[test]
    fn json_notice_is_one_json_object() {
        let line = notice_line(LogFormat::Json, 42, 100);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["fields"]["dropped"], 42);
        assert_eq!(v["fields"]["rate_limit"], 100);
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], DROP_NOTICE_TARGET);
    }

    /// The whole path: a subscriber writing through the limiter, a flood
    /// of session lines, life-cycle lines that must all survive, and the
    /// notice accounting for every line dropped.
    #[test]
    fn flood_through_subscriber_is_limited_and_accounted() {
        let cap = Capture::default();
        let limiter = Arc::new(Limiter::new(20, LogFormat::Json));
        let subscriber = tracing_subscriber::registry().with(RateLimited::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(NoticeWriter::new(cap.clone(), limiter.clone())),
            limiter.clone(),
        ));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                crate::session_summary!(
                    client = "198.51.100.7",
                    n = i,
                    outcome = "pregreet",
                    "session"
                );
                if i % 100 == 0 {
                    tracing::info!(target: "tarpit::ops::reload", n = i, "life cycle");
                }
            }
            // a line after the flood carries the notice (more than a
            // second later, as far as the limiter knows)
            std::thread::sleep(Duration::from_millis(1100));
            tracing::info!(target: "tarpit::ops", "after");
        });
        let text = cap.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let sessions = lines
            .iter()
            .filter(|v| v["target"] == SESSION_TARGET)
            .count();
        let life = lines
            .iter()
            .filter(|v| v["fields"]["message"] == "life cycle")
            .count();
        let dropped: u64 = lines
            .iter()
            .filter(|v| v["target"] == DROP_NOTICE_TARGET)
            .map(|v| v["fields"]["dropped"].as_u64().unwrap())
            .sum();
        assert_eq!(life, 10, "life-cycle lines are never dropped");
        // 20 at once, plus whatever refilled while the loop ran
        assert!((20..200).contains(&sessions), "{sessions} session lines");
        assert_eq!(
            sessions as u64 + dropped,
            1000,
            "every line is written or counted"
        );
        assert_eq!(limiter.dropped_total(), dropped);
    }
}
