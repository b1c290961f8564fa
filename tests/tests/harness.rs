//! The harness itself: a test network, a real Postfix inside it, and
//! clean-up that leaves nothing behind.
use std::process::Command;
use std::time::Duration;

use tarpit_tests::{CLIENT_V4, Postfix, SERVER_V4, TestNet, require_root};

#[test]
fn postfix_in_a_namespace_delivers_and_sees_the_client_address() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let pf = Postfix::start(&net).expect("postfix");
    let out = net
        .client_cmd("swaks")
        .args(["--server", &SERVER_V4.to_string(), "--port", "2525"])
        .args(["--from", "a@example.org", "--to", "someone@tarpit.test"])
        .args(["--helo", "client.example.org", "--timeout", "20"])
        .output()
        .expect("swaks");
    assert!(
        out.status.success(),
        "swaks: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        pf.wait_delivered(1, Duration::from_secs(20)),
        "log:\n{}",
        pf.log()
    );
    assert_eq!(pf.delivered(), 1);
    // Relaying is refused, and the refusal names the real client address.
    let out = net
        .client_cmd("swaks")
        .args(["--server", &SERVER_V4.to_string(), "--port", "2525"])
        .args([
            "--from",
            "a@example.org",
            "--to",
            "victim@elsewhere.example",
        ])
        .args(["--quit-after", "RCPT", "--timeout", "20"])
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("554"), "relay not refused:\n{text}");
    assert!(
        pf.wait_log(
            &format!("reject: RCPT from unknown[{CLIENT_V4}]"),
            Duration::from_secs(10)
        ),
        "log:\n{}",
        pf.log()
    );
}

#[test]
fn dropping_the_network_removes_its_namespaces() {
    if !require_root() {
        return;
    }
    let net = TestNet::new().expect("test network");
    let (s, c) = (net.server_ns.clone(), net.client_ns.clone());
    drop(net);
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&s) && !list.contains(&c), "left: {list}");
}
