//! What a file imports: the module paths of each language's import
//! statements, as the places in a workspace they may name. A line scan,
//! not a grammar: it runs on the cursor's file at every selection and on
//! the files that one imports, so it must cost next to nothing, and an
//! import it misreads resolves to no file (or to one the ranker then
//! weighs like any other).
//!
//! Resolution against the workspace's paths is [`crate::context`]'s
//! (`Workspace::import_hops`): the first [`Target`] of an import that
//! names files wins, the nearest where several do.

use std::path::Path;

/// A place an import may name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A file, relative to the importing file's folder (`..` allowed).
    Relative(String),
    /// A file whose path from the workspace root is this, or ends with
    /// `/` and this.
    Suffix(String),
    /// The files directly in a folder whose path is this, or ends with
    /// `/` and this (a Go package, a Java wildcard import).
    Folder(String),
}

/// One imported module's targets, best first.
pub type Import = Vec<Target>;

/// The imports of `text`, a file at `path`, by its extension; none for
/// languages it does not know.
pub fn imports(path: &str, text: &str) -> Vec<Import> {
    let ext = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    match ext {
        "rs" => rust(path, text),
        "py" | "pyi" => python(text),
        "js" | "jsx" | "mjs" | "cjs" | "ts" | "tsx" | "mts" | "cts" => javascript(text),
        "go" => go(text),
        "c" | "h" | "cc" | "cpp" | "cxx" | "hpp" | "hh" | "hxx" => c(text),
        "java" | "kt" => java(text, ext),
        _ => Vec::new(),
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Statements starting with `keyword ` (after a visibility), joined over
/// lines until `end`; a statement is cut at 2 KB (a misread one).
fn statements(text: &str, keyword: &str, end: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("").trim();
        if let Some(s) = &mut open {
            s.push(' ');
            s.push_str(line);
            if line.contains(end) || s.len() > 2048 {
                out.push(open.take().unwrap());
            }
            continue;
        }
        let mut t = line;
        if let Some(rest) = t.strip_prefix("pub") {
            t = rest.trim_start();
            if t.starts_with('(') {
                t = t.split_once(')').map_or("", |(_, r)| r).trim_start();
            }
        }
        if let Some(rest) = t.strip_prefix(keyword)
            && rest.starts_with(char::is_whitespace)
        {
            let rest = rest.trim().to_string();
            // `mod name { … }` is inline: no file.
            if keyword == "mod" && rest.contains('{') {
                continue;
            }
            if end == '\n' || rest.contains(end) {
                out.push(rest);
            } else {
                open = Some(rest);
            }
        }
    }
    out
}

/// The module paths of a Rust `use` tree (`a::{b, c::d as e}`), each as
/// its segments; `self` in a group names the group's own path, a glob
/// the path it is under.
fn use_paths(tree: &str, base: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let prefix = tree[..open].trim().trim_end_matches("::");
        let mut path = base.to_vec();
        path.extend(
            prefix
                .split("::")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
        let inner = tree[open + 1..].trim_end();
        let inner = inner.strip_suffix('}').unwrap_or(inner);
        let (mut depth, mut from) = (0, 0);
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    use_paths(&inner[from..i], &path, out);
                    from = i + 1;
                }
                _ => {}
            }
        }
        use_paths(&inner[from..], &path, out);
        return;
    }
    let tree = tree.split(" as ").next().unwrap_or("").trim();
    if tree.is_empty() {
        return;
    }
    let mut path = base.to_vec();
    for seg in tree.split("::").map(str::trim) {
        match seg {
            "self" | "*" => {}
            s if is_ident(s) => path.push(s.to_string()),
            _ => return,
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
}

/// The Rust files a module path may be in: `a/b/c.rs`, `a/b/c/mod.rs`,
/// then without its last segment (an item, not a module), and so on.
fn rust_module_files(segments: &[String], make: &dyn Fn(String) -> Target) -> Import {
    let mut targets = Vec::new();
    for n in (1..=segments.len()).rev() {
        let joined = segments[..n].join("/");
        targets.push(make(format!("{joined}.rs")));
        targets.push(make(format!("{joined}/mod.rs")));
    }
    targets
}

fn rust(path: &str, text: &str) -> Vec<Import> {
    let file = Path::new(path);
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    // A module root's children are beside it; `a.rs`'s are in `a/`.
    let root = matches!(stem, "mod" | "lib" | "main");
    let children = if root {
        String::new()
    } else {
        format!("{stem}/")
    };
    let mut out = Vec::new();
    for stmt in statements(text, "mod", ';') {
        let name = stmt.trim_end_matches(';').trim();
        if is_ident(name) {
            out.push(vec![
                Target::Relative(format!("{children}{name}.rs")),
                Target::Relative(format!("{children}{name}/mod.rs")),
            ]);
        }
    }
    for stmt in statements(text, "use", ';') {
        let tree = stmt.split(';').next().unwrap_or("");
        let mut paths = Vec::new();
        use_paths(tree.trim_start_matches("::"), &[], &mut paths);
        for segs in paths {
            let (first, rest) = (segs[0].as_str(), &segs[1..]);
            let import = match first {
                "std" | "core" | "alloc" => continue,
                "crate" => rust_module_files(rest, &|p| Target::Suffix(p)),
                "self" => rust_module_files(rest, &|p| Target::Relative(format!("{children}{p}"))),
                "super" => {
                    // Each further `super` goes one folder up.
                    let ups = rest.iter().take_while(|s| *s == "super").count();
                    let up = "../".repeat(ups + usize::from(root));
                    rust_module_files(&rest[ups..], &|p| Target::Relative(format!("{up}{p}")))
                }
                // Another crate, or a module beside this one.
                _ => {
                    let mut beside =
                        rust_module_files(&segs, &|p| Target::Relative(format!("{children}{p}")));
                    beside.extend(rust_module_files(&segs, &|p| Target::Suffix(p)));
                    beside
                }
            };
            if !import.is_empty() {
                out.push(import);
            }
        }
    }
    out
}

/// The Python files of a dotted module under `base` (a relative prefix,
/// or empty for an absolute import).
fn python_module(base: Option<&str>, dotted: &str) -> Vec<Target> {
    let joined = dotted
        .split('.')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    let files = if joined.is_empty() {
        vec!["__init__.py".to_string()]
    } else {
        vec![format!("{joined}.py"), format!("{joined}/__init__.py")]
    };
    files
        .into_iter()
        .map(|f| match base {
            Some(b) => Target::Relative(format!("{b}{f}")),
            None => Target::Suffix(f),
        })
        .collect()
}

fn python(text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    // `import a.b as c, d`
    for stmt in statements(text, "import", '\n') {
        for module in stmt.split(',') {
            let module = module.split(" as ").next().unwrap_or("").trim();
            if !module.is_empty() && module.split('.').all(is_ident) {
                out.push(python_module(None, module));
            }
        }
    }
    // `from .a.b import (c, d as e)`: each name a module or a name in one.
    let mut froms = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(s) = &mut open {
            s.push(' ');
            s.push_str(line);
            if line.contains(')') || s.len() > 2048 {
                froms.push(open.take().unwrap());
            }
        } else if let Some(rest) = line.strip_prefix("from ") {
            if rest.contains('(') && !rest.contains(')') {
                open = Some(rest.to_string());
            } else {
                froms.push(rest.to_string());
            }
        }
    }
    for stmt in froms {
        let Some((module, names)) = stmt.split_once(" import ") else {
            continue;
        };
        let module = module.trim();
        let dots = module.chars().take_while(|&c| c == '.').count();
        let dotted = &module[dots..];
        if !dotted.split('.').all(|s| s.is_empty() || is_ident(s)) {
            continue;
        }
        let base = (dots > 0).then(|| "../".repeat(dots - 1));
        let prefix = if dotted.is_empty() {
            String::new()
        } else {
            format!("{dotted}.")
        };
        for name in names
            .trim_matches(|c| c == '(' || c == ')' || c == ' ')
            .split(',')
        {
            let name = name.split(" as ").next().unwrap_or("").trim();
            if !is_ident(name) {
                continue;
            }
            let mut import = python_module(base.as_deref(), &format!("{prefix}{name}"));
            import.extend(python_module(base.as_deref(), dotted));
            out.push(import);
        }
    }
    out
}

/// Quoted strings right after any of `markers` (`from '…'`, `require("…")`).
fn quoted_after<'a>(line: &'a str, markers: &[&str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    for marker in markers {
        let mut rest = line;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let r = rest.trim_start();
            let Some(q) = r.chars().next().filter(|c| matches!(c, '\'' | '"' | '`')) else {
                continue;
            };
            if let Some(end) = r[1..].find(q) {
                out.push(&r[1..1 + end]);
            }
        }
    }
    out
}

fn javascript(text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let mut specs = quoted_after(line, &["from", "require(", "import("]);
        if t.starts_with("import") {
            specs.extend(quoted_after(t, &["import"]));
        }
        for spec in specs {
            // Packages are not the workspace's; `@/` and `~/` are the
            // usual aliases of `src/`.
            let (spec, relative) = if spec.starts_with("./") || spec.starts_with("../") {
                (spec.to_string(), true)
            } else if let Some(rest) = spec.strip_prefix("@/").or(spec.strip_prefix("~/")) {
                (format!("src/{rest}"), false)
            } else {
                continue;
            };
            let spec = spec.trim_start_matches("./");
            let make = |p: String| {
                if relative {
                    Target::Relative(p)
                } else {
                    Target::Suffix(p)
                }
            };
            let mut targets = Vec::new();
            let stem = [".js", ".jsx", ".mjs", ".cjs"]
                .iter()
                .find_map(|e| spec.strip_suffix(e));
            if let Some(stem) = stem {
                // TypeScript imports its `.ts` files as `.js`.
                targets.push(make(spec.to_string()));
                targets.push(make(format!("{stem}.ts")));
                targets.push(make(format!("{stem}.tsx")));
            } else {
                for ext in ["", ".ts", ".tsx", ".d.ts", ".js", ".jsx", ".mjs"] {
                    targets.push(make(format!("{spec}{ext}")));
                }
                for index in ["index.ts", "index.tsx", "index.js", "index.jsx"] {
                    targets.push(make(format!("{spec}/{index}")));
                }
            }
            out.push(targets);
        }
    }
    out
}

fn go(text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    let mut block = false;
    for line in text.lines() {
        let t = line.split("//").next().unwrap_or("").trim();
        let spec = if block {
            if t.starts_with(')') {
                block = false;
                continue;
            }
            t
        } else if let Some(rest) = t.strip_prefix("import") {
            let rest = rest.trim();
            match rest.strip_prefix('(') {
                Some(inner) => {
                    block = true;
                    inner.trim()
                }
                None => rest,
            }
        } else {
            continue;
        };
        // `alias "path"`, `. "path"`, `_ "path"`
        let Some(path) = spec.split('"').nth(1) else {
            continue;
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        // The package's folder by the longest tail of its path that a
        // folder has (a module's path is not the workspace's), down to two
        // segments (one for a one-segment path, as the standard library's).
        let shortest = segments.len().min(2);
        let targets = (0..=segments.len().saturating_sub(shortest))
            .map(|i| Target::Folder(segments[i..].join("/")))
            .collect::<Vec<_>>();
        if !targets.is_empty() {
            out.push(targets);
        }
    }
    out
}

fn c(text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let Some(rest) = t.strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("include") else {
            continue;
        };
        let rest = rest.trim();
        if let Some(q) = rest.strip_prefix('"') {
            if let Some(end) = q.find('"') {
                let name = q[..end].to_string();
                out.push(vec![Target::Relative(name.clone()), Target::Suffix(name)]);
            }
        } else if let Some(a) = rest.strip_prefix('<')
            && let Some(end) = a.find('>')
        {
            out.push(vec![Target::Suffix(a[..end].to_string())]);
        }
    }
    out
}

fn java(text: &str, ext: &str) -> Vec<Import> {
    let mut out = Vec::new();
    for stmt in statements(text, "import", if ext == "kt" { '\n' } else { ';' }) {
        let stmt = stmt.split(';').next().unwrap_or("").trim();
        let stmt = stmt.strip_prefix("static ").unwrap_or(stmt).trim();
        let stmt = stmt.split(" as ").next().unwrap_or("").trim();
        let segments: Vec<&str> = stmt.split('.').map(str::trim).collect();
        if segments.last() == Some(&"*") {
            let package = &segments[..segments.len() - 1];
            if !package.is_empty() && package.iter().all(|s| is_ident(s)) {
                out.push(vec![Target::Folder(package.join("/"))]);
            }
            continue;
        }
        if segments.is_empty() || !segments.iter().all(|s| is_ident(s)) {
            continue;
        }
        // A class, or a member of one (a static import, a nested class).
        let mut targets = Vec::new();
        for n in (2..=segments.len()).rev() {
            let joined = segments[..n].join("/");
            for e in ["java", "kt"] {
                targets.push(Target::Suffix(format!("{joined}.{e}")));
            }
        }
        out.push(targets);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firsts(imports: &[Import]) -> Vec<Target> {
        imports.iter().map(|i| i[0].clone()).collect()
    }

    #[test]
    fn rust_modules_and_use_trees() {
        let text = "mod parse;\npub(crate) mod walk;\nuse std::io;\n\
                    use crate::config::{Config, rope::{Rope, self}};\n\
                    use super::util::helper as h;\nuse self::inner::*;\n\
                    use serde::{\n    Deserialize,\n    Serialize,\n};\n";
        let got = imports("src/model/mod.rs", text);
        let f = firsts(&got);
        assert_eq!(f[0], Target::Relative("parse.rs".into()));
        assert_eq!(f[1], Target::Relative("walk.rs".into()));
        // std is skipped; the group expands into its paths.
        assert_eq!(f[2], Target::Suffix("config/Config.rs".into()));
        assert!(got[2].contains(&Target::Suffix("config.rs".into())));
        assert_eq!(f[3], Target::Suffix("config/rope/Rope.rs".into()));
        assert_eq!(f[4], Target::Suffix("config/rope.rs".into()));
        // From mod.rs, `super` is the parent folder.
        assert!(got[5].contains(&Target::Relative("../util.rs".into())));
        assert_eq!(f[6], Target::Relative("inner.rs".into()));
        // A multi-line group of another crate.
        assert!(got[7].contains(&Target::Suffix("serde/Deserialize.rs".into())));
        assert_eq!(got.len(), 9);
        // In `a.rs`, children and `self` are in `a/`, `super` is beside it.
        let got = imports("src/a.rs", "mod b;\nuse super::c::D;\n");
        assert_eq!(got[0][0], Target::Relative("a/b.rs".into()));
        assert!(got[1].contains(&Target::Relative("c.rs".into())));
    }

    #[test]
    fn python_imports_absolute_and_relative() {
        let text = "import os.path\nimport json as j, email.utils\n\
                    from .message import Message\nfrom .. import errors\n\
                    from email.mime import (\n    text,\n    base as b,\n)\n";
        let got = imports("email/mime/x.py", text);
        let f = firsts(&got);
        assert_eq!(
            f,
            vec![
                Target::Suffix("os/path.py".into()),
                Target::Suffix("json.py".into()),
                Target::Suffix("email/utils.py".into()),
                Target::Relative("message/Message.py".into()),
                Target::Relative("../errors.py".into()),
                Target::Suffix("email/mime/text.py".into()),
                Target::Suffix("email/mime/base.py".into()),
            ]
        );
        // A name imported from a module may be in the module itself.
        assert!(got[3].contains(&Target::Relative("message.py".into())));
        assert!(got[4].contains(&Target::Relative("../__init__.py".into())));
    }

    #[test]
    fn javascript_relative_specifiers_and_aliases() {
        let text = "import { a } from './a';\nimport b from \"../lib/b.js\";\n\
                    const c = require('./c');\nimport 'react';\nimport x from '@/util/x';\n\
                    export * from './d';\n";
        let got = imports("src/app/main.ts", text);
        let f = firsts(&got);
        assert_eq!(f[0], Target::Relative("a".into()));
        assert!(got[0].contains(&Target::Relative("a.ts".into())));
        assert!(got[0].contains(&Target::Relative("a/index.ts".into())));
        assert!(got[1].contains(&Target::Relative("../lib/b.ts".into())));
        assert_eq!(f[2], Target::Relative("c".into()));
        assert!(got[3].contains(&Target::Suffix("src/util/x.ts".into())));
        assert_eq!(f[4], Target::Relative("d".into()));
        assert_eq!(got.len(), 5, "a package is not the workspace's: {got:?}");
    }

    #[test]
    fn go_packages_by_their_path_tails() {
        let text = "package main\n\nimport \"fmt\"\nimport (\n\t\"github.com/o/r/internal/x\"\n\
                    \ty \"github.com/o/r/pkg/y\" // why\n)\n";
        let got = imports("cmd/main.go", text);
        assert_eq!(got[0], vec![Target::Folder("fmt".into())]);
        assert_eq!(
            got[1][0],
            Target::Folder("github.com/o/r/internal/x".into())
        );
        assert_eq!(got[1].last(), Some(&Target::Folder("internal/x".into())));
        assert_eq!(got[2].last(), Some(&Target::Folder("pkg/y".into())));
    }

    #[test]
    fn c_includes_and_java_imports() {
        let got = imports("src/a.c", "#include <stdio.h>\n# include \"b/c.h\"\n");
        assert_eq!(got[0], vec![Target::Suffix("stdio.h".into())]);
        assert_eq!(got[1][0], Target::Relative("b/c.h".into()));
        let got = imports(
            "A.java",
            "import java.util.*;\nimport static org.x.Y.m;\nimport org.x.Z;\n",
        );
        assert_eq!(got[0], vec![Target::Folder("java/util".into())]);
        assert_eq!(got[1][0], Target::Suffix("org/x/Y/m.java".into()));
        assert!(got[1].contains(&Target::Suffix("org/x/Y.java".into())));
        assert_eq!(got[2][0], Target::Suffix("org/x/Z.java".into()));
    }
}
