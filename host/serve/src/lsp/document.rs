//! Open documents as kiln keeps them, and LSP positions in them.
//!
//! kiln stores text as UTF-8; LSP positions count characters in the code
//! units the client and server agreed on at `initialize` (UTF-16 unless the
//! client offers UTF-8). Lines end at `\n`, `\r\n` or `\r`. Every
//! conversion here checks its input: a position past the end of a line or
//! of the text is clamped (the protocol's rule), a position that falls
//! inside a character (between the halves of a surrogate pair, or inside
//! a UTF-8 sequence) is an error, and nothing slices text at a byte that
//! is not a character boundary.

use crate::context::Edited;
use serde_json::Value;
use std::time::Instant;

/// The unit of `Position::character`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionEncoding {
    Utf8,
    Utf16,
}

impl PositionEncoding {
    /// What LSP calls it (`PositionEncodingKind`).
    pub fn name(self) -> &'static str {
        match self {
            PositionEncoding::Utf8 => "utf-8",
            PositionEncoding::Utf16 => "utf-16",
        }
    }

    /// The encoding for a client that offers `offered` (its
    /// `capabilities.general.positionEncodings`): UTF-8, kiln's own, when
    /// offered; else UTF-16, which every client supports.
    pub fn negotiate(offered: &Value) -> PositionEncoding {
        let utf8 = offered
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e == "utf-8"));
        if utf8 {
            PositionEncoding::Utf8
        } else {
            PositionEncoding::Utf16
        }
    }

    fn units(self, c: char) -> usize {
        match self {
            PositionEncoding::Utf8 => c.len_utf8(),
            PositionEncoding::Utf16 => c.len_utf16(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: u32,
    pub character: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error(
        "{what} is not a position: it must be {{\"line\": N, \"character\": N}}, N an integer from 0 to 4294967295"
    )]
    Malformed { what: String },
    #[error(
        "{what} (line {line}, character {character}) falls inside a character: {encoding} positions must count whole characters"
    )]
    InsideCharacter {
        what: String,
        line: u32,
        character: u32,
        encoding: &'static str,
    },
}

/// The position at `v`, named `what` in errors.
pub fn parse_position(v: Option<&Value>, what: &str) -> Result<Position, PositionError> {
    let malformed = || PositionError::Malformed {
        what: what.to_string(),
    };
    let v = v.and_then(Value::as_object).ok_or_else(malformed)?;
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(malformed)
    };
    Ok(Position {
        line: field("line")?,
        character: field("character")?,
    })
}

fn is_line_break(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

/// The byte offset of `pos` in `text` (see the module's rules).
pub fn offset(
    text: &str,
    pos: Position,
    enc: PositionEncoding,
    what: &str,
) -> Result<usize, PositionError> {
    let bytes = text.as_bytes();
    let mut start = 0;
    for _ in 0..pos.line {
        let Some(i) = bytes[start..].iter().position(|&b| is_line_break(b)) else {
            return Ok(text.len());
        };
        let at = start + i;
        start = at
            + if bytes[at..].starts_with(b"\r\n") {
                2
            } else {
                1
            };
    }
    let end = bytes[start..]
        .iter()
        .position(|&b| is_line_break(b))
        .map_or(text.len(), |i| start + i);
    let want = pos.character as usize;
    let mut units = 0;
    for (i, c) in text[start..end].char_indices() {
        if units == want {
            return Ok(start + i);
        }
        units += enc.units(c);
        if units > want {
            return Err(PositionError::InsideCharacter {
                what: what.to_string(),
                line: pos.line,
                character: pos.character,
                encoding: enc.name(),
            });
        }
    }
    Ok(end)
}

/// A document the editor opened, as kiln has it.
pub struct Document {
    pub text: String,
    pub opened: Instant,
    pub edited: Option<Instant>,
    /// The ranges edited last, newest first: the edit ring
    /// (`crate::context::Edited`).
    pub edits: Vec<Edited>,
    /// The editor's language id (`didOpen`'s `languageId`), for routes.
    pub language: Option<String>,
    /// Why kiln's text no longer matches the editor's, after an edit kiln
    /// could not apply. Completions are refused until a full-text change
    /// or a new `didOpen` brings the two back together.
    out_of_sync: Option<String>,
}

impl Document {
    pub fn new(text: String) -> Document {
        Document {
            text,
            opened: Instant::now(),
            edited: None,
            edits: Vec::new(),
            language: None,
            out_of_sync: None,
        }
    }

    pub fn out_of_sync(&self) -> Option<&str> {
        self.out_of_sync.as_deref()
    }

    /// Marks the text as differing from the editor's, keeping the first
    /// reason. Returns whether the document was in sync until now.
    pub fn mark_out_of_sync(&mut self, why: String) -> bool {
        let was = self.out_of_sync.is_none();
        if was {
            self.out_of_sync = Some(why);
        }
        was
    }

    /// Applies `textDocument/didChange`'s `contentChanges`, in order. An
    /// edit that cannot be applied stops there, marks the document out of
    /// sync and comes back as the error.
    pub fn apply_changes(&mut self, changes: &Value, enc: PositionEncoding) -> Result<(), String> {
        let now = Instant::now();
        self.edited = Some(now);
        let before = self.text.clone();
        let result = self.apply(changes, enc);
        ring_add(&mut self.edits, &before, &self.text, now);
        if let Err(e) = &result {
            self.mark_out_of_sync(e.clone());
        }
        result
    }

    fn apply(&mut self, changes: &Value, enc: PositionEncoding) -> Result<(), String> {
        let changes = changes
            .as_array()
            .ok_or("contentChanges must be an array of edits")?;
        for (i, change) in changes.iter().enumerate() {
            let Some(text) = change.get("text").and_then(Value::as_str) else {
                return Err(format!(
                    "contentChanges[{i}] has no text (each edit is {{\"range\": …, \"text\": \"…\"}} or {{\"text\": \"…\"}})"
                ));
            };
            match change.get("range") {
                None | Some(Value::Null) => {
                    self.text = text.to_string();
                    self.out_of_sync = None;
                }
                Some(range) => {
                    let what = |end: &str| format!("contentChanges[{i}].range.{end}");
                    if !range.is_object() {
                        return Err(format!("contentChanges[{i}].range is not a range"));
                    }
                    let at = |end: &str| {
                        let pos = parse_position(range.get(end), &what(end))?;
                        offset(&self.text, pos, enc, &what(end))
                    };
                    let (a, b) = (
                        at("start").map_err(|e| e.to_string())?,
                        at("end").map_err(|e| e.to_string())?,
                    );
                    if a > b {
                        return Err(format!("contentChanges[{i}].range ends before it starts"));
                    }
                    self.text.replace_range(a..b, text);
                }
            }
        }
        Ok(())
    }
}

/// Edited ranges kept per document.
pub const EDIT_RING: usize = 8;
/// Edits this many lines apart or nearer are one range.
const EDIT_JOIN_LINES: u32 = 3;

/// Records the change from `old` to `new` in `ring` (newest first): the
/// lines that differ (between the common start and the common end, so a
/// full-text change counts only what changed), ranges below it moved by
/// the lines it added or removed, ranges it touches joined to it.
pub fn ring_add(ring: &mut Vec<Edited>, old: &str, new: &str, at: Instant) {
    let (o, n) = (old.as_bytes(), new.as_bytes());
    let start = o.iter().zip(n).take_while(|(a, b)| a == b).count();
    let end = (o[start..].iter().rev())
        .zip(n[start..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    if start == o.len() && start == n.len() {
        return; // no change
    }
    let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count() as u32;
    let first = lines(&n[..start]);
    let old_last = first + lines(&o[start..o.len() - end]);
    let new_last = first + lines(&n[start..n.len() - end]);
    let shift = i64::from(new_last) - i64::from(old_last);
    // Text inserted up to a line break leaves the next line as it was.
    let changed = &n[start..n.len() - end];
    let end_line = if changed.last() == Some(&b'\n') {
        new_last
    } else {
        new_last + 1
    };
    let mut range = Edited {
        start_line: first,
        end_line: end_line.max(first + 1),
        at,
    };
    ring.retain_mut(|e| {
        if e.start_line > old_last + EDIT_JOIN_LINES {
            e.start_line = (i64::from(e.start_line) + shift).max(0) as u32;
            e.end_line = (i64::from(e.end_line) + shift).max(1) as u32;
            return true;
        }
        if e.end_line + EDIT_JOIN_LINES < first {
            return true;
        }
        // Touched: joined into the new range (its lines as they are now).
        let end = if e.end_line > old_last {
            (i64::from(e.end_line) + shift).max(1) as u32
        } else {
            e.end_line
        };
        range.start_line = range.start_line.min(e.start_line);
        range.end_line = range.end_line.max(end);
        false
    });
    ring.insert(0, range);
    ring.truncate(EDIT_RING);
}

#[cfg(test)]
mod tests {
    use super::*;
    use PositionEncoding::{Utf8, Utf16};
    use proptest::prelude::*;
    use serde_json::json;

    fn at(text: &str, line: u32, character: u32, enc: PositionEncoding) -> Option<usize> {
        offset(text, Position { line, character }, enc, "p").ok()
    }

    #[test]
    fn the_edit_ring_follows_ranges_as_lines_move() {
        let t0 = Instant::now();
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let mut d = Document::new(text.clone());
        let ranges = |d: &Document| -> Vec<(u32, u32)> {
            d.edits.iter().map(|e| (e.start_line, e.end_line)).collect()
        };
        // A character typed on line 15.
        let change = |line: u32, text: &str| json!([{"range": {"start": {"line": line, "character": 0}, "end": {"line": line, "character": 0}}, "text": text}]);
        d.apply_changes(&change(15, "x"), Utf16).unwrap();
        assert_eq!(ranges(&d), [(15, 16)]);
        // Two lines inserted at line 2 move the range below them down.
        d.apply_changes(&change(2, "a\nb\n"), Utf16).unwrap();
        assert_eq!(ranges(&d), [(2, 4), (17, 18)]);
        // An edit next to a range joins it.
        d.apply_changes(&change(6, "y"), Utf16).unwrap();
        assert_eq!(ranges(&d), [(2, 7), (17, 18)]);
        // A full-text change counts only the lines that differ.
        let mut full = d.text.clone();
        full = full.replace("line 10\n", "line ten\n");
        d.apply_changes(&json!([{"text": full}]), Utf16).unwrap();
        assert_eq!(ranges(&d), [(12, 13), (2, 7), (17, 18)]);
        // The same text again changes nothing; deleting two lines moves
        // the ranges below up, and joins those within 3 lines.
        d.apply_changes(&json!([{"text": full}]), Utf16).unwrap();
        assert_eq!(d.edits.len(), 3);
        let range = json!([{"range": {"start": {"line": 8, "character": 0}, "end": {"line": 10, "character": 0}}, "text": ""}]);
        d.apply_changes(&range, Utf16).unwrap();
        assert_eq!(ranges(&d), [(2, 11), (15, 16)]);
        // At most EDIT_RING ranges, the newest kept.
        let mut ring = Vec::new();
        let mut text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        for i in 0..12 {
            let next = text.replacen(&format!("line {}\n", i * 10), "changed\n", 1);
            ring_add(&mut ring, &text, &next, t0);
            text = next;
        }
        let got: Vec<u32> = ring.iter().map(|e| e.start_line).collect();
        assert_eq!(got, [110, 100, 90, 80, 70, 60, 50, 40]);
    }

    #[test]
    fn positions_count_code_units_and_clamp() {
        let text = "aé😀b\nxy";
        assert_eq!(at(text, 0, 1, Utf16), Some(1));
        assert_eq!(at(text, 0, 2, Utf16), Some(3));
        assert_eq!(at(text, 0, 3, Utf16), None, "inside the surrogate pair");
        assert_eq!(at(text, 0, 4, Utf16), Some(7), "the emoji is 2 units");
        assert_eq!(at(text, 0, 3, Utf8), Some(3));
        assert_eq!(at(text, 0, 2, Utf8), None, "inside é");
        assert_eq!(at(text, 0, 99, Utf16), Some(8), "clamped to the line");
        assert_eq!(at(text, 1, 1, Utf16), Some(10));
        assert_eq!(at(text, 7, 0, Utf16), Some(text.len()), "past the end");
        assert_eq!(at("é = 1", 0, 1, Utf16), Some(2));
    }

    #[test]
    fn every_line_break_ends_a_line() {
        let text = "a\r\nb\rc\nd";
        assert_eq!(at(text, 1, 0, Utf16), Some(3));
        assert_eq!(at(text, 2, 0, Utf16), Some(5));
        assert_eq!(at(text, 3, 0, Utf16), Some(7));
        assert_eq!(at(text, 0, 5, Utf16), Some(1), "before \\r\\n");
    }

    #[test]
    fn bad_edits_are_refused_and_mark_the_document() {
        let mut d = Document::new("abc\n".into());
        let refused =
            |d: &mut Document, changes: Value| d.apply_changes(&changes, Utf16).unwrap_err();
        let e = refused(&mut d, json!([{"range": 5, "text": "x"}]));
        assert!(e.contains("not a range"), "{e}");
        assert_eq!(d.text, "abc\n", "nothing inserted at the top");
        assert!(d.out_of_sync().is_some());
        d.apply_changes(&json!([{"text": "😀"}]), Utf16).unwrap();
        assert!(d.out_of_sync().is_none(), "a full-text change resyncs");
        let e = refused(
            &mut d,
            json!([{"range": {"start": {"line": 0, "character": 1}, "end": {"line": 0, "character": 1}}, "text": "x"}]),
        );
        assert!(e.contains("inside a character"), "{e}");
        let e = refused(
            &mut d,
            json!([{"range": {"start": {"line": 0, "character": 2}, "end": {"line": 0, "character": 0}}, "text": ""}]),
        );
        assert!(e.contains("ends before"), "{e}");
        let e = refused(
            &mut d,
            json!([{"range": {"start": {"line": -1, "character": 0}, "end": {"line": 0, "character": 0}}, "text": ""}]),
        );
        assert!(e.contains("not a position"), "{e}");
        let e = refused(&mut d, json!({"text": "x"}));
        assert!(e.contains("array"), "{e}");
    }

    /// The editor's side: text as UTF-16 code units, edited as a
    /// JavaScript editor does (positions clamped to lines and the text).
    struct Client {
        units: Vec<u16>,
    }

    impl Client {
        fn line_starts(&self) -> Vec<usize> {
            let mut starts = vec![0];
            let u = &self.units;
            let mut i = 0;
            while i < u.len() {
                if u[i] == b'\r' as u16 && u.get(i + 1) == Some(&(b'\n' as u16)) {
                    starts.push(i + 2);
                    i += 2;
                    continue;
                }
                if u[i] == b'\n' as u16 || u[i] == b'\r' as u16 {
                    starts.push(i + 1);
                }
                i += 1;
            }
            starts
        }

        /// The unit offset of a position, `None` inside a surrogate pair.
        fn offset(&self, line: u32, character: u32) -> Option<usize> {
            let starts = self.line_starts();
            let Some(&start) = starts.get(line as usize) else {
                return Some(self.units.len());
            };
            let mut end = starts
                .get(line as usize + 1)
                .copied()
                .unwrap_or(self.units.len());
            while end > start
                && (self.units[end - 1] == b'\n' as u16 || self.units[end - 1] == b'\r' as u16)
            {
                end -= 1;
            }
            let at = (start + character as usize).min(end);
            let inside =
                at < self.units.len() && (0xDC00..0xE000).contains(&self.units[at]) && at > start;
            (!inside).then_some(at)
        }
    }

    /// The text's lines, split as LSP splits them.
    fn lsp_lines(text: &str) -> Vec<&str> {
        let (b, mut out, mut start, mut i) = (text.as_bytes(), Vec::new(), 0, 0);
        while i < b.len() {
            if is_line_break(b[i]) {
                out.push(&text[start..i]);
                i += if b[i..].starts_with(b"\r\n") { 2 } else { 1 };
                start = i;
            } else {
                i += 1;
            }
        }
        out.push(&text[start..]);
        out
    }

    fn arb_text() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "a", "x = 1", "é", "中文", "😀", "e\u{301}", "\n", "\r\n", "\r", " ", "🇫🇷", "\t",
        ]);
        prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Random edits at random positions (valid, past the end, inside
        /// surrogate pairs) never panic, and where the client could apply
        /// an edit the server's text stays the client's.
        #[test]
        fn edits_keep_the_server_equal_to_the_client(
            start in arb_text(),
            edits in prop::collection::vec((0u32..6, 0u32..14, 0u32..6, 0u32..14, arb_text()), 1..8),
        ) {
            let mut server = Document::new(start.clone());
            let mut client = Client { units: start.encode_utf16().collect() };
            for (l1, c1, l2, c2, text) in edits {
                let (a, b) = (client.offset(l1, c1), client.offset(l2, c2));
                let change = json!([{"range": {"start": {"line": l1, "character": c1}, "end": {"line": l2, "character": c2}}, "text": text}]);
                let applied = server.apply_changes(&change, Utf16);
                match (a, b) {
                    (Some(a), Some(b)) if a <= b => {
                        prop_assert!(applied.is_ok(), "{applied:?}");
                        client.units.splice(a..b, text.encode_utf16());
                        prop_assert_eq!(&server.text, &String::from_utf16(&client.units).unwrap());
                    }
                    _ => {
                        prop_assert!(applied.is_err());
                        // The client's and server's copies part here;
                        // both start again from a full-text change.
                        server.apply_changes(&json!([{"text": start}]), Utf16).unwrap();
                        client.units = start.encode_utf16().collect();
                    }
                }
            }
        }

        /// UTF-8 and UTF-16 positions of the same character boundary give
        /// the same offset.
        #[test]
        fn both_encodings_agree_on_boundaries(text in arb_text()) {
            for (line, l) in lsp_lines(&text).into_iter().enumerate() {
                let (mut u8s, mut u16s) = (0u32, 0u32);
                let line = line as u32;
                for c in l.chars().chain(std::iter::once('\0')) {
                    let a = at(&text, line, u8s, Utf8);
                    let b = at(&text, line, u16s, Utf16);
                    prop_assert!(a.is_some() && a == b, "{text:?} {line} {u8s} {u16s}");
                    u8s += c.len_utf8() as u32;
                    u16s += c.len_utf16() as u32;
                }
            }
        }
    }
}
