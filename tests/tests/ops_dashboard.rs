//! The Grafana dashboard (config/grafana/tarpit-dashboard.json) against a
//! live agent and a real Prometheus (Debian's `prometheus` package):
//! Prometheus scrapes the agent inside the test's server namespace while
//! a mix of traffic goes through (good senders, a DNSBL-listed one, an
//! unknown recipient, a pre-greet talker that ends up blocked in the
//! kernel, a session the dead MTA cannot take); then every panel's PromQL
//! is evaluated through Prometheus's HTTP API. Each must parse and return
//! data, and every metric a panel names must be in the agent's own
//! `/metrics` (no `or vector(0)` papering over a missing one).
//!
//! With `TARPIT_DASHBOARD_DUMP=DIR` the test also writes each panel's
//! query_range result there (the closing note's picture is drawn from it).
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use tarpit_tests::env::repo_root;
use tarpit_tests::smtp_client::{
    SmtpClient, agent_config, agent_v4, kill_postfix, proxy_backend, scrape_metrics,
};
use tarpit_tests::swaks::swaks;
use tarpit_tests::{
    Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, Rbldnsd, TempDir, TestNet, require_root, wait,
};

const PROMETHEUS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);

fn dashboard() -> Value {
    let path = repo_root().join("config/grafana/tarpit-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard JSON");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// Every PromQL expression of the dashboard, with its panel's title.
fn panel_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = panels.pop() {
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let title = p["title"].as_str().unwrap_or_default().to_string();
                out.push((title, expr.to_string()));
            }
        }
    }
    out
}

/// The expression as Prometheus gets it: Grafana's interval variables
/// become a fixed window that holds many 1 s scrapes.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
}

/// The `tarpit_*` metric names an expression names.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tarpit_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET on Prometheus's HTTP API inside the server namespace.
fn api(net: &TestNet, path_and_query: &str) -> Value {
    let body = net
        .in_server(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&PROMETHEUS, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                s,
                "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("namespace")
        .unwrap_or_else(|e| panic!("Prometheus API {path_and_query}: {e}"));
    let json = body.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Prometheus in the server namespace, scraping the agent every second;
/// Drop stops it (its directory goes with the TempDir).
struct Prometheus {
    child: Child,
    dir: TempDir,
}

impl Prometheus {
    fn start(net: &TestNet) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let conf = dir.path.join("prometheus.yml");
        std::fs::write(
            &conf,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tarpit\n    static_configs: [{ targets: [\"127.0.0.1:9325\"] }]\n",
        )
        .expect("prometheus.yml");
        let log = std::fs::File::create(dir.path.join("prometheus.log")).expect("log");
        let child = net
            .server_cmd("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start prometheus (apt-get install prometheus)");
        let p = Prometheus { child, dir };
        let up = wait::until(Duration::from_secs(30), || {
            net.in_server(|| {
                TcpStream::connect_timeout(&PROMETHEUS, Duration::from_millis(200)).is_ok()
            })
            .unwrap_or(false)
        });
        assert!(up, "Prometheus did not listen:\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

#[test]
fn every_dashboard_panel_returns_data_from_a_live_agent_through_prometheus() {
    if !require_root() {
        return;
    }
    let d = dashboard();
    let queries = panel_queries(&d);
    assert!(queries.len() >= 10, "the dashboard has its panels");
    for (title, expr) in &queries {
        assert!(
            !expr.contains("vector(0)"),
            "panel {title:?} papers over a missing metric: {expr}"
        );
    }

    let net = TestNet::new().expect("test network");
    // 198.51.100.65 is listed in bl.test (tests/peers/bl.zone); .9 is not.
    for a in [v4(65), v4(9)] {
        net.add_client_addr(a).expect("client address");
    }
    let _rbl = Rbldnsd::start(&net, &["bl.test:ip4set:bl.zone"], &[]).expect("rbldnsd");
    let pins = PinDir::new().expect("pins");
    let pf = Postfix::start(&net).expect("postfix");
    let rest = r#"
[greeting]
delay = "1s"
[rcpt]
threshold = 1
delay = "1s"
[reject]
delay = "1s"
[blacklist]
delay = "1s"
[dns]
nameservers = ["127.0.0.1:5353"]
timeout = "3s"
[dnsbl]
sites = ["bl.test"]
[offenders]
pregreet_strikes = 1
"#;
    let agent =
        Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), rest)).expect("agent");
    let _prom = Prometheus::start(&net);

    // Traffic: good senders (v4, v6, two recipients: an RCPT delay), a
    // listed one, an unknown recipient (a held 5xx).
    for src in [IpAddr::from(CLIENT_V4), IpAddr::from(CLIENT_V6)] {
        let s = swaks(&net, src, &["--to", "sink@tarpit.test,other@tarpit.test"]);
        assert!(s.ok, "{}", s.out);
    }
    let s = swaks(&net, v4(65), &[]);
    assert!(s.ok, "listed sender: {}", s.out);
    let s = swaks(&net, CLIENT_V4.into(), &["--to", "unknown1@tarpit.test"]);
    assert!(!s.ok && s.out.contains("550"), "{}", s.out);
    // A pre-greet talker: 554, and one strike blocks it in the kernel.
    {
        let mut c = SmtpClient::connect(&net, v4(9), agent_v4()).expect("connect");
        c.send(b"EHLO bot.example\r\n").expect("send");
        let r = c.reply().expect("reply");
        assert_eq!(r.code, 554, "{}", r.text);
    }
    // Its next SYNs are dropped by XDP.
    let blocked = wait::until(Duration::from_secs(10), || {
        SmtpClient::connect(&net, v4(9), agent_v4()).is_err()
    });
    assert!(blocked, "the talker was not blocked:\n{}", agent.log());
    // The MTA dies: the next session is a backend error.
    kill_postfix(&net);
    let s = swaks(&net, CLIENT_V6.into(), &[]);
    assert!(!s.ok, "{}", s.out);
    drop(pf);

    let metrics = scrape_metrics(&net).expect("scrape");
    if std::env::var_os("TARPIT_DASHBOARD_METRICS").is_some() {
        println!("{metrics}");
    }
    // A few more scrapes after the last session, so every rate() has its
    // samples on both sides.
    std::thread::sleep(Duration::from_secs(5));
    let up = api(
        &net,
        &format!("/api/v1/query?query={}", urlencode("up{job=\"tarpit\"}")),
    );
    assert_eq!(
        up["data"]["result"][0]["value"][1], "1",
        "Prometheus scrapes the agent: {up}"
    );

    let dump = std::env::var_os("TARPIT_DASHBOARD_DUMP").map(PathBuf::from);
    let mut failures = Vec::new();
    for (i, (title, expr)) in queries.iter().enumerate() {
        for name in metric_names(expr) {
            let exported = metrics
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(&name));
            if !exported {
                failures.push(format!("{title}: {name} is not in the agent's /metrics"));
            }
        }
        let q = concrete(expr);
        let r = api(&net, &format!("/api/v1/query?query={}", urlencode(&q)));
        if r["status"] != "success" {
            failures.push(format!("{title}: {q} failed: {r}"));
            continue;
        }
        let n = r["data"]["result"].as_array().map_or(0, Vec::len);
        if n == 0 {
            failures.push(format!("{title}: {q} returned no data"));
        }
        if let Some(dir) = &dump {
            let end = r["data"]["result"][0]["value"][0].as_f64().unwrap_or(0.0);
            let range = api(
                &net,
                &format!(
                    "/api/v1/query_range?query={}&start={}&end={}&step=1",
                    urlencode(&q),
                    end - 60.0,
                    end
                ),
            );
            std::fs::create_dir_all(dir).expect("dump dir");
            let file = dir.join(format!("{i:02}.json"));
            let _ = std::fs::write(
                file,
                serde_json::json!({"title": title, "expr": q, "result": range["data"]["result"]})
                    .to_string(),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} panel queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
    drop(agent);
}
