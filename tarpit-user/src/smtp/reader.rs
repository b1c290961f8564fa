//! One reading of everything the client sends: the strict one.
//!
//! The session asks this reader for the next [`Item`] and forwards only
//! what it hands out: canonical command lines, strict SASL responses, the
//! re-encoded body, BDAT chunks counted by length. What the MTA receives
//! therefore frames the same under any reading (strict or lenient), and
//! every command and end of data it can find is one the agent saw.
//!
//! The session tells the reader what comes next, from the MTA's replies:
//! a body after 354 ([`expect_body`](ClientReader::expect_body)), a SASL
//! response after 334, a chunk after an accepted `BDAT`. Until then it
//! must not ask for more items after a command that may change the framing
//! (DATA, BDAT, AUTH): the lines after them are not commands yet.
use bytes::{Bytes, BytesMut};

use super::{
    BareLineEnding, BodyEncoder, BodyStep, Command, LineBuf, LineError, LineFault, canonical,
    parse_command, strict_line,
};

/// What the client's next bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Command,
    /// One SASL response line (after a 334).
    AuthResponse,
    /// A DATA body (after a 354).
    Body,
    /// The rest of a BDAT chunk.
    Chunk,
}

/// One thing the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A command line (strict), classified, with its canonical form (ends
    /// CRLF): what is forwarded.
    Command(Command, Bytes),
    /// A command or SASL line with a bare CR, bare LF or NUL: answer
    /// `500 5.5.2`, forward nothing (after a 334, cancel the exchange with
    /// `*`). Expecting commands after it.
    BadLine(LineFault),
    /// An over-long line (dropped): answer `500 5.5.2` (after a 334,
    /// cancel with `*`). Expecting commands after it.
    TooLong,
    /// The SASL response line after a 334 (strict; content + CRLF, not
    /// parsed: it is a credential). Expecting commands after it.
    AuthResponse(Bytes),
    /// The end of a DATA body (see [`BodyEncoder`]); its `.` CRLF is not
    /// in `to_mta`: the session sends it after its hold. Expecting
    /// commands after it.
    BodyEnd,
    /// Reject mode: a bare line ending or NUL in the body. The session
    /// refuses the message and closes: the MTA's connection is dropped
    /// without an end of data. (Expecting commands after it, but nothing
    /// after a refused body may be taken as a command.)
    BodyRefused(LineFault),
    /// The chunk announced by [`ClientReader::expect_chunk`] is complete.
    /// Expecting commands after it.
    ChunkEnd,
}

/// The client's side of a session: its buffered bytes and what they are.
#[derive(Debug)]
pub struct ClientReader {
    buf: LineBuf,
    expect: Expect,
    bare: BareLineEnding,
    body: BodyEncoder,
    /// Bytes of the current BDAT chunk still to come.
    chunk: u64,
}

impl ClientReader {
    /// `max_line`: the longest command or SASL line kept (CRLF included).
    pub fn new(max_line: usize, bare: BareLineEnding) -> ClientReader {
        ClientReader {
            buf: LineBuf::crlf(max_line),
            expect: Expect::Command,
            bare,
            body: BodyEncoder::new(bare),
            chunk: 0,
        }
    }

    /// Where the next read from the client goes (see [`LineBuf::spare`]):
    /// the session reads with `client.read_buf(reader.spare())`.
    pub fn spare(&mut self) -> &mut BytesMut {
        self.buf.spare()
    }

    /// Appends bytes as if read (tests, the fuzz target).
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend(data);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes buffered and not yet handed out.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Drops everything buffered and expects a command: bytes a client sent
    /// after STARTTLS must not be taken as commands inside TLS.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.expect = Expect::Command;
        self.chunk = 0;
    }

    pub fn expecting(&self) -> Expect {
        self.expect
    }

    /// The buffered input ends with a complete `QUIT` command line. A
    /// client that pipelines QUIT behind its last command and then shuts
    /// its sending side (Exim does, behind a pipelined `BDAT ... LAST`)
    /// has said all it will and waits for the replies: its end of input
    /// is a half-close, not a client that left. Only when commands are
    /// expected, and only the last line is looked at (what comes before
    /// it may not have been read yet); should those bytes end a chunk
    /// that is not complete, the chunk never is, and its end of data is
    /// never passed on.
    pub fn ends_with_quit(&self) -> bool {
        if self.expect != Expect::Command {
            return false;
        }
        let buf = self.buf.peek();
        let Some(content) = buf.strip_suffix(b"\r\n") else {
            return false;
        };
        let start = content
            .windows(2)
            .rposition(|w| w == b"\r\n")
            .map_or(0, |i| i + 2);
        matches!(strict_line(&buf[start..]), Ok(c) if parse_command(c) == Command::Quit)
    }

    /// After the MTA's 354: a body follows.
    pub fn expect_body(&mut self) {
        self.body = BodyEncoder::new(self.bare);
        self.expect = Expect::Body;
    }

    /// After `BDAT size` (accepted for forwarding): `size` raw bytes
    /// follow. A size of 0 has none: commands are still expected.
    pub fn expect_chunk(&mut self, size: u64) {
        if size > 0 {
            self.chunk = size;
            self.expect = Expect::Chunk;
        }
    }

    /// After a 334: one SASL response line follows.
    pub fn expect_auth_response(&mut self) {
        self.expect = Expect::AuthResponse;
    }

    /// The next item, or `None` when more input is needed. Body bytes
    /// (re-encoded) and chunk bytes (raw) are appended to `to_mta` as they
    /// come, without an item, so that a long body is never held here.
    pub fn next(&mut self, to_mta: &mut BytesMut) -> Option<Item> {
        match self.expect {
            Expect::Command => Some(match self.buf.next_line()? {
                Err(LineError::TooLong(_)) => Item::TooLong,
                Ok(line) => match strict_line(&line) {
                    Ok(content) => Item::Command(parse_command(content), canonical(content)),
                    Err(fault) => Item::BadLine(fault),
                },
            }),
            Expect::AuthResponse => {
                let line = self.buf.next_line()?;
                self.expect = Expect::Command;
                Some(match line {
                    Err(LineError::TooLong(_)) => Item::TooLong,
                    // A strict line is its content and CRLF: forwarded as is.
                    Ok(line) => match strict_line(&line) {
                        Ok(_) => Item::AuthResponse(line),
                        Err(fault) => Item::BadLine(fault),
                    },
                })
            }
            Expect::Body => {
                if self.buf.is_empty() {
                    return None;
                }
                let step = self.body.feed(self.buf.peek(), to_mta);
                match step {
                    BodyStep::More => {
                        self.buf.advance(usize::MAX);
                        None
                    }
                    BodyStep::End { consumed } => {
                        self.buf.advance(consumed);
                        self.expect = Expect::Command;
                        Some(Item::BodyEnd)
                    }
                    BodyStep::Refused { consumed, fault } => {
                        self.buf.advance(consumed);
                        self.expect = Expect::Command;
                        Some(Item::BodyRefused(fault))
                    }
                }
            }
            Expect::Chunk => {
                if self.buf.is_empty() {
                    return None;
                }
                let want = usize::try_from(self.chunk).unwrap_or(usize::MAX);
                let n = want.min(self.buf.len());
                to_mta.extend_from_slice(&self.buf.peek()[..n]);
                self.buf.advance(n);
                self.chunk -= n as u64;
                if self.chunk > 0 {
                    return None;
                }
                self.expect = Expect::Command;
                Some(Item::ChunkEnd)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: BareLineEnding = BareLineEnding::Normalize;

    /// Every item the buffered input gives, acting as the MTA would have
    /// answered (354 to DATA, 334 to AUTH, BDAT accepted); and what went
    /// to the MTA besides the commands.
    fn items(r: &mut ClientReader, input: &[u8]) -> (Vec<Item>, Vec<u8>) {
        r.extend(input);
        let mut out = BytesMut::new();
        let mut items = Vec::new();
        while let Some(item) = r.next(&mut out) {
            match &item {
                Item::Command(Command::Data, _) => r.expect_body(),
                Item::Command(Command::Auth(_), _) => r.expect_auth_response(),
                Item::Command(Command::Bdat(Some((n, _))), _) => r.expect_chunk(*n),
                _ => {}
            }
            items.push(item);
        }
        (items, out.to_vec())
    }

    fn cmd(c: Command, canon: &'static [u8]) -> Item {
        Item::Command(c, Bytes::from_static(canon))
    }

    #[test]
    fn a_bare_lf_in_pipelined_commands_is_one_bad_line() {
        let mut r = ClientReader::new(512, N);
        // A bare LF ends nothing: the line runs to the CRLF and is refused
        // whole, so the MAIL after the LF reaches nobody.
        let (got, _) = items(&mut r, b"RCPT TO:<a>\nMAIL FROM:<b>\r\nNOOP\r\n");
        assert_eq!(
            got,
            [
                Item::BadLine(LineFault::BareLf),
                cmd(Command::Noop, b"NOOP\r\n"),
            ]
        );
        let (got, _) = items(&mut r, b"RCPT TO:<a>\rMAIL FROM:<b>\r\nNO\0OP\r\n");
        assert_eq!(
            got,
            [
                Item::BadLine(LineFault::BareCr),
                Item::BadLine(LineFault::Nul)
            ]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn a_transaction_with_a_smuggling_attempt() {
        let mut r = ClientReader::new(512, N);
        let (got, body) = items(
            &mut r,
            b"ehlo x\r\nMAIL FROM:<a@b>\r\nRCPT\tTO:<c@d>\r\nDATA\r\n\
              hi\r\n.\r\r\nMAIL FROM:<evil@x>\r\n..\r\n.\r\nquit\r\n",
        );
        assert_eq!(
            got,
            [
                cmd(Command::Ehlo("x".into()), b"EHLO x\r\n"),
                cmd(Command::Mail("a@b".into()), b"MAIL FROM:<a@b>\r\n"),
                cmd(Command::Rcpt("c@d".into()), b"RCPT TO:<c@d>\r\n"),
                cmd(Command::Data, b"DATA\r\n"),
                Item::BodyEnd,
                cmd(Command::Quit, b"QUIT\r\n"),
            ]
        );
        assert_eq!(&body[..], b"hi\r\n..\r\nMAIL FROM:<evil@x>\r\n..\r\n");
        assert_eq!(r.expecting(), Expect::Command);
    }

    #[test]
    fn a_body_is_not_held_in_the_reader() {
        let mut r = ClientReader::new(64, N);
        let mut out = BytesMut::new();
        assert_eq!(r.next(&mut out), None);
        r.extend(b"DATA\r\n");
        assert_eq!(r.next(&mut out), Some(cmd(Command::Data, b"DATA\r\n")));
        r.expect_body();
        for _ in 0..100 {
            r.extend(&[b'x'; 1000]);
            assert_eq!(r.next(&mut out), None);
            assert!(r.is_empty(), "a line longer than max_line streams through");
        }
        assert_eq!(out.len(), 100_000);
        r.extend(b"\r\n.\r\nNOOP\r\n");
        assert_eq!(r.next(&mut out), Some(Item::BodyEnd));
        assert_eq!(r.next(&mut out), Some(cmd(Command::Noop, b"NOOP\r\n")));
        assert!(out.ends_with(b"x\r\n"));
    }

    #[test]
    fn rejecting_reader_refuses_a_bare_lf_body() {
        let mut r = ClientReader::new(512, BareLineEnding::Reject);
        let (got, body) = items(&mut r, b"DATA\r\nok\r\nbad\n.\nMAIL FROM:<e>\r\n");
        assert_eq!(
            got[..2],
            [
                cmd(Command::Data, b"DATA\r\n"),
                Item::BodyRefused(LineFault::BareLf)
            ]
        );
        assert_eq!(&body[..], b"ok\r\nbad");
    }

    #[test]
    fn auth_responses_are_strict_and_opaque() {
        let mut r = ClientReader::new(512, N);
        let (got, _) = items(&mut r, b"AUTH\tLOGIN\r\ndXNlcg==\r\nNOOP\r\n");
        assert_eq!(
            got,
            [
                cmd(Command::Auth("LOGIN".into()), b"AUTH LOGIN\r\n"),
                Item::AuthResponse(Bytes::from_static(b"dXNlcg==\r\n")),
                cmd(Command::Noop, b"NOOP\r\n"),
            ]
        );
        // A response is never classified, even if it reads like a command.
        let (got, _) = items(&mut r, b"AUTH PLAIN\r\nDATA\r\n");
        assert_eq!(got[1], Item::AuthResponse(Bytes::from_static(b"DATA\r\n")));
        // Not strict: refused, and the next line is a command again.
        for (bad, fault) in [
            (&b"dXN\nlcg==\r\n"[..], LineFault::BareLf),
            (b"dXN\rlcg==\r\n", LineFault::BareCr),
            (b"dXN\0lcg==\r\n", LineFault::Nul),
        ] {
            r.expect_auth_response();
            let (got, _) = items(&mut r, bad);
            assert_eq!(got[0], Item::BadLine(fault));
            assert_eq!(r.expecting(), Expect::Command);
        }
        r.expect_auth_response();
        let mut long = vec![b'A'; 600];
        long.extend_from_slice(b"\r\nRSET\r\n");
        let (got, _) = items(&mut r, &long);
        assert_eq!(got, [Item::TooLong, cmd(Command::Rset, b"RSET\r\n")]);
    }

    #[test]
    fn chunks_are_framed_by_length() {
        let mut r = ClientReader::new(512, N);
        let mut out = BytesMut::new();
        r.extend(b"BDAT\t7 LAST\r\nab");
        assert_eq!(
            r.next(&mut out),
            Some(cmd(Command::Bdat(Some((7, true))), b"BDAT 7 LAST\r\n"))
        );
        r.expect_chunk(7);
        assert_eq!(r.expecting(), Expect::Chunk);
        assert_eq!(r.next(&mut out), None);
        assert_eq!(&out[..], b"ab");
        // Chunk bytes are binary: nothing in them is a line end.
        r.extend(b"\n.\0\r\nQUIT\r\n");
        assert_eq!(r.next(&mut out), Some(Item::ChunkEnd));
        assert_eq!(&out[..], b"ab\n.\0\r\n");
        assert_eq!(r.next(&mut out), Some(cmd(Command::Quit, b"QUIT\r\n")));
        // BDAT 0 has no chunk.
        r.expect_chunk(0);
        assert_eq!(r.expecting(), Expect::Command);
    }

    #[test]
    fn over_long_commands_are_dropped() {
        let mut r = ClientReader::new(16, N);
        let (got, _) = items(&mut r, b"MAIL FROM:<aaaaaaaaaaaa@b>\r\nQUIT\r\n");
        assert_eq!(got, [Item::TooLong, cmd(Command::Quit, b"QUIT\r\n")]);
    }

    #[test]
    fn clear_drops_pipelined_bytes() {
        let mut r = ClientReader::new(512, N);
        let mut out = BytesMut::new();
        r.extend(b"STARTTLS\r\nMAIL FROM:<injected>\r\n");
        assert_eq!(
            r.next(&mut out),
            Some(cmd(Command::Starttls(false), b"STARTTLS\r\n"))
        );
        assert_eq!(r.len(), b"MAIL FROM:<injected>\r\n".len());
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.next(&mut out), None);
        assert_eq!(r.expecting(), Expect::Command);
    }

    #[test]
    fn bytes_read_into_the_spare_room_are_commands() {
        let mut r = ClientReader::new(512, N);
        r.spare().extend_from_slice(b"HELO x\r\n");
        let mut out = BytesMut::new();
        assert_eq!(
            r.next(&mut out),
            Some(cmd(Command::Helo("x".into()), b"HELO x\r\n"))
        );
    }

    #[test]
    fn a_pipelined_quit_at_the_end_is_seen() {
        let quit = |input: &[u8]| {
            let mut r = ClientReader::new(512, N);
            r.extend(input);
            r.ends_with_quit()
        };
        assert!(quit(b"QUIT\r\n"));
        assert!(quit(b"quit\r\n"));
        assert!(!quit(b"RCPT TO:<a@b>\r\nBDAT 3 LAST\r\nabcQUIT\r\n"));
        assert!(quit(b"RCPT TO:<a@b>\r\nBDAT 5 LAST\r\nab\r\n\r\nQUIT\r\n"));
        // Not the last line, not a whole line, a bare LF.
        assert!(!quit(b"QUIT\r\nRSET\r\n"));
        assert!(!quit(b"QUIT"));
        assert!(!quit(b"RSET\nQUIT\r\n"));
        assert!(!quit(b""));
        // Inside a body the bytes are not a command.
        let mut r = ClientReader::new(512, N);
        r.expect_body();
        r.extend(b"QUIT\r\n");
        assert!(!r.ends_with_quit());
    }
}
