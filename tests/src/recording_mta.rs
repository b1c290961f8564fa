//! A scripted MTA that records, byte for byte, what the agent forwards.
//!
//! Real Postfix proves what a real MTA makes of the agent's output, but it
//! normalises what it reads (it never ends a line at a bare CR, strips CRs
//! before an LF), so its log cannot show every byte the agent sent. This
//! backend reads strictly (lines end only at CRLF, a DATA body only at
//! CRLF.CRLF, a BDAT chunk is exactly its size), answers like a permissive
//! MTA, and keeps everything it received per connection, so a test can
//! assert on the exact bytes: no bare CR, LF or NUL, one end of data per
//! message, commands in their canonical spelling.
//!
//! It listens on a loopback port inside the test's server namespace and
//! expects a PROXY v2 header first (the agent's `client_address =
//! "proxy-v2"`). Plain std threads: each connection has its own, and every
//! thread polls a stop flag, so Drop ends them all.
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::TestNet;
use crate::wait;

/// The fixed part of a PROXY v2 header: signature, version/command,
/// family, length.
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// How often blocked reads and the accept loop look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What the MTA offers and how it misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Offer CHUNKING in the EHLO reply (BDAT); can be changed later with
    /// [`RecordingMta::set_chunking`].
    pub chunking: bool,
    /// Stop reading a connection after this many bytes (after the PROXY
    /// header): the connection stays open, nothing more is read or
    /// answered, as a stalled MTA.
    pub stall_after: Option<usize>,
}

/// Everything one connection brought.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// The PROXY v2 header as received (fixed part and addresses).
    pub proxy_header: Vec<u8>,
    /// Every byte received after the PROXY header, in order.
    pub bytes: Vec<u8>,
    /// The command lines the MTA answered, without their CRLF.
    pub commands: Vec<Vec<u8>>,
    /// DATA bodies as received (still dot-stuffed), each up to and
    /// including the CRLF before the final `.CRLF`.
    pub bodies: Vec<Vec<u8>>,
    /// BDAT chunks, exactly as many bytes as each command announced.
    pub chunks: Vec<Vec<u8>>,
    /// The agent sent QUIT (and got 221).
    pub quit: bool,
    /// The connection is over (QUIT, end of stream or error).
    pub closed: bool,
}

impl Recording {
    /// The client address the PROXY v2 header names (TCP over IPv4 or
    /// IPv6), if any.
    pub fn proxy_source(&self) -> Option<IpAddr> {
        let h = &self.proxy_header;
        match h.get(13)? {
            0x11 if h.len() >= 20 => {
                let o: [u8; 4] = h[16..20].try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(o)))
            }
            0x21 if h.len() >= 32 => {
                let o: [u8; 16] = h[16..32].try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            }
            _ => None,
        }
    }

    /// The command lines as text (lossy), for assertions and messages.
    pub fn command_lines(&self) -> Vec<String> {
        self.commands
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }
}

/// Positions and values of every bare CR, bare LF and NUL in `bytes`:
/// what a strict reader and a lenient one would read differently.
pub fn bare_line_endings(bytes: &[u8]) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        let bare = match b {
            b'\r' => bytes.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || bytes[i - 1] != b'\r',
            0 => true,
            _ => false,
        };
        if bare {
            out.push((i, b));
        }
    }
    out
}

/// How often `needle` occurs in `hay` (overlapping occurrences counted).
pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

struct Shared {
    stop: AtomicBool,
    chunking: AtomicBool,
    stall_after: Option<usize>,
    conns: Mutex<Vec<Arc<Mutex<Recording>>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking connection thread must not hide what was recorded.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running recording MTA; Drop stops it and joins its threads.
pub struct RecordingMta {
    /// Where it listens (loopback of the server namespace).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl RecordingMta {
    /// Listens on 127.0.0.1 (a free port) inside the server namespace of
    /// `net`.
    pub fn start(net: &TestNet, opts: Options) -> Result<RecordingMta> {
        let listener = net
            .in_server(|| TcpListener::bind(("127.0.0.1", 0)))
            .context("server namespace")?
            .context("recording MTA: bind")?;
        RecordingMta::serve(listener, opts)
    }

    /// Serves on a listener the caller made (in whatever namespace).
    pub fn serve(listener: TcpListener, opts: Options) -> Result<RecordingMta> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            chunking: AtomicBool::new(opts.chunking),
            stall_after: opts.stall_after,
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, s));
        Ok(RecordingMta {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The agent's `[backend]` section for this MTA.
    pub fn backend_config(&self) -> String {
        format!(
            "[backend]\naddr = \"{}\"\nclient_address = \"proxy-v2\"\n",
            self.addr
        )
    }

    /// Offer CHUNKING (or not) in EHLO replies from now on.
    pub fn set_chunking(&self, on: bool) {
        self.shared.chunking.store(on, Ordering::SeqCst);
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// A copy of what every connection brought so far, in accept order.
    pub fn recordings(&self) -> Vec<Recording> {
        lock(&self.shared.conns)
            .iter()
            .map(|r| lock(r).clone())
            .collect()
    }

    /// Waits until connection `i` (0 = the first accepted) is over and
    /// returns its recording; `None` when that does not happen in time.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> Option<Recording> {
        let mut out = None;
        wait::until(timeout, || {
            let conns = lock(&self.shared.conns);
            match conns.get(i).map(|r| lock(r).clone()) {
                Some(r) if r.closed => {
                    out = Some(r);
                    true
                }
                _ => false,
            }
        });
        out
    }
}

impl Drop for RecordingMta {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                // Reads block with a timeout (see `Wire::fill`).
                let _ = stream.set_nonblocking(false);
                let rec = Arc::new(Mutex::new(Recording::default()));
                lock(&shared.conns).push(rec.clone());
                let s = shared.clone();
                let t = std::thread::spawn(move || {
                    let mut wire = Wire {
                        stream,
                        buf: Vec::new(),
                        received: 0,
                        rec: rec.clone(),
                        shared: s,
                    };
                    // Any error (the agent hung up, a reset) ends the
                    // connection like an EOF: the recording is what counts.
                    let _ = wire.serve();
                    lock(&rec).closed = true;
                });
                lock(&shared.threads).push(t);
            }
            // Nothing to accept (or a transient error): look again soon.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// One connection: a strict reader over the socket that records what it
/// reads.
struct Wire {
    stream: TcpStream,
    /// Received and not yet consumed.
    buf: Vec<u8>,
    /// Bytes received on this connection (PROXY header included).
    received: usize,
    rec: Arc<Mutex<Recording>>,
    shared: Arc<Shared>,
}

impl Wire {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    /// Reads at most `max` more bytes into `buf`; false at end of stream
    /// or when the MTA is stopped. A stalled connection reads nothing more
    /// until then.
    fn fill(&mut self, max: usize) -> std::io::Result<bool> {
        self.stream.set_read_timeout(Some(POLL))?;
        let mut chunk = [0u8; 4096];
        loop {
            if self.stopping() {
                return Ok(false);
            }
            // The stall counts from the end of the PROXY header.
            let header = lock(&self.rec).proxy_header.len();
            let limit = match self.shared.stall_after {
                Some(n) if header > 0 => Some((n + header).saturating_sub(self.received)),
                _ => None,
            };
            let want = match limit {
                Some(0) => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Some(n) => n.min(chunk.len()).min(max),
                None => chunk.len().min(max),
            };
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.received += n;
                    self.buf.extend_from_slice(&chunk[..n]);
                    lock(&self.rec).bytes.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next `n` bytes; `None` at end of stream. Reads no further than
    /// that, so the PROXY header does not pull in what a stall must not
    /// read.
    fn take(&mut self, n: usize) -> std::io::Result<Option<Vec<u8>>> {
        while self.buf.len() < n {
            if !self.fill(n - self.buf.len())? {
                return Ok(None);
            }
        }
        Ok(Some(self.buf.drain(..n).collect()))
    }

    /// The next line, ended only by CRLF, without it.
    fn line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let mut line: Vec<u8> = self.buf.drain(..i + 2).collect();
                line.truncate(i);
                return Ok(Some(line));
            }
            if !self.fill(usize::MAX)? {
                return Ok(None);
            }
        }
    }

    /// A DATA body, ended only by CRLF.CRLF (the CRLF of the DATA line
    /// counts as the first, as in RFC 5321 4.1.1.4); returns it up to and
    /// including the CRLF before the final `.CRLF`.
    fn body(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if self.buf.starts_with(b".\r\n") {
                self.buf.drain(..3);
                return Ok(Some(Vec::new()));
            }
            if let Some(i) = find(&self.buf, b"\r\n.\r\n") {
                let mut body: Vec<u8> = self.buf.drain(..i + 5).collect();
                body.truncate(i + 2);
                return Ok(Some(body));
            }
            if !self.fill(usize::MAX)? {
                return Ok(None);
            }
        }
    }

    fn send(&mut self, reply: &str) -> std::io::Result<()> {
        self.stream.write_all(reply.as_bytes())
    }

    fn ehlo_reply(&self) -> String {
        let mut caps = vec!["rec.test", "PIPELINING", "SIZE 10240000", "8BITMIME"];
        if self.shared.chunking.load(Ordering::SeqCst) {
            caps.push("CHUNKING");
        }
        caps.push("SMTPUTF8");
        let last = caps.len() - 1;
        caps.iter()
            .enumerate()
            .map(|(i, c)| format!("250{}{c}\r\n", if i == last { ' ' } else { '-' }))
            .collect()
    }

    /// The PROXY v2 header; false when the stream ended or does not start
    /// with one (then nothing is answered).
    fn proxy_header(&mut self) -> std::io::Result<bool> {
        let Some(fixed) = self.take(16)? else {
            return Ok(false);
        };
        if &fixed[..12] != PROXY_V2_SIGNATURE {
            return Ok(false);
        }
        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let Some(rest) = self.take(len)? else {
            return Ok(false);
        };
        let mut rec = lock(&self.rec);
        rec.proxy_header = [fixed, rest].concat();
        let header = rec.proxy_header.len();
        rec.bytes.drain(..header);
        Ok(true)
    }

    fn serve(&mut self) -> std::io::Result<()> {
        if !self.proxy_header()? {
            return Ok(());
        }
        self.send("220 rec.test ESMTP\r\n")?;
        while let Some(line) = self.line()? {
            lock(&self.rec).commands.push(line.clone());
            let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
            let verb = line[..verb_end].to_ascii_uppercase();
            let args = String::from_utf8_lossy(&line[verb_end..]).into_owned();
            match verb.as_slice() {
                b"EHLO" => {
                    let r = self.ehlo_reply();
                    self.send(&r)?;
                }
                b"HELO" => self.send("250 rec.test\r\n")?,
                b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => self.send("250 2.0.0 Ok\r\n")?,
                b"DATA" => {
                    self.send("354 End data with <CR><LF>.<CR><LF>\r\n")?;
                    let Some(body) = self.body()? else {
                        return Ok(());
                    };
                    lock(&self.rec).bodies.push(body);
                    self.send("250 2.0.0 Ok: queued as REC\r\n")?;
                }
                b"BDAT" => {
                    let mut words = args.split(' ').filter(|w| !w.is_empty());
                    let Some(size) = words.next().and_then(|w| w.parse::<usize>().ok()) else {
                        // The size is unknown, so is the framing: hang up.
                        self.send("501 5.5.4 Syntax: BDAT size [LAST]\r\n")?;
                        return Ok(());
                    };
                    let Some(chunk) = self.take(size)? else {
                        return Ok(());
                    };
                    lock(&self.rec).chunks.push(chunk);
                    self.send("250 2.0.0 Ok: chunk received\r\n")?;
                }
                b"QUIT" => {
                    self.send("221 2.0.0 Bye\r\n")?;
                    lock(&self.rec).quit = true;
                    return Ok(());
                }
                _ => self.send("502 5.5.2 Error: command not recognized\r\n")?,
            }
        }
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_endings_are_found_and_crlf_is_not() {
        assert!(bare_line_endings(b"a\r\nb\r\n.\r\n").is_empty());
        assert_eq!(bare_line_endings(b"a\nb"), vec![(1, b'\n')]);
        assert_eq!(bare_line_endings(b"\na"), vec![(0, b'\n')]);
        assert_eq!(bare_line_endings(b"a\r"), vec![(1, b'\r')]);
        assert_eq!(bare_line_endings(b"\r\r\n.\0"), vec![(0, b'\r'), (4, 0)]);
    }

    #[test]
    fn counts_overlapping() {
        assert_eq!(count(b"\r\n.\r\n.\r\n", b"\r\n.\r\n"), 2);
        assert_eq!(count(b"abc", b""), 0);
        assert_eq!(count(b"a", b"abc"), 0);
    }

    /// A PROXY v2 header for 198.51.100.2:1 -> 127.0.0.1:25.
    fn v4_header() -> Vec<u8> {
        let mut h = PROXY_V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 2, 127, 0, 0, 1, 0, 1, 0, 25,
        ]);
        h
    }

    fn start(opts: Options) -> (RecordingMta, TcpStream, std::io::BufReader<TcpStream>) {
        let mta = RecordingMta::serve(TcpListener::bind(("127.0.0.1", 0)).unwrap(), opts).unwrap();
        let s = TcpStream::connect(mta.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = std::io::BufReader::new(s.try_clone().unwrap());
        (mta, s, r)
    }

    fn replies(r: &mut std::io::BufReader<TcpStream>, n: usize) -> Vec<String> {
        (0..n).map(|_| reply_text(r)).collect()
    }

    #[test]
    fn reads_strictly_and_records_everything_after_the_header() {
        let (mta, mut s, mut r) = start(Options::default());
        s.write_all(&v4_header()).unwrap();
        s.write_all(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            .unwrap();
        let got = replies(&mut r, 5);
        assert!(got[0].starts_with("220 "), "{got:?}");
        assert!(got[4].starts_with("354 "), "{got:?}");
        // Bare LF dots are body; only CRLF.CRLF ends it.
        s.write_all(b"a\n.\nb\r\n..c\r\n.\r\nBDAT 3 LAST\r\nxyzQUIT\r\n")
            .unwrap();
        let got = replies(&mut r, 3);
        assert!(got[0].starts_with("250 2.0.0 Ok: queued"), "{got:?}");
        assert!(got[1].starts_with("250 2.0.0 Ok: chunk"), "{got:?}");
        assert!(got[2].starts_with("221 "), "{got:?}");
        let rec = mta.wait_closed(0, Duration::from_secs(5)).unwrap();
        assert!(rec.quit);
        assert_eq!(rec.proxy_source(), Some("198.51.100.2".parse().unwrap()));
        assert!(rec.bytes.starts_with(b"EHLO x\r\n"));
        assert!(rec.bytes.ends_with(b"xyzQUIT\r\n"));
        assert_eq!(rec.bodies, vec![b"a\n.\nb\r\n..c\r\n".to_vec()]);
        assert_eq!(rec.chunks, vec![b"xyz".to_vec()]);
        assert_eq!(
            rec.command_lines(),
            [
                "EHLO x",
                "MAIL FROM:<a@b>",
                "RCPT TO:<c@d>",
                "DATA",
                "BDAT 3 LAST",
                "QUIT"
            ]
        );
        assert_eq!(mta.connections(), 1);
    }

    /// One whole (possibly multi-line) reply.
    fn reply_text(r: &mut std::io::BufReader<TcpStream>) -> String {
        use std::io::BufRead;
        let mut text = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(!line.is_empty(), "closed early; got {text:?}");
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return text;
            }
        }
    }

    #[test]
    fn chunking_is_offered_on_demand() {
        let (mta, mut s, mut r) = start(Options::default());
        s.write_all(&v4_header()).unwrap();
        s.write_all(b"EHLO x\r\n").unwrap();
        assert!(reply_text(&mut r).starts_with("220 "));
        let ehlo = reply_text(&mut r);
        assert!(
            ehlo.contains("PIPELINING") && !ehlo.contains("CHUNKING"),
            "{ehlo}"
        );
        mta.set_chunking(true);
        s.write_all(b"EHLO x\r\n").unwrap();
        let ehlo = reply_text(&mut r);
        assert!(ehlo.contains("CHUNKING"), "{ehlo}");
    }

    #[test]
    fn a_stalled_connection_stops_reading() {
        let (mta, mut s, mut r) = start(Options {
            stall_after: Some(10),
            ..Options::default()
        });
        s.write_all(&v4_header()).unwrap();
        s.write_all(b"HELO x\r\nNOOP\r\n").unwrap();
        let got = replies(&mut r, 2);
        assert!(got[1].starts_with("250 rec.test"), "{got:?}");
        std::thread::sleep(Duration::from_millis(300));
        let rec = &mta.recordings()[0];
        assert_eq!(rec.bytes, b"HELO x\r\nNO");
        assert!(!rec.closed);
        // Nothing answers the NOOP.
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        assert!(r.read_line(&mut line).is_err(), "{line:?}");
    }

    #[test]
    fn proxy_source_of_v4_and_v6_headers() {
        let mut h = PROXY_V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 198, 51, 100, 2, 127, 0, 0, 1, 0, 1, 0, 25,
        ]);
        let r = Recording {
            proxy_header: h,
            ..Recording::default()
        };
        assert_eq!(r.proxy_source(), Some("198.51.100.2".parse().unwrap()));
        let mut h = PROXY_V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x21, 0, 36]);
        h.extend_from_slice(&"fd5b:1e00::2".parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&[0; 20]);
        let r = Recording {
            proxy_header: h,
            ..Recording::default()
        };
        assert_eq!(r.proxy_source(), Some("fd5b:1e00::2".parse().unwrap()));
    }
}
