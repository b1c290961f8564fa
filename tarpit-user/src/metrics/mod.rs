//! The agent's metrics, on one prometheus-client [`Registry`], and a
//! minimal HTTP endpoint serving them.
//!
//! Prometheus text (OpenMetrics) at `GET /metrics` on `metrics.listen`: one
//! `encode` of the one registry. [`Metrics`] registers the sessions'
//! families, the kernel feature gauge, the block-list churn counters and
//! the dropped log lines; the other parts of the agent register their own
//! families and scrape-time collectors into it with [`Metrics::register`]
//! (the reputation checks, the kernel maps' counters and fill levels, the
//! bypass steering counts, config reloads), so this module depends on
//! none of them.
//!
//! Session names (all prefixed `tarpit_`):
//! - `sessions_active` (gauge), `sessions_total{outcome}`;
//! - `delays_total{reason}`, `delay_seconds{reason}` (histogram of holds);
//! - `pregreet_total`, `limit_refusals_total{limit}`,
//!   `backend_errors_total{kind}`, `starttls_passthrough_total`,
//!   `authenticated_total`, `protocol_refusals_total{what}` (input the
//!   strict reader refused: `bare_line_ending`, `bdat_without_chunking`,
//!   `auth_in_clear`, `xclient`), `keepalives_total`, `abandoned_messages_total`;
//! - `kernel_feature_available{feature}` (gauge), `blocks_added_total`,
//!   `blocks_expired_total`, `blocks_evicted_total`, `log_lines_dropped_total`.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::policy::Reason;

pub mod summary;

type Labels = Vec<(&'static str, &'static str)>;

/// How a session ended; a metric label and a log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client sent QUIT.
    Quit,
    /// The client closed the connection without QUIT.
    ClientClosed,
    /// Talked before the banner: 554 and closed.
    PreGreet,
    /// Idle timeout: 421 4.4.2.
    Idle,
    /// Refused by a session limit: 421.
    Limit,
    /// The MTA could not be reached, failed or timed out: 4xx to the client.
    BackendError,
    /// The MTA ended the session (its own 421).
    BackendClosed,
    /// STARTTLS relayed to the MTA; the rest was relayed opaquely.
    Passthrough,
    /// A network or TLS error on the client side.
    ClientError,
    /// Closed by the agent's graceful stop (421 4.3.2).
    Shutdown,
    /// Listed by DNSBL with the `drop` action: closed without a reply.
    DnsblDrop,
    /// Greylisted at connect: 421 4.7.1.
    Greylisted,
    /// A message with bare line endings refused (`smtp.bare_line_ending =
    /// "reject"`): 554 and closed, nothing passed to the MTA.
    Protocol,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::ClientClosed => "client_closed",
            Outcome::PreGreet => "pregreet",
            Outcome::Idle => "idle",
            Outcome::Limit => "limit",
            Outcome::BackendError => "backend_error",
            Outcome::BackendClosed => "backend_closed",
            Outcome::Passthrough => "passthrough",
            Outcome::ClientError => "client_error",
            Outcome::Shutdown => "shutdown",
            Outcome::DnsblDrop => "dnsbl_drop",
            Outcome::Greylisted => "greylisted",
            Outcome::Protocol => "protocol",
        }
    }
}

/// Every metric of the agent, in one registry.
pub struct Metrics {
    /// Behind a lock so that parts built after the sessions' metrics (the
    /// reputation checks, the closed loop) can still register theirs.
    registry: Mutex<Registry>,
    pub sessions_active: Gauge,
    sessions_total: Family<Labels, Counter>,
    delays_total: Family<Labels, Counter>,
    delay_seconds: Family<Labels, Histogram>,
    pub pregreet_total: Counter,
    /// Sessions answered 554 and disconnected.
    pub drops_554_total: Counter,
    limit_refusals: Family<Labels, Counter>,
    backend_errors: Family<Labels, Counter>,
    pub starttls_passthrough_total: Counter,
    pub authenticated_total: Counter,
    protocol_refusals: Family<Labels, Counter>,
    /// NOOPs sent to keep the MTA's session alive during a hold.
    pub keepalives_total: Counter,
    /// Messages whose end of data never reached the MTA (the client left
    /// during the end-of-data hold): nothing was queued.
    pub abandoned_messages_total: Counter,
    /// Entries the agent put on the kernel's block list.
    pub blocks_added: Counter,
    /// Expired block-list entries swept from the kernel's map.
    pub blocks_expired: Counter,
    /// Automatic blocks evicted to make room for newer ones.
    pub blocks_evicted: Counter,
    kernel_features: Family<Labels, Gauge>,
    /// Connections opened to the MTA (the rate is for PromQL).
    pub mta_connects_total: Counter,
    /// Clients whose reply waits for an MTA slot (`backend.max_connecting`,
    /// `backend.max_sessions`).
    pub mta_waiting: Gauge,
    /// Sessions past the greeting that ended without ever reaching the
    /// MTA (`backend.connect = "at-transaction"`).
    pub sessions_unreached_total: Counter,
    /// Client behaviour postscreen's after-greeting tests look for
    /// (`[protocol]`), by test and action.
    protocol_tests: Family<Labels, Counter>,
}

fn delay_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ])
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tarpit");
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "SMTP sessions open now",
            sessions_active.clone(),
        );
        let sessions_total = Family::<Labels, Counter>::default();
        registry.register(
            "sessions",
            "SMTP sessions ended, by outcome",
            sessions_total.clone(),
        );
        let delays_total = Family::<Labels, Counter>::default();
        registry.register("delays", "Replies held, by reason", delays_total.clone());
        let delay_seconds =
            Family::<Labels, Histogram>::new_with_constructor(delay_histogram as fn() -> Histogram);
        registry.register(
            "delay_seconds",
            "Hold given to a reply, by reason",
            delay_seconds.clone(),
        );
        let pregreet_total = Counter::default();
        registry.register(
            "pregreet",
            "Clients that talked before the banner",
            pregreet_total.clone(),
        );
        let drops_554_total = Counter::default();
        registry.register(
            "drops_554",
            "Sessions answered 554 and disconnected",
            drops_554_total.clone(),
        );
        let limit_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Sessions or lines refused by a limit",
            limit_refusals.clone(),
        );
        let backend_errors = Family::<Labels, Counter>::default();
        registry.register(
            "backend_errors",
            "Failures talking to the MTA, by kind",
            backend_errors.clone(),
        );
        let starttls_passthrough_total = Counter::default();
        registry.register(
            "starttls_passthrough",
            "Sessions relayed opaquely: STARTTLS went to the MTA, or implicit TLS with the MTA",
            starttls_passthrough_total.clone(),
        );
        let authenticated_total = Counter::default();
        registry.register(
            "authenticated",
            "Sessions the MTA answered 235 to AUTH",
            authenticated_total.clone(),
        );
        let protocol_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "protocol_refusals",
            "Client input the strict reader refused and did not forward, by what",
            protocol_refusals.clone(),
        );
        let keepalives_total = Counter::default();
        registry.register(
            "keepalives",
            "NOOPs sent to the MTA to keep its session alive during a hold",
            keepalives_total.clone(),
        );
        let abandoned_messages_total = Counter::default();
        registry.register(
            "abandoned_messages",
            "Messages dropped before their end of data reached the MTA (client left during the hold)",
            abandoned_messages_total.clone(),
        );
        let kernel_features = Family::<Labels, Gauge>::default();
        registry.register(
            "kernel_feature_available",
            "1 when this kernel runs the feature, 0 when it was degraded at load (the log says why)",
            kernel_features.clone(),
        );
        let [blocks_added, blocks_expired, blocks_evicted] = [
            (
                "blocks_added",
                "Entries the agent put on the kernel's block list",
            ),
            (
                "blocks_expired",
                "Expired block-list entries swept from the kernel's map",
            ),
            (
                "blocks_evicted",
                "Automatic blocks evicted, oldest first, when their part of the block list \
                 (kernel.auto_block_entries) was full",
            ),
        ]
        .map(|(name, help)| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        });
        let mta_connects_total = Counter::default();
        registry.register(
            "mta_connects",
            "Connections opened to the MTA",
            mta_connects_total.clone(),
        );
        let mta_waiting = Gauge::default();
        registry.register(
            "mta_waiting",
            "Clients waiting for an MTA slot (backend.max_connecting, backend.max_sessions)",
            mta_waiting.clone(),
        );
        let sessions_unreached_total = Counter::default();
        registry.register(
            "sessions_unreached",
            "Sessions past the greeting that ended without reaching the MTA (at-transaction)",
            sessions_unreached_total.clone(),
        );
        let protocol_tests = Family::<Labels, Counter>::default();
        registry.register(
            "protocol_tests",
            "Clients that tripped an after-greeting test ([protocol]), by test and action",
            protocol_tests.clone(),
        );
        registry.register_collector(Box::new(DroppedLogLines));
        Metrics {
            registry: Mutex::new(registry),
            mta_connects_total,
            mta_waiting,
            sessions_unreached_total,
            protocol_tests,
            blocks_added,
            blocks_expired,
            blocks_evicted,
            kernel_features,
            protocol_refusals,
            keepalives_total,
            abandoned_messages_total,
            sessions_active,
            sessions_total,
            delays_total,
            delay_seconds,
            pregreet_total,
            drops_554_total,
            limit_refusals,
            backend_errors,
            starttls_passthrough_total,
            authenticated_total,
        }
    }

    /// Lets another part of the agent register its families or
    /// collectors (each once: the registry keeps what it is given).
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records whether a kernel feature works on this kernel, for
    /// `tarpit_kernel_feature_available` (a verifier that refuses a
    /// program degrades its feature, see `kernel::Kernel::features`).
    pub fn kernel_feature(&self, name: &'static str, available: bool) {
        self.kernel_features
            .get_or_create(&vec![("feature", name)])
            .set(i64::from(available));
    }

    pub fn session_ended(&self, outcome: Outcome) {
        self.sessions_total
            .get_or_create(&vec![("outcome", outcome.as_str())])
            .inc();
    }

    pub fn delayed(&self, reason: Reason, d: Duration) {
        summary::delayed(reason.as_str(), d);
        let l = vec![("reason", reason.as_str())];
        self.delays_total.get_or_create(&l).inc();
        self.delay_seconds
            .get_or_create(&l)
            .observe(d.as_secs_f64());
    }

    /// The client said HELO/EHLO: noted in the session's summary line.
    pub fn helo(&self, name: &str) {
        summary::helo(name);
    }

    /// The client sent a RCPT: noted in the session's summary line.
    pub fn rcpt(&self) {
        summary::rcpt();
    }

    /// A client tripped an after-greeting test (`[protocol]`).
    pub fn protocol_test(&self, test: &'static str, action: &'static str) {
        self.protocol_tests
            .get_or_create(&vec![("test", test), ("action", action)])
            .inc();
    }

    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&vec![("limit", limit)])
            .inc();
    }

    pub fn protocol_refused(&self, what: &'static str) {
        self.protocol_refusals
            .get_or_create(&vec![("what", what)])
            .inc();
    }

    pub fn backend_error(&self, kind: &'static str) {
        self.backend_errors
            .get_or_create(&vec![("kind", kind)])
            .inc();
    }

    /// The text exposition: the one registry, encoded once.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Encodes one family from a [`Collector`] as the registry encodes a
/// registered one: the help ends with a full stop, and a family with
/// nothing in it is left out.
pub fn encode_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> std::fmt::Result {
    if metric.is_empty() {
        return Ok(());
    }
    let help = format!("{help}.");
    let e = encoder.encode_descriptor(name, &help, None, metric.metric_type())?;
    metric.encode(e)
}

/// `tarpit_log_lines_dropped_total`, read from the log's own count at
/// each scrape.
#[derive(Debug)]
struct DroppedLogLines;

impl Collector for DroppedLogLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        encode_family(
            &mut encoder,
            "log_lines_dropped",
            "Log lines dropped by the rate limit ([log] rate_limit)",
            &ConstCounter::new(crate::logging::dropped_total()),
        )
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Binds the endpoint, with no runtime needed (the agent binds before its
/// runtime starts, see `ops::privileges`); serve it with [`serve`].
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

/// Serves `GET /metrics` until the task is dropped. One short-lived task
/// per request; requests are tiny and bounded.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics endpoint lost: {e}");
            return;
        }
    };
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics endpoint listening");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), answer(stream, &metrics)).await
            {
                debug!(%peer, "metrics request timed out: {e}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let response = if method == b"GET" && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
        let body = metrics.render();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        let body = "not found; try /metrics\n";
        format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_labels() {
        let m = Metrics::new();
        m.session_ended(Outcome::PreGreet);
        m.session_ended(Outcome::PreGreet);
        m.delayed(Reason::Rcpt, Duration::from_secs(10));
        m.pregreet_total.inc();
        let text = m.render();
        assert!(
            text.contains("tarpit_sessions_total{outcome=\"pregreet\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tarpit_delays_total{reason=\"rcpt\"} 1"),
            "{text}"
        );
        assert!(text.contains("tarpit_pregreet_total 1"), "{text}");
        assert!(
            text.contains("tarpit_delay_seconds_sum{reason=\"rcpt\"} 10"),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }

    #[test]
    fn loop_and_log_families_are_in_the_one_registry() {
        let m = Metrics::new();
        m.blocks_added.inc_by(2);
        m.kernel_feature("pregreet", false);
        m.kernel_feature("pregreet", true);
        m.kernel_feature("sock_ops", false);
        let text = m.render();
        for want in [
            "tarpit_blocks_added_total 2\n",
            "tarpit_blocks_expired_total 0\n",
            "tarpit_blocks_evicted_total 0\n",
            "# TYPE tarpit_log_lines_dropped counter\n",
            "# HELP tarpit_log_lines_dropped Log lines dropped by the rate limit ([log] rate_limit).\n",
            "tarpit_kernel_feature_available{feature=\"pregreet\"} 1\n",
            "tarpit_kernel_feature_available{feature=\"sock_ops\"} 0\n",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(text.contains("tarpit_log_lines_dropped_total "), "{text}");
        // Registered later, by another part of the agent.
        let late = Counter::<u64>::default();
        late.inc();
        m.register(|r| r.register("late", "Registered after the start", late.clone()));
        let text = m.render();
        assert!(text.contains("tarpit_late_total 1\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn endpoint_answers_get_metrics() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        m.sessions_active.set(3);
        let task = tokio::spawn(serve(l, m));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("tarpit_sessions_active 3"), "{out}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        task.abort();
    }
}
