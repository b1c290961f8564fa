//! The kernel's allow list follows the configuration: `allow.ips` from the
//! config file plus the run-time entries of the state file (`tarpit allow
//! add`) are put into the ALLOW map at start and on every reload; entries
//! that are in neither any more leave it (nor among the entries other MX
//! hosts shared through the cluster, [`sync_keeping`]). XDP, sk_lookup and the agent then
//! read one list. (`allow.internal` stays the agent's: internal hosts are
//! exempt from every rule and never blocked, but they are the site's own
//! relays and keep going through the agent's accounting.)
use std::collections::BTreeSet;
use std::time::SystemTime;

use ipnet::IpNet;
use tracing::{info, warn};

use crate::config::Config;
use crate::kernel::KernelMaps;
use crate::state::{State, unix};

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    pub failed: usize,
}

/// The prefixes the configuration puts on the allow list (host bits
/// cleared, as the kernel stores them).
pub fn from_config(config: &Config) -> BTreeSet<IpNet> {
    config.allow.ips.iter().map(|n| n.trunc()).collect()
}

/// The unexpired run-time entries of the state file; a missing file is
/// none, an unreadable one is an error (its entries are then kept).
pub fn from_state(config: &Config) -> Result<BTreeSet<IpNet>, crate::state::StateError> {
    let state = State::load(&config.state.file)?;
    let now = unix(SystemTime::now());
    Ok(state
        .allow
        .iter()
        .filter(|e| e.expires_at.is_none_or(|t| t > now))
        .map(|e| e.cidr.trunc())
        .collect())
}

/// What to add and remove (pure): `present` is the kernel's list.
pub fn plan(
    wanted: &BTreeSet<IpNet>,
    runtime: &BTreeSet<IpNet>,
    present: &BTreeSet<IpNet>,
) -> (Vec<IpNet>, Vec<IpNet>) {
    let add = wanted.difference(present).copied().collect();
    let remove = present
        .iter()
        .filter(|n| !wanted.contains(n) && !runtime.contains(n))
        .copied()
        .collect();
    (add, remove)
}

/// Brings the kernel's allow list in line with `config`.
pub fn sync(maps: &mut KernelMaps, config: &Config) -> SyncReport {
    sync_keeping(maps, config, &BTreeSet::new())
}

/// [`sync`], keeping `shared` too: the entries other MX hosts put on the
/// allow list through the cluster, which neither this host's config nor
/// its state file holds.
pub fn sync_keeping(
    maps: &mut KernelMaps,
    config: &Config,
    shared: &BTreeSet<IpNet>,
) -> SyncReport {
    let mut report = SyncReport::default();
    let wanted = from_config(config);
    let runtime = match from_state(config) {
        Ok(mut r) => {
            r.extend(shared.iter().map(|n| n.trunc()));
            Some(r)
        }
        Err(e) => {
            warn!("allow list: state file not readable ({e}); removing nothing");
            None
        }
    };
    let present: BTreeSet<IpNet> = match maps.allow_list() {
        Ok(items) => items.into_iter().map(|i| i.net.trunc()).collect(),
        Err(e) => {
            warn!("allow list: cannot read the kernel's list: {e}");
            report.failed += 1;
            return report;
        }
    };
    let (add, remove) = match &runtime {
        Some(rt) => plan(&wanted, rt, &present),
        None => (plan(&wanted, &present, &present).0, Vec::new()),
    };
    for net in add {
        match maps.allow_add(net, None) {
            Ok(()) => report.added.push(net),
            Err(e) => {
                report.failed += 1;
                warn!(prefix = %net, "allow list: not added to the kernel: {e}");
            }
        }
    }
    for net in remove {
        match maps.allow_del(net) {
            Ok(_) => report.removed.push(net),
            Err(e) => {
                report.failed += 1;
                warn!(prefix = %net, "allow list: not removed from the kernel: {e}");
            }
        }
    }
    info!(
        added = report.added.len(),
        removed = report.removed.len(),
        failed = report.failed,
        "kernel allow list in step with the configuration"
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<IpNet> {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn config_entries_come_and_go_runtime_entries_stay() {
        let wanted = set(&["198.51.100.0/24", "fd5b:1e00::/64"]);
        let runtime = set(&["198.51.100.77/32"]);
        let present = set(&["198.51.100.0/24", "198.51.100.77/32", "10.0.0.0/8"]);
        let (add, remove) = plan(&wanted, &runtime, &present);
        assert_eq!(add, vec!["fd5b:1e00::/64".parse::<IpNet>().unwrap()]);
        assert_eq!(remove, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn config_prefixes_are_normalised_and_internal_stays_out() {
        let c = Config::parse("[allow]\nips = [\"198.51.100.9/24\"]\ninternal = [\"::1/128\"]\n")
            .unwrap();
        assert_eq!(from_config(&c), set(&["198.51.100.0/24"]));
    }
}
