//! The workspace index, persisted: each file's definitions and chunk
//! identifiers, kept in SQLite by the file's content hash, so an index is
//! rebuilt only for files that changed.
//!
//! `KILN_HOME/cache/index.db` holds two tables: `files` (per workspace
//! root and relative path: the size and modification time last seen and
//! the content's sha256) and `parsed` (per sha256 and extension, which
//! picks the grammar: the file's index, encoded below). A file whose size
//! and time are as recorded is taken from `parsed` without being read; one
//! whose time changed is read and hashed, and parsed again only if its
//! content is new. Parsed entries no file refers to are dropped.
//!
//! The cache is only ever a shortcut: a database that cannot be opened
//! is moved aside (`index.db.broken`) and started afresh, an entry that
//! does not decode is parsed again, and a write that fails leaves the
//! index as built. It holds identifiers and definition lines, never file
//! texts; with encryption at rest it is not written at all ([`path`]).

use crate::context::FileIndex;
use crate::symbols::{Def, KINDS};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bumped whenever what an entry holds changes (the grammars' queries,
/// the chunking, the encoding): older entries are then parsed again.
const FORMAT: u32 = 3;

pub struct Cache {
    conn: Connection,
}

/// A file to record: where, what was seen, and its entry when parsed
/// anew.
pub struct Record {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: String,
    pub ext: String,
    pub data: Option<Vec<u8>>,
}

impl Record {
    pub fn new(
        path: &str,
        size: u64,
        modified: Option<SystemTime>,
        sha256: String,
        data: Option<Vec<u8>>,
    ) -> Record {
        Record {
            path: path.to_string(),
            size,
            mtime_ns: mtime_ns(modified),
            sha256,
            ext: ext(path).to_string(),
            data,
        }
    }
}

/// Where the persisted index lives: `KILN_HOME/cache/index.db`; `None`
/// with encryption at rest (it holds names from the user's code, so it is
/// then kept in memory only, rebuilt at each start).
pub fn path(config: &kiln_registry::config::Config) -> Option<std::path::PathBuf> {
    (!config.encrypt_at_rest).then(|| config.home.join("cache").join("index.db"))
}

/// What the cache recorded of a file.
pub struct Seen {
    pub size: u64,
    pub mtime_ns: i64,
    pub sha256: String,
}

pub fn mtime_ns(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(-1, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}

impl Cache {
    /// Opens (or creates) the cache at `path`; a file that is not a
    /// usable database is moved aside and a new one made. The message
    /// says what happened when nothing could be opened.
    pub fn open(path: &Path) -> Result<Cache, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        match Cache::try_open(path) {
            Ok(c) => Ok(c),
            Err(first) => {
                let aside = path.with_extension("db.broken");
                std::fs::rename(path, &aside).map_err(|e| {
                    format!(
                        "{}: {first}; and it could not be moved aside: {e}",
                        path.display()
                    )
                })?;
                Cache::try_open(path).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }

    fn try_open(path: &Path) -> Result<Cache, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS files (
                 root TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, ext TEXT NOT NULL,
                 PRIMARY KEY (root, path));
             CREATE TABLE IF NOT EXISTS parsed (
                 sha256 TEXT NOT NULL, ext TEXT NOT NULL, format INTEGER NOT NULL,
                 data BLOB NOT NULL, PRIMARY KEY (sha256, ext));
             CREATE INDEX IF NOT EXISTS files_by_content ON files (sha256, ext);",
        )?;
        // A quick read proves the file is a database at all.
        conn.query_row("SELECT count(*) FROM files", [], |r| r.get::<_, i64>(0))?;
        Ok(Cache { conn })
    }

    /// Every file recorded under `root`.
    pub fn seen(&self, root: &str) -> HashMap<String, Seen> {
        let mut out = HashMap::new();
        let Ok(mut stmt) = self
            .conn
            .prepare("SELECT path, size, mtime_ns, sha256 FROM files WHERE root = ?1")
        else {
            return out;
        };
        let rows = stmt.query_map([root], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Seen {
                    size: r.get::<_, i64>(1)? as u64,
                    mtime_ns: r.get(2)?,
                    sha256: r.get(3)?,
                },
            ))
        });
        if let Ok(rows) = rows {
            out.extend(rows.flatten());
        }
        out
    }

    /// The encoded index of content `sha256` read with the grammar of
    /// `ext`, if kept in this format.
    pub fn parsed(&self, sha256: &str, ext: &str) -> Option<Vec<u8>> {
        self.conn
            .query_row(
                "SELECT data FROM parsed WHERE sha256 = ?1 AND ext = ?2 AND format = ?3",
                params![sha256, ext, FORMAT],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten()
    }

    /// Records what was indexed under `root` (files and, where parsed
    /// anew, their entries) and forgets the files `gone`. One
    /// transaction; [`Cache::collect`] drops the entries left unused.
    pub fn record(&mut self, root: &str, files: &[Record], gone: &[String]) -> Result<(), String> {
        let tx = self.conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut file = tx
                .prepare(
                    "INSERT OR REPLACE INTO files (root, path, size, mtime_ns, sha256, ext)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(|e| e.to_string())?;
            let mut entry = tx
                .prepare(
                    "INSERT OR REPLACE INTO parsed (sha256, ext, format, data) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(|e| e.to_string())?;
            for r in files {
                file.execute(params![
                    root,
                    r.path,
                    r.size as i64,
                    r.mtime_ns,
                    r.sha256,
                    r.ext
                ])
                .map_err(|e| e.to_string())?;
                if let Some(data) = &r.data {
                    entry
                        .execute(params![r.sha256, r.ext, FORMAT, data])
                        .map_err(|e| e.to_string())?;
                }
            }
            let mut forget = tx
                .prepare("DELETE FROM files WHERE root = ?1 AND path = ?2")
                .map_err(|e| e.to_string())?;
            for path in gone {
                forget
                    .execute(params![root, path])
                    .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

    /// Drops the entries no file refers to (once an index is recorded: a
    /// lookup per entry, through the files' content index).
    pub fn collect(&mut self) -> Result<(), String> {
        self.conn
            .execute(
                "DELETE FROM parsed WHERE NOT EXISTS
                 (SELECT 1 FROM files WHERE files.sha256 = parsed.sha256 AND files.ext = parsed.ext)",
                [],
            )
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// A file's extension, which picks its grammar ("" without one).
pub fn ext(path: &str) -> &str {
    let name = path.rsplit(['/', '\\']).next().unwrap_or(path);
    name.rsplit_once('.').map_or("", |(_, e)| e)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// A file's index as bytes (its text is not kept).
pub(crate) fn encode(file: &FileIndex) -> Vec<u8> {
    let mut out = Vec::new();
    put_u32(&mut out, file.defs.len() as u32);
    for d in &file.defs {
        put_str(&mut out, &d.name);
        let kind = KINDS.iter().position(|&k| k == d.kind).unwrap_or(0);
        out.push(kind as u8);
        for v in [d.line, d.start, d.signature_end, d.end] {
            put_u32(&mut out, v);
        }
    }
    put_u32(&mut out, file.spans.len() as u32);
    for (start, end, terms, n) in &file.spans {
        for v in [*start, *end, *n, terms.len() as u32] {
            put_u32(&mut out, v);
        }
        let mut sorted: Vec<(&str, u32)> = file.terms_of(terms).collect();
        sorted.sort();
        for (w, c) in sorted {
            put_str(&mut out, w);
            put_u32(&mut out, c);
        }
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn u32(&mut self) -> Option<u32> {
        let v = self.b.get(self.at..self.at + 4)?;
        self.at += 4;
        Some(u32::from_le_bytes(v.try_into().ok()?))
    }
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }
    fn str(&mut self) -> Option<String> {
        self.str_ref().map(str::to_string)
    }

    fn str_ref(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        let v = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        std::str::from_utf8(v).ok()
    }
}

/// The index of the file at `path` (of `size` bytes, as recorded) from
/// bytes [`encode`] wrote; `None` for anything else (the caller parses
/// the file again).
pub(crate) fn decode(
    path: String,
    modified: Option<SystemTime>,
    size: u64,
    bytes: &[u8],
) -> Option<FileIndex> {
    let mut r = Reader { b: bytes, at: 0 };
    let n_defs = r.u32()? as usize;
    let mut defs = Vec::with_capacity(n_defs.min(bytes.len() / 21));
    for _ in 0..n_defs {
        let name = r.str()?;
        let kind = *KINDS.get(r.u8()? as usize)?;
        let (line, start, signature_end, end) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        defs.push(Def {
            name,
            kind,
            line,
            start,
            signature_end,
            end,
        });
    }
    let n_spans = r.u32()? as usize;
    let mut file = FileIndex {
        path,
        text: None,
        modified,
        bytes: size,
        defs,
        spans: Vec::with_capacity(n_spans.min(bytes.len() / 16)),
        terms: Vec::new(),
        words: String::new(),
    };
    for _ in 0..n_spans {
        let (start, end, n, terms) = (r.u32()?, r.u32()?, r.u32()?, r.u32()? as usize);
        let first = file.terms.len() as u32;
        for _ in 0..terms {
            let w = r.str_ref()?;
            file.add_term(w, r.u32()?);
        }
        file.spans
            .push((start, end, first..file.terms.len() as u32, n));
    }
    (r.at == bytes.len()).then_some(file)
}
