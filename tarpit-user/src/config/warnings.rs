//! Settings that are valid but hurt real senders.
//!
//! A hold is only a tarpit while the sender waits for it. RFC 5321
//! 4.5.3.2 gives the minimum time a client waits for each reply; a hold
//! that reaches it makes real senders give up (and retry, or bounce),
//! while bots never mind. These are warnings, not errors: a site may want
//! exactly that for its blacklist. `tarpit check-config` prints them and
//! the agent logs them at start and on reload.
//!
//! The hold of one reply is the longest of the holds that apply to it
//! (they overlap, see the policy's `Delay::max`), so a reply reaches its
//! timeout exactly when one of its holds does: each key is checked on its
//! own. Every hold is also capped by what is left of the session's budget
//! (`limits.max_total_delay`), and the greeting and EHLO holds every held
//! sender pays come out of it first.
use std::fmt;
use std::time::Duration;

use super::{Config, MAX_DELAY};

/// A setting that will cost real senders, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The dotted key path, as in configuration errors.
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A reply a sender waits for, and for how long at least.
#[derive(Debug, Clone, Copy)]
struct AwaitedReply {
    what: &'static str,
    timeout: Duration,
}

const fn minutes(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

/// RFC 5321 4.5.3.2.1.
const GREETING: AwaitedReply = AwaitedReply {
    what: "the greeting",
    timeout: minutes(5),
};
/// RFC 5321 names no EHLO timeout; senders use the greeting's 5 minutes
/// (Postfix's `smtp_helo_timeout` is 300s).
const EHLO: AwaitedReply = AwaitedReply {
    what: "EHLO",
    timeout: minutes(5),
};
/// RFC 5321 4.5.3.2.2.
const MAIL: AwaitedReply = AwaitedReply {
    what: "MAIL",
    timeout: minutes(5),
};
/// RFC 5321 4.5.3.2.3.
const RCPT: AwaitedReply = AwaitedReply {
    what: "RCPT",
    timeout: minutes(5),
};
/// RFC 5321 4.5.3.2.4: the 354 (or a 5xx) to DATA.
const DATA: AwaitedReply = AwaitedReply {
    what: "DATA",
    timeout: minutes(2),
};
/// RFC 5321 4.5.3.2.6. The end of data reaches the MTA only after its
/// hold, so the MTA's own time comes on top: reaching 10 minutes is enough
/// to lose the sender (and a sender that gives up here sends again).
const DATA_END: AwaitedReply = AwaitedReply {
    what: "the end of data",
    timeout: minutes(10),
};

/// Postfix's `smtpd_timeout` under stress (`${stress?{10}:{300}}s`): the
/// longest an MTA with the default may sit idle while the agent holds.
const STRESS_SMTPD_TIMEOUT: Duration = Duration::from_secs(10);

/// Enough to find the RCPT whose hold reaches 5 minutes for any sensible
/// `rcpt.delay`; a tiny delay with a tiny scaling never gets there anyway.
const MAX_RCPTS_EXAMINED: u32 = 1_000_000;

/// What a configuration makes senders wait, and the warnings.
pub fn warnings(c: &Config) -> Vec<Warning> {
    if !c.enabled {
        // A transparent proxy holds nothing.
        return Vec::new();
    }
    let budget = c.limits.max_total_delay;
    let greeting = c.greeting.delay.min(budget);
    let after_greeting = budget.saturating_sub(greeting);
    let helo = c.helo.delay.min(after_greeting);
    // The least a held sender has spent when its transaction starts.
    let after_helo = after_greeting.saturating_sub(helo);
    let rcpt = rcpt_holds(c, after_helo);

    let mut out = Vec::new();
    out.extend(hold_warning(
        "greeting.delay",
        c.greeting.delay,
        budget,
        "the greeting is",
        &[GREETING],
    ));
    out.extend(hold_warning(
        "helo.delay",
        c.helo.delay,
        after_greeting,
        "the reply to EHLO and HELO is",
        &[EHLO],
    ));
    if let Some(first) = rcpt.first_reaching {
        out.push(Warning {
            key: "rcpt.delay",
            message: format!(
                "from the {} RCPT of a session on, its reply is held {}{}, {}",
                ordinal(first.k),
                capped(first.held, first.uncapped),
                if c.rcpt.scaling > 1.0 {
                    " (rcpt.scaling)"
                } else {
                    ""
                },
                too_long(&[RCPT])
            ),
        });
    }
    out.extend(hold_warning(
        "reject.delay",
        c.reject.delay,
        after_greeting,
        "every 5xx reply is",
        &[EHLO, MAIL, RCPT, DATA, DATA_END],
    ));
    out.extend(hold_warning(
        "blacklist.delay",
        c.blacklist.delay,
        after_helo,
        "a blacklisted client's replies are",
        &[MAIL, RCPT, DATA, DATA_END],
    ));

    // The MTA sits idle between commands while the agent holds a reply.
    let longest = [
        helo,
        c.reject.delay.min(after_greeting),
        c.blacklist.delay.min(after_helo),
        rcpt.longest,
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let keepalive = c.backend.keepalive;
    if longest > STRESS_SMTPD_TIMEOUT {
        if keepalive.is_zero() {
            out.push(Warning {
                key: "backend.keepalive",
                message: format!(
                    "0 sends the MTA no NOOP during holds, and a hold between commands can \
                     last {}: an MTA with a shorter smtpd_timeout (Postfix's default is 10s \
                     under stress) drops the session meanwhile; give its listener for the \
                     agent a fixed smtpd_timeout above every hold (docs/mta-setup.md)",
                    fmt_duration(longest)
                ),
            });
        } else if keepalive >= STRESS_SMTPD_TIMEOUT {
            out.push(Warning {
                key: "backend.keepalive",
                message: format!(
                    "a NOOP every {} does not keep alive an MTA whose smtpd_timeout is 10s \
                     (Postfix's default under stress), and a hold between commands can last \
                     {}: use less than 10s (the default is 8s)",
                    fmt_duration(keepalive),
                    fmt_duration(longest)
                ),
            });
        }
    }
    out
}

/// The warning for a hold of `delay` on `replies`, within `room` (what the
/// budget has left when those replies come), if it reaches one's timeout.
fn hold_warning(
    key: &'static str,
    delay: Duration,
    room: Duration,
    subject: &str,
    replies: &[AwaitedReply],
) -> Option<Warning> {
    let held = delay.min(room);
    let reached: Vec<AwaitedReply> = replies
        .iter()
        .copied()
        .filter(|r| !held.is_zero() && held >= r.timeout)
        .collect();
    (!reached.is_empty()).then(|| Warning {
        key,
        message: format!(
            "{subject} held {}, {}",
            capped(held, delay),
            too_long(&reached)
        ),
    })
}

/// What the RCPT tarpit does to a sender that is not blacklisted.
#[derive(Debug, Default)]
struct RcptHolds {
    /// The longest RCPT hold within the budget.
    longest: Duration,
    /// The first RCPT whose hold reaches the RCPT timeout.
    first_reaching: Option<RcptHold>,
}

#[derive(Debug, Clone, Copy)]
struct RcptHold {
    /// The RCPT's number in the session (1-based).
    k: u32,
    /// Its hold, within the budget.
    held: Duration,
    /// Its hold by `rcpt.delay` and `rcpt.scaling` alone.
    uncapped: Duration,
}

/// Walks the delayed RCPTs of one session as the policy holds them (the
/// k-th past the threshold waits `delay * (1 + (k-1) * (scaling-1))`, at
/// most 600s), each paid out of what `room` has left, since pipelined or
/// not, each RCPT's hold follows the one before.
fn rcpt_holds(c: &Config, room: Duration) -> RcptHolds {
    let mut out = RcptHolds::default();
    if c.rcpt.delay.is_zero() {
        return out;
    }
    let mut left = room;
    for beyond in 0..MAX_RCPTS_EXAMINED {
        let factor = 1.0 + f64::from(beyond) * (c.rcpt.scaling - 1.0);
        let secs = (c.rcpt.delay.as_secs_f64() * factor).min(MAX_DELAY.as_secs_f64());
        let uncapped = Duration::from_secs_f64(secs);
        let held = uncapped.min(left);
        out.longest = out.longest.max(held);
        if out.first_reaching.is_none() && !held.is_zero() && held >= RCPT.timeout {
            out.first_reaching = Some(RcptHold {
                k: c.rcpt.threshold.saturating_add(beyond).saturating_add(1),
                held,
                uncapped,
            });
        }
        // Later RCPTs wait no longer once the budget runs out or the
        // delay stops growing.
        let grows = c.rcpt.scaling > 1.0 && uncapped < MAX_DELAY;
        if held < uncapped || !grows || out.first_reaching.is_some() {
            break;
        }
        left -= held;
    }
    out
}

/// "6m", or "3m 55s (what limits.max_total_delay leaves of 10m)".
fn capped(held: Duration, configured: Duration) -> String {
    if held < configured {
        format!(
            "{} (what limits.max_total_delay leaves of {})",
            fmt_duration(held),
            fmt_duration(configured)
        )
    } else {
        fmt_duration(held)
    }
}

/// "at least as long as senders wait for MAIL (5m) and DATA (2m) ...".
fn too_long(replies: &[AwaitedReply]) -> String {
    let items: Vec<String> = replies
        .iter()
        .map(|r| format!("{} ({})", r.what, fmt_duration(r.timeout)))
        .collect();
    let list = match items.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    format!(
        "at least as long as RFC 5321 4.5.3.2 has senders wait for the reply to {list}: \
         real senders give up there"
    )
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Whole milliseconds: the scaling makes odd nanoseconds nobody set.
fn fmt_duration(d: Duration) -> String {
    let ms = Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    humantime::format_duration(ms).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warned(text: &str) -> Vec<Warning> {
        Config::parse(text).unwrap().warnings()
    }

    fn only(text: &str, key: &str) -> String {
        let w = warned(text);
        assert_eq!(w.len(), 1, "{text}: {w:?}");
        assert_eq!(w[0].key, key, "{text}: {w:?}");
        w[0].to_string()
    }

    #[test]
    fn the_defaults_and_the_shipped_file_give_none() {
        assert_eq!(warned(""), vec![]);
        assert_eq!(warned(include_str!("../../../config/tarpit.toml")), vec![]);
    }

    #[test]
    fn display_is_key_then_message() {
        let w = Warning {
            key: "a.b",
            message: "c".into(),
        };
        assert_eq!(w.to_string(), "a.b: c");
    }

    #[test]
    fn a_blacklist_delay_past_5m_loses_mail_rcpt_and_data() {
        let m = only("[blacklist]\ndelay = \"6m\"\n", "blacklist.delay");
        assert!(m.contains("held 6m,"), "{m}");
        assert!(m.contains("MAIL (5m), RCPT (5m) and DATA (2m)"), "{m}");
        assert!(!m.contains("end of data"), "{m}");
        // 2 minutes: only the 354 to DATA.
        let m = only("[blacklist]\ndelay = \"2m\"\n", "blacklist.delay");
        assert!(m.contains("reply to DATA (2m)"), "{m}");
        assert!(!m.contains("MAIL"), "{m}");
        assert_eq!(warned("[blacklist]\ndelay = \"119s\"\n"), vec![]);
    }

    #[test]
    fn a_ten_minute_hold_reaches_the_end_of_data() {
        let m = only(
            "[blacklist]\ndelay = \"10m\"\n[limits]\nmax_total_delay = \"1h\"\n",
            "blacklist.delay",
        );
        assert!(m.contains("the end of data (10m)"), "{m}");
    }

    #[test]
    fn the_session_budget_caps_what_is_warned_about() {
        // 10m asked, but the default 15m budget less the 5s greeting
        // leaves the whole 10m: all four replies.
        let m = only("[blacklist]\ndelay = \"10m\"\n", "blacklist.delay");
        assert!(m.contains("the end of data"), "{m}");
        // A 4m budget: the greeting takes 5s, 3m55s is left, past DATA's
        // 2 minutes only; the message says the budget capped it.
        let m = only(
            "[blacklist]\ndelay = \"10m\"\n[limits]\nmax_total_delay = \"4m\"\n",
            "blacklist.delay",
        );
        assert!(
            m.contains("held 3m 55s (what limits.max_total_delay leaves of 10m)"),
            "{m}"
        );
        assert!(
            m.contains("reply to DATA (2m)") && !m.contains("MAIL"),
            "{m}"
        );
        // A budget under 2 minutes: no hold can reach any timeout.
        assert_eq!(
            warned("[blacklist]\ndelay = \"10m\"\n[limits]\nmax_total_delay = \"100s\"\n"),
            vec![]
        );
    }

    #[test]
    fn a_reject_delay_past_2m_loses_a_5xx_to_data() {
        let m = only("[reject]\ndelay = \"3m\"\n", "reject.delay");
        assert!(m.contains("every 5xx reply is held 3m"), "{m}");
        assert!(m.contains("reply to DATA (2m)"), "{m}");
        let m = only("[reject]\ndelay = \"5m\"\n", "reject.delay");
        assert!(
            m.contains("EHLO (5m), MAIL (5m), RCPT (5m) and DATA (2m)"),
            "{m}"
        );
    }

    #[test]
    fn greeting_and_helo_delays_of_5m_lose_the_sender() {
        let m = only("[greeting]\ndelay = \"5m\"\n", "greeting.delay");
        assert!(m.contains("the greeting (5m)"), "{m}");
        let m = only("[helo]\ndelay = \"5m\"\n", "helo.delay");
        assert!(m.contains("EHLO (5m)"), "{m}");
        assert_eq!(warned("[greeting]\ndelay = \"299s\"\n"), vec![]);
    }

    #[test]
    fn a_scaled_rcpt_delay_names_the_rcpt_that_reaches_5m() {
        // 60s, scaling 2: the 6th RCPT (1st delayed) waits 60s, the 7th
        // 120s, the 8th 180s, the 9th 240s, the 10th 300s.
        let text = "[rcpt]\nthreshold = 5\ndelay = \"60s\"\nscaling = 2.0\n\
                    [limits]\nmax_total_delay = \"1h\"\n";
        let m = only(text, "rcpt.delay");
        assert!(m.contains("from the 10th RCPT"), "{m}");
        assert!(m.contains("held 5m (rcpt.scaling)"), "{m}");
        // With the default 15m budget, 60+120+180+240 = 10m are spent
        // first: the 10th RCPT gets what is left of 14m55s, 4m55s.
        let text = "[rcpt]\nthreshold = 5\ndelay = \"60s\"\nscaling = 2.0\n";
        assert_eq!(warned(text), vec![]);
        // Flat: every delayed RCPT or none.
        let m = only("[rcpt]\ndelay = \"5m\"\n", "rcpt.delay");
        assert!(m.contains("from the 6th RCPT"), "{m}");
    }

    #[test]
    fn keepalive_off_with_long_holds_is_warned() {
        let m = only("[backend]\nkeepalive = \"0s\"\n", "backend.keepalive");
        // The default blacklist delay is the longest hold.
        assert!(m.contains("can last 1m"), "{m}");
        // No hold over 10s: nothing to keep alive.
        let quiet = "[backend]\nkeepalive = \"0s\"\n[blacklist]\ndelay = \"10s\"\n\
                     [rcpt]\ndelay = \"10s\"\n";
        assert_eq!(warned(quiet), vec![]);
    }

    #[test]
    fn a_keepalive_of_10s_or_more_is_warned() {
        let m = only("[backend]\nkeepalive = \"10s\"\n", "backend.keepalive");
        assert!(m.contains("a NOOP every 10s"), "{m}");
        assert_eq!(warned("[backend]\nkeepalive = \"9s\"\n"), vec![]);
    }

    #[test]
    fn a_disabled_tarpit_holds_nothing() {
        assert_eq!(
            warned(
                "enabled = false\n[blacklist]\ndelay = \"10m\"\n[backend]\nkeepalive = \"0s\"\n"
            ),
            vec![]
        );
    }

    #[test]
    fn warnings_come_in_the_order_of_the_file() {
        let keys: Vec<_> = warned(
            "[greeting]\ndelay = \"5m\"\n[rcpt]\ndelay = \"5m\"\n[reject]\ndelay = \"5m\"\n\
             [blacklist]\ndelay = \"5m\"\n[limits]\nmax_total_delay = \"1h\"\n",
        )
        .into_iter()
        .map(|w| w.key)
        .collect();
        assert_eq!(
            keys,
            [
                "greeting.delay",
                "rcpt.delay",
                "reject.delay",
                "blacklist.delay"
            ]
        );
    }

    #[test]
    fn ordinals() {
        let got: Vec<_> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .map(ordinal)
            .into();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }
}
