//! Fill-in-the-middle holes at syntactic units.
//!
//! Where kiln has the language's grammar (`kiln_serve::symbols::Lang`) a
//! hole is one of: a function's body (its statements, without the
//! braces), a method or associated item of a class, impl or trait, an arm
//! of a `match`/`switch`, or a statement; in every language, also the rest
//! of a line from a word boundary. These are what an editor asks kiln to
//! complete, so they are what an adapter should learn to fill.

use kiln_serve::symbols::{self, Lang};
use serde::Serialize;
use tree_sitter::Node;

/// What a hole holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// A function's or method's body.
    Body,
    /// A whole method or associated item inside a class, impl or trait.
    Member,
    /// A `match` arm or `switch` case.
    Arm,
    /// A statement.
    Statement,
    /// The rest of a line.
    Line,
}

impl SpanKind {
    pub const ALL: [SpanKind; 5] = [
        SpanKind::Body,
        SpanKind::Member,
        SpanKind::Arm,
        SpanKind::Statement,
        SpanKind::Line,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SpanKind::Body => "body",
            SpanKind::Member => "member",
            SpanKind::Arm => "arm",
            SpanKind::Statement => "statement",
            SpanKind::Line => "line",
        }
    }
}

/// A hole: bytes `start..end` of the file's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub kind: SpanKind,
}

/// Holes longer than this are not offered (the prompt around them must
/// fit a training sequence).
pub const MAX_SPAN_BYTES: usize = 1500;
/// Nor holes over this many lines.
const MAX_SPAN_LINES: usize = 40;

const ARMS: &[&str] = &[
    "match_arm",
    "switch_case",
    "switch_default",
    "case_clause",
    "expression_case",
    "type_case",
    "default_case",
    "communication_case",
    "case_statement",
    "switch_block_statement_group",
    "switch_rule",
];

/// Parents whose function-like children are members.
const MEMBER_PARENTS: &[&str] = &[
    "declaration_list",
    "class_body",
    "interface_body",
    "enum_body",
    "field_declaration_list",
    "object_type",
];

fn function_like(kind: &str) -> bool {
    kind.contains("function") || kind.contains("method") || kind.contains("constructor")
}

fn statement_like(kind: &str) -> bool {
    (kind.ends_with("_statement")
        && !matches!(
            kind,
            "compound_statement" | "import_statement" | "import_from_statement" | "case_statement"
        ))
        || matches!(
            kind,
            "let_declaration"
                | "local_variable_declaration"
                | "short_var_declaration"
                | "lexical_declaration"
                | "assignment_statement"
                | "expression_statement"
        )
}

/// Every hole `text` (at `path`) offers.
pub fn spans(path: &str, text: &str) -> Vec<Span> {
    let mut out = Vec::new();
    if let Some(lang) = Lang::of_path(path)
        && let Some(tree) = symbols::parse(lang, text)
    {
        let mut stack = vec![tree.root_node()];
        while let Some(node) = stack.pop() {
            classify(node, text, &mut out);
            let mut cursor = node.walk();
            stack.extend(node.named_children(&mut cursor));
        }
    }
    out.extend(line_spans(text));
    out.retain(|s| fits(text, s));
    out.sort_by_key(|s| (s.start, s.end, s.kind));
    out.dedup_by_key(|s| (s.start, s.end));
    out
}

fn fits(text: &str, s: &Span) -> bool {
    let t = &text[s.start..s.end];
    s.end > s.start
        && s.end - s.start <= MAX_SPAN_BYTES
        && t.lines().count() <= MAX_SPAN_LINES
        && !t.trim().is_empty()
}

fn classify(node: Node, text: &str, out: &mut Vec<Span>) {
    if node.has_error() {
        return;
    }
    let kind = node.kind();
    let whole = |k| Span {
        start: node.start_byte(),
        end: node.end_byte(),
        kind: k,
    };
    if function_like(kind) {
        if let Some(body) = node.child_by_field_name("body") {
            let mut cursor = body.walk();
            let inner: Vec<Node> = body.named_children(&mut cursor).collect();
            if let (Some(first), Some(last)) = (inner.first(), inner.last()) {
                out.push(Span {
                    start: first.start_byte(),
                    end: last.end_byte(),
                    kind: SpanKind::Body,
                });
            }
        }
        let parent = node.parent().map(|p| p.kind()).unwrap_or("");
        let in_class_block = parent == "block"
            && node
                .parent()
                .and_then(|p| p.parent())
                .is_some_and(|g| g.kind() == "class_definition");
        if MEMBER_PARENTS.contains(&parent) || in_class_block {
            out.push(whole(SpanKind::Member));
        }
    } else if ARMS.contains(&kind) {
        out.push(whole(SpanKind::Arm));
    } else if statement_like(kind) {
        // A statement that starts its line (not one nested in an
        // expression on a line of other code).
        let line_start = text[..node.start_byte()].rfind('\n').map_or(0, |i| i + 1);
        if text[line_start..node.start_byte()].trim().is_empty() {
            out.push(whole(SpanKind::Statement));
        }
    }
}

/// Per line with code, the rest of the line from the start of one of its
/// words (the first non-blank character onwards).
fn line_spans(text: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let start = at + (body.len() - body.trim_start().len());
        let end = at + body.len();
        // The boundaries where a word starts after a non-word character:
        // the cursor an editor sees mid-line.
        let mut cut = start;
        let mut prev_word = false;
        let mut boundaries = Vec::new();
        for (i, c) in text[start..end].char_indices() {
            let word = c.is_alphanumeric() || c == '_';
            if word && !prev_word {
                boundaries.push(start + i);
            }
            prev_word = word;
        }
        if boundaries.len() > 1 {
            // The middle boundary: a line's second half (its value, call
            // arguments…) rather than always its whole.
            cut = boundaries[boundaries.len() / 2];
        }
        if !boundaries.is_empty() && end > cut {
            out.push(Span {
                start: cut,
                end,
                kind: SpanKind::Line,
            });
        }
        at += line.len();
    }
    out
}

/// Up to `n` holes from `spans`, spread over the kinds (the rest of a
/// line at most a third of them), chosen by `rng`.
pub fn choose(spans: &[Span], n: usize, rng: &mut fastrand::Rng) -> Vec<Span> {
    let mut by_kind: Vec<Vec<Span>> = SpanKind::ALL
        .iter()
        .map(|k| spans.iter().filter(|s| s.kind == *k).copied().collect())
        .collect();
    for v in &mut by_kind {
        rng.shuffle(v);
    }
    let max_lines = n.div_ceil(3).max(1);
    // Rounds over the kinds from a random one, so that files with room for
    // one or two holes do not all get the same kind.
    let first = rng.usize(..by_kind.len());
    by_kind.rotate_left(first);
    let mut chosen = Vec::new();
    let mut lines = 0;
    'rounds: loop {
        let mut added = false;
        for v in by_kind.iter_mut() {
            if chosen.len() >= n {
                break 'rounds;
            }
            if v.first().is_some_and(|s| s.kind == SpanKind::Line) && lines >= max_lines {
                continue;
            }
            if let Some(s) = v.pop() {
                lines += usize::from(s.kind == SpanKind::Line);
                chosen.push(s);
                added = true;
            }
        }
        if !added {
            break;
        }
    }
    chosen.sort_by_key(|s| s.start);
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(path: &str, text: &str, kind: SpanKind) -> Vec<String> {
        (spans(path, text).into_iter())
            .filter(|s| s.kind == kind)
            .map(|s| text[s.start..s.end].to_string())
            .collect()
    }

    const RUST: &str = "struct Meters(f64);\n\nimpl Meters {\n    fn double(&self) -> f64 {\n        let two = 2.0;\n        self.0 * two\n    }\n}\n\nfn sign(x: i32) -> &'static str {\n    match x {\n        0 => \"zero\",\n        n if n < 0 => \"negative\",\n        _ => \"positive\",\n    }\n}\n";

    #[test]
    fn rust_bodies_members_arms_statements_and_lines() {
        let bodies = texts("m.rs", RUST, SpanKind::Body);
        assert!(
            bodies.contains(&"let two = 2.0;\n        self.0 * two".to_string()),
            "{bodies:?}"
        );
        assert!(
            bodies.iter().any(|b| b.starts_with("match x {")),
            "{bodies:?}"
        );
        let members = texts("m.rs", RUST, SpanKind::Member);
        assert_eq!(members.len(), 1, "{members:?}");
        assert!(members[0].starts_with("fn double(&self) -> f64 {") && members[0].ends_with('}'));
        let arms = texts("m.rs", RUST, SpanKind::Arm);
        // An arm is Rust's, with its comma.
        assert!(arms.contains(&"0 => \"zero\",".to_string()), "{arms:?}");
        assert!(arms.contains(&"_ => \"positive\",".to_string()), "{arms:?}");
        let statements = texts("m.rs", RUST, SpanKind::Statement);
        assert!(
            statements.contains(&"let two = 2.0;".to_string()),
            "{statements:?}"
        );
        let lines = texts("m.rs", RUST, SpanKind::Line);
        assert!(lines.contains(&"2.0;".to_string()), "{lines:?}");
        // Lines without a word (a closing brace) are no holes.
        assert!(!lines.contains(&"}".to_string()), "{lines:?}");
        // No hole spans a parse error.
        let broken = "fn f( {\n    let x = ;\n}\n";
        assert!(texts("b.rs", broken, SpanKind::Body).is_empty());
    }

    #[test]
    fn python_methods_and_other_languages() {
        let py = "class Circle:\n    def area(self):\n        r = self.r\n        return 3.14 * r * r\n\ndef free(x):\n    return x + 1\n";
        let members = texts("c.py", py, SpanKind::Member);
        assert_eq!(members.len(), 1, "{members:?}");
        assert!(members[0].starts_with("def area(self):"));
        let bodies = texts("c.py", py, SpanKind::Body);
        assert!(bodies.contains(&"return x + 1".to_string()), "{bodies:?}");
        assert!(bodies.contains(&"r = self.r\n        return 3.14 * r * r".to_string()));
        // A language without a grammar still has line holes.
        let rb = "def hello(name)\n  puts \"hi #{name}\"\nend\n";
        let all = spans("x.rb", rb);
        assert!(
            !all.is_empty() && all.iter().all(|s| s.kind == SpanKind::Line),
            "{all:?}"
        );
    }

    #[test]
    fn choosing_spreads_over_kinds_and_repeats_with_the_seed() {
        let all = spans("m.rs", RUST);
        let pick = |seed| choose(&all, 6, &mut fastrand::Rng::with_seed(seed));
        let a = pick(7);
        assert_eq!(a, pick(7));
        assert_eq!(a.len(), 6);
        let kinds: std::collections::HashSet<SpanKind> = a.iter().map(|s| s.kind).collect();
        assert!(kinds.len() >= 4, "{a:?}");
        assert!(a.iter().filter(|s| s.kind == SpanKind::Line).count() <= 2);
        assert!(choose(&all, 1000, &mut fastrand::Rng::with_seed(1)).len() <= all.len());
    }
}
