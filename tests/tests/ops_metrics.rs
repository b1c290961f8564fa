//! The metrics endpoint after a scripted mix of sessions shows exactly
//! what happened: outcomes, delays by reason, pre-greet drops, and the
//! kernel's own view (per-CPU counters, map fill levels).
mod ops_common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use ops_common::{World, sample, samples, scrape, send_message};
use tarpit_tests::smtp_client::{SmtpClient, agent_v4, agent_v6};
use tarpit_tests::{CLIENT_V4, CLIENT_V6, require_root};

const REST: &str = r#"
[greeting]
delay = "1s"
[rcpt]
threshold = 1
delay = "1s"
"#;

/// Talks before the banner: must get 554 and a closed connection.
fn pre_greet_talker(w: &World, src: IpAddr, dst: std::net::SocketAddr) {
    let mut c = SmtpClient::connect(&w.net, src, dst).expect("connect");
    c.send(b"EHLO bot.example\r\n").unwrap();
    let r = c.reply().expect("a reply before the close");
    assert_eq!(r.code, 554, "{}", r.text);
    assert!(c.closed_within(Duration::from_secs(5)), "not disconnected");
}

#[test]
fn scripted_mix_of_sessions_shows_in_the_metrics() {
    if !require_root() {
        return;
    }
    let w = World::new(REST);
    // 3 good sessions (one of them with 3 recipients: 2 RCPT delays)
    assert!(send_message(&w.net, CLIENT_V4.into(), agent_v4(), 1, "one").unwrap());
    assert!(send_message(&w.net, CLIENT_V6.into(), agent_v6(), 1, "two").unwrap());
    assert!(send_message(&w.net, CLIENT_V4.into(), agent_v4(), 3, "three").unwrap());
    // 2 pre-greet talkers
    pre_greet_talker(&w, CLIENT_V4.into(), agent_v4());
    pre_greet_talker(&w, CLIENT_V6.into(), agent_v6());
    // 1 client that gives up during the greeting delay
    let gone = w.net.in_client(|| {
        let mut s = std::net::TcpStream::connect(agent_v4()).unwrap();
        s.write_all(b"").unwrap();
        drop(s);
    });
    gone.expect("client namespace");
    assert!(
        w.pf.wait_delivered(3, Duration::from_secs(20)),
        "{}",
        w.pf.log()
    );

    // the sessions' ends are counted when their tasks finish: poll briefly
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape(&w.net);
        if sample(&text, "tarpit_sessions_total{outcome=\"client_closed\"}") == Some(1.0)
            && sample(&text, "tarpit_sessions_active") == Some(0.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let expect = |name: &str, v: f64| {
        assert_eq!(sample(&text, name), Some(v), "{name}\n{text}");
    };
    expect("tarpit_sessions_total{outcome=\"quit\"}", 3.0);
    expect("tarpit_sessions_total{outcome=\"pregreet\"}", 2.0);
    expect("tarpit_sessions_total{outcome=\"client_closed\"}", 1.0);
    expect("tarpit_sessions_active", 0.0);
    expect("tarpit_drops_554_total", 2.0);
    expect("tarpit_pregreet_total", 2.0);
    // every session got the greeting delay; 2 RCPTs past the threshold
    expect("tarpit_delays_total{reason=\"greeting\"}", 6.0);
    expect("tarpit_delays_total{reason=\"rcpt\"}", 2.0);
    expect("tarpit_delay_seconds_count{reason=\"rcpt\"}", 2.0);
    expect("tarpit_delay_seconds_sum{reason=\"rcpt\"}", 2.0);
    // the 1 s greeting hold falls in the le=1.0 bucket, not below
    expect(
        "tarpit_delay_seconds_bucket{le=\"0.5\",reason=\"greeting\"}",
        0.0,
    );
    expect(
        "tarpit_delay_seconds_bucket{le=\"1.0\",reason=\"greeting\"}",
        6.0,
    );
    assert_eq!(
        samples(&text, "tarpit_backend_errors_total"),
        vec![],
        "no backend errors: {text}"
    );
    expect("tarpit_config_reloads_total{result=\"applied\"}", 0.0);
    expect("tarpit_config_reloads_total{result=\"refused\"}", 0.0);
    assert!(
        sample(&text, "tarpit_log_lines_dropped_total").is_some(),
        "{text}"
    );

    // The kernel saw the same sessions on the veth: 6 flows to port 25,
    // both pre-greet talkers flagged by tc, and the per-address map holds
    // the two client addresses.
    let kernel = |c: &str| sample(&text, &format!("tarpit_kernel_total{{counter=\"{c}\"}}"));
    assert!(kernel("tc_flow_new").unwrap_or(0.0) >= 6.0, "{text}");
    assert!(kernel("tc_pregreet").unwrap_or(0.0) >= 2.0, "{text}");
    assert!(kernel("xdp_pass").unwrap_or(0.0) > 0.0, "{text}");
    assert!(
        sample(&text, "tarpit_map_entries{map=\"IP_STATE\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    let capacity = sample(&text, "tarpit_map_capacity{map=\"IP_STATE\"}").unwrap_or(0.0);
    assert!(capacity >= 1024.0, "{text}");
    // Every program loaded on this kernel: no feature switched off.
    for f in ["xdp", "pregreet", "sock_ops"] {
        let v = sample(
            &text,
            &format!("tarpit_kernel_feature_available{{feature=\"{f}\"}}"),
        );
        assert_eq!(v, Some(1.0), "{f}: {text}");
    }
    assert!(
        text.trim_end().ends_with("# EOF"),
        "one EOF at the very end"
    );
    assert_eq!(text.matches("# EOF").count(), 1);

    // ... and the log has one summary line per session, postscreen-style
    let log = w.agent().log();
    let summaries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tarpit::session: session "))
        .collect();
    assert_eq!(summaries.len(), 6, "{log}");
    let three = summaries
        .iter()
        .find(|l| l.contains("rcpts=3"))
        .unwrap_or_else(|| panic!("no rcpts=3 in {summaries:#?}"));
    for part in [
        "helo=\"client.example\"",
        "delays=greeting 1s, rcpt 2x1s",
        "delay_s=3",
        "outcome=\"quit\"",
    ] {
        assert!(three.contains(part), "{part} not in {three}");
    }
    let pregreet = summaries
        .iter()
        .filter(|l| l.contains("outcome=\"pregreet\""))
        .count();
    assert_eq!(pregreet, 2, "{summaries:#?}");
}

#[test]
fn endpoint_answers_only_get_metrics() {
    if !require_root() {
        return;
    }
    let w = World::new("[greeting]\ndelay = \"0s\"\n");
    let answer = |req: &'static [u8]| -> String {
        w.net
            .in_server(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", 9325)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(req).unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out
            })
            .unwrap()
    };
    assert!(answer(b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
    assert!(answer(b"GET /other HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 404"));
    // the endpoint is on loopback only: the veth address has nothing
    let reach = w.net.in_client(|| {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((tarpit_tests::SERVER_V4, 9325)),
            Duration::from_secs(2),
        )
        .is_ok()
    });
    assert_eq!(
        reach.ok(),
        Some(false),
        "metrics reachable from the network"
    );
}
