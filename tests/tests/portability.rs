//! What differs between the kernels tarpit supports: every kernel program
//! of the built object passes this kernel's verifier and every map it
//! declares can be created; tc attaches through TCX from Linux 6.6 and
//! through netlink filters on a clsact qdisc below (Debian 12's 6.1, 5.10),
//! and stopping the agent leaves nothing attached either way.
//!
//! The agent loads only what its config enables, so a program the verifier
//! of an older kernel refuses could hide until a user enables it. This test
//! loads them all, without attaching anything. `cargo xtask test --kernel`
//! runs it on Debian's 5.10, 6.1 and 6.12 (the verifier differs between
//! them: older ones lose bounds through stack spills and refuse reads of
//! stack slots written on another path); a refusal names the program and
//! ends with the tail of its verifier log.

use aya::{
    EbpfLoader,
    programs::{Program, SchedClassifier, tc::TcAttachType},
};
use tarpit::kernel_version::KernelVersion;
use tarpit_tests::hooks;
use tarpit_tests::{Agent, PinDir, TestCgroup, TestNet, env::repo_root, require_root, tarpit_bin};

/// Lines of verifier log shown per refused program: the refusal is at the end.
const LOG_TAIL: usize = 25;

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn load(program: &mut Program) -> Result<(), String> {
    let r = match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkLookup(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::SocketFilter(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        other => {
            return Err(format!(
                "program type {:?} is not loaded by this test: add it here",
                other.prog_type()
            ));
        }
    };
    r.map_err(|e| tail(&e.to_string(), LOG_TAIL))
}

#[test]
fn every_program_passes_this_kernels_verifier() {
    if !require_root() {
        return;
    }
    // The object the agent embeds; `cargo xtask test --kernel` passes its
    // snapshot of the same build.
    let path = std::env::var_os("TARPIT_EBPF_OBJECT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/ebpf/bpfel-unknown-none/release/tarpit"));
    let object = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build it with `cargo xtask build-ebpf`)",
            path.display()
        )
    });
    // No pin paths: nothing outlives the test; the maps go with `ebpf`.
    let mut ebpf = EbpfLoader::new()
        .load(&object)
        .unwrap_or_else(|e| panic!("maps or BTF refused by this kernel: {e}"));
    let mut loaded = Vec::new();
    let mut refused = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        match load(program) {
            Ok(()) => loaded.push(name.to_string()),
            Err(log) => refused.push(format!("{name}:\n{log}")),
        }
    }
    eprintln!("loaded: {}", loaded.join(", "));
    assert!(
        refused.is_empty(),
        "refused by the verifier of {}:\n\n{}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        refused.join("\n\n")
    );
    assert!(!loaded.is_empty(), "the object holds no programs");
}

/// The running kernel's release and whether it has TCX (Linux 6.6).
fn kernel() -> (String, bool) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let v = KernelVersion::parse(&release).expect("kernel release parses");
    (release, v >= KernelVersion { major: 6, minor: 6 })
}

fn config(
    net: &TestNet,
    pins: &PinDir,
    cgroup: &TestCgroup,
    tc_attach: &str,
    detach_on_exit: bool,
) -> String {
    format!(
        r#"
[listen]
addrs = ["127.0.0.1:2525"]
[backend]
addr = "127.0.0.1:2535"
[kernel]
interfaces = ["{iface}"]
smtp_ports = [25]
pin_path = "{pins}"
cgroup = "{cgroup}"
tc_attach = "{tc_attach}"
detach_on_exit = {detach_on_exit}
"#,
        iface = net.server_if,
        pins = pins.path.display(),
        cgroup = cgroup.path.display(),
    )
}

/// Output of a command run inside the server namespace (stdout and stderr).
fn in_server(net: &TestNet, program: &str, args: &[&str]) -> String {
    let out = net
        .server_cmd(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What is attached to the server veth, as the tools show it.
#[derive(Debug, PartialEq, Eq)]
struct Hooks {
    clsact: bool,
    /// cls_bpf filters (netlink tc), by program name.
    netlink_ingress: Vec<String>,
    netlink_egress: Vec<String>,
    /// TCX programs (empty on kernels without TCX).
    tcx_ingress: Vec<String>,
    tcx_egress: Vec<String>,
    xdp: bool,
    sock_ops: bool,
}

/// Program names of `tc filter show` output: one per filter line (iproute2
/// prints the name twice on a line: as the filter's and as the program's).
fn names_in(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("tarpit_")))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn hooks(net: &TestNet, cgroup: &TestCgroup) -> Hooks {
    let dev = net.server_if.as_str();
    let tcx = |dir: TcAttachType| -> Vec<String> {
        let iface = net.server_if.clone();
        let mut names: Vec<String> = net
            .in_server(move || {
                SchedClassifier::query_tcx(&iface, dir)
                    .map(|(_, progs)| {
                        progs
                            .iter()
                            .filter_map(|p| p.name_as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .expect("server namespace");
        names.sort();
        names
    };
    Hooks {
        clsact: in_server(net, "tc", &["qdisc", "show", "dev", dev]).contains("clsact"),
        netlink_ingress: names_in(&in_server(
            net,
            "tc",
            &["filter", "show", "dev", dev, "ingress"],
        )),
        netlink_egress: names_in(&in_server(
            net,
            "tc",
            &["filter", "show", "dev", dev, "egress"],
        )),
        tcx_ingress: tcx(TcAttachType::Ingress),
        tcx_egress: tcx(TcAttachType::Egress),
        xdp: hooks::xdp_prog_id(net).is_some(),
        sock_ops: hooks::sock_ops_on(cgroup),
    }
}

fn nothing_attached() -> Hooks {
    Hooks {
        clsact: false,
        netlink_ingress: vec![],
        netlink_egress: vec![],
        tcx_ingress: vec![],
        tcx_egress: vec![],
        xdp: false,
        sock_ops: false,
    }
}

/// Every hook of ours in place: tc through TCX or through netlink filters
/// (on a clsact qdisc, ours or one that was there), XDP, sock_ops.
fn attached(tcx: bool, clsact_before: bool) -> Hooks {
    let (tc_in, tc_out) = (
        vec!["tarpit_tc_in".to_string()],
        vec!["tarpit_tc_out".to_string()],
    );
    Hooks {
        clsact: clsact_before || !tcx,
        netlink_ingress: if tcx { vec![] } else { tc_in.clone() },
        netlink_egress: if tcx { vec![] } else { tc_out.clone() },
        tcx_ingress: if tcx { tc_in } else { vec![] },
        tcx_egress: if tcx { tc_out } else { vec![] },
        xdp: true,
        sock_ops: true,
    }
}

/// Starts the agent with `tc_attach`, checks what it attached, stops it and
/// checks that it took everything away again.
fn attach_and_detach(tc_attach: &str, expect_tcx: bool, clsact_before: bool) {
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let cgroup = TestCgroup::new().expect("test cgroup");
    if clsact_before {
        in_server(
            &net,
            "tc",
            &["qdisc", "add", "dev", &net.server_if, "clsact"],
        );
        assert!(hooks(&net, &cgroup).clsact, "could not add a clsact qdisc");
    }
    let before = Hooks {
        clsact: clsact_before,
        ..nothing_attached()
    };
    assert_eq!(
        hooks(&net, &cgroup),
        before,
        "something attached before the agent"
    );

    let agent =
        Agent::start(&net, &config(&net, &pins, &cgroup, tc_attach, true)).expect("agent starts");
    let (release, _) = kernel();
    let want = attached(expect_tcx, clsact_before);
    assert_eq!(
        hooks(&net, &cgroup),
        want,
        "attached on {release} with tc_attach = {tc_attach}; agent log:\n{}",
        agent.log()
    );

    let log = agent.log();
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "agent exit status {status}; log:\n{log}");
    assert_eq!(
        hooks(&net, &cgroup),
        before,
        "left attached on {release} after the agent stopped (tc_attach = {tc_attach})"
    );
    assert!(!pins.path.exists(), "pins left: {:?}", pins.entries());
}

/// `tc_attach = "auto"`: TCX links from Linux 6.6; below, netlink filters on
/// a clsact qdisc that the agent adds and removes again.
#[test]
fn tc_attaches_the_way_this_kernel_supports_and_detach_leaves_nothing() {
    if !require_root() {
        return;
    }
    let (_, tcx) = kernel();
    attach_and_detach("auto", tcx, false);
}

/// The netlink path (the only one on Debian 12's 6.1 and on 5.10), forced,
/// so it is also tested on kernels with TCX.
#[test]
fn netlink_tc_adds_and_removes_its_clsact_qdisc() {
    if !require_root() {
        return;
    }
    attach_and_detach("netlink", false, false);
}

/// A clsact qdisc the admin made (other filters may hang on it) stays.
#[test]
fn netlink_tc_keeps_a_clsact_qdisc_it_did_not_create() {
    if !require_root() {
        return;
    }
    attach_and_detach("netlink", false, true);
}

/// An agent that dies without cleaning up (kill -9, `detach_on_exit =
/// false`) leaves its hooks working; `tarpit detach` then removes every
/// one of them.
fn crash_then_detach(tc_attach: &str, expect_tcx: bool) {
    let release = kernel().0;
    let net = TestNet::new().expect("test network");
    let pins = PinDir::new().expect("pin dir");
    let cgroup = TestCgroup::new().expect("test cgroup");
    let mut agent =
        Agent::start(&net, &config(&net, &pins, &cgroup, tc_attach, false)).expect("agent starts");
    agent.kill9();
    assert_eq!(
        hooks(&net, &cgroup),
        attached(expect_tcx, false),
        "hooks after kill -9 on {release} (tc_attach = {tc_attach}); agent log:\n{}",
        agent.log()
    );

    let out = net
        .server_cmd(&tarpit_bin().display().to_string())
        .arg("-c")
        .arg(&agent.config)
        .arg("detach")
        .output()
        .expect("tarpit detach runs");
    assert!(
        out.status.success(),
        "tarpit detach failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hooks(&net, &cgroup),
        nothing_attached(),
        "left attached on {release} after `tarpit detach` (tc_attach = {tc_attach})"
    );
    assert!(!pins.path.exists(), "pins left: {:?}", pins.entries());
}

/// Whichever way tc attached on this kernel.
#[test]
fn tarpit_detach_after_a_crash_leaves_nothing() {
    if !require_root() {
        return;
    }
    crash_then_detach("auto", kernel().1);
}

/// Netlink filters and the qdisc made for them outlive the agent's process:
/// only `tarpit detach` can remove them.
#[test]
fn tarpit_detach_removes_netlink_filters_and_the_qdisc_after_a_crash() {
    if !require_root() {
        return;
    }
    crash_then_detach("netlink", false);
}
