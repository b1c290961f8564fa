//! [`Policy::explain`]: what the tarpit does to a client, in words, for
//! `tarpit ip`. The order is the agent's ([`super::precedence`]); the
//! tarpit rules after it are asked in the order they bite.
use std::net::IpAddr;

use super::Policy;
use super::facts::{Dns, Facts, Grey};
use super::precedence::{AllowedBy, Standing};
use crate::config::GreylistMode;
use crate::config::ListAction;

/// A verdict (`allow`, `block`, `off`, `internal`, `authenticated`,
/// `dnsbl`, `blacklisted`, `greylist`, `tarpit`) and one sentence for
/// people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub verdict: &'static str,
    pub reason: String,
}

fn says(verdict: &'static str, reason: String) -> Explanation {
    Explanation { verdict, reason }
}

fn human(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

impl Policy {
    /// What applies to the client of `f` now, most decisive rule first.
    pub fn explain(&self, f: &Facts) -> Explanation {
        let p = &self.precedence;
        let ip =
            f.ip.map_or(IpAddr::from([0, 0, 0, 0]), |ip| ip.to_canonical());
        let who = p.who_of(f);
        match p.standing(&who) {
            Standing::Allow(AllowedBy::Kernel) => says(
                "allow",
                format!(
                    "allow-listed by {}: XDP passes it even if a block entry matches, and the \
                     agent applies no delay",
                    f.kernel_allow.map(|n| n.to_string()).unwrap_or_default()
                ),
            ),
            Standing::Allow(AllowedBy::Config) => says(
                "allow",
                format!(
                    "allow-listed by the configuration ({} in allow.ips): no delay",
                    p.allow_net(ip).map(|n| n.to_string()).unwrap_or_default()
                ),
            ),
            Standing::Allow(AllowedBy::Dns) => says(
                "allow",
                format!(
                    "allow-listed by DNS ({}): no delay, never greylisted",
                    match &f.dns {
                        Dns::Allowed(why) => why.as_str(),
                        _ => "",
                    }
                ),
            ),
            Standing::Block if f.kernel_block.as_ref().is_some_and(|b| b.hold) => {
                let b = f.kernel_block.as_ref();
                says(
                    "hold",
                    format!(
                        "held in kernel by {} ({}) {}: XDP answers its connections to the SMTP \
                         ports with a zero window and keeps no socket (dropped where the kernel \
                         cannot); {}",
                        b.map(|b| b.net.to_string()).unwrap_or_default(),
                        b.map_or("manual", |b| b.reason.as_str()),
                        b.map_or("", |b| b.until.as_str()),
                        if b.is_some_and(|b| b.all_ports) {
                            "its other packets are dropped"
                        } else {
                            "other ports pass"
                        }
                    ),
                )
            }
            Standing::Block => {
                let b = f.kernel_block.as_ref();
                says(
                    "block",
                    format!(
                        "blocked by {} ({}) {}: XDP drops its packets to {}",
                        b.map(|b| b.net.to_string()).unwrap_or_default(),
                        b.map_or("manual", |b| b.reason.as_str()),
                        b.map_or("", |b| b.until.as_str()),
                        if b.is_some_and(|b| b.all_ports) {
                            "every port"
                        } else {
                            "the SMTP ports"
                        }
                    ),
                )
            }
            Standing::Off => says(
                "off",
                "the master switch is off (enabled = false): the agent applies no tarpit rule"
                    .into(),
            ),
            Standing::Internal => says(
                "internal",
                format!(
                    "internal network {} (allow.internal): never tarpitted",
                    p.internal_net(ip)
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ),
            ),
            Standing::Authenticated => {
                let until = f
                    .auth_note
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default();
                says(
                    "authenticated",
                    format!(
                        "authenticated{until}: the tarpit delays are skipped from the start of \
                         its sessions (helo.authenticated_once_per_day)"
                    ),
                )
            }
            Standing::Subject => self.explain_subject(ip, f),
        }
    }

    /// The tarpit rules, for a client the precedence does not spare.
    fn explain_subject(&self, ip: IpAddr, f: &Facts) -> Explanation {
        let greeting = human(self.qmail.delay);
        if let Dns::Listed { score, action, .. } = &f.dns
            && let Some(what) = self.postscreen.explain(*score, *action)
        {
            return says("dnsbl", what);
        }
        if let Some(net) = self
            .orf
            .ip_net(ip)
            .filter(|_| self.precedence.internal_net(ip).is_none())
        {
            return says(
                "blacklisted",
                format!(
                    "blacklisted ({net} in blacklist.ips): the greeting is held {greeting}, then \
                     every reply from MAIL FROM on {}",
                    human(self.orf.delay)
                ),
            );
        }
        match (self.greylisting.mode, f.greylist) {
            (GreylistMode::Connect, Grey::WouldGreylist) => {
                return says(
                    "greylist",
                    "greylisted at connect: no passed entry for the address, it gets 421 4.7.1 \
                     after the greeting delay"
                        .into(),
                );
            }
            (GreylistMode::Connect, Grey::Unknown) => {
                return says(
                    "greylist",
                    "greylisting at connect: unless the address passed before (the store was \
                     not read), it gets 421 4.7.1 after the greeting delay"
                        .into(),
                );
            }
            (GreylistMode::Triplet, _) => {
                return says(
                    "greylist",
                    format!(
                        "greylisting per triplet: the greeting is held {greeting}, and new \
                         triplets get 451 4.7.1 at RCPT"
                    ),
                );
            }
            _ => {}
        }
        let history = match f.pregreet_strikes {
            0 => String::new(),
            n => format!(
                "; it talked before the greeting {n} time{}",
                if n == 1 { "" } else { "s" }
            ),
        };
        let drop = if self.qmail.drop_pre_greet {
            ", a talker is dropped with 554"
        } else {
            ""
        };
        let clamp = match &f.clamped {
            Some(until) if until.is_empty() => "; its TCP window is clamped".to_string(),
            Some(until) => format!("; its TCP window is clamped {until}"),
            None => String::new(),
        };
        let log = match &f.dns {
            Dns::Listed {
                score,
                action: ListAction::Log,
                ..
            } => format!("; DNSBL score {score} is only logged (action log)"),
            _ => String::new(),
        };
        let auth = match &f.auth_note {
            Some(n) => format!(
                "; it authenticated{}, but helo.authenticated_once_per_day is off: a new session \
                 is tarpitted until it authenticates again",
                if n.is_empty() {
                    String::new()
                } else {
                    format!(" ({n})")
                }
            ),
            None => String::new(),
        };
        says(
            "tarpit",
            format!(
                "tarpitted like any client: greeting held {greeting}{drop}{history}{clamp}{log}{auth}"
            ),
        )
    }
}
