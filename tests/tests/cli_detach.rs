//! `tarpit detach` takes every program of ours off its hook at once, even
//! while an agent still holds the links, and removes every pin: a
//! block-listed client gets through, no XDP program is left on the
//! interface, no sock_ops program on the cgroup, the pin directory is gone.
mod cli_common;

use cli_common::{CliWorld, Opts, Probe, ip};
use tarpit_tests::hooks::{cgroup_progs, sock_ops_on, xdp_prog_id};
use tarpit_tests::require_root;

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
    assert!(xdp_prog_id(&w.net).is_some(), "no XDP attached before");
    assert!(
        sock_ops_on(&w.cgroup),
        "sock_ops not attached before: {:?}",
        cgroup_progs(&w.cgroup)
    );

    let out = w.ok(&["detach"]);
    assert!(out.contains("taken off their hooks at once"), "{out}");
    assert!(
        w.pins.entries().is_empty(),
        "pins left: {:?}",
        w.pins.entries()
    );
    assert!(!w.pins.path.exists());
    assert_eq!(xdp_prog_id(&w.net), None, "XDP still attached");
    assert!(
        cgroup_progs(&w.cgroup).is_empty(),
        "still on the cgroup: {:?}",
        cgroup_progs(&w.cgroup)
    );
    // Nothing drops the bot any more; the agent still answers it.
    assert_eq!(w.probe(bot), Probe::Connected);
    // The state file keeps the entry for the next start.
    assert_eq!(w.state()["block"][0]["cidr"], "198.51.100.65/32");
    let err = w.fails(&["detach"], 1);
    assert!(err.contains("no tarpit maps at"), "{err}");
}
