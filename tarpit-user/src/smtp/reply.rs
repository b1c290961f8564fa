//! Replies from the MTA: parsed to learn the code, relayed byte for byte.

use bytes::{Bytes, BytesMut};

/// One parsed reply line (`250-PIPELINING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    pub code: u16,
    /// `false` for `ddd-` continuation lines.
    pub last: bool,
    pub text: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with a 3-digit code from 200 to 599")]
    BadCode,
    #[error("reply code is not followed by a space, a hyphen or the line end")]
    BadSeparator,
    #[error("multi-line reply changes its code from {0} to {1}")]
    CodeChanged(u16, u16),
    #[error("multi-line reply has more than {0} lines")]
    TooManyLines(usize),
}

/// Parses one reply line (with or without its line ending).
pub fn parse_reply_line(line: &[u8]) -> Result<ReplyLine<'_>, ReplyError> {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\r' | b'\n') {
        end -= 1;
    }
    let line = &line[..end];
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(ReplyError::BadCode);
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    if !(200..600).contains(&code) {
        return Err(ReplyError::BadCode);
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(ReplyError::BadSeparator),
    };
    Ok(ReplyLine { code, last, text })
}

/// A complete reply: its code and its lines exactly as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The raw lines, each with its own line ending.
    pub lines: Vec<Bytes>,
}

impl Reply {
    /// A single-line reply made by the agent itself.
    pub fn local(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![Bytes::from(format!("{code} {text}\r\n"))],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent_failure(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The bytes to send.
    pub fn to_bytes(&self) -> Bytes {
        if self.lines.len() == 1 {
            return self.lines[0].clone();
        }
        let mut out = BytesMut::with_capacity(self.lines.iter().map(|l| l.len()).sum());
        for l in &self.lines {
            out.extend_from_slice(l);
        }
        out.freeze()
    }

    /// The EHLO keywords (`PIPELINING`, `SIZE 1000`), upper-cased.
    pub fn ehlo_keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .filter_map(|l| parse_reply_line(l).ok())
            .map(|l| String::from_utf8_lossy(l.text).trim().to_ascii_uppercase())
            .collect()
    }

    /// Rewrites a 250 EHLO reply for the client: drops the extensions only
    /// the agent may use (`XCLIENT`, `XFORWARD`), and adds or drops
    /// `STARTTLS` according to `starttls` (`Some(true)`: the agent offers
    /// it; `Some(false)`: TLS is already on, nobody offers it; `None`: as
    /// the MTA said). With `hide_auth`, `AUTH` is not offered (the agent
    /// terminates TLS and the client has not started it: Postfix's
    /// `smtpd_tls_auth_only`). The first line (the greeting) is kept as it
    /// came.
    pub fn rewrite_ehlo(&self, starttls: Option<bool>, hide_auth: bool) -> Reply {
        if self.code != 250 || self.lines.is_empty() {
            return self.clone();
        }
        let first = self.lines[0].clone();
        let mut keywords: Vec<Bytes> = Vec::new();
        for raw in &self.lines[1..] {
            let Ok(l) = parse_reply_line(raw) else {
                return self.clone();
            };
            let word = String::from_utf8_lossy(l.text).trim().to_ascii_uppercase();
            let verb = word.split_ascii_whitespace().next().unwrap_or("");
            match verb {
                "XCLIENT" | "XFORWARD" => continue,
                "STARTTLS" if starttls.is_some() => continue,
                v if hide_auth && (v == "AUTH" || v.starts_with("AUTH=")) => continue,
                _ => {}
            }
            keywords.push(Bytes::copy_from_slice(l.text));
        }
        if starttls == Some(true) {
            keywords.push(Bytes::from_static(b"STARTTLS"));
        }
        let Ok(first_line) = parse_reply_line(&first) else {
            return self.clone();
        };
        let mut lines = Vec::with_capacity(keywords.len() + 1);
        let first_text = first_line.text;
        let n = keywords.len();
        lines.push(make_line(250, n == 0, first_text));
        for (i, k) in keywords.iter().enumerate() {
            lines.push(make_line(250, i + 1 == n, k));
        }
        Reply { code: 250, lines }
    }
}

fn make_line(code: u16, last: bool, text: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(text.len() + 6);
    b.extend_from_slice(format!("{code}{}", if last { ' ' } else { '-' }).as_bytes());
    b.extend_from_slice(text);
    b.extend_from_slice(b"\r\n");
    b.freeze()
}

/// Collects reply lines until the final one.
#[derive(Debug, Default)]
pub struct ReplyAssembler {
    code: Option<u16>,
    lines: Vec<Bytes>,
}

/// Most lines a reply may have: Postfix's EHLO reply has about 12.
pub const MAX_REPLY_LINES: usize = 100;

impl ReplyAssembler {
    /// Adds a line; returns the reply when it was the last line.
    pub fn push(&mut self, raw: Bytes) -> Result<Option<Reply>, ReplyError> {
        let line = parse_reply_line(&raw)?;
        if let Some(code) = self.code
            && code != line.code
        {
            return Err(ReplyError::CodeChanged(code, line.code));
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines(MAX_REPLY_LINES));
        }
        let (code, last) = (line.code, line.last);
        self.code = Some(code);
        self.lines.push(raw);
        if !last {
            return Ok(None);
        }
        self.code = None;
        Ok(Some(Reply {
            code,
            lines: std::mem::take(&mut self.lines),
        }))
    }

    /// True while a multi-line reply is half read.
    pub fn is_partial(&self) -> bool {
        !self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(text: &[u8]) -> Vec<Reply> {
        let mut a = ReplyAssembler::default();
        let mut out = Vec::new();
        for line in text.split_inclusive(|b| *b == b'\n') {
            if let Some(r) = a.push(Bytes::copy_from_slice(line)).unwrap() {
                out.push(r);
            }
        }
        assert!(!a.is_partial());
        out
    }

    #[test]
    fn single_and_multi_line() {
        let rs =
            assemble(b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n354 go\r\n");
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[0].code, 220);
        assert_eq!(rs[1].code, 250);
        assert_eq!(rs[1].lines.len(), 3);
        assert_eq!(
            &rs[1].to_bytes()[..],
            b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
        );
        assert_eq!(rs[2].code, 354);
    }

    #[test]
    fn bare_code_and_bare_lf() {
        assert_eq!(
            parse_reply_line(b"250").unwrap(),
            ReplyLine {
                code: 250,
                last: true,
                text: b""
            }
        );
        assert_eq!(parse_reply_line(b"550 no\n").unwrap().text, b"no");
    }

    #[test]
    fn bad_lines_are_errors() {
        assert_eq!(parse_reply_line(b"25"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply_line(b"abc def"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply_line(b"150 old"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply_line(b"600 no"), Err(ReplyError::BadCode));
        assert_eq!(parse_reply_line(b"250x"), Err(ReplyError::BadSeparator));
        let mut a = ReplyAssembler::default();
        a.push(Bytes::from_static(b"250-a\r\n")).unwrap();
        assert_eq!(
            a.push(Bytes::from_static(b"550 b\r\n")),
            Err(ReplyError::CodeChanged(250, 550))
        );
    }

    #[test]
    fn too_many_lines() {
        let mut a = ReplyAssembler::default();
        for _ in 0..MAX_REPLY_LINES {
            a.push(Bytes::from_static(b"250-x\r\n")).unwrap();
        }
        assert_eq!(
            a.push(Bytes::from_static(b"250 x\r\n")),
            Err(ReplyError::TooManyLines(MAX_REPLY_LINES))
        );
    }

    fn ehlo() -> Reply {
        assemble(b"250-mx.tarpit.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-XCLIENT NAME ADDR\r\n250-STARTTLS\r\n250-8BITMIME\r\n250 CHUNKING\r\n").remove(0)
    }

    #[test]
    fn ehlo_rewrite_hides_xclient_and_handles_starttls() {
        let r = ehlo().rewrite_ehlo(None, false);
        assert_eq!(
            &r.to_bytes()[..],
            b"250-mx.tarpit.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-8BITMIME\r\n250 CHUNKING\r\n"
        );
        let r = ehlo().rewrite_ehlo(Some(false), false);
        assert!(!r.ehlo_keywords().contains(&"STARTTLS".to_string()));
        assert_eq!(r.ehlo_keywords().last().unwrap(), "CHUNKING");
        let plain = assemble(b"250 mx.tarpit.test\r\n").remove(0);
        let r = plain.rewrite_ehlo(Some(true), false);
        assert_eq!(&r.to_bytes()[..], b"250-mx.tarpit.test\r\n250 STARTTLS\r\n");
        // a non-250 reply is relayed untouched
        let e = Reply::local(554, "no");
        assert_eq!(e.rewrite_ehlo(Some(true), true), e);
    }

    #[test]
    fn ehlo_rewrite_hides_auth_before_tls() {
        let r = assemble(
            b"250-mx.tarpit.test\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250 8BITMIME\r\n",
        )
        .remove(0);
        let hidden = r.rewrite_ehlo(Some(true), true);
        assert_eq!(hidden.ehlo_keywords(), vec!["8BITMIME", "STARTTLS"]);
        let shown = r.rewrite_ehlo(Some(false), false);
        assert_eq!(shown.ehlo_keywords().len(), 3);
    }
}
