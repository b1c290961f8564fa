//! The firewall baseline: an nftables set-based drop rule for the same
//! block-listed prefixes, on the netdev ingress hook of the server veth
//! (the earliest and cheapest place nftables can drop, so the fairest
//! opponent for XDP). The table lives in the bench's namespace and goes
//! with it.
use anyhow::{Context, Result, bail};

use super::netns::BenchNet;
use super::synflood::{BLOCK_V4, BLOCK_V6};

const TABLE: &str = "tpbench";

pub fn install(net: &BenchNet, port: u16) -> Result<()> {
    let rules = format!(
        "table netdev {TABLE} {{\n\
           set block4 {{ type ipv4_addr; flags interval; elements = {{ {}/{} }} }}\n\
           set block6 {{ type ipv6_addr; flags interval; elements = {{ {}/{} }} }}\n\
           chain ingress {{\n\
             type filter hook ingress device \"{}\" priority -500; policy accept;\n\
             ip saddr @block4 tcp dport {port} counter drop\n\
             ip6 saddr @block6 tcp dport {port} counter drop\n\
           }}\n\
         }}\n",
        BLOCK_V4.0, BLOCK_V4.1, BLOCK_V6.0, BLOCK_V6.1, net.server_if
    );
    testkit::feed(net.server_cmd("nft").args(["-f", "-"]), &rules)
        .context("nft refused the rules (is nftables installed?)")
}

/// Packets dropped by the rules so far.
pub fn dropped(net: &BenchNet) -> Result<u64> {
    let out = net
        .server_cmd("nft")
        .args(["-j", "list", "table", "netdev", TABLE])
        .output()?;
    if !out.status.success() {
        bail!("nft list: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut n = 0;
    for item in v["nftables"].as_array().into_iter().flatten() {
        for expr in item["rule"]["expr"].as_array().into_iter().flatten() {
            n += expr["counter"]["packets"].as_u64().unwrap_or(0);
        }
    }
    Ok(n)
}
