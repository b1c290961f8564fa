//! The talker's fast path as the server takes it: a socket accepted
//! outside the runtime's reactor, a talker answered at open (not parked),
//! the 554 written straight on the socket or, when the send buffer cannot
//! take it, through the runtime. IPv4 and IPv6 loopback.
use std::io::{ErrorKind, Write};

use super::*;

/// A connected pair: the client (tokio) and the server's side as the
/// server accepts it (a non-blocking std socket), with their addresses.
/// `None` when the family has no loopback here (IPv6 off).
async fn pair(bind: &str) -> Option<(TcpStream, std::net::TcpStream, SocketAddr, SocketAddr)> {
    let l = TcpListener::bind(bind).await.ok()?;
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, peer) = l.accept().await.unwrap();
    let local = server.local_addr().unwrap();
    let server = server.into_std().unwrap();
    // Loopback is internal by default; pretend the peer is a remote client.
    let remote = if peer.is_ipv4() {
        "198.51.100.9"
    } else {
        "fd5b:1e00::9"
    };
    let peer = SocketAddr::new(remote.parse().unwrap(), peer.port());
    Some((client, server, peer, local))
}

/// Waits until the server's side has bytes or news to read.
fn wait_readable(s: &std::net::TcpStream) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while super::super::park::peek(s).is_none() {
        assert!(std::time::Instant::now() < deadline, "nothing arrived");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

async fn read_to_end(c: &mut TcpStream) -> String {
    let mut got = Vec::new();
    // A reset after the reply (the talker's bytes were never read) ends
    // the read too; what came before it counts.
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_talker_seen_at_open_gets_554_at_once_v4_and_v6() {
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let Some((mut c, server, peer, local)) = pair(bind).await else {
            continue;
        };
        let mta = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared = shared(HOLD_30S, mta.local_addr().unwrap());
        c.write_all(b"EHLO bot\r\n").await.unwrap();
        wait_readable(&server);
        let state = classify(&shared, peer, local);
        // Not parked: the 30 s delay does not apply to it.
        match open(&shared, server, peer, local, state).await {
            Opened::Done(o) => assert_eq!(o, Outcome::PreGreet, "{bind}"),
            Opened::Held(..) => panic!("{bind}: a talker was parked"),
        }
        let r = read_to_end(&mut c).await;
        assert!(r.starts_with("554 "), "{bind}: {r}");
        assert!(r.ends_with("\r\n"), "{bind}: {r}");
        assert_eq!(shared.metrics.pregreet_total.get(), 1, "{bind}");
        assert_eq!(shared.metrics.drops_554_total.get(), 1, "{bind}");
    }
}

#[tokio::test]
async fn a_silent_client_is_parked_and_one_that_reset_ends_at_once() {
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let Some((c, server, peer, local)) = pair(bind).await else {
            continue;
        };
        let shared = shared(HOLD_30S, "127.0.0.1:9".parse().unwrap());
        let state = classify(&shared, peer, local);
        let Opened::Held(_server, greeting) = open(&shared, server, peer, local, state).await
        else {
            panic!("{bind}: a silent client was not held");
        };
        assert!(greeting.deadline() > Instant::now(), "{bind}");
        drop(c);

        // Talks, then resets before the agent looks (SO_LINGER 0).
        let Some((mut c, server, peer, local)) = pair(bind).await else {
            continue;
        };
        c.write_all(b"EHLO bot\r\n").await.unwrap();
        let c = c.into_std().unwrap();
        socket2::SockRef::from(&c)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(c);
        wait_readable(&server);
        let state = classify(&shared, peer, local);
        match open(&shared, server, peer, local, state).await {
            // Its bytes may still be read before the reset is: judged, and
            // the 554 goes nowhere; or the reset is seen first.
            Opened::Done(Outcome::PreGreet) => {}
            Opened::Done(Outcome::ClientError | Outcome::ClientClosed) => {}
            Opened::Done(o) => panic!("{bind}: {o:?}"),
            Opened::Held(..) => panic!("{bind}: a reset client was parked"),
        }
    }
}

#[tokio::test]
async fn a_reply_the_send_buffer_cannot_take_goes_out_through_the_runtime() {
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let Some((mut c, server, _, _)) = pair(bind).await else {
            continue;
        };
        // A client that does not read: fill what it and the agent buffer.
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let junk = [b'x'; 4096];
        let mut sent = 0usize;
        loop {
            match (&server).write(&junk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{bind}: {e}"),
            }
        }
        let reply = b"554 5.7.1 talk later\r\n";
        let closing = tokio::spawn(say_and_close_std(server, reply));
        let r = read_to_end(&mut c).await;
        closing.await.unwrap();
        assert_eq!(r.len(), sent + reply.len(), "{bind}");
        assert!(r.ends_with("554 5.7.1 talk later\r\n"), "{bind}");
    }
}
