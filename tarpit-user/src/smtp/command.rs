//! Client commands: recognised leniently, forwarded canonically.
//!
//! MTAs split the verb from its arguments differently (Postfix accepts any
//! white space and skips it before the verb, Exim wants one space). The
//! agent recognises a verb wherever any of them might: leading white space
//! skipped, the verb ending at any white space, any case. What it forwards
//! is the [`canonical`] form of the line (verb upper-cased, one space, no
//! white space around the arguments), which every MTA reads as the agent
//! did, so no MTA can act on a command the agent did not classify.
//!
//! The parser never refuses a line: anything it does not recognise is
//! [`Command::Other`] and goes to the MTA, whose reply is relayed. It only
//! pulls out what the policies and the framing need (HELO name, envelope
//! addresses, BDAT size, AUTH mechanism).
use bytes::{BufMut, Bytes, BytesMut};

/// One command line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// `MAIL FROM:<addr>`; the null sender is an empty string.
    Mail(String),
    Rcpt(String),
    /// The verb DATA, whatever follows it: the session switches to body
    /// mode only on the MTA's 354, so an MTA that accepts `DATA x` cannot
    /// put the two readers out of step.
    Data,
    /// `BDAT size [LAST]`; `None` when the size or keyword is malformed,
    /// in which case the framing of what follows is unknown.
    Bdat(Option<(u64, bool)>),
    Rset,
    Quit,
    /// STARTTLS; `true` when arguments followed the verb (a syntax error
    /// for the MTA, which must not start TLS on it).
    Starttls(bool),
    /// `AUTH mechanism [initial-response]`: the mechanism only (the rest
    /// is a credential and is never kept).
    Auth(String),
    /// XCLIENT or XFORWARD, in any spelling: only the agent may send these
    /// to the MTA.
    ProxyOverride,
    Noop,
    Other,
}

/// White space as the most lenient MTA reads it between words. CR, LF and
/// NUL cannot reach here from a strict line; taking them as separators
/// keeps [`parse_command`] and [`canonical`] in agreement on any input.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | 0x0b | 0x0c | b'\r' | b'\n' | 0)
}

fn trim(s: &[u8]) -> &[u8] {
    let mut s = trim_start(s);
    while let [head @ .., last] = s {
        if !is_ws(*last) {
            break;
        }
        s = head;
    }
    s
}

/// The verb and the arguments (trimmed), as both the parser and the
/// canonical form see them.
fn split_verb(content: &[u8]) -> (&[u8], &[u8]) {
    let line = trim(content);
    match line.iter().position(|&b| is_ws(b)) {
        Some(i) => (&line[..i], trim(&line[i..])),
        None => (line, &[][..]),
    }
}

/// Classifies a command line's content (without its CRLF).
pub fn parse_command(content: &[u8]) -> Command {
    let (verb, rest) = split_verb(content);
    let verb = verb.to_ascii_uppercase();
    match verb.as_slice() {
        b"HELO" => Command::Helo(first_word(rest)),
        b"EHLO" => Command::Ehlo(first_word(rest)),
        b"MAIL" => match path_after(rest, b"FROM:") {
            Some(p) => Command::Mail(p),
            None => Command::Other,
        },
        b"RCPT" => match path_after(rest, b"TO:") {
            Some(p) => Command::Rcpt(p),
            None => Command::Other,
        },
        b"DATA" => Command::Data,
        b"BDAT" => Command::Bdat(parse_bdat(rest)),
        b"RSET" => Command::Rset,
        b"QUIT" => Command::Quit,
        b"STARTTLS" => Command::Starttls(!rest.is_empty()),
        b"AUTH" => Command::Auth(first_word(rest).to_ascii_uppercase()),
        b"XCLIENT" | b"XFORWARD" => Command::ProxyOverride,
        b"NOOP" => Command::Noop,
        _ => Command::Other,
    }
}

/// The line as the agent forwards it: verb upper-cased (ASCII), then, if
/// anything but white space follows it, one space and the rest with
/// leading and trailing white space removed; then CRLF. Never contains CR,
/// LF or NUL except the final CRLF (a CR, LF or NUL inside the arguments,
/// which a strict line cannot hold, becomes a space).
pub fn canonical(content: &[u8]) -> Bytes {
    let (verb, rest) = split_verb(content);
    let mut out = BytesMut::with_capacity(verb.len() + rest.len() + 3);
    out.extend(verb.iter().map(u8::to_ascii_uppercase));
    if !rest.is_empty() {
        out.put_u8(b' ');
        out.extend(rest.iter().map(|&b| match b {
            b'\r' | b'\n' | 0 => b' ',
            b => b,
        }));
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// White-space separated words, as [`is_ws`] separates them.
fn words(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    s.split(|&b| is_ws(b)).filter(|w| !w.is_empty())
}

fn first_word(rest: &[u8]) -> String {
    String::from_utf8_lossy(words(rest).next().unwrap_or(b"")).into_owned()
}

/// The path of `MAIL FROM:` / `RCPT TO:`, lenient like Postfix: white space
/// around the colon is accepted, angle brackets are optional, and a quoted
/// local part may contain `>` and spaces.
fn path_after(rest: &[u8], keyword: &[u8]) -> Option<String> {
    let rest = trim_start(rest);
    if rest.len() < keyword.len()
        || !rest[..keyword.len() - 1].eq_ignore_ascii_case(&keyword[..keyword.len() - 1])
    {
        return None;
    }
    let after_word = trim_start(&rest[keyword.len() - 1..]);
    let after_colon = trim_start(after_word.strip_prefix(b":")?);
    let path = if let Some(inner) = after_colon.strip_prefix(b"<") {
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (i, &b) in inner.iter().enumerate() {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = !quoted;
            } else if b == b'>' && !quoted {
                end = Some(i);
                break;
            }
        }
        &inner[..end?]
    } else {
        let end = after_colon
            .iter()
            .position(|&b| is_ws(b))
            .unwrap_or(after_colon.len());
        &after_colon[..end]
    };
    // Source routes (`@a,@b:user@c`) are obsolete; the mailbox is what counts.
    let path = match (path.first(), path.iter().position(|&b| b == b':')) {
        (Some(b'@'), Some(i)) => &path[i + 1..],
        _ => path,
    };
    Some(String::from_utf8_lossy(path).into_owned())
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [first, tail @ ..] = s {
        if !is_ws(*first) {
            break;
        }
        s = tail;
    }
    s
}

fn parse_bdat(rest: &[u8]) -> Option<(u64, bool)> {
    let mut words = words(rest);
    let size_word = words.next()?;
    if size_word.len() > 19 || !size_word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(size_word).ok()?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case(b"LAST") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some((size, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(
            parse_command(b"ehlo client.example\r\n"),
            Command::Ehlo("client.example".into())
        );
        assert_eq!(parse_command(b"HeLo x"), Command::Helo("x".into()));
        assert_eq!(parse_command(b"quit\r\n"), Command::Quit);
        assert_eq!(parse_command(b"data\r\n"), Command::Data);
        assert_eq!(parse_command(b"StartTLS\r\n"), Command::Starttls(false));
        assert_eq!(parse_command(b"rset"), Command::Rset);
        assert_eq!(parse_command(b"NOOP hello"), Command::Noop);
    }

    #[test]
    fn envelope_paths() {
        assert_eq!(
            parse_command(b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\n"),
            Command::Mail("a@b.example".into())
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<>\r\n"),
            Command::Mail(String::new())
        );
        assert_eq!(
            parse_command(b"mail from: <x@y>"),
            Command::Mail("x@y".into())
        );
        assert_eq!(
            parse_command(b"MAIL FROM:x@y SIZE=1"),
            Command::Mail("x@y".into())
        );
        assert_eq!(
            parse_command(b"RCPT TO:<\"a>b c\"@d>\r\n"),
            Command::Rcpt("\"a>b c\"@d".into())
        );
        assert_eq!(
            parse_command(b"RCPT TO:<@relay.example:u@d.example>"),
            Command::Rcpt("u@d.example".into())
        );
        assert_eq!(
            parse_command("RCPT TO:<ü@bücher.example> ".as_bytes()),
            Command::Rcpt("ü@bücher.example".into())
        );
        // malformed envelope commands are the MTA's to refuse
        assert_eq!(parse_command(b"MAIL <a@b>"), Command::Other);
        assert_eq!(parse_command(b"RCPT TO:<unterminated"), Command::Other);
        assert_eq!(parse_command(b"MAIL"), Command::Other);
    }

    #[test]
    fn bdat_framing() {
        assert_eq!(
            parse_command(b"BDAT 1000\r\n"),
            Command::Bdat(Some((1000, false)))
        );
        assert_eq!(
            parse_command(b"bdat 0 last\r\n"),
            Command::Bdat(Some((0, true)))
        );
        assert_eq!(parse_command(b"BDAT\r\n"), Command::Bdat(None));
        assert_eq!(parse_command(b"BDAT -1"), Command::Bdat(None));
        assert_eq!(parse_command(b"BDAT 10 LAST x"), Command::Bdat(None));
        assert_eq!(
            parse_command(b"BDAT 99999999999999999999"),
            Command::Bdat(None)
        );
        assert_eq!(parse_command(b"BDAT 1 FIRST"), Command::Bdat(None));
    }

    #[test]
    fn auth_keeps_only_the_mechanism() {
        assert_eq!(
            parse_command(b"auth plain AHVzZXIAcGFzcw==\r\n"),
            Command::Auth("PLAIN".into())
        );
        assert_eq!(parse_command(b"AUTH LOGIN"), Command::Auth("LOGIN".into()));
    }

    #[test]
    fn proxy_overrides_are_recognised() {
        assert_eq!(
            parse_command(b"XCLIENT ADDR=1.2.3.4"),
            Command::ProxyOverride
        );
        assert_eq!(parse_command(b"xforward NAME=x"), Command::ProxyOverride);
    }

    #[test]
    fn garbage_is_other() {
        assert_eq!(parse_command(b""), Command::Other);
        assert_eq!(parse_command(b"\xff\xfe\r\n"), Command::Other);
        assert_eq!(parse_command(b"GET / HTTP/1.1"), Command::Other);
    }

    #[test]
    fn data_and_starttls_whatever_follows() {
        assert_eq!(parse_command(b"DATA now"), Command::Data);
        assert_eq!(parse_command(b"data\t"), Command::Data);
        assert_eq!(parse_command(b"STARTTLS x"), Command::Starttls(true));
        assert_eq!(parse_command(b"\tstarttls \t"), Command::Starttls(false));
    }

    /// Every white space any MTA might take as a separator, and leading
    /// white space, are recognised (a verb the agent misses is a command
    /// that skips its policies).
    #[test]
    fn lenient_spellings_are_recognised() {
        let cases: &[(&[u8], Command)] = &[
            (b"RCPT\tTO:<a@b>", Command::Rcpt("a@b".into())),
            (b"RCPT TO:\t<a@b>", Command::Rcpt("a@b".into())),
            (b"RCPT\x0bTO:<a@b>", Command::Rcpt("a@b".into())),
            (b"rcpt\x0cto:\x0b<a@b>\x0c", Command::Rcpt("a@b".into())),
            (b"  MAIL FROM:<a@b>", Command::Mail("a@b".into())),
            (b"MAIL FROM:a@b\tSIZE=1", Command::Mail("a@b".into())),
            (b"data\t", Command::Data),
            (b"\x0bDATA", Command::Data),
            (b"BDAT\t10 LAST", Command::Bdat(Some((10, true)))),
            (b"BDAT\x0c10\x0bLAST", Command::Bdat(Some((10, true)))),
            (b"AUTH\tPLAIN x", Command::Auth("PLAIN".into())),
            (b"auth\x0bplain\x0cx", Command::Auth("PLAIN".into())),
            (
                b"EHLO\tclient.example",
                Command::Ehlo("client.example".into()),
            ),
            (b"xclient\tADDR=1.2.3.4", Command::ProxyOverride),
            (b"\tXFORWARD", Command::ProxyOverride),
            (b"XcLiEnT\x0bNAME=x", Command::ProxyOverride),
            (b"xForward\x0c", Command::ProxyOverride),
            (b"QUIT\x0c", Command::Quit),
            (b"rset\t", Command::Rset),
        ];
        for (line, want) in cases {
            assert_eq!(
                &parse_command(line),
                want,
                "{:?}",
                line.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn canonical_form() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"RCPT\tTO:<a@b>", b"RCPT TO:<a@b>\r\n"),
            (b"rcpt TO:\t<a@b>", b"RCPT TO:\t<a@b>\r\n"),
            (b"  MAIL FROM:<a@b>  ", b"MAIL FROM:<a@b>\r\n"),
            (b"data\t", b"DATA\r\n"),
            (b"Data x", b"DATA x\r\n"),
            (b"BDAT\t10 LAST", b"BDAT 10 LAST\r\n"),
            (b"AUTH\tPLAIN x", b"AUTH PLAIN x\r\n"),
            (b"xclient\tADDR=1.2.3.4", b"XCLIENT ADDR=1.2.3.4\r\n"),
            (b"\tXFORWARD", b"XFORWARD\r\n"),
            (b"\x0bnoop\x0c\x0bhi\x0b", b"NOOP hi\r\n"),
            (b"quit\x0c", b"QUIT\r\n"),
            (b"", b"\r\n"),
            (b" \t ", b"\r\n"),
            (b"\xc3\xbc x", b"\xc3\xbc x\r\n"),
            // not from strict lines, but never forwarded as line ends
            (b"DATA\rQUIT", b"DATA QUIT\r\n"),
            (
                b"MAIL FROM:<a>\nRCPT TO:<b>\r",
                b"MAIL FROM:<a> RCPT TO:<b>\r\n",
            ),
            (b"DA\0TA", b"DA TA\r\n"),
        ];
        for (line, want) in cases {
            let got = canonical(line);
            assert_eq!(&got[..], *want, "{:?}", line.escape_ascii().to_string());
            // the MTA's reading of what is forwarded is the agent's reading
            let content = &got[..got.len() - 2];
            assert_eq!(parse_command(content), parse_command(line));
        }
    }

    #[test]
    fn separators_are_not_verb_bytes() {
        // NUL, CR and LF never come from a strict line; if they did, they
        // would separate words, in the parser as in the canonical form.
        assert_eq!(parse_command(b"DATA\0"), Command::Data);
        assert_eq!(parse_command(b"DA\0TA"), Command::Other);
        assert_eq!(parse_command(b"\r\nQUIT\r\n"), Command::Quit);
    }
}
