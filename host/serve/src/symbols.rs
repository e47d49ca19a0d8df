//! Definitions in source files: what the symbol index knows.
//!
//! For Rust, Python, JavaScript, TypeScript (and TSX), Go, C, C++ and
//! Java a file is parsed with its tree-sitter grammar and its definitions
//! are the matches of the grammar's own tag query (`queries/tags.scm`, as
//! GitHub's code navigation uses them), with a few patterns added where
//! those queries leave out what completions use (constants, statics, enum
//! variants, fields, type aliases, macros). Other code falls back to a
//! heuristic: an identifier right after a definition keyword (`def`,
//! `class`, `fn`, `struct`…) on one line, its block ending where the
//! indentation returns. Documentation and data files (Markdown, TOML,
//! YAML, JSON, text) define nothing.
//!
//! A definition is kept at two resolutions, the snippets context can show:
//! its *signature* (leading doc comments and attributes, then the lines
//! before its body opens; a Python docstring included) and its *body*
//! (the whole definition, at most [`BODY_LINES`] lines).

use std::cell::RefCell;
use std::sync::OnceLock;
use tree_sitter::{Language, Parser, Query, QueryCursor, StreamingIterator};

/// A body longer than this many lines is cut there.
pub const BODY_LINES: u32 = 60;
/// At most this many lines of leading doc comments and attributes.
const DOC_LINES: u32 = 8;
/// A signature longer than this (a long parameter list) is cut there.
const SIGNATURE_LINES: u32 = 16;

/// One definition. Lines are 0-based, ends exclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Def {
    pub name: String,
    /// `function`, `method`, `class`, `interface`, `module`, `macro`,
    /// `constant`, `type` or `field` (from the tag query's capture).
    pub kind: &'static str,
    /// The line naming it.
    pub line: u32,
    /// The first line of its leading docs and attributes, or of itself.
    pub start: u32,
    /// The end of its signature (at least `line + 1`).
    pub signature_end: u32,
    /// The end of the definition (at least `signature_end`).
    pub end: u32,
}

impl Def {
    /// The lines of the body resolution: the whole definition, cut at
    /// [`BODY_LINES`].
    pub fn body_lines(&self) -> (u32, u32) {
        (self.start, self.end.min(self.start + BODY_LINES))
    }
}

/// The languages with a grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lang {
    Rust,
    Python,
    JavaScript,
    TypeScript,
    Tsx,
    Go,
    C,
    Cpp,
    Java,
}

const LANGS: [Lang; 9] = [
    Lang::Rust,
    Lang::Python,
    Lang::JavaScript,
    Lang::TypeScript,
    Lang::Tsx,
    Lang::Go,
    Lang::C,
    Lang::Cpp,
    Lang::Java,
];

impl Lang {
    /// The language of a path, by its extension.
    pub fn of_path(path: &str) -> Option<Lang> {
        let ext = path.rsplit_once('.')?.1;
        Some(match ext {
            "rs" => Lang::Rust,
            "py" | "pyi" => Lang::Python,
            "js" | "jsx" | "mjs" | "cjs" => Lang::JavaScript,
            "ts" | "mts" | "cts" => Lang::TypeScript,
            "tsx" => Lang::Tsx,
            "go" => Lang::Go,
            "c" | "h" => Lang::C,
            "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => Lang::Cpp,
            "java" => Lang::Java,
            _ => return None,
        })
    }

    fn index(self) -> usize {
        LANGS.iter().position(|&l| l == self).expect("listed")
    }

    fn language(self) -> Language {
        match self {
            Lang::Rust => tree_sitter_rust::LANGUAGE.into(),
            Lang::Python => tree_sitter_python::LANGUAGE.into(),
            Lang::JavaScript => tree_sitter_javascript::LANGUAGE.into(),
            Lang::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
            Lang::Tsx => tree_sitter_typescript::LANGUAGE_TSX.into(),
            Lang::Go => tree_sitter_go::LANGUAGE.into(),
            Lang::C => tree_sitter_c::LANGUAGE.into(),
            Lang::Cpp => tree_sitter_cpp::LANGUAGE.into(),
            Lang::Java => tree_sitter_java::LANGUAGE.into(),
        }
    }

    /// The grammar's tag query and kiln's additions.
    fn query_source(self) -> String {
        let (tags, extra): (&[&str], &str) = match self {
            Lang::Rust => (&[tree_sitter_rust::TAGS_QUERY], RUST_EXTRA),
            Lang::Python => (&[tree_sitter_python::TAGS_QUERY], ""),
            Lang::JavaScript => (&[tree_sitter_javascript::TAGS_QUERY], ""),
            // TypeScript's tags add to JavaScript's (its grammar extends
            // JavaScript's), as the tree-sitter CLI combines them.
            Lang::TypeScript | Lang::Tsx => (
                &[
                    tree_sitter_javascript::TAGS_QUERY,
                    tree_sitter_typescript::TAGS_QUERY,
                ],
                TYPESCRIPT_EXTRA,
            ),
            Lang::Go => (&[tree_sitter_go::TAGS_QUERY], GO_EXTRA),
            Lang::C => (&[tree_sitter_c::TAGS_QUERY], C_EXTRA),
            Lang::Cpp => (&[tree_sitter_cpp::TAGS_QUERY], C_EXTRA),
            Lang::Java => (&[tree_sitter_java::TAGS_QUERY], JAVA_EXTRA),
        };
        let mut src = tags.join("\n");
        src.push('\n');
        src.push_str(extra);
        src
    }

    /// The compiled query, once per process.
    fn query(self) -> &'static Query {
        static QUERIES: [OnceLock<Query>; 9] = [const { OnceLock::new() }; 9];
        QUERIES[self.index()].get_or_init(|| {
            Query::new(&self.language(), &self.query_source())
                .unwrap_or_else(|e| panic!("the {self:?} tag query does not compile: {e}"))
        })
    }
}

const RUST_EXTRA: &str = r#"
(const_item name: (identifier) @name) @definition.constant
(static_item name: (identifier) @name) @definition.constant
(enum_variant name: (identifier) @name) @definition.constant
(field_declaration name: (field_identifier) @name) @definition.field
"#;

const TYPESCRIPT_EXTRA: &str = r#"
(type_alias_declaration name: (type_identifier) @name) @definition.type
(enum_declaration name: (identifier) @name) @definition.type
"#;

const GO_EXTRA: &str = r#"
(source_file (const_declaration (const_spec name: (identifier) @name) @definition.constant))
(source_file (var_declaration (var_spec name: (identifier) @name) @definition.constant))
(field_declaration name: (field_identifier) @name) @definition.field
"#;

const C_EXTRA: &str = r#"
(preproc_def name: (identifier) @name) @definition.constant
(preproc_function_def name: (identifier) @name) @definition.macro
(enumerator name: (identifier) @name) @definition.constant
(field_declaration declarator: (field_identifier) @name) @definition.field
"#;

const JAVA_EXTRA: &str = r#"
(enum_declaration name: (identifier) @name) @definition.class
(record_declaration name: (identifier) @name) @definition.class
(enum_constant name: (identifier) @name) @definition.constant
(field_declaration declarator: (variable_declarator name: (identifier) @name)) @definition.field
(constructor_declaration name: (identifier) @name) @definition.method
"#;

/// Node kinds a definition's tag may sit inside, on the same lines: the
/// definition snippet is the outermost (C's `function_declarator` inside
/// its `function_definition`, an `export` before a class, a decorated
/// Python function).
const WRAPPERS: &[&str] = &[
    "function_definition",
    "declaration",
    "template_declaration",
    "export_statement",
    "decorated_definition",
    "lexical_declaration",
    "variable_declaration",
    "type_declaration",
    "const_declaration",
    "var_declaration",
    "expression_statement",
    "pointer_declarator",
    "reference_declarator",
    "field_declaration",
];

/// The definitions in `text`, found as the path's language says (the
/// grammar, or the heuristic for other files), in order of their lines.
pub fn definitions(path: &str, text: &str) -> Vec<Def> {
    let prose = [".md", ".toml", ".yaml", ".yml", ".json", ".txt"];
    let mut defs = match Lang::of_path(path) {
        Some(lang) => parsed(lang, text).unwrap_or_else(|| heuristic(text)),
        // Documentation and data define nothing ("the type of" in prose
        // is not a definition of `of`).
        None if prose.iter().any(|e| path.ends_with(e)) => Vec::new(),
        None => heuristic(text),
    };
    defs.sort_by(|a, b| (a.line, a.start, &a.name).cmp(&(b.line, b.start, &b.name)));
    defs.dedup_by(|a, b| a.name == b.name && a.line == b.line);
    defs
}

/// [`definitions`] of a text seen recently (the open documents, asked
/// at every completion), by a hash of path and text.
pub fn definitions_memo(path: &str, text: &str) -> std::sync::Arc<Vec<Def>> {
    use std::hash::{Hash, Hasher};
    static SEEN: OnceLock<moka::sync::Cache<u64, std::sync::Arc<Vec<Def>>>> = OnceLock::new();
    let seen = SEEN.get_or_init(|| moka::sync::Cache::new(64));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (path, text).hash(&mut h);
    seen.get_with(h.finish(), || std::sync::Arc::new(definitions(path, text)))
}

thread_local! {
    static PARSERS: RefCell<Vec<Option<Parser>>> = RefCell::new((0..LANGS.len()).map(|_| None).collect());
}

/// The syntax tree of `text` in `lang` (this thread's parser for the
/// language); `None` when the parser gives up.
pub fn parse(lang: Lang, text: &str) -> Option<tree_sitter::Tree> {
    PARSERS.with(|parsers| {
        let mut parsers = parsers.borrow_mut();
        let parser = parsers[lang.index()].get_or_insert_with(|| {
            let mut p = Parser::new();
            p.set_language(&lang.language())
                .expect("the grammar matches the tree-sitter version");
            p
        });
        parser.parse(text, None)
    })
}

/// Definitions from the grammar; `None` when the parser gives up.
fn parsed(lang: Lang, text: &str) -> Option<Vec<Def>> {
    let tree = parse(lang, text)?;
    let query = lang.query();
    let names = query.capture_names();
    let lines: Vec<&str> = text.lines().collect();
    let mut cursor = QueryCursor::new();
    let mut matches = cursor.matches(query, tree.root_node(), text.as_bytes());
    let mut defs = Vec::new();
    while let Some(m) = matches.next() {
        let mut name = None;
        let mut def = None;
        for cap in m.captures() {
            let capture = names[cap.index as usize];
            if capture == "name" {
                name = Some(cap.node);
            } else if let Some(kind) = capture.strip_prefix("definition.") {
                def = Some((kind, cap.node));
            }
        }
        let (Some(name), Some((kind, node))) = (name, def) else {
            continue;
        };
        let Ok(ident) = name.utf8_text(text.as_bytes()) else {
            continue;
        };
        if ident.is_empty() || ident.len() > 128 {
            continue;
        }
        let preprocessor = matches!(lang, Lang::C | Lang::Cpp);
        defs.push(shape(preprocessor, kind, ident, name, node, &lines));
    }
    Some(defs)
}

/// Every kind of definition.
pub const KINDS: [&str; 9] = [
    "function",
    "method",
    "class",
    "interface",
    "module",
    "macro",
    "constant",
    "field",
    "type",
];

fn kind_name(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|&&k| k == kind)
        .copied()
        .unwrap_or("type")
}

/// The lines of a definition and of its signature.
fn shape(
    preprocessor: bool,
    kind: &str,
    ident: &str,
    name: tree_sitter::Node<'_>,
    node: tree_sitter::Node<'_>,
    lines: &[&str],
) -> Def {
    let mut outer = node;
    while let Some(parent) = outer.parent() {
        if !WRAPPERS.contains(&parent.kind()) || parent.parent().is_none() {
            break;
        }
        outer = parent;
    }
    let line = name.start_position().row as u32;
    let first = outer.start_position().row as u32;
    let end_pos = outer.end_position();
    let mut end = end_pos.row as u32 + u32::from(end_pos.column > 0);
    end = end.max(line + 1);
    let body = node
        .child_by_field_name("body")
        .or_else(|| outer.child_by_field_name("body"));
    let mut signature_end = match body {
        Some(body) => {
            let at = body.start_position();
            let row = at.row as u32;
            let opens_line =
                (lines.get(at.row)).is_some_and(|l| l[..at.column.min(l.len())].trim().is_empty());
            if opens_line {
                // The body starts a line of its own (a Python block, a
                // brace on its own line): the signature is the lines
                // before it, and a docstring opening the body.
                let doc = (body.named_child(0))
                    .filter(|s| s.kind() == "expression_statement")
                    .and_then(|s| s.named_child(0))
                    .filter(|s| s.kind() == "string");
                match doc {
                    Some(doc) => doc.end_position().row as u32 + 1,
                    None => row,
                }
            } else {
                row + 1
            }
        }
        None => end,
    };
    signature_end = signature_end.clamp(line + 1, end.max(line + 1));
    signature_end = signature_end
        .min(first.max(line) + SIGNATURE_LINES)
        .max(line + 1);
    let start = leading_docs(lines, first, preprocessor);
    Def {
        name: ident.to_string(),
        kind: kind_name(kind),
        line,
        start,
        signature_end,
        end: end.max(signature_end),
    }
}

/// The first of the doc comment and attribute lines right above `first`
/// (no blank line between), at most [`DOC_LINES`] of them; `#` lines are
/// not comments where there is a `preprocessor` (C, C++).
fn leading_docs(lines: &[&str], first: u32, preprocessor: bool) -> u32 {
    let mut start = first;
    while start > 0 && first - start < DOC_LINES {
        let above = lines.get(start as usize - 1).map_or("", |l| l.trim_start());
        // `#` opens a comment (Python, shell) or an attribute (Rust), but
        // in C and C++ a preprocessor line (`#include`, `#ifdef`).
        let hash_comment = above.starts_with('#') && !preprocessor;
        let doc = hash_comment || ["//", "/*", "*", "@"].iter().any(|p| above.starts_with(p));
        if !doc {
            break;
        }
        start -= 1;
    }
    start
}

/// Words that introduce a definition, for files without a grammar.
pub const DEFINERS: &[&str] = &[
    "fn",
    "def",
    "class",
    "struct",
    "enum",
    "trait",
    "type",
    "function",
    "const",
    "let",
    "var",
    "interface",
    "impl",
    "mod",
    "static",
    "func",
];

/// Definitions by keyword: an identifier right after a definition keyword
/// on one line; the definition runs until a non-blank line indented no
/// deeper than its first.
fn heuristic(text: &str) -> Vec<Def> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut defs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let words = crate::context::words(line);
        for w in words.windows(2) {
            if !DEFINERS.contains(&w[0].as_str()) {
                continue;
            }
            let own = indent(line);
            let mut end = i + 1;
            while end < lines.len() && end - i < BODY_LINES as usize {
                let l = lines[end];
                if !l.trim().is_empty() && indent(l) <= own {
                    // A closing brace (or `end`) at the same depth
                    // belongs to it.
                    let t = l.trim();
                    if t.starts_with(['}', ')', ']']) || t == "end" || t.starts_with("end ") {
                        end += 1;
                    }
                    break;
                }
                end += 1;
            }
            let start = leading_docs(&lines, i as u32, false);
            defs.push(Def {
                name: w[1].clone(),
                kind: "type",
                line: i as u32,
                start,
                signature_end: i as u32 + 1,
                end: end as u32,
            });
        }
    }
    defs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(defs: &'a [Def], name: &str) -> &'a Def {
        (defs.iter().find(|d| d.name == name)).unwrap_or_else(|| panic!("no {name} in {defs:#?}"))
    }

    #[test]
    fn open_documents_are_parsed_once_per_text() {
        let a = definitions_memo("memo.py", "def one():\n    pass\n");
        let again = definitions_memo("memo.py", "def one():\n    pass\n");
        assert!(std::sync::Arc::ptr_eq(&a, &again), "parsed once");
        let edited = definitions_memo("memo.py", "def two():\n    pass\n");
        assert_eq!(edited[0].name, "two");
        assert_eq!(*a, definitions("memo.py", "def one():\n    pass\n"));
    }

    #[test]
    fn every_query_compiles_against_its_grammar() {
        for lang in LANGS {
            let _ = lang.query();
        }
    }

    #[test]
    fn rust_definitions_have_their_docs_signature_and_body() {
        let text = "use std::fmt;\n\n/// A point.\n#[derive(Debug)]\npub struct Point {\n    pub x: f32,\n    pub y: f32,\n}\n\nimpl Point {\n    /// Distance to the origin.\n    pub fn norm(&self)\n        -> f32 {\n        (self.x * self.x + self.y * self.y).sqrt()\n    }\n}\n\npub const ORIGIN: Point = Point { x: 0.0, y: 0.0 };\n\nenum Shape { Dot, Line(Point, Point) }\n";
        let defs = definitions("geo.rs", text);
        let point = find(&defs, "Point");
        assert_eq!((point.kind, point.line, point.start), ("class", 4, 2));
        assert_eq!((point.signature_end, point.end), (5, 8));
        let norm = find(&defs, "norm");
        assert_eq!((norm.kind, norm.line, norm.start), ("method", 11, 10));
        assert_eq!((norm.signature_end, norm.end), (13, 15), "{norm:?}");
        assert_eq!(find(&defs, "ORIGIN").kind, "constant");
        assert_eq!(find(&defs, "x").kind, "field");
        assert_eq!(find(&defs, "Line").line, 19);
    }

    #[test]
    fn python_signatures_keep_decorators_and_docstrings() {
        let text = "import os\n\nLIMIT = 10\n\n\nclass Cache:\n    \"\"\"Keeps things.\"\"\"\n\n    @property\n    def size(self):\n        \"\"\"How many.\n\n        Counted.\"\"\"\n        return len(self.items)\n";
        let defs = definitions("cache.py", text);
        assert_eq!(find(&defs, "LIMIT").kind, "constant");
        let cache = find(&defs, "Cache");
        assert_eq!((cache.line, cache.signature_end, cache.end), (5, 7, 14));
        let size = find(&defs, "size");
        assert_eq!(
            (size.line, size.start),
            (9, 8),
            "the decorator is part of it"
        );
        assert_eq!((size.signature_end, size.end), (13, 14), "{size:?}");
    }

    #[test]
    fn c_go_java_typescript_definitions_are_found() {
        let c = "#define MAX 4\n\ntypedef struct node {\n    int value;\n} node_t;\n\nstatic int add(int a,\n               int b)\n{\n    return a + b;\n}\n";
        let defs = definitions("x.c", c);
        let add = find(&defs, "add");
        assert_eq!(
            (add.kind, add.line, add.start, add.end),
            ("function", 6, 6, 11)
        );
        assert_eq!(add.signature_end, 8, "the brace on its own line is body");
        assert_eq!(find(&defs, "MAX").kind, "constant");
        let guarded = "#ifdef FAST\n// Adds.\nint add(int a, int b) { return a + b; }\n#endif\n";
        let add = find(&definitions("g.c", guarded), "add").clone();
        assert_eq!(add.start, 1, "the comment is its doc, the #ifdef is not");
        assert_eq!(find(&defs, "node_t").kind, "type");
        let go = "package p\n\n// Sum adds.\nfunc Sum(a, b int) int {\n\treturn a + b\n}\n\ntype T struct {\n\tName string\n}\n\nconst Limit = 3\n";
        let defs = definitions("p.go", go);
        let sum = find(&defs, "Sum");
        assert_eq!((sum.start, sum.signature_end, sum.end), (2, 4, 6));
        assert_eq!(find(&defs, "T").line, 7);
        assert_eq!(find(&defs, "Limit").kind, "constant");
        let java = "class Box {\n    int size;\n    Box(int s) { size = s; }\n    int area() {\n        return size * size;\n    }\n}\n";
        let defs = definitions("Box.java", java);
        assert_eq!(find(&defs, "area").end, 6);
        assert_eq!(find(&defs, "size").kind, "field");
        let ts = "export interface Shape {\n  area(): number;\n}\n\nexport class Square implements Shape {\n  constructor(private side: number) {}\n  area(): number {\n    return this.side ** 2;\n  }\n}\n\ntype Id = string;\nexport function make(): Square {\n  return new Square(1);\n}\n";
        for path in ["s.ts", "s.tsx"] {
            let defs = definitions(path, ts);
            assert_eq!(find(&defs, "Shape").kind, "interface");
            let square = find(&defs, "Square");
            assert_eq!((square.line, square.end), (4, 10), "{path}");
            assert_eq!(find(&defs, "Id").kind, "type");
            assert_eq!(find(&defs, "make").signature_end, 13);
        }
        let js = "const add = (a, b) => a + b;\nclass K { run() { return 1; } }\n";
        let defs = definitions("k.js", js);
        assert_eq!(find(&defs, "add").kind, "function");
        assert_eq!(find(&defs, "run").kind, "method");
        let cpp =
            "namespace n {\nclass Q {\n public:\n  int go();\n};\nint Q::go() { return 1; }\n}\n";
        let defs = definitions("q.cpp", cpp);
        assert_eq!(find(&defs, "Q").kind, "class");
        assert!(
            defs.iter().any(|d| d.name == "go" && d.line == 5),
            "{defs:#?}"
        );
    }

    #[test]
    fn other_languages_and_broken_files_fall_back_or_parse_what_they_can() {
        let rb = "# A greeter.\nclass Greeter\n  def hello\n    puts 'hi'\n  end\nend\n";
        let defs = definitions("g.rb", rb);
        let hello = find(&defs, "hello");
        assert_eq!((hello.line, hello.end), (2, 5));
        assert_eq!(find(&defs, "Greeter").start, 0, "the comment above");
        // A file cut mid-definition still yields what parses.
        let broken = "fn ok() -> u32 { 1 }\n\nfn cut(a: u32 {\n";
        let defs = definitions("b.rs", broken);
        assert!(defs.iter().any(|d| d.name == "ok"), "{defs:#?}");
        assert!(definitions("e.rs", "").is_empty());
        assert!(definitions("CHANGES.md", "The type method changed.\n").is_empty());
        assert!(definitions("c.toml", "[package]\nstatic = 1\n").is_empty());
        assert!(definitions("bin.py", "\u{0}\u{1}garbage(((").is_empty());
    }
}
