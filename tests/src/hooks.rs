//! What is attached where, as the kernel reports it to an admin's tools
//! (`ip`, `bpftool`): XDP on the server-side veth, programs on a test
//! cgroup. Independent of the agent's own bookkeeping, so a test can check
//! that a load attached and a detach removed what it claims.
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use crate::{TestCgroup, TestNet};

/// `ip -d link show` of the server-side veth.
pub fn server_link(net: &TestNet) -> String {
    let out = Command::new("ip")
        .args([
            "-n",
            &net.server_ns,
            "-d",
            "link",
            "show",
            "dev",
            &net.server_if,
        ])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The id of the XDP program on the server-side veth: `ip` shows
/// "prog/xdp id 123" (driver mode) or "prog/xdpgeneric id 123".
pub fn xdp_prog_id(net: &TestNet) -> Option<u32> {
    let text = server_link(net);
    let at = text.find("prog/xdp")?;
    text[at..]
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)?
        .parse()
        .ok()
}

/// (name, id) of the programs attached to the cgroup.
///
/// `bpftool cgroup show` sends a query that kernels before 6.0 refuse, and
/// then shows nothing; there the cgroup's links are read instead (aya
/// attaches through a link from 5.7 on), so an old kernel cannot make a
/// "nothing attached" check pass by showing nothing.
pub fn cgroup_progs(cgroup: &TestCgroup) -> Vec<(String, u64)> {
    let shown = bpftool_json(&["cgroup", "show", &cgroup.path.display().to_string()]);
    let mut progs: Vec<(String, u64)> = shown
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    if progs.is_empty() {
        let ino = std::fs::metadata(&cgroup.path).map_or(0, |m| m.ino());
        let links = bpftool_json(&["link", "show"]);
        for l in links.as_array().into_iter().flatten() {
            if l["type"] == "cgroup" && l["cgroup_id"].as_u64() == Some(ino) {
                let id = l["prog_id"].as_u64().unwrap_or(0);
                let prog = bpftool_json(&["prog", "show", "id", &id.to_string()]);
                progs.push((prog["name"].as_str().unwrap_or("").to_string(), id));
            }
        }
    }
    progs
}

/// Whether our sock_ops program is attached to the cgroup.
pub fn sock_ops_on(cgroup: &TestCgroup) -> bool {
    cgroup_progs(cgroup)
        .iter()
        .any(|(name, _)| name == "tarpit_sockops")
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool (apt-get install bpftool)");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}
