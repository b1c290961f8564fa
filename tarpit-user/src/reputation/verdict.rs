//! What the session gets back from the DNS checks: the [`DnsVerdict`] of
//! one client, and the [`ReputationHandle`] it waits on (never past the
//! deadline set at connect). Apart from the look-ups so that the rules a
//! verdict implies (allow lists win, the reject wording) read on their own.
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::dnsbl::{Hit, ListAction};
use crate::policy::Dns;

/// Everything DNS said about one client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsVerdict {
    /// Combined DNSBL/DNSWL score.
    pub score: i32,
    /// The sites that counted.
    pub hits: Vec<Hit>,
    /// Set when the score reached `dnsbl.threshold`: what to do.
    pub listed: Option<ListAction>,
    /// The score reached `dnswl.threshold`: exempt like an allow-listed IP.
    pub dnswl: bool,
    /// A forward-confirmed PTR name on the host-name allow list.
    pub allow_host: Option<String>,
    /// False when a lookup failed or timed out (then "not listed").
    pub complete: bool,
    /// Served by the temporary allow cache, without a query.
    pub from_allow_cache: bool,
}

impl DnsVerdict {
    /// The verdict as the policy's facts (`policy::Dns`): what the
    /// agent's sessions and `tarpit ip` hand to the one precedence.
    pub fn facts(&self) -> Dns {
        if self.exempt() {
            return Dns::Allowed(match &self.allow_host {
                Some(host) => format!("forward-confirmed name {host} on allow.hosts"),
                None => format!("DNSWL score {}", self.score),
            });
        }
        match self.listed {
            Some(action) => Dns::Listed {
                score: self.score,
                action,
                reply: self.reject_reply(),
            },
            None => Dns::Clean,
        }
    }

    /// A client no DNS rule applies to (no lists configured, or DNS gave
    /// nothing in time).
    pub(super) fn clean(complete: bool) -> DnsVerdict {
        DnsVerdict {
            complete,
            ..Default::default()
        }
    }

    /// Allow-listed by DNSWL or by host name: never tarpitted, never
    /// greylisted.
    pub fn exempt(&self) -> bool {
        self.dnswl || self.allow_host.is_some()
    }

    /// The action to take, if any: none for exempt clients (an allow list
    /// wins over a block list, as in SecurityGateway).
    pub fn action(&self) -> Option<ListAction> {
        if self.exempt() { None } else { self.listed }
    }

    /// The reply for the `reject` action, naming the lists (postscreen's
    /// wording, an RFC 3463 code for "delivery not authorized").
    pub fn reject_reply(&self) -> String {
        let lists: Vec<&str> = self
            .hits
            .iter()
            .filter(|h| h.weight > 0)
            .map(|h| h.domain.as_str())
            .collect();
        format!(
            "554 5.7.1 Service unavailable; client blocked using {}",
            if lists.is_empty() {
                "DNSBL".to_string()
            } else {
                lists.join(", ")
            }
        )
    }
}

/// One client's checks in flight; the verdict is awaited at most until
/// the deadline set at connect.
pub struct ReputationHandle {
    pub(super) rx: Option<oneshot::Receiver<DnsVerdict>>,
    pub(super) deadline: Instant,
    pub(super) verdict: Option<DnsVerdict>,
}

impl ReputationHandle {
    /// The verdict, waiting for it at most until `dns.timeout` after
    /// connect. Later calls return the same verdict at once. Cancel-safe:
    /// dropped while waiting (another `select!` branch won), it loses
    /// nothing, and a later call waits on.
    pub async fn verdict(&mut self) -> &DnsVerdict {
        if self.verdict.is_none() {
            let v = match self.rx.as_mut() {
                // The task keeps the same deadline; the grace only covers
                // scheduling, so a stuck task cannot hold the session.
                Some(rx) => {
                    match tokio::time::timeout_at(self.deadline + Duration::from_millis(100), rx)
                        .await
                    {
                        Ok(Ok(v)) => v,
                        _ => DnsVerdict::clean(false),
                    }
                }
                None => DnsVerdict::clean(false),
            };
            self.rx = None;
            self.verdict = Some(v);
        }
        self.verdict.get_or_insert_with(|| DnsVerdict::clean(false))
    }

    /// The verdict if it is already known, without waiting.
    pub fn try_verdict(&mut self) -> Option<&DnsVerdict> {
        if self.verdict.is_none()
            && let Some(rx) = self.rx.as_mut()
            && let Ok(v) = rx.try_recv()
        {
            self.rx = None;
            self.verdict = Some(v);
        }
        self.verdict.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn verdict_survives_a_cancelled_wait() {
        let (tx, rx) = oneshot::channel();
        let mut h = ReputationHandle {
            rx: Some(rx),
            deadline: Instant::now() + Duration::from_secs(5),
            verdict: None,
        };
        // Another branch wins first (the greeting delay ends).
        tokio::select! {
            _ = h.verdict() => panic!("no verdict yet"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let listed = DnsVerdict {
            score: 3,
            listed: Some(ListAction::Delay),
            complete: true,
            ..Default::default()
        };
        tx.send(listed.clone()).unwrap();
        assert_eq!(h.verdict().await, &listed);
        assert_eq!(h.try_verdict(), Some(&listed));
    }

    #[tokio::test(start_paused = true)]
    async fn verdict_wait_is_bounded_by_the_deadline() {
        let (_tx, rx) = oneshot::channel::<DnsVerdict>();
        let start = Instant::now();
        let mut h = ReputationHandle {
            rx: Some(rx),
            deadline: start + Duration::from_secs(5),
            verdict: None,
        };
        let v = h.verdict().await.clone();
        assert!(!v.complete && v.listed.is_none());
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5100));
    }

    #[test]
    fn allow_lists_win_over_block_lists_and_reply_names_lists() {
        let v = DnsVerdict {
            score: 3,
            hits: vec![
                Hit {
                    domain: "bl.test".into(),
                    spec: "bl.test*3".into(),
                    weight: 3,
                },
                Hit {
                    domain: "wl.test".into(),
                    spec: "wl.test*-1".into(),
                    weight: -1,
                },
            ],
            listed: Some(ListAction::Reject),
            ..Default::default()
        };
        assert_eq!(v.action(), Some(ListAction::Reject));
        assert_eq!(
            v.reject_reply(),
            "554 5.7.1 Service unavailable; client blocked using bl.test"
        );
        let allowed = DnsVerdict {
            allow_host: Some("mx.partner.example".into()),
            ..v
        };
        assert!(allowed.exempt());
        assert_eq!(allowed.action(), None);
    }
}
