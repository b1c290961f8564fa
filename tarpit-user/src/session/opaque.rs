//! Sessions the agent relays without reading them: STARTTLS relayed to
//! the MTA (the agent has no certificate), and implicit-TLS ports (465).
//!
//! On an implicit-TLS port the client speaks TLS first. With a certificate
//! the agent terminates TLS itself (after the greeting delay) and the
//! session is relayed like any other, every policy but the pre-greet check
//! included; without one, the client's TLS session is with the MTA's
//! wrapper-mode listener (`backend.implicit_tls_addr`), introduced by the
//! PROXY header, and the agent passes the bytes through without waiting
//! for a banner it could not read.
use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tracing::{debug, warn};

use super::{NO_SERVICE, Shared, say_and_close};
use crate::backend::Backend;
use crate::config::MtaAddr;
use crate::metrics::Outcome;
use crate::smtp::Reply;
use crate::tls::ClientStream;

/// Read size of each direction of an opaque relay.
const CHUNK: usize = 16 * 1024;

/// The start of an implicit-TLS session, once the greeting delay is over:
/// the client stream (in TLS when the agent terminates it), the MTA, and
/// the MTA's banner when there is one to relay.
pub(super) async fn implicit_tls(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(ClientStream, Backend, Option<Reply>), Outcome> {
    let Some(acceptor) = &shared.tls else {
        let addr = shared
            .backend
            .implicit_tls_addr
            .map(MtaAddr::Tcp)
            .unwrap_or_else(|| shared.backend.addr.clone());
        return match Backend::open_opaque(&shared.backend, &addr, peer, local).await {
            Ok(b) => Ok((ClientStream::Plain(stream), b, None)),
            Err(e) => {
                // The client waits for a TLS handshake: no words it could read.
                warn!(client = %peer, "{e}");
                shared.metrics.backend_error(e.kind());
                Err(Outcome::BackendError)
            }
        };
    };
    let client = match timeout(
        shared.limits.idle,
        ClientStream::Plain(stream).upgrade(acceptor),
    )
    .await
    {
        Ok(Ok(c)) => c,
        _ => {
            debug!(client = %peer, "implicit TLS handshake failed");
            return Err(Outcome::ClientError);
        }
    };
    let mut client = client;
    match Box::pin(super::connect::open(shared, peer, local)).await {
        Ok((backend, banner)) => Ok((client, backend, Some(banner))),
        Err(e) => {
            warn!(client = %peer, "{e}");
            shared.metrics.backend_error(e.kind());
            say_and_close(&mut client, NO_SERVICE).await;
            Err(Outcome::BackendError)
        }
    }
}

/// Relays the rest of a session without looking at it, until both sides
/// have closed or neither has sent anything for `limits.idle`; a write
/// that blocks longer than its timeout ends it too.
pub(super) async fn passthrough(
    shared: &Shared,
    client: &mut ClientStream,
    backend: &mut Backend,
    to_client: Bytes,
) -> Outcome {
    shared.metrics.starttls_passthrough_total.inc();
    let write_limit = shared.backend.write_timeout;
    if !to_client.is_empty()
        && !matches!(
            timeout(write_limit, client.write_all(&to_client)).await,
            Ok(Ok(()))
        )
    {
        return Outcome::ClientError;
    }
    let mut up = vec![0u8; CHUNK];
    let mut down = vec![0u8; CHUNK];
    let (mut client_open, mut backend_open) = (true, true);
    let idle = shared.limits.idle;
    let shutdown = &shared.shutdown;
    while client_open || backend_open {
        tokio::select! {
            r = client.read(&mut up), if client_open => match r {
                Ok(0) | Err(_) => {
                    client_open = false;
                    let _ = timeout(write_limit, backend.stream.shutdown()).await;
                }
                Ok(n) => {
                    if backend.send(&up[..n], write_limit).await.is_err() {
                        return Outcome::BackendError;
                    }
                }
            },
            r = backend.stream.read(&mut down), if backend_open => match r {
                Ok(0) | Err(_) => {
                    backend_open = false;
                    let _ = timeout(write_limit, client.shutdown()).await;
                }
                Ok(n) => {
                    if !matches!(timeout(write_limit, client.write_all(&down[..n])).await, Ok(Ok(()))) {
                        return Outcome::ClientError;
                    }
                }
            },
            _ = sleep(idle) => {
                shared.metrics.limit_refused("idle");
                return Outcome::Idle;
            }
            _ = shutdown.closing() => return Outcome::Shutdown,
        }
    }
    Outcome::Passthrough
}
