//! JSON-RPC framing over a byte stream: `Content-Length` headers, a blank
//! line, a JSON body. Written here rather than taken from a crate because
//! a broken message must be answered and skipped, never end the session:
//!
//! - header lines are bytes, not text (a stray non-UTF-8 byte is a broken
//!   header, not an I/O error);
//! - after a broken message the reader resynchronises on the next
//!   `Content-Length: N` line. That pattern (a header name, digits, a raw
//!   line break) cannot occur inside a JSON body, whose strings escape
//!   line breaks, so finding it is a reliable message boundary, even in the
//!   middle of a body whose declared length was a lie;
//! - a body above [`MAX_MESSAGE_BYTES`] is skipped without being kept, and
//!   the skip stops early at the next header (a length of 10^12 does not
//!   swallow the session);
//! - lone UTF-16 surrogates in string escapes (`"\ud800"`), which
//!   `serde_json` refuses, are replaced by U+FFFD and the message is
//!   flagged, so the server can name the document they were meant for.

use serde_json::Value;
use std::io::Read;

/// Messages larger than this are read past and answered with an error.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A header line longer than this is not a header.
const MAX_HEADER_LINE: usize = 8 * 1024;

const CONTENT_LENGTH: &[u8] = b"content-length:";

/// One message off the wire.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    /// JSON whose strings held lone UTF-16 surrogates, each replaced by
    /// U+FFFD: the text is not what the client meant.
    LoneSurrogates(Value),
    /// Not JSON, or a broken header: answered with a parse error. Whatever
    /// follows it up to the next header is skipped without another answer.
    Malformed(String),
    /// Content-Length above the limit: skipped unread, answered.
    TooLarge(u64),
}

/// Reads frames from `R`, resynchronising after broken ones.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    pos: usize,
    eof: bool,
    /// A broken message was reported: bytes up to the next header are its
    /// remains and are skipped silently.
    quiet: bool,
    /// The length of a message whose header block is read and whose body
    /// is next (stray bytes before it were reported first).
    pending: Option<u64>,
    /// Bytes of an oversized body still to skip (answered already).
    skip: Option<u64>,
    max_body: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader::with_limit(inner, MAX_MESSAGE_BYTES)
    }

    /// A reader that refuses bodies above `max_body` bytes.
    pub fn with_limit(inner: R, max_body: usize) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            eof: false,
            quiet: false,
            pending: None,
            skip: None,
            max_body,
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
    }

    /// Reads more input; `false` at the end of input.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + (64 << 10), 0);
        let n = loop {
            match self.inner.read(&mut self.buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(e);
                }
            }
        };
        self.buf.truncate(old + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    /// The next header line without its line break, or `None` at the end
    /// of input. A line too long to be a header comes back in pieces, each
    /// ending just before any `Content-Length:` it holds.
    fn line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut scanned = 0;
        loop {
            let avail = self.avail();
            if let Some(i) = avail[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + i;
                let mut line = avail[..end].to_vec();
                self.consume(end + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            scanned = avail.len();
            if avail.len() > MAX_HEADER_LINE {
                // Not a header: hand back a piece that ends before the
                // next possible header name.
                let cut = find_ci(&avail[1..], CONTENT_LENGTH)
                    .map_or(avail.len() - CONTENT_LENGTH.len(), |p| p + 1);
                let piece = avail[..cut].to_vec();
                self.consume(cut);
                return Ok(Some(piece));
            }
            if !self.fill()? {
                // A partial line at the end of input is not a message.
                let rest = self.avail().len();
                self.consume(rest);
                return Ok(None);
            }
        }
    }

    /// Reads one message; `None` at the end of input.
    pub fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(n) = self.skip.take() {
                self.skip_oversized(n)?;
            }
            if let Some(n) = self.pending.take() {
                return self.body(n).map(Some);
            }
            match self.header_block()? {
                None => return Ok(None),
                Some(Err(why)) => {
                    if !std::mem::replace(&mut self.quiet, true) {
                        return Ok(Some(Frame::Malformed(why)));
                    }
                }
                Some(Ok(n)) => return self.body(n).map(Some),
            }
        }
    }

    /// Headers up to the blank line: the body's length, or why there is
    /// no usable one. `None` at the end of input.
    fn header_block(&mut self) -> std::io::Result<Option<Result<u64, String>>> {
        let mut length: Option<u64> = None;
        let mut problem: Option<String> = None;
        let mut saw_header = false;
        loop {
            let Some(mut line) = self.line()? else {
                return Ok(None);
            };
            if line.is_empty() {
                if saw_header {
                    break;
                }
                continue; // stray blank lines between messages
            }
            // Bytes before a Content-Length header are the remains of a
            // broken message: resynchronise on the header.
            if let Some(p) = find_ci(&line, CONTENT_LENGTH)
                && p > 0
            {
                if !self.quiet {
                    problem.get_or_insert_with(|| {
                        format!(
                            "{} bytes that are not a message came before a Content-Length header",
                            p
                        )
                    });
                }
                line.drain(..p);
                // A new message starts here: what was read before is gone.
                length = None;
            }
            match parse_header(&line) {
                Ok(Some(n)) => {
                    saw_header = true;
                    length = Some(n);
                }
                Ok(None) => saw_header = true,
                Err(why) => {
                    if !self.quiet {
                        problem.get_or_insert(why);
                    }
                    // Not a header, but the blank line after it ends this
                    // block, so that it is answered before more input
                    // comes.
                    saw_header = true;
                }
            }
        }
        if let Some(why) = problem {
            // Stray bytes before a whole message: report them now and read
            // the message on the next call.
            if let Some(n) = length {
                self.pending = Some(n);
            }
            return Ok(Some(Err(why)));
        }
        Ok(Some(length.ok_or_else(|| {
            "the message has no Content-Length header".to_string()
        })))
    }

    /// Reads or skips a body of `n` bytes.
    fn body(&mut self, n: u64) -> std::io::Result<Frame> {
        if n > self.max_body as u64 {
            // Answered at once; the body is skipped on the next call.
            self.skip = Some(n);
            self.quiet = false;
            return Ok(Frame::TooLarge(n));
        }
        let n = n as usize;
        while self.avail().len() < n {
            if !self.fill()? {
                let got = self.avail().len();
                self.consume(got);
                return Ok(Frame::Malformed(format!(
                    "the input ended after {got} of the message's {n} bytes"
                )));
            }
        }
        let body = &self.avail()[..n];
        let why = match parse_json(body) {
            Ok(frame) => {
                self.consume(n);
                self.quiet = false;
                return Ok(frame);
            }
            Err(why) => why,
        };
        // The declared length overran this body into the next message:
        // keep the next message's bytes for the next call.
        let keep_from = find_header(body).unwrap_or(n);
        self.consume(keep_from);
        self.quiet = true;
        Ok(Frame::Malformed(if keep_from < n {
            format!(
                "the message is not JSON ({why}); its Content-Length ({n}) ran into the next message"
            )
        } else {
            format!("the message is not JSON: {why}")
        }))
    }

    /// Skips `n` bytes without keeping them, stopping early at a header
    /// (the declared length was not the real one).
    fn skip_oversized(&mut self, mut left: u64) -> std::io::Result<()> {
        // Keep a tail that could be the start of a header cut in two.
        const TAIL: usize = 64;
        while left > 0 {
            let avail = self.avail();
            let window = &avail[..avail.len().min(usize::try_from(left).unwrap_or(usize::MAX))];
            if let Some(p) = find_header(window) {
                self.consume(p);
                return Ok(());
            }
            let skip = if window.len() as u64 == left {
                window.len()
            } else {
                window.len().saturating_sub(TAIL)
            };
            self.consume(skip);
            left -= skip as u64;
            if left > 0 && !self.fill()? {
                let rest = self.avail().len();
                self.consume(rest);
                return Ok(());
            }
        }
        Ok(())
    }
}

/// `Ok(Some(n))` for a Content-Length, `Ok(None)` for another header.
fn parse_header(line: &[u8]) -> Result<Option<u64>, String> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(format!("malformed header line {:?}", shown()));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(format!("malformed header line {:?}", shown()));
    }
    if !name.eq_ignore_ascii_case(b"content-length") {
        return Ok(None); // Content-Type and others
    }
    let value = std::str::from_utf8(value).unwrap_or("").trim();
    match value.parse::<u64>() {
        Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(format!(
            "bad Content-Length {:?} (a decimal byte count)",
            String::from_utf8_lossy(&value.as_bytes()[..value.len().min(40)])
        )),
    }
}

/// Where `needle` (lower case) occurs in `hay`, ignoring ASCII case.
fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).find(|&i| hay[i..i + needle.len()].eq_ignore_ascii_case(needle))
}

/// Where a whole `Content-Length: <digits>` line starts in `hay`.
fn find_header(hay: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find_ci(&hay[from..], CONTENT_LENGTH) {
        let at = from + p;
        let mut i = at + CONTENT_LENGTH.len();
        while i < hay.len() && (hay[i] == b' ' || hay[i] == b'\t') {
            i += 1;
        }
        let digits = i;
        while i < hay.len() && hay[i].is_ascii_digit() {
            i += 1;
        }
        if i > digits && (hay[i..].starts_with(b"\r\n") || hay[i..].starts_with(b"\n")) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn parse_json(body: &[u8]) -> Result<Frame, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(Frame::Json(v)),
        Err(e) => {
            let mut fixed = body.to_vec();
            if replace_lone_surrogates(&mut fixed)
                && let Ok(v) = serde_json::from_slice::<Value>(&fixed)
            {
                return Ok(Frame::LoneSurrogates(v));
            }
            Err(e.to_string())
        }
    }
}

/// Replaces `\uXXXX` escapes of unpaired surrogates inside JSON strings by
/// `\ufffd` (same length). Returns whether it replaced any.
fn replace_lone_surrogates(json: &mut [u8]) -> bool {
    let hex = |s: &[u8]| -> Option<u16> {
        let s = std::str::from_utf8(s.get(..4)?).ok()?;
        u16::from_str_radix(s, 16).ok()
    };
    let escape_at = |json: &[u8], i: usize| -> Option<u16> {
        if json.get(i..i + 2)? == b"\\u" {
            hex(&json[i + 2..])
        } else {
            None
        }
    };
    let mut replaced = false;
    let mut in_string = false;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if let Some(u) = escape_at(json, i) {
                    let high = (0xD800..0xDC00).contains(&u);
                    let low = (0xDC00..0xE000).contains(&u);
                    let paired = high
                        && escape_at(json, i + 6).is_some_and(|v| (0xDC00..0xE000).contains(&v));
                    if paired {
                        i += 12;
                        continue;
                    }
                    if high || low {
                        json[i..i + 6].copy_from_slice(b"\\ufffd");
                        replaced = true;
                    }
                    i += 6;
                    continue;
                }
                i += 2; // any other escape, `\"` included
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut r = FrameReader::with_limit(input, 1000);
        std::iter::from_fn(|| r.next_frame().unwrap()).collect()
    }

    fn msg(body: &str) -> Vec<u8> {
        format!("Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    }

    fn kinds(f: &[Frame]) -> Vec<String> {
        f.iter()
            .map(|f| match f {
                Frame::Json(v) => v.to_string(),
                Frame::LoneSurrogates(v) => format!("lone {v}"),
                Frame::Malformed(_) => "malformed".into(),
                Frame::TooLarge(n) => format!("too large {n}"),
            })
            .collect()
    }

    #[test]
    fn messages_and_broken_ones_in_a_row() {
        let mut input = msg("{}");
        input.extend_from_slice(b"Content-Length: 5\r\nContent-Type: x\r\n\r\n{bad}");
        input.extend_from_slice(b"Content-Length: 2000\r\n\r\n");
        input.resize(input.len() + 2000, b' ');
        input.extend_from_slice(b"X-Nothing: 1\r\n\r\n");
        input.extend(msg("null"));
        assert_eq!(
            kinds(&frames(&input)),
            ["{}", "malformed", "too large 2000", "malformed", "null"]
        );
    }

    #[test]
    fn a_bad_length_is_answered_once_and_the_next_message_read() {
        for bad in ["abc", "-5", "", "1e3", "0x10", "18446744073709551616"] {
            let mut input = format!("Content-Length: {bad}\r\n\r\n{{\"a\":1}}").into_bytes();
            input.extend(msg("[1]"));
            input.extend(msg("[2]"));
            assert_eq!(
                kinds(&frames(&input)),
                ["malformed", "[1]", "[2]"],
                "Content-Length {bad:?}"
            );
        }
        // Missing altogether.
        let mut input = b"Content-Type: x\r\n\r\n{\"a\":1}".to_vec();
        input.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&input)), ["malformed", "[1]"]);
    }

    #[test]
    fn a_length_too_small_or_too_large_resynchronises() {
        let body = r#"{"jsonrpc":"2.0","method":"x"}"#;
        let mut small = format!("Content-Length: 10\r\n\r\n{body}").into_bytes();
        small.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&small)), ["malformed", "[1]"]);
        let mut large = format!("Content-Length: {}\r\n\r\n{body}", body.len() + 25).into_bytes();
        large.extend(msg("[1]"));
        large.extend(msg("[2]"));
        assert_eq!(kinds(&frames(&large)), ["malformed", "[1]", "[2]"]);
    }

    #[test]
    fn an_absurd_length_does_not_swallow_the_session() {
        let mut input = b"Content-Length: 1000000000000\r\n\r\n{}".to_vec();
        input.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&input)), ["too large 1000000000000", "[1]"]);
    }

    #[test]
    fn non_utf8_headers_and_garbage_are_reported_not_fatal() {
        let mut input = b"Content-Le\xffngth: 2\r\n\r\n{}".to_vec();
        input.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&input)), ["malformed", "[1]"]);
        let mut input = vec![b'x'; 100_000];
        input.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&input)), ["malformed", "[1]"]);
        let mut input = b"\xff\xfe\r\n\r\n".to_vec();
        input.extend(msg("[1]"));
        assert_eq!(kinds(&frames(&input)), ["malformed", "[1]"]);
    }

    /// Input that is all there is for now: reading past it panics.
    struct NoMore<'a>(&'a [u8]);

    impl Read for NoMore<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(!self.0.is_empty(), "read past the input a client sent");
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_broken_message_is_answered_before_more_input_comes() {
        for input in [
            &b"Content-Length: abc\r\n\r\n{\"a\":1}"[..],
            b"Content-Length: -1\r\n\r\n{}",
            b"\xff\r\n\r\n{}",
            b"Content-Length: 2\r\n\r\n{x",
        ] {
            let mut r = FrameReader::new(NoMore(input));
            assert!(matches!(r.next_frame().unwrap(), Some(Frame::Malformed(_))));
        }
        let mut r = FrameReader::new(NoMore(b"Content-Length: 2\r\n\r\n{}"));
        assert!(matches!(r.next_frame().unwrap(), Some(Frame::Json(_))));
        let mut r = FrameReader::new(NoMore(b"Content-Length: 99999999999\r\n\r\n{}"));
        assert!(matches!(r.next_frame().unwrap(), Some(Frame::TooLarge(_))));
    }

    #[test]
    fn the_end_of_input_inside_a_message_is_reported() {
        let f = frames(b"Content-Length: 10\r\n\r\n{\"a\"");
        assert_eq!(kinds(&f), ["malformed"]);
        assert!(frames(b"Content-Len").is_empty());
    }

    #[test]
    fn lone_surrogates_are_replaced_and_flagged() {
        let f = frames(&msg(
            r#"{"t":"a\ud800b","u":"\udc00","ok":"\ud83d\ude00","q":"\\ud800"}"#,
        ));
        let Frame::LoneSurrogates(v) = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!(v["t"], "a\u{fffd}b");
        assert_eq!(v["u"], "\u{fffd}");
        assert_eq!(v["ok"], "😀");
        assert_eq!(v["q"], "\\ud800", "an escaped backslash is not an escape");
        assert!(
            matches!(&frames(&msg(r#"{"ok":"\ud83d\ude00"}"#))[0], Frame::Json(v) if v == &json!({"ok": "😀"}))
        );
    }
}
