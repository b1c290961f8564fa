//! A bounded line buffer that the I/O code reads into.
//!
//! The session waits on the client, the MTA and its timers at once
//! (`select!`); a read future that is dropped must not take bytes with it.
//! So the caller reads with one cancel-safe `read_buf` straight into
//! [`LineBuf::spare`]: every byte that arrived is kept. This file does no
//! I/O itself (the reads live in `session` and `backend`), so the parser
//! builds and is tested without a runtime.
use bytes::{Buf, Bytes, BytesMut};

/// Read size; also the capacity kept by an idle buffer.
const CHUNK: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// Bytes read from a peer and not yet consumed.
#[derive(Debug)]
pub struct LineBuf {
    buf: BytesMut,
    max_line: usize,
    /// Inside an over-long line: its bytes are dropped up to the next LF.
    discarding: bool,
    /// Lines end only at CRLF (client commands): a bare LF is part of the
    /// line, which the strict reader then refuses whole, so no MTA behind
    /// the agent can take the text after it for a command of its own.
    crlf_only: bool,
}

impl LineBuf {
    /// Lines end at LF, with or without CR (the MTA's replies).
    pub fn new(max_line: usize) -> LineBuf {
        LineBuf {
            buf: BytesMut::new(),
            max_line,
            discarding: false,
            crlf_only: false,
        }
    }

    /// Lines end only at CRLF (what clients send).
    pub fn crlf(max_line: usize) -> LineBuf {
        LineBuf {
            crlf_only: true,
            ..LineBuf::new(max_line)
        }
    }

    /// Where the first complete line ends (the index of its LF).
    fn line_end(&self) -> Option<usize> {
        if !self.crlf_only {
            return self.buf.iter().position(|&b| b == b'\n');
        }
        self.buf
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| i + 1)
    }

    /// Where the next read goes: the buffer, with room for one more read
    /// reserved. Only append to it (tokio's `read_buf(buf.spare())`, which
    /// is cancel-safe: `Ok(0)` is end of stream); what is there already is
    /// the start of a line not yet handed out.
    pub fn spare(&mut self) -> &mut BytesMut {
        self.buf.reserve(CHUNK);
        &mut self.buf
    }

    /// Appends bytes (used by tests and the fuzz target).
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Drops everything buffered (bytes a client sent after STARTTLS must
    /// not be taken as commands inside TLS).
    pub fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.discarding = false;
    }

    /// The next complete line with its line ending (LF or CRLF; only CRLF
    /// for a [`LineBuf::crlf`] buffer), or
    /// `TooLong` once for each over-long line (whose bytes are dropped),
    /// or `None` when no complete line is buffered yet.
    pub fn next_line(&mut self) -> Option<Result<Bytes, LineError>> {
        loop {
            match self.line_end() {
                Some(i) => {
                    if self.discarding {
                        self.buf.advance(i + 1);
                        self.discarding = false;
                        self.shrink();
                        return Some(Err(LineError::TooLong(self.max_line)));
                    }
                    if i + 1 > self.max_line {
                        self.buf.advance(i + 1);
                        self.shrink();
                        return Some(Err(LineError::TooLong(self.max_line)));
                    }
                    let line = self.buf.split_to(i + 1).freeze();
                    self.shrink();
                    return Some(Ok(line));
                }
                None => {
                    if self.buf.len() >= self.max_line {
                        // Keep nothing of it: a client cannot make us hold
                        // more than one line's worth (but a CR that may
                        // start the CRLF ending it).
                        self.discarding = true;
                        let cr = self.crlf_only && self.buf.last() == Some(&b'\r');
                        self.buf.clear();
                        if cr {
                            self.buf.extend_from_slice(b"\r");
                        }
                        self.shrink();
                        if cr {
                            return None;
                        }
                        continue;
                    }
                    return None;
                }
            }
        }
    }

    /// Up to `max` raw bytes (BDAT chunks, DATA bodies, opaque relay).
    pub fn take_raw(&mut self, max: usize) -> Bytes {
        let n = max.min(self.buf.len());
        let out = self.buf.split_to(n).freeze();
        self.shrink();
        out
    }

    /// Drops the first `n` buffered bytes (at most all of them), once the
    /// caller has used them from [`peek`](Self::peek).
    pub fn advance(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
        self.shrink();
    }

    /// The buffered bytes, unconsumed.
    pub fn peek(&self) -> &[u8] {
        &self.buf
    }

    /// A session that waits holds no buffer it does not need.
    fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * CHUNK {
            self.buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_lf() {
        let mut b = LineBuf::new(512);
        b.extend(b"EHLO a\r\nMAIL FROM:<>\nRC");
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"EHLO a\r\n");
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"MAIL FROM:<>\n");
        assert!(b.next_line().is_none());
        b.extend(b"PT TO:<x@y>\r\n");
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"RCPT TO:<x@y>\r\n");
        assert!(b.is_empty());
    }

    #[test]
    fn over_long_line_is_reported_once_and_dropped() {
        let mut b = LineBuf::new(512);
        b.extend(&[b'a'; 600]);
        assert!(b.next_line().is_none());
        assert!(b.len() < 512, "the long line is not kept");
        b.extend(&[b'a'; 600]);
        assert!(b.next_line().is_none());
        b.extend(b"aaa\r\nQUIT\r\n");
        assert_eq!(b.next_line(), Some(Err(LineError::TooLong(512))));
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"QUIT\r\n");
        assert!(b.next_line().is_none());
    }

    #[test]
    fn over_long_complete_line() {
        let mut b = LineBuf::new(512);
        let mut line = vec![b'x'; 511];
        line.extend_from_slice(b"\r\nNOOP\r\n");
        b.extend(&line);
        assert_eq!(b.next_line(), Some(Err(LineError::TooLong(512))));
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"NOOP\r\n");
        let mut ok = vec![b'x'; 510];
        ok.extend_from_slice(b"\r\n");
        b.extend(&ok);
        assert_eq!(b.next_line().unwrap().unwrap().len(), 512);
    }

    #[test]
    fn client_lines_end_only_at_crlf() {
        let mut b = LineBuf::crlf(512);
        b.extend(b"RCPT TO:<a@b>\nDATA\r\nQUIT\r");
        assert_eq!(
            &b.next_line().unwrap().unwrap()[..],
            b"RCPT TO:<a@b>\nDATA\r\n"
        );
        assert!(b.next_line().is_none());
        b.extend(b"\n");
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"QUIT\r\n");
        // an over-long line whose CR and LF come in different reads
        let mut b = LineBuf::crlf(512);
        let mut long = vec![b'a'; 600];
        long.push(b'\r');
        b.extend(&long);
        assert!(b.next_line().is_none());
        b.extend(b"\nNOOP\r\n");
        assert_eq!(b.next_line(), Some(Err(LineError::TooLong(512))));
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"NOOP\r\n");
    }

    #[test]
    fn raw_takes_at_most_what_is_there() {
        let mut b = LineBuf::new(512);
        b.extend(b"0123456789");
        assert_eq!(&b.take_raw(4)[..], b"0123");
        assert_eq!(&b.take_raw(100)[..], b"456789");
        assert!(b.take_raw(5).is_empty());
    }

    #[test]
    fn bytes_read_into_the_spare_room_follow_what_is_buffered() {
        let mut b = LineBuf::new(512);
        b.extend(b"HE");
        let spare = b.spare();
        assert!(spare.capacity() - spare.len() >= CHUNK);
        spare.extend_from_slice(b"LO x\r\n");
        assert_eq!(b.len(), 8);
        assert_eq!(&b.next_line().unwrap().unwrap()[..], b"HELO x\r\n");
    }
}
