//! One entry point for the fuzz target (`fuzz/fuzz_targets/smtp.rs`) and
//! for the bounded run in the unit tests: feeds arbitrary bytes through
//! every parser the agent runs on network input and checks invariants.
//! Nothing here may panic on any input.
//!
//! The client side drives the real [`ClientReader`] as the session does
//! (as if the MTA said 354 to every DATA, 334 to every AUTH and accepted
//! every BDAT), builds what the agent would forward, and checks that
//! (a) it holds no bare CR, bare LF or NUL outside BDAT chunks; (b) a
//! lenient reader of it (any of CR, LF, CRLF ends a line, CR runs before
//! an LF collapse: how the most permissive MTA reads) finds exactly the
//! commands, SASL responses, body ends and chunk ends the agent found;
//! (c) how the input is split into reads changes nothing.
use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::{
    BareLineEnding, ClientReader, Command, Expect, Item, ReplyAssembler, parse_command,
    parse_reply_line,
};

/// The command line limit the client side runs with.
const MAX_LINE: usize = 512;

/// Exercises the parsers with `data`; panics only when an invariant breaks.
pub fn exercise(data: &[u8]) {
    let cut = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    for mode in [BareLineEnding::Normalize, BareLineEnding::Reject] {
        let whole = relay(mode, &[data]);
        let split = relay(mode, &[&data[..cut], &data[cut..]]);
        assert_eq!(whole, split, "what is forwarded depends on the split");
        whole.check();
    }
    replies(data);
}

/// A boundary in the client's stream, as a reader of it finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A command line and its verb (upper-cased).
    Command(Vec<u8>),
    /// A SASL response line (or the `*` that cancels the exchange).
    AuthResponse,
    BodyEnd,
    ChunkEnd,
}

/// What the agent forwarded, and what it saw.
#[derive(Debug, PartialEq, Eq)]
struct Relay {
    forwarded: Vec<u8>,
    /// Where BDAT chunk bytes (raw, binary) are in `forwarded`.
    chunks: Vec<Range<usize>>,
    events: Vec<Event>,
}

/// The verb as the most lenient MTA finds it: after any white space, up
/// to the next, any case.
fn lenient_verb(line: &[u8]) -> Vec<u8> {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | 0x0b | 0x0c);
    let start = line.iter().position(|b| !ws(b)).unwrap_or(line.len());
    let line = &line[start..];
    let end = line.iter().position(ws).unwrap_or(line.len());
    line[..end].to_ascii_uppercase()
}

/// The session's handling of the client's stream, with the reader.
fn relay(mode: BareLineEnding, pieces: &[&[u8]]) -> Relay {
    let input: Vec<u8> = pieces.concat();
    let mut r = ClientReader::new(MAX_LINE, mode);
    let mut to_mta = BytesMut::new();
    let mut out = Relay {
        forwarded: Vec::new(),
        chunks: Vec::new(),
        events: Vec::new(),
    };
    let mut fed = 0;
    'read: for piece in pieces {
        r.extend(piece);
        fed += piece.len();
        loop {
            let expecting = r.expecting();
            let line_start = fed - r.len();
            let item = r.next(&mut to_mta);
            let line_end = fed - r.len();
            let at = out.forwarded.len();
            out.forwarded.extend_from_slice(&to_mta);
            to_mta.clear();
            match expecting {
                Expect::Chunk if out.forwarded.len() > at => {
                    let end = out.forwarded.len();
                    match out.chunks.last_mut() {
                        // One chunk read in several pieces is one region.
                        Some(last) if last.end == at => last.end = end,
                        _ => out.chunks.push(at..end),
                    }
                }
                Expect::Command | Expect::AuthResponse => {
                    assert_eq!(at, out.forwarded.len(), "bytes forwarded without an item");
                }
                _ => {}
            }
            let Some(item) = item else {
                match r.expecting() {
                    Expect::Command | Expect::AuthResponse => {
                        assert!(r.len() < MAX_LINE, "more than a line held");
                    }
                    Expect::Body | Expect::Chunk => assert!(r.is_empty(), "body held"),
                }
                break;
            };
            match item {
                Item::Command(cmd, canon) => {
                    assert_eq!(expecting, Expect::Command);
                    let content = canon
                        .strip_suffix(b"\r\n")
                        .expect("canonical line ends in CRLF");
                    assert_eq!(
                        parse_command(content),
                        cmd,
                        "canonical form reads otherwise"
                    );
                    // The raw line the reader took this from: the verb a
                    // lenient MTA would find in it is the forwarded one.
                    let raw = &input[line_start..line_end];
                    let raw = raw.strip_suffix(b"\r\n").expect("strict line");
                    let verb = lenient_verb(raw);
                    assert_eq!(verb, lenient_verb(content), "canonical form moved the verb");
                    match cmd {
                        // Answered by the agent itself, never forwarded.
                        Command::Bdat(None) | Command::ProxyOverride => continue,
                        Command::Data => r.expect_body(),
                        Command::Bdat(Some((n, _))) => r.expect_chunk(n),
                        Command::Auth(_) => r.expect_auth_response(),
                        _ => {}
                    }
                    out.events.push(Event::Command(verb));
                    out.forwarded.extend_from_slice(&canon);
                }
                Item::BadLine(_) | Item::TooLong => {
                    if expecting == Expect::AuthResponse {
                        // The MTA waits for a response: cancel it.
                        out.forwarded.extend_from_slice(b"*\r\n");
                        out.events.push(Event::AuthResponse);
                    }
                }
                Item::AuthResponse(line) => {
                    assert_eq!(expecting, Expect::AuthResponse);
                    out.forwarded.extend_from_slice(&line);
                    out.events.push(Event::AuthResponse);
                }
                Item::BodyEnd => {
                    assert_eq!(expecting, Expect::Body);
                    out.forwarded.extend_from_slice(b".\r\n");
                    out.events.push(Event::BodyEnd);
                }
                Item::BodyRefused(_) => {
                    assert_eq!(mode, BareLineEnding::Reject);
                    // The session refuses the message and closes.
                    break 'read;
                }
                Item::ChunkEnd => {
                    assert_eq!(expecting, Expect::Chunk);
                    out.events.push(Event::ChunkEnd);
                }
            }
        }
    }
    out
}

impl Relay {
    fn check(&self) {
        // (a) outside chunks, only CRLF line ends and no NUL.
        let mut from = 0;
        let ends = self
            .chunks
            .iter()
            .map(|c| c.start)
            .chain([self.forwarded.len()]);
        for (seg_end, next) in ends.zip(self.chunks.iter().map(|c| c.end).chain([0])) {
            let seg = &self.forwarded[from..seg_end];
            for (i, &b) in seg.iter().enumerate() {
                let text = seg.escape_ascii();
                match b {
                    0 => panic!("NUL forwarded: {text}"),
                    b'\r' => assert_eq!(seg.get(i + 1), Some(&b'\n'), "bare CR: {text}"),
                    b'\n' => assert!(i > 0 && seg[i - 1] == b'\r', "bare LF: {text}"),
                    _ => {}
                }
            }
            from = next;
        }
        // (b) the lenient reading finds what the agent found.
        assert_eq!(
            lenient_events(&self.forwarded),
            self.events,
            "a lenient reader finds other boundaries in {}",
            self.forwarded.escape_ascii()
        );
    }
}

/// Reads the forwarded stream as the most permissive MTA would.
fn lenient_events(s: &[u8]) -> Vec<Event> {
    #[derive(PartialEq)]
    enum Mode {
        Command,
        AuthResponse,
        Body,
    }
    let mut events = Vec::new();
    let mut mode = Mode::Command;
    let mut i = 0;
    while i < s.len() {
        let Some(len) = s[i..].iter().position(|&b| b == b'\r' || b == b'\n') else {
            break; // an unfinished line is no boundary
        };
        let line = &s[i..i + len];
        i += len;
        let crs = s[i..].iter().take_while(|&&b| b == b'\r').count();
        i += if crs > 0 && s.get(i + crs) == Some(&b'\n') {
            crs + 1
        } else {
            1
        };
        match mode {
            Mode::Command => {
                let verb = lenient_verb(line);
                match verb.as_slice() {
                    b"DATA" => mode = Mode::Body,
                    b"AUTH" => mode = Mode::AuthResponse,
                    b"BDAT" => {
                        let size = line
                            .split(|b| matches!(b, b' ' | b'\t' | 0x0b | 0x0c))
                            .filter(|w| !w.is_empty())
                            .nth(1)
                            .and_then(|w| std::str::from_utf8(w).ok())
                            .and_then(|w| w.parse::<u64>().ok())
                            .unwrap_or(0);
                        events.push(Event::Command(verb));
                        if size > 0 {
                            let left = (s.len() - i) as u64;
                            if left < size {
                                return events;
                            }
                            // left >= size: size fits in usize.
                            i += size as usize;
                            events.push(Event::ChunkEnd);
                        }
                        continue;
                    }
                    _ => {}
                }
                events.push(Event::Command(verb));
            }
            Mode::AuthResponse => {
                events.push(Event::AuthResponse);
                mode = Mode::Command;
            }
            Mode::Body => {
                if line == b"." {
                    events.push(Event::BodyEnd);
                    mode = Mode::Command;
                }
            }
        }
    }
    events
}

/// MTA side: replies, assembled and rewritten.
fn replies(data: &[u8]) {
    let mut asm = ReplyAssembler::default();
    for raw in data.split_inclusive(|b| *b == b'\n') {
        let _ = parse_reply_line(raw);
        match asm.push(Bytes::copy_from_slice(raw)) {
            Ok(Some(reply)) => {
                let total: usize = reply.lines.iter().map(|l| l.len()).sum();
                assert_eq!(reply.to_bytes().len(), total);
                for starttls in [None, Some(true), Some(false)] {
                    let r = reply.rewrite_ehlo(starttls, starttls == Some(true));
                    assert_eq!(r.code, reply.code);
                    for l in &r.lines {
                        assert!(parse_reply_line(l).is_ok(), "rewrite made a bad line");
                    }
                }
                let _ = reply.ehlo_keywords();
            }
            Ok(None) => {}
            Err(_) => asm = ReplyAssembler::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every end-of-data spelling from the smuggling research.
    const SMUGGLING: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
        b"\r\n.\0\r\n",
        b"\r\n\0.\r\n",
        b"\0\n.\n",
        b"\r\n.\r\0\n",
    ];

    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds: Vec<Vec<u8>> = [
            &b"EHLO a\r\nMAIL FROM:<a@b> SIZE=1\r\nRCPT TO:<\"q>\"@d>\r\nBDAT 5 LAST\r\nxxxxx"[..],
            b"250-mx\r\n250-PIPELINING\r\n250-XCLIENT ADDR\r\n250 STARTTLS\r\n354 go\r\n",
            b"DATA\r\nSubject: x\r\n\r\n..a\r\n.\r\nQUIT\r\n",
            b"AUTH PLAIN AGEAYg==\r\n*\r\n535 no\r\n",
            b"220-teaser\r\n220 mx\r\n421 4.4.2 bye\n",
            b"\xff\xfe\r\n.\n\n.\r\r\n",
            b"\tRCPT\tTO:<a@b>\r\ndata\t\r\nx\r\n.\r\nBDAT\t3 LAST\r\na\nbAUTH\x0bLOGIN\r\nu\r\n",
            b"xclient\tADDR=1.2.3.4\r\n\x0cXFORWARD\r\nRCPT TO:<a>\nMAIL FROM:<b>\r\n",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        for v in SMUGGLING {
            let mut s = b"EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nbody".to_vec();
            s.extend_from_slice(v);
            s.extend_from_slice(
                b"MAIL FROM:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\nforged\r\n.\r\nQUIT\r\n",
            );
            seeds.push(s);
        }
        seeds
    }

    /// The smuggling attempts, unmutated: the forged transaction is body
    /// (normalize) or never forwarded (reject).
    #[test]
    fn smuggled_transactions_stay_in_the_body() {
        for (n, s) in seeds().iter().skip(8).enumerate() {
            let name = SMUGGLING[n].escape_ascii().to_string();
            let verbs = |r: &Relay| {
                r.events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Command(v) => Some(String::from_utf8_lossy(v).into_owned()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            };
            let norm = relay(BareLineEnding::Normalize, &[s]);
            norm.check();
            assert_eq!(
                verbs(&norm),
                ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"],
                "{name}"
            );
            assert_eq!(
                norm.events.iter().filter(|e| **e == Event::BodyEnd).count(),
                1
            );
            let rej = relay(BareLineEnding::Reject, &[s]);
            rej.check();
            assert_eq!(verbs(&rej), ["EHLO", "MAIL", "RCPT", "DATA"], "{name}");
            assert!(!rej.forwarded.windows(6).any(|w| w == b"forged"), "{name}");
        }
    }

    #[test]
    fn the_lenient_reader_sees_smuggling_in_raw_bytes() {
        // What the invariant guards against: forwarding the raw body would
        // give a permissive MTA a command the agent never saw.
        let raw = b"DATA\r\nx\r\n.\r\r\nMAIL FROM:<e>\r\n";
        assert_eq!(
            lenient_events(raw),
            [
                Event::Command(b"DATA".to_vec()),
                Event::BodyEnd,
                Event::Command(b"MAIL".to_vec()),
            ]
        );
    }

    /// A bounded run over mutations of real SMTP traffic (xorshift, fixed
    /// seed): the same invariants the fuzz target checks, in every
    /// `cargo test`.
    #[test]
    fn bounded_fuzz_run() {
        let seeds = seeds();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"\r\n.\0\t\x0b: <>";
        for i in 0..20_000 {
            let mut d = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 8) {
                let r = next();
                let pos = (r as usize >> 8) % (d.len() + 1);
                match r % 4 {
                    0 if pos < d.len() => d[pos] = (r >> 32) as u8,
                    1 => d.insert(pos, alphabet[(r >> 40) as usize % alphabet.len()]),
                    2 if pos < d.len() => {
                        d.remove(pos);
                    }
                    _ => d.extend_from_slice(&d.clone()[..pos.min(d.len())]),
                }
            }
            exercise(&d);
        }
        exercise(&[]);
        exercise(&[b'a'; 5000]);
        exercise(b"\x03DATA\r\n");
    }
}
