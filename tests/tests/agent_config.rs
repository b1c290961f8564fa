//! The agent's config keys are checked at load: `tarpit check-config` and
//! `tarpit run` refuse the same bad file with the key and the reason.
use std::process::Command;

use tarpit_tests::{tarpit_bin, unique_id};

fn refused(cmd: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("tarpit-agentcfg-{}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(tarpit_bin())
        .args([cmd, "-c"])
        .arg(&file)
        .output()
        .expect("run tarpit");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{cmd} accepted {text:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_agent_keys_are_refused_by_check_config_and_run_alike() {
    let cases = [
        ("[blacklist]\ndelay = \"601s\"\n", "blacklist.delay", "600s"),
        ("[greeting]\ndelay = \"11m\"\n", "greeting.delay", "600s"),
        ("[rcpt]\nscaling = 0.5\n", "rcpt.scaling", "1.0"),
        ("[limits]\nline = 100\n", "limits.line", "512"),
        ("[listen]\nbacklog = 0\n", "listen.backlog", "1 to 65535"),
        ("[tls]\ncert = \"/nonexistent.pem\"\n", "tls.key", "needed"),
        (
            "[backend]\nclient_address = \"proxy-v3\"\n",
            "client_address",
            "proxy-v3",
        ),
        (
            "[listen]\naddrs = [\"127.0.0.1:465\"]\n[backend]\nclient_address = \"xclient\"\n",
            "backend.client_address",
            "implicit-TLS port 465",
        ),
    ];
    for (text, key, reason) in cases {
        for cmd in ["check-config", "run"] {
            let err = refused(cmd, text);
            assert!(
                err.contains(key) && err.contains(reason),
                "{cmd} {text:?}: {err}"
            );
        }
    }
}

/// A hold that real senders will not sit out is the operator's choice, so
/// check-config accepts the file (exit 0, "ok") but says so on stderr.
#[test]
fn check_config_warns_of_holds_past_the_senders_timeout_and_still_accepts() {
    let dir = std::env::temp_dir().join(format!("tarpit-agentcfg-{}", unique_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("long.toml");
    std::fs::write(&file, "[blacklist]\ndelay = \"6m\"\n").unwrap();
    let out = Command::new(tarpit_bin())
        .args(["check-config", "-c"])
        .arg(&file)
        .output()
        .expect("run tarpit");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("long.toml: ok"), "{stdout}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("warning: blacklist.delay: "))
        .unwrap_or_else(|| panic!("no blacklist.delay warning: {stderr}"));
    assert!(
        warning.contains("6m") && warning.contains("RCPT"),
        "{warning}"
    );
}
