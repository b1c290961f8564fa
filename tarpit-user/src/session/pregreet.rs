//! Pre-greet: a client that talks before the banner. The verdict comes
//! from the pre-greet source (`Ports::pregreet`: the kernel's per-flow
//! flag, or the agent's own socket); what follows is the policy's
//! (`Event::TalkedFirst`: a held 554, then close).
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::{Duration, timeout};
use tracing::info;

use super::{Shared, say_and_close_std};
use crate::metrics::Outcome;
use crate::policy::ports::{Offence, Talk};
use crate::policy::{Event, SessionState};

/// Asks the verdict source just before the banner goes out.
pub(super) async fn talked_first(
    shared: &Shared,
    stream: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    seen: bool,
) -> Talk {
    let mut probe = [0u8; 1];
    // One poll of the socket: data already there counts, nothing waits.
    let seen = seen
        || matches!(
            timeout(Duration::ZERO, stream.peek(&mut probe)).await,
            Ok(Ok(n)) if n > 0
        );
    shared.ports.pregreet.talked_first(peer, local, seen)
}

/// [`answer`] for a socket in the runtime's reactor (talk seen after the
/// DNS gate or the MTA's connect: rare).
pub(super) async fn answer_registered(
    shared: &Shared,
    state: &mut SessionState,
    stream: TcpStream,
    peer: SocketAddr,
    talk: Talk,
) -> Outcome {
    match stream.into_std() {
        Ok(s) => answer(shared, state, s, peer, talk).await,
        // Not seen in practice; the client is not answered, but its talk
        // still counts.
        Err(_) => {
            if talk == Talk::Unstruck {
                shared.ports.offences.offence(peer.ip(), Offence::PreGreet);
            }
            shared.metrics.pregreet_total.inc();
            Outcome::PreGreet
        }
    }
}

/// Answers a client that talked first as the policy says, and closes.
/// Talk the kernel did not strike (`Talk::Unstruck`) is reported as an
/// offence here, so it counts toward a block all the same. The socket is
/// outside the runtime's reactor: the reply is written straight on it
/// (`say_and_close_std`).
pub(super) async fn answer(
    shared: &Shared,
    state: &mut SessionState,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    talk: Talk,
) -> Outcome {
    shared.metrics.pregreet_total.inc();
    if talk == Talk::Unstruck {
        shared.ports.offences.offence(peer.ip(), Offence::PreGreet);
    }
    info!(client = %peer, "pre-greet talk: 554 and close");
    let action = shared.policy.decide(state, Event::TalkedFirst);
    if let Some(d) = action.hold {
        shared.metrics.delayed(d.reason, d.duration);
        tokio::select! {
            _ = tokio::time::sleep(d.duration) => {}
            _ = shared.shutdown.draining() => {}
        }
    }
    if let Some(mut text) = action.reply {
        text.push_str("\r\n");
        say_and_close_std(stream, text.as_bytes()).await;
    }
    shared.metrics.drops_554_total.inc();
    Outcome::PreGreet
}
