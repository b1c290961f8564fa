//! The sk_lookup bypass as the closed loop runs it: which clients the
//! steering program may hand straight to the MTA (the policy's own rule,
//! so the kernel never spares a client the agent would tarpit), taking the
//! MTA's listeners again after an MTA restart, and the steering counters
//! at each scrape.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tarpit_common::steer::{
    STEER_F_ALLOWED, STEER_F_AUTHENTICATED, STEER_F_FAIL_OPEN, SteerSettings,
};
use tracing::{debug, info, warn};

use super::{LoopHandle, LoopState};
use crate::config::Config;
use crate::kernel::{SteerCounters, SteerMaps};
use crate::metrics::encode_family;
use crate::policy::precedence::Precedence;

/// The steering settings a config asks for.
pub fn steer_settings(config: &Config) -> SteerSettings {
    let mut s = SteerSettings::default();
    if !config.bypass.enabled {
        return s;
    }
    for (slot, port) in s.ports.iter_mut().zip(&config.bypass.ports) {
        *slot = *port;
    }
    // Past the agent only whom the agent itself would spare from the
    // start of a session: the policy's rule.
    let rule = Precedence::new(config);
    if config.bypass.allowlisted && rule.exclude_allowlisted {
        s.flags |= STEER_F_ALLOWED;
    }
    if config.bypass.authenticated && rule.auth_spares_new_sessions {
        s.flags |= STEER_F_AUTHENTICATED;
    }
    if config.bypass.fail_open {
        s.flags |= STEER_F_FAIL_OPEN;
    }
    s
}

impl LoopState {
    /// A restarted MTA listens on new sockets; the old ones left the
    /// sockmap when they closed. Take the new ones (needs the rights the
    /// agent had at start: after a privilege drop this fails and says so).
    pub(super) fn retake_mta(&self) {
        let Some(steer) = &self.steer else { return };
        let addrs = self.config().bypass.mta_listeners.clone();
        let now = SteerMaps::listener_inodes(&addrs);
        let mut known = self.mta_inodes.lock().unwrap_or_else(|e| e.into_inner());
        if *known == now || now.iter().any(|i| i.is_none()) {
            return;
        }
        let mut s = steer.lock().unwrap_or_else(|e| e.into_inner());
        match s.take_mta(&addrs) {
            Ok(taken) => {
                *known = taken.iter().map(|l| Some(l.inode)).collect();
                info!("bypass: the MTA's listeners changed (MTA restarted); taken again");
            }
            Err(e) => warn!(
                "bypass: the MTA's listeners changed and cannot be taken again ({e:#}); \
                 restart the agent to steer trusted clients and fail open"
            ),
        }
    }
}

/// `tarpit_bypass_steered_total{decision}`, read from the sk_lookup
/// program's counters at each scrape (registered with a bypass only).
pub(super) struct SteerScrape(pub(super) LoopHandle);

impl std::fmt::Debug for SteerScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SteerScrape")
    }
}

impl Collector for SteerScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        match self.0.steer_counters() {
            Some(Ok(c)) => encode_family(
                &mut encoder,
                "bypass_steered",
                "Connections the sk_lookup program steered, by decision (bypass)",
                &steer_family(&c),
            ),
            Some(Err(e)) => {
                debug!(target: "tarpit::ops", "cannot read steering counters: {e}");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// What the sk_lookup program did with each new connection to a steered
/// port. `allowlisted`, `authenticated`, `fail_open`: handed to the MTA's
/// listener; `agent`: to the agent's; `passed`: left to the kernel's own
/// lookup (no usable socket in the map).
fn steer_family(c: &SteerCounters) -> Family<Vec<(&'static str, &'static str)>, Counter> {
    let fam = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    for (decision, v) in [
        ("allowlisted", c.allowed),
        ("authenticated", c.authenticated),
        ("agent", c.agent),
        ("fail_open", c.fail_open),
        ("passed", c.passed),
    ] {
        fam.get_or_create(&vec![("decision", decision)]).inc_by(v);
    }
    fam
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn steering_counts_render_by_decision() {
        #[derive(Debug)]
        struct Fixed(SteerCounters);
        impl Collector for Fixed {
            fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
                encode_family(
                    &mut encoder,
                    "bypass_steered",
                    "Steered",
                    &steer_family(&self.0),
                )
            }
        }
        let m = Metrics::new();
        let fixed = Fixed(SteerCounters {
            allowed: 3,
            authenticated: 2,
            agent: 7,
            fail_open: 1,
            passed: 0,
        });
        m.register(|r| r.register_collector(Box::new(fixed)));
        let text = m.render();
        assert!(
            text.contains("# TYPE tarpit_bypass_steered counter"),
            "{text}"
        );
        for (decision, v) in [
            ("allowlisted", 3),
            ("authenticated", 2),
            ("agent", 7),
            ("fail_open", 1),
            ("passed", 0),
        ] {
            assert!(
                text.contains(&format!(
                    "tarpit_bypass_steered_total{{decision=\"{decision}\"}} {v}\n"
                )),
                "{decision}: {text}"
            );
        }
    }

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    const BYPASS: &str = "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\"]\n";

    #[test]
    fn nothing_is_steered_without_bypass() {
        assert_eq!(steer_settings(&parse("")), SteerSettings::default());
    }

    #[test]
    fn allow_listed_clients_are_steered_only_when_the_agent_would_spare_them() {
        let s = steer_settings(&parse(BYPASS));
        assert_eq!(s.ports[0], 25);
        assert!(s.has(STEER_F_ALLOWED) && s.has(STEER_F_FAIL_OPEN));
        let s = steer_settings(&parse(&format!("{BYPASS}[exclude]\nallowlisted = false\n")));
        assert!(!s.has(STEER_F_ALLOWED));
    }

    #[test]
    fn authenticated_clients_are_steered_only_with_once_per_day() {
        assert!(!steer_settings(&parse(BYPASS)).has(STEER_F_AUTHENTICATED));
        let on = format!("{BYPASS}[helo]\nauthenticated_once_per_day = true\n");
        assert!(steer_settings(&parse(&on)).has(STEER_F_AUTHENTICATED));
        // bypass.authenticated = false wins over the HELO rule.
        let c = parse(
            "[bypass]\nenabled = true\nmta_listeners = [\"127.0.0.1:10026\"]\n\
             authenticated = false\n[helo]\nauthenticated_once_per_day = true\n",
        );
        assert!(!steer_settings(&c).has(STEER_F_AUTHENTICATED));
        // Nor are they when the agent itself would not spare them
        // (exclude.authenticated = false): the kernel follows the policy.
        let not_spared = format!("{on}[exclude]\nauthenticated = false\n");
        assert!(!steer_settings(&parse(&not_spared)).has(STEER_F_AUTHENTICATED));
    }

    #[test]
    fn fail_open_can_be_switched_off() {
        let c = parse(&format!("{BYPASS}fail_open = false\n"));
        assert!(!steer_settings(&c).has(STEER_F_FAIL_OPEN));
    }
}
