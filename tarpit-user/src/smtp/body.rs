//! The DATA body, re-encoded on its way to the MTA.
//!
//! Forwarding the body as it came would let the MTA find an end of data
//! the agent did not (SMTP smuggling: `\n.\n`, `\r\n.\r\r\n` and the like
//! end a message for some MTAs), and run the commands after it past every
//! policy. So the agent reads the body strictly and writes it anew:
//!
//! - lines split at CRLF; with [`BareLineEnding::Normalize`] a bare LF
//!   ends a line too, and bare CRs and NULs are dropped; with
//!   [`BareLineEnding::Reject`] the first of them refuses the message;
//! - the body ends only at a raw line that is exactly `.` CRLF after a
//!   line that ended in CRLF (the DATA command's CRLF counts for the first);
//! - the client's dot-stuffing is removed (RFC 5321 4.5.2), and every line
//!   written that starts with `.` is stuffed again, with CRLF after it.
//!
//! What comes out holds no bare CR, LF or NUL and no line `.`: the only
//! CRLF.CRLF the MTA sees is the one the session appends after its hold.
//! The encoder streams: it holds back at most a CR and a leading dot.
use bytes::{BufMut, BytesMut};

use super::LineFault;
pub use crate::config::BareLineEnding;

/// Where in the current line's content the encoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// No content yet.
    Start,
    /// The content so far is one `.`, held: whether it is stuffing
    /// depends on what follows.
    Dot,
    /// Content written; the rest of the line goes out as it comes.
    Mid,
}

/// Re-encodes one DATA body; create one after the MTA's 354.
#[derive(Debug, Clone)]
pub struct BodyEncoder {
    mode: BareLineEnding,
    pos: Pos,
    /// The previous raw line ended in CRLF.
    prev_crlf: bool,
    /// No raw byte of the current line consumed yet.
    raw_empty: bool,
    /// The raw bytes of the current line so far are exactly `.` (a CR
    /// after it is pending in `cr`).
    raw_dot: bool,
    /// The last byte was a CR: a line end if an LF follows, else bare.
    cr: bool,
}

/// What [`BodyEncoder::feed`] found in its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyStep {
    /// All of the input consumed; the body goes on.
    More,
    /// The body ended after `consumed` bytes of the input (the terminator
    /// included); the rest is the client's next command.
    End { consumed: usize },
    /// Reject mode: a bare CR, bare LF or NUL; `consumed` counts the input
    /// up to and including the byte that showed it (for a bare CR, the
    /// byte after it).
    Refused { consumed: usize, fault: LineFault },
}

impl BodyEncoder {
    pub fn new(mode: BareLineEnding) -> BodyEncoder {
        BodyEncoder {
            mode,
            pos: Pos::Start,
            // The DATA command's CRLF: a body may be empty.
            prev_crlf: true,
            raw_empty: true,
            raw_dot: false,
            cr: false,
        }
    }

    /// Consumes `input` (a chunk of the client's body, split anywhere) and
    /// appends the re-encoded bytes to `out`. At `End`, the terminator is
    /// not written (the session sends it once its hold has run) and what
    /// was written ends with the last line's CRLF.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> BodyStep {
        let reject = self.mode == BareLineEnding::Reject;
        let mut i = 0;
        while i < input.len() {
            if self.pos == Pos::Mid && !self.cr {
                // The common case: a run of ordinary bytes goes out as is.
                let rest = &input[i..];
                let run = rest
                    .iter()
                    .position(|&b| matches!(b, b'\r' | b'\n' | 0))
                    .unwrap_or(rest.len());
                out.extend_from_slice(&rest[..run]);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            if self.cr {
                self.cr = false;
                if b == b'\n' {
                    if self.raw_dot && self.prev_crlf {
                        *self = BodyEncoder::new(self.mode);
                        return BodyStep::End { consumed: i };
                    }
                    self.end_line(out, true);
                    continue;
                }
                if reject {
                    return BodyStep::Refused {
                        consumed: i,
                        fault: LineFault::BareCr,
                    };
                }
                // A bare CR is dropped; the raw line is no longer `.`.
                self.raw_dot = false;
            }
            match b {
                b'\r' => {
                    self.cr = true;
                    self.raw_empty = false;
                }
                b'\n' if reject => {
                    return BodyStep::Refused {
                        consumed: i,
                        fault: LineFault::BareLf,
                    };
                }
                b'\n' => self.end_line(out, false),
                0 if reject => {
                    return BodyStep::Refused {
                        consumed: i,
                        fault: LineFault::Nul,
                    };
                }
                0 => {
                    self.raw_empty = false;
                    self.raw_dot = false;
                }
                b'.' if self.pos == Pos::Start => {
                    self.pos = Pos::Dot;
                    self.raw_dot = self.raw_empty;
                    self.raw_empty = false;
                }
                b'.' if self.pos == Pos::Dot => {
                    // `..`: one dot was stuffing, the other starts the
                    // content and is stuffed again.
                    out.put_slice(b"..");
                    self.enter_content();
                }
                _ => {
                    // After a held dot: it was stuffing, dropped.
                    out.put_u8(b);
                    self.enter_content();
                }
            }
        }
        BodyStep::More
    }

    fn enter_content(&mut self) {
        self.pos = Pos::Mid;
        self.raw_empty = false;
        self.raw_dot = false;
    }

    /// Ends the current line (not the body): a lone `.` goes out stuffed.
    fn end_line(&mut self, out: &mut BytesMut, crlf: bool) {
        if self.pos == Pos::Dot {
            out.put_slice(b"..");
        }
        out.put_slice(b"\r\n");
        self.pos = Pos::Start;
        self.prev_crlf = crlf;
        self.raw_empty = true;
        self.raw_dot = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: BareLineEnding = BareLineEnding::Normalize;
    const R: BareLineEnding = BareLineEnding::Reject;

    /// Feeds `pieces` in order; the bytes written and the step that
    /// stopped it (offsets counted over the whole input).
    fn run(mode: BareLineEnding, pieces: &[&[u8]]) -> (Vec<u8>, BodyStep) {
        let mut e = BodyEncoder::new(mode);
        let mut out = BytesMut::new();
        let mut before = 0;
        for p in pieces {
            match e.feed(p, &mut out) {
                BodyStep::More => before += p.len(),
                BodyStep::End { consumed } => {
                    return (
                        out.to_vec(),
                        BodyStep::End {
                            consumed: before + consumed,
                        },
                    );
                }
                BodyStep::Refused { consumed, fault } => {
                    let consumed = before + consumed;
                    return (out.to_vec(), BodyStep::Refused { consumed, fault });
                }
            }
        }
        (out.to_vec(), BodyStep::More)
    }

    /// The whole input, and checks that every two-piece split and the
    /// byte-by-byte feed give the same.
    fn encode(mode: BareLineEnding, input: &[u8]) -> (Vec<u8>, BodyStep) {
        let whole = run(mode, &[input]);
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(run(mode, &[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(mode, &bytes), whole, "byte by byte");
        assert_clean(&whole.0);
        whole
    }

    /// What reaches the MTA: no bare CR, LF or NUL, no line `.`.
    fn assert_clean(out: &[u8]) {
        for (i, &b) in out.iter().enumerate() {
            match b {
                0 => panic!("NUL at {i}"),
                b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
        let text = out.escape_ascii().to_string();
        assert!(!out.starts_with(b".\r\n"), "{text}");
        assert!(!out.windows(5).any(|w| w == b"\r\n.\r\n"), "{text}");
    }

    /// Every end-of-data spelling from the smuggling research, each
    /// followed by a smuggled transaction and the real end.
    const SMUGGLED: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
        b"\r\n.\0\r\n",
        b"\r\n\0.\r\n",
        b"\r\n.\r\0\n",
        b"\r\n.\0\n",
        b"\r\n\r.\r\n",
        b"\n\r\n.\n",
    ];

    fn smuggle(variant: &[u8]) -> Vec<u8> {
        let mut m = b"Subject: x\r\n\r\nbody".to_vec();
        m.extend_from_slice(variant);
        m.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nforged\r\n.\r\n");
        m
    }

    #[test]
    fn smuggled_ends_are_body_when_normalising() {
        for v in SMUGGLED {
            let input = smuggle(v);
            let mut tail = input.clone();
            tail.extend_from_slice(b"QUIT\r\n");
            let (out, step) = encode(N, &tail);
            let name = v.escape_ascii().to_string();
            assert_eq!(
                step,
                BodyStep::End {
                    consumed: input.len()
                },
                "{name}"
            );
            let text = String::from_utf8_lossy(&out);
            assert!(text.contains("MAIL FROM:<evil@x>\r\n"), "{name}: {text:?}");
            assert!(text.ends_with("forged\r\n"), "{name}: {text:?}");
        }
    }

    #[test]
    fn smuggled_ends_are_refused_when_rejecting() {
        for v in SMUGGLED {
            let input = smuggle(v);
            let (out, step) = encode(R, &input);
            let name = v.escape_ascii().to_string();
            let BodyStep::Refused { consumed, .. } = step else {
                panic!("{name}: {step:?}");
            };
            // Refused before anything smuggled was written.
            let at = input.windows(4).position(|w| w == b"MAIL").expect("MAIL");
            assert!(consumed <= at + 1, "{name}: {consumed} > {at}");
            assert!(!String::from_utf8_lossy(&out).contains("MAIL"), "{name}");
        }
    }

    #[test]
    fn exact_outputs() {
        let cases: &[(&[u8], &[u8], Option<usize>)] = &[
            (b".\r\n", b"", Some(3)),
            (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", Some(6)),
            (b"a\n.\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n", Some(10)),
            (b"a\r\n.\r\r\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n", Some(13)),
            (b"a\r\r\n.\r\r\n", b"a\r\n..\r\n", None),
            (b"\r.\r\n", b"..\r\n", None),
            (b"\n.\r\n", b"\r\n..\r\n", None),
            (b"a\0b\rc\r\n", b"abc\r\n", None),
            (b"x\r\n\r\n.\r\n", b"x\r\n\r\n", Some(8)),
            (b"..\r\n.\r\n", b"..\r\n", Some(7)),
            (b".x\r\n", b"x\r\n", None),
            (b"...\r\n", b"...\r\n", None),
            (b".\0x\r\n", b"x\r\n", None),
            (b"long line", b"long line", None),
            (b"a\r", b"a", None),
            (b".", b"", None),
        ];
        for (input, want, end) in cases {
            let (out, step) = encode(N, input);
            let name = input.escape_ascii().to_string();
            assert_eq!(
                out.escape_ascii().to_string(),
                want.escape_ascii().to_string(),
                "{name}"
            );
            match end {
                Some(n) => assert_eq!(step, BodyStep::End { consumed: *n }, "{name}"),
                None => assert_eq!(step, BodyStep::More, "{name}"),
            }
        }
    }

    #[test]
    fn dot_stuffing_round_trips() {
        let lines: &[&[u8]] = &[b"..", b".x", b"x.", b"...", b".", b"", b". ", b"a"];
        let mut stuffed = Vec::new();
        for l in lines {
            if l.starts_with(b".") {
                stuffed.push(b'.');
            }
            stuffed.extend_from_slice(l);
            stuffed.extend_from_slice(b"\r\n");
        }
        let mut input = stuffed.clone();
        input.extend_from_slice(b".\r\n");
        for mode in [N, R] {
            let (out, step) = encode(mode, &input);
            assert_eq!(out, stuffed);
            assert_eq!(
                step,
                BodyStep::End {
                    consumed: input.len()
                }
            );
        }
    }

    #[test]
    fn clean_bodies_are_the_same_in_both_modes() {
        let input = b"From: a\r\n\r\n..dots\r\n.x\r\nend\r\n.\r\nQUIT\r\n";
        assert_eq!(encode(N, input), encode(R, input));
        assert_eq!(
            encode(R, input).1,
            BodyStep::End {
                consumed: input.len() - 6
            }
        );
    }

    #[test]
    fn reject_names_the_fault() {
        let refused = |input: &[u8]| encode(R, input).1;
        assert_eq!(
            refused(b"ab\ncd"),
            BodyStep::Refused {
                consumed: 3,
                fault: LineFault::BareLf
            }
        );
        assert_eq!(
            refused(b"ab\rcd"),
            BodyStep::Refused {
                consumed: 4,
                fault: LineFault::BareCr
            }
        );
        assert_eq!(
            refused(b"a\r\nb\0"),
            BodyStep::Refused {
                consumed: 5,
                fault: LineFault::Nul
            }
        );
        // A CR that ends the input is not yet known to be bare.
        assert_eq!(refused(b"ab\r"), BodyStep::More);
    }

    #[test]
    fn the_encoder_is_reusable_after_the_end() {
        let mut e = BodyEncoder::new(N);
        let mut out = BytesMut::new();
        assert_eq!(e.feed(b"a\n.\r\n", &mut out), BodyStep::More);
        assert_eq!(
            e.feed(b"b\r\n.\r\n", &mut out),
            BodyStep::End { consumed: 6 }
        );
        assert_eq!(e.feed(b".\r\n", &mut out), BodyStep::End { consumed: 3 });
        assert_eq!(&out[..], b"a\r\n..\r\nb\r\n");
    }

    /// A line with no end in sight streams through: the encoder keeps
    /// nothing of it but, at most, a CR.
    #[test]
    fn long_lines_stream() {
        let mut e = BodyEncoder::new(N);
        let mut out = BytesMut::new();
        let chunk = [b'x'; 4096];
        for n in 1..=256 {
            assert_eq!(e.feed(&chunk, &mut out), BodyStep::More);
            assert_eq!(out.len(), n * chunk.len());
        }
        assert_eq!(e.feed(b"y\r", &mut out), BodyStep::More);
        assert_eq!(out.len(), 256 * chunk.len() + 1, "only the CR is held");
        assert_eq!(e.feed(b"\n.\r\n", &mut out), BodyStep::End { consumed: 4 });
        assert!(out.ends_with(b"xy\r\n"));
    }
}
