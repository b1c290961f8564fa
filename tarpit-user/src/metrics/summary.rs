//! The one summary line per session, postscreen-style:
//!
//! ```text
//! INFO tarpit::session: session client=198.51.100.7 helo="bot.example" rcpts=12 delays="greeting 5s, rcpt 7x10s" delay_s=75.0 outcome="quit"
//! ```
//!
//! What a session did is gathered in a tally while it runs (the HELO name,
//! recipients, each hold and its reason: the session reports them through
//! its metrics handle, `Metrics::helo`, `rcpt`, `delayed`), and written by
//! [`write`] once it ended, whatever the path it took (pre-greet drop,
//! limit, QUIT, error). The server gives each session its tally with
//! [`scope`]: a task-local scoped to that session's future, so no session
//! sees another's and none reaches a process-wide value. The line goes through `session_summary!`, so it is rate-limited
//! with the other per-session lines under a flood.
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// What one session did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    pub helo: Option<String>,
    pub rcpts: u32,
    /// Per reason: holds and their total, in first-seen order.
    pub delays: Vec<(&'static str, u32, Duration)>,
}

impl Tally {
    pub fn total_delay(&self) -> Duration {
        self.delays.iter().map(|(_, _, d)| *d).sum()
    }

    /// "greeting 5s, rcpt 3x10s" (equal holds) or "rcpt 3 holds 45s".
    pub fn delays_text(&self) -> String {
        Delays(&self.delays).to_string()
    }
}

/// [`Tally::delays_text`] as a `Display`: formatted only when the summary
/// line is written, not for a line the rate limit drops (a flood of
/// pre-greet talkers).
struct Delays<'a>(&'a [(&'static str, u32, Duration)]);

impl std::fmt::Display for Delays<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, (reason, n, total)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let total_s = total.as_secs_f64();
            if *n == 1 {
                write!(f, "{reason} {}", Secs(total_s))?;
            } else if total.as_nanos() % u128::from(*n) == 0 {
                write!(f, "{reason} {n}x{}", Secs(total_s / f64::from(*n)))?;
            } else {
                write!(f, "{reason} {n} holds {}", Secs(total_s))?;
            }
        }
        Ok(())
    }
}

struct Secs(f64);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        if s.fract() == 0.0 {
            write!(f, "{s:.0}s")
        } else {
            write!(f, "{s:.1}s")
        }
    }
}

tokio::task_local! {
    static TALLY: RefCell<Tally>;
}

/// Runs a session with a fresh tally; returns its result and the tally.
pub async fn scope<F: Future>(session: F) -> (F::Output, Tally) {
    scope_from(Tally::default(), session).await
}

/// Runs the rest of a session that began in another task (a client parked
/// in the greeting delay) on with the tally it had there.
pub async fn scope_from<F: Future>(tally: Tally, session: F) -> (F::Output, Tally) {
    TALLY
        .scope(RefCell::new(tally), async {
            let out = session.await;
            let tally = TALLY.with(|t| t.take());
            (out, tally)
        })
        .await
}

fn with(f: impl FnOnce(&mut Tally)) {
    // Outside a session scope (unit tests of other modules): nothing to do.
    let _ = TALLY.try_with(|t| f(&mut t.borrow_mut()));
}

/// The client said HELO/EHLO (the last one counts). Kept short: it is the
/// client's text.
pub(super) fn helo(name: &str) {
    let name: String = name.chars().take(64).collect();
    with(|t| t.helo = Some(name));
}

/// The client sent a RCPT.
pub(super) fn rcpt() {
    with(|t| t.rcpts += 1);
}

/// A reply was held `d` for `reason`.
pub(super) fn delayed(reason: &'static str, d: Duration) {
    with(
        |t| match t.delays.iter_mut().find(|(r, _, _)| *r == reason) {
            Some((_, n, total)) => {
                *n += 1;
                *total += d;
            }
            None => t.delays.push((reason, 1, d)),
        },
    );
}

/// Writes the summary line. Client-provided text goes out Debug-quoted,
/// so a HELO name cannot forge log lines.
pub fn write(client: SocketAddr, tally: &Tally, outcome: &str) {
    crate::session_summary!(
        client = %client.ip(),
        port = client.port(),
        helo = ?tally.helo.as_deref().unwrap_or("-"),
        rcpts = tally.rcpts,
        delays = %Delays(&tally.delays),
        delay_s = tally.total_delay().as_secs_f64(),
        outcome,
        "session"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tally_collects_inside_the_scope_only() {
        helo("outside"); // no scope: ignored
        let ((), t) = scope(async {
            helo("first.example");
            helo("client.example");
            rcpt();
            rcpt();
            delayed("greeting", Duration::from_secs(5));
            delayed("rcpt", Duration::from_secs(10));
            delayed("rcpt", Duration::from_secs(10));
            tokio::task::yield_now().await;
            delayed("rcpt", Duration::from_secs(10));
        })
        .await;
        assert_eq!(t.helo.as_deref(), Some("client.example"));
        assert_eq!(t.rcpts, 2);
        assert_eq!(t.total_delay(), Duration::from_secs(35));
        assert_eq!(t.delays_text(), "greeting 5s, rcpt 3x10s");
    }

    #[tokio::test]
    async fn a_parked_session_counts_both_halves_in_one_tally() {
        let parked = Tally {
            delays: vec![("greeting", 1, Duration::from_secs(300))],
            ..Tally::default()
        };
        let ((), t) = scope_from(parked, async {
            helo("client.example");
            rcpt();
            rcpt();
            rcpt();
            delayed("rcpt", Duration::from_secs(10));
            delayed("greeting", Duration::from_secs(1));
            delayed("rcpt", Duration::from_secs(10));
        })
        .await;
        assert_eq!(t.helo.as_deref(), Some("client.example"));
        assert_eq!(t.rcpts, 3);
        assert_eq!(
            t.delays,
            vec![
                ("greeting", 2, Duration::from_secs(301)),
                ("rcpt", 2, Duration::from_secs(20)),
            ]
        );
        assert_eq!(t.delays_text(), "greeting 2x150.5s, rcpt 2x10s");
    }

    #[test]
    fn delays_text_forms() {
        let mut t = Tally::default();
        assert_eq!(t.delays_text(), "none");
        t.delays.push(("rcpt", 3, Duration::from_secs(45)));
        t.delays.push(("reject", 1, Duration::from_millis(1500)));
        assert_eq!(t.delays_text(), "rcpt 3x15s, reject 1.5s");
        t.delays[0].2 = Duration::from_secs(46);
        assert_eq!(t.delays_text(), "rcpt 3 holds 46s, reject 1.5s");
    }

    #[tokio::test]
    async fn long_helo_is_cut() {
        let ((), t) = scope(async { helo(&"x".repeat(500)) }).await;
        assert_eq!(t.helo.unwrap().len(), 64);
    }
}
