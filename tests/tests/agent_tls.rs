//! STARTTLS terminated by the agent: the policies keep working inside TLS
//! and mail still reaches Postfix, once. Driven by Python's smtplib.
use std::time::Duration;

use tarpit_tests::smtp_client::{agent_config, proxy_backend};
use tarpit_tests::tls_cert::make_cert;
use tarpit_tests::{Agent, CLIENT_V4, CLIENT_V6, PinDir, Postfix, SERVER_V4, SERVER_V6, TestNet};
use tarpit_tests::{require_root, unique_id};

/// smtplib session: EHLO, STARTTLS, EHLO, MAIL, 3 RCPTs (timed), DATA.
/// Prints one line per fact for the test to check.
const CLIENT: &str = r#"
import smtplib, ssl, sys, time
host, src = sys.argv[1], sys.argv[2]
s = smtplib.SMTP(host, 25, source_address=(src, 0), timeout=30)
s.ehlo("client.example")
print("before", "starttls" in s.esmtp_features, "xclient" in s.esmtp_features)
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
code, _ = s.starttls(context=ctx)
print("starttls", code, s.sock.version())
s.ehlo("client.example")
print("after", "starttls" in s.esmtp_features, "pipelining" in s.esmtp_features)
s.mail("tls@client.example")
for i in range(3):
    t = time.monotonic()
    code, _ = s.rcpt("sink%d@tarpit.test" % i)
    print("rcpt", code, round(time.monotonic() - t, 3))
code, _ = s.data(b"Subject: over tls\r\n\r\nhello inside TLS\r\n")
print("data", code)
s.quit()
"#;

#[test]
fn starttls_terminated_by_the_agent_keeps_the_policies_working() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tarpit-tls-{}", unique_id()));
    let (cert, key) = make_cert(&dir, "mx.tarpit.test");
    let net = TestNet::new().unwrap();
    let pins = PinDir::new().unwrap();
    let pf = Postfix::start(&net).unwrap();
    let rest = format!(
        "[greeting]\ndelay = \"0s\"\n[rcpt]\nthreshold = 1\ndelay = \"1s\"\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n"
    );
    let _agent = Agent::start(&net, &agent_config(&net, &pins, &proxy_backend(), &rest)).unwrap();
    for (host, src) in [
        (SERVER_V4.to_string(), CLIENT_V4.to_string()),
        (SERVER_V6.to_string(), CLIENT_V6.to_string()),
    ] {
        let out = net
            .client_cmd("python3")
            .args(["-c", CLIENT, &host, &src])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        // The agent offers STARTTLS (this Postfix has no TLS) and hides XCLIENT.
        assert_eq!(lines[0], "before True False", "{text}");
        assert!(lines[1].starts_with("starttls 220 TLSv1."), "{text}");
        assert_eq!(lines[2], "after False True", "{text}");
        // Inside TLS the RCPT tarpit still applies: 0, then 1 s, 1 s.
        let rcpt: Vec<(u16, f64)> = lines[3..6]
            .iter()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[1].parse().unwrap(), w[2].parse().unwrap())
            })
            .collect();
        assert!(rcpt.iter().all(|(c, _)| *c == 250), "{text}");
        assert!(rcpt[0].1 < 1.0, "{text}");
        for (_, t) in &rcpt[1..] {
            assert!((1.0..2.5).contains(t), "RCPT delay inside TLS: {text}");
        }
        assert_eq!(lines[6], "data 250", "{text}");
    }
    // 3 recipients x 2 sessions, each delivered once
    assert!(
        pf.wait_delivered(6, Duration::from_secs(20)),
        "{}",
        pf.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pf.delivered(), 6);
    let _ = std::fs::remove_dir_all(&dir);
}
