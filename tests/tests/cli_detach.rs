//! `tarpit detach` takes every program of ours off its hook at once, even
//! while an agent still holds the links, and removes every pin: a
//! block-listed client gets through, no XDP program is left on the
//! interface, no sock_ops program on the cgroup, the pin directory is gone.
mod cli_common;

use std::process::Command;

use cli_common::{CliWorld, Opts, Probe, ip};
use tarpit_tests::require_root;

/// Program ids attached to an interface of the server namespace (XDP) or
/// to the test's cgroup (sock_ops), as bpftool reports them.
fn attached(w: &CliWorld) -> (String, String) {
    let link = Command::new("ip")
        .args([
            "-n",
            &w.net.server_ns,
            "-d",
            "link",
            "show",
            "dev",
            &w.net.server_if,
        ])
        .output()
        .unwrap();
    let cgroup = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&w.cgroup.path)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    (
        String::from_utf8_lossy(&link.stdout).into_owned(),
        String::from_utf8_lossy(&cgroup.stdout).into_owned(),
    )
}

#[test]
fn detach_takes_programs_off_at_once_even_with_the_agent_running() {
    if !require_root() {
        return;
    }
    let mut w = CliWorld::new(Opts::default());
    let bot = ip("198.51.100.65");
    w.net.add_client_addr(bot).unwrap();
    w.start_agent();
    w.ok(&["block", "add", "198.51.100.65"]);
    assert_eq!(w.probe(bot), Probe::Dropped);
    let (link, cgroup) = attached(&w);
    assert!(link.contains("prog/xdp"), "XDP attached before:\n{link}");
    assert!(
        cgroup.contains("sock_ops"),
        "sock_ops attached before:\n{cgroup}"
    );

    let out = w.ok(&["detach"]);
    assert!(out.contains("taken off their hooks at once"), "{out}");
    assert!(
        w.pins.entries().is_empty(),
        "pins left: {:?}",
        w.pins.entries()
    );
    assert!(!w.pins.path.exists());
    let (link, cgroup) = attached(&w);
    assert!(!link.contains("prog/xdp"), "XDP still attached:\n{link}");
    assert!(
        !cgroup.contains("sock_ops"),
        "sock_ops still attached:\n{cgroup}"
    );
    // Nothing drops the bot any more; the agent still answers it.
    assert_eq!(w.probe(bot), Probe::Connected);
    // The state file keeps the entry for the next start.
    assert_eq!(w.state()["block"][0]["cidr"], "198.51.100.65/32");
    let err = w.fails(&["detach"], 1);
    assert!(err.contains("no tarpit maps at"), "{err}");
}
