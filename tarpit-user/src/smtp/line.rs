//! The strict reading of a command line: it ends at CRLF and nowhere else.
//!
//! MTAs disagree about bare CR and LF (Postfix ends a line at a bare LF and
//! strips CRs before it; others end one at a bare CR too). A line the agent
//! took as one command could be two for the MTA, or the other way round,
//! so the agent accepts only lines every reader frames the same way, and
//! refuses the rest without forwarding them.

/// Why a line is not a strict SMTP line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    /// An LF not preceded by CR (also a line with no CRLF at its end).
    BareLf,
    /// A CR not followed by LF.
    BareCr,
    /// A NUL byte (C-string based MTAs cut the line there).
    Nul,
}

impl LineFault {
    /// For logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LineFault::BareLf => "bare LF",
            LineFault::BareCr => "bare CR",
            LineFault::Nul => "NUL",
        }
    }
}

impl std::fmt::Display for LineFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line as [`LineBuf::next_line`](super::LineBuf::next_line) frames it
/// (a client's lines end at CRLF, so a bare LF is inside). `Ok(content without the CRLF)` only if it ends with CRLF
/// and holds no other CR, LF or NUL; else the first fault, left to right.
/// A line with no LF at its end (never framed so) counts as `BareLf`.
pub fn strict_line(line: &[u8]) -> Result<&[u8], LineFault> {
    let content = line.strip_suffix(b"\r\n");
    let body = content.unwrap_or(line);
    for (i, &b) in body.iter().enumerate() {
        match b {
            0 => return Err(LineFault::Nul),
            b'\n' => return Err(LineFault::BareLf),
            b'\r' if body.get(i + 1) != Some(&b'\n') => return Err(LineFault::BareCr),
            // A CRLF inside the content: a second line, which only a
            // caller that did not frame at LF can hand us.
            b'\r' => return Err(LineFault::BareLf),
            _ => {}
        }
    }
    match content {
        Some(c) => Ok(c),
        None => Err(LineFault::BareLf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_lines_are_strict() {
        assert_eq!(strict_line(b"EHLO a\r\n"), Ok(&b"EHLO a"[..]));
        assert_eq!(strict_line(b"\r\n"), Ok(&b""[..]));
        assert_eq!(
            strict_line(b"RCPT\tTO:<a@b>\r\n"),
            Ok(&b"RCPT\tTO:<a@b>"[..])
        );
    }

    #[test]
    fn faults_are_named_left_to_right() {
        assert_eq!(strict_line(b"MAIL FROM:<a>\n"), Err(LineFault::BareLf));
        assert_eq!(strict_line(b".\r\r\n"), Err(LineFault::BareCr));
        assert_eq!(strict_line(b"DATA\rQUIT\r\n"), Err(LineFault::BareCr));
        assert_eq!(strict_line(b"DA\0TA\r\n"), Err(LineFault::Nul));
        assert_eq!(strict_line(b"a\0b\rc\n"), Err(LineFault::Nul));
        assert_eq!(strict_line(b"a\rb\0\r\n"), Err(LineFault::BareCr));
        assert_eq!(strict_line(b"\n"), Err(LineFault::BareLf));
        assert_eq!(strict_line(b"a\r\nb\r\n"), Err(LineFault::BareLf));
    }

    #[test]
    fn unframed_input_does_not_panic() {
        assert_eq!(strict_line(b""), Err(LineFault::BareLf));
        assert_eq!(strict_line(b"abc"), Err(LineFault::BareLf));
        assert_eq!(strict_line(b"abc\r"), Err(LineFault::BareCr));
        assert_eq!(LineFault::Nul.as_str(), "NUL");
        assert_eq!(LineFault::BareCr.to_string(), "bare CR");
    }
}
