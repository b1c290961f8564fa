//! The kernel's rare events as an async stream (ring buffer + tokio
//! `AsyncFd`). One reader at a time: the agent.
use std::io;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use tarpit_common::{
    Event, IpAddrKey,
    events::{
        EVENT_BLOCK_HIT, EVENT_F_TEASER, EVENT_FLOW_TABLE_FULL, EVENT_IP_TABLE_FULL, EVENT_PREGREET,
    },
    maps as names,
};
use tokio::io::{Interest, unix::AsyncFd};

use super::{clock::BootInstant, error::KernelError};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The client talked before the server's greeting.
    PreGreet { teaser: bool },
    /// A sample of XDP block-list drops: `count` drops of `reason` so far
    /// on the CPU that sent it.
    BlockHit { reason: u32, count: u64 },
    /// The flow table refused a new flow (pre-greet detection degrades to
    /// "unknown" for it).
    FlowTableFull,
    /// The per-address map refused an entry.
    IpTableFull,
    /// A kind this version does not know.
    Other(u32),
}

/// One event, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEvent {
    pub at: BootInstant,
    pub kind: EventKind,
    /// The client.
    pub addr: IpAddr,
    pub client_port: u16,
    pub server_port: u16,
    /// The server address of the flow (pre-greet only).
    pub server: Option<IpAddr>,
}

impl KernelEvent {
    /// Decodes one ring-buffer record; `None` for a record of the wrong size.
    pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is repr(C) plain data valid for every bit pattern;
        // read_unaligned copes with any alignment of the record.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = match e.kind {
            EVENT_PREGREET => EventKind::PreGreet {
                teaser: e.flags & EVENT_F_TEASER != 0,
            },
            EVENT_BLOCK_HIT => EventKind::BlockHit {
                reason: e.flags,
                count: e.value,
            },
            EVENT_FLOW_TABLE_FULL => EventKind::FlowTableFull,
            EVENT_IP_TABLE_FULL => EventKind::IpTableFull,
            other => EventKind::Other(other),
        };
        let server = (e.server != IpAddrKey::default()).then(|| IpAddr::from(e.server));
        Some(KernelEvent {
            at: BootInstant(e.ts_ns),
            kind,
            addr: IpAddr::from(e.addr),
            client_port: e.client_port,
            server_port: e.server_port,
            server,
        })
    }
}

/// Reads events as they come. Must be created inside a tokio runtime.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    /// Opens the pinned ring buffer of `pin_path`.
    pub fn open(pin_path: &Path) -> Result<EventStream, KernelError> {
        let p = pin_path.join(names::EVENTS);
        if !p.exists() {
            return Err(KernelError::NoMaps {
                path: pin_path.to_owned(),
            });
        }
        let data = MapData::from_pin(&p)
            .map_err(|e| KernelError::from_map(format!("cannot open {}", p.display()), e, None))?;
        let map = Map::from_map_data(data)
            .map_err(|e| KernelError::from_map("event ring buffer", e, None))?;
        let ring = RingBuf::try_from(map)
            .map_err(|e| KernelError::from_map("event ring buffer", e, None))?;
        // SAFETY: the ring buffer owns its fd and keeps it open for as long
        // as the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(io::Error::from)
            .map_err(|source| KernelError::Io {
                what: "cannot watch the event ring buffer".into(),
                source,
            })?;
        Ok(EventStream { ring })
    }

    /// The next event, waiting for one if none is queued.
    pub async fn next(&mut self) -> io::Result<KernelEvent> {
        loop {
            if let Some(e) = self.try_next() {
                return Ok(e);
            }
            let mut guard = self.ring.readable_mut().await?;
            if let Some(e) = next_decoded(guard.get_inner_mut()) {
                return Ok(e);
            }
            guard.clear_ready();
        }
    }

    /// An event if one is queued now.
    pub fn try_next(&mut self) -> Option<KernelEvent> {
        next_decoded(self.ring.get_mut())
    }
}

fn next_decoded(ring: &mut RingBuf<MapData>) -> Option<KernelEvent> {
    loop {
        let item = ring.next()?;
        if let Some(e) = KernelEvent::decode(&item) {
            return Some(e);
        }
        // A record of another size: skip it rather than misread it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: &Event) -> Vec<u8> {
        let p = (e as *const Event).cast::<u8>();
        // SAFETY: reading the bytes of a plain repr(C) value.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<Event>()) }.to_vec()
    }

    #[test]
    fn decodes_a_pregreet() {
        let client: IpAddr = "198.51.100.2".parse().unwrap();
        let server: IpAddr = "fd5b:1e00::1".parse().unwrap();
        let e = Event {
            ts_ns: 42,
            kind: EVENT_PREGREET,
            flags: EVENT_F_TEASER,
            addr: client.into(),
            client_port: 40000,
            server_port: 25,
            server: server.into(),
            ..Event::default()
        };
        let d = KernelEvent::decode(&bytes(&e)).unwrap();
        assert_eq!(d.kind, EventKind::PreGreet { teaser: true });
        assert_eq!(d.addr, client);
        assert_eq!(d.server, Some(server));
        assert_eq!((d.client_port, d.server_port), (40000, 25));
        assert_eq!(d.at, BootInstant(42));
    }

    #[test]
    fn short_record_is_refused() {
        assert!(KernelEvent::decode(&[0u8; 10]).is_none());
    }
}
