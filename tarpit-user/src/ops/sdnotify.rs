//! systemd's readiness protocol (`sd_notify(3)`): one datagram per state
//! change to the socket named by `$NOTIFY_SOCKET`.
//!
//! With `Type=notify` systemd considers the agent started only once it says
//! `READY=1` (after the programs are attached and the ports are open), shows
//! a reload as running between `RELOADING=1` and the next `READY=1`, and
//! with `WatchdogSec=` restarts it if the `WATCHDOG=1` pings stop - which
//! they do when the async runtime is wedged, since they are sent from it.
//! Outside systemd (no `$NOTIFY_SOCKET`) every call does nothing.
//!
//! The vocabulary ([`NotifyState`]), the monotonic clock a reload carries
//! and the watchdog's `$WATCHDOG_USEC`/`$WATCHDOG_PID` come from the
//! `sd-notify` crate. The datagram itself is sent here, because
//! `sd_notify::notify` (0.5) cannot do two things the agent does: reach an
//! abstract socket (`$NOTIFY_SOCKET` starting with `@`, as container
//! managers hand out), and send the states joined by newlines without a
//! trailing one (`WATCHDOG=1`, byte for byte, as libsystemd sends it and as
//! the end-to-end test expects).
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

pub use sd_notify::NotifyState;
use tracing::debug;

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    Path(PathBuf),
    /// Linux abstract socket (`$NOTIFY_SOCKET` starting with `@`).
    Abstract(Vec<u8>),
}

/// A handle on the notification socket; `None` inside = not under systemd.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    addr: Option<NotifyAddr>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let addr = std::env::var_os("NOTIFY_SOCKET").and_then(|v| parse_addr(v.as_encoded_bytes()));
        Notifier { addr }
    }

    pub fn new(addr: NotifyAddr) -> Notifier {
        Notifier { addr: Some(addr) }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// Sends `states` in one datagram. Ok(false) when there is no socket.
    pub fn notify(&self, states: &[NotifyState<'_>]) -> io::Result<bool> {
        let Some(addr) = &self.addr else {
            return Ok(false);
        };
        let msg = states
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let sock = UnixDatagram::unbound()?;
        let addr = match addr {
            NotifyAddr::Path(p) => SocketAddr::from_pathname(p)?,
            NotifyAddr::Abstract(name) => SocketAddr::from_abstract_name(name)?,
        };
        if sock.send_to_addr(msg.as_bytes(), &addr)? != msg.len() {
            return Err(io::Error::other("short write to NOTIFY_SOCKET"));
        }
        debug!(target: "tarpit::ops", state = %msg.replace('\n', " "), "sd_notify");
        Ok(true)
    }

    /// Startup finished: ports open, programs attached, privileges dropped.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload began; systemd (v253 on) wants the monotonic time with it.
    pub fn reloading(&self) {
        let now = NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0));
        self.send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading the configuration"),
        ]);
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining sessions"),
        ]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Failures to notify are logged, never fatal: the agent's work matters
    /// more than systemd's view of it.
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = self.notify(states) {
            tracing::warn!(target: "tarpit::ops", "cannot notify systemd: {e}");
        }
    }
}

fn parse_addr(raw: &[u8]) -> Option<NotifyAddr> {
    match raw {
        [] => None,
        [b'@', rest @ ..] => Some(NotifyAddr::Abstract(rest.to_vec())),
        [b'/', ..] => {
            let s = std::str::from_utf8(raw).ok()?;
            Some(NotifyAddr::Path(PathBuf::from(s)))
        }
        // vsock and other forms are for VMs, not for us
        _ => None,
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is set
/// (and not zero) for this process (`$WATCHDOG_PID` absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_addresses() {
        assert_eq!(
            parse_addr(b"/run/systemd/notify"),
            Some(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_addr(b"@/org/x"),
            Some(NotifyAddr::Abstract(b"/org/x".to_vec()))
        );
        assert_eq!(parse_addr(b""), None);
        assert_eq!(parse_addr(b"vsock:2:1"), None);
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("tarpit-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(NotifyAddr::Path(path.clone()));
        n.ready("serving");
        n.reloading();
        n.stopping();
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = server.recv(&mut buf).unwrap();
            got.push(String::from_utf8(buf[..len].to_vec()).unwrap());
        }
        assert_eq!(got[0], "READY=1\nSTATUS=serving");
        assert!(
            got[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{}",
            got[1]
        );
        let usec: u64 = got[1].lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert!(got[2].starts_with("STOPPING=1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("tarpit-test-notify-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::new(NotifyAddr::Abstract(name.into_bytes()));
        assert!(n.notify(&[NotifyState::Watchdog]).unwrap());
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn without_socket_nothing_happens() {
        let n = Notifier::default();
        assert!(!n.enabled());
        assert!(!n.notify(&[NotifyState::Ready]).unwrap());
    }
}
