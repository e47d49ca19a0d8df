//! Context from the workspace: files walked with `.gitignore` respected,
//! cut into chunks of lines, scored against the text around the cursor by
//! the active ranking policy (or the built-in ranker) from the features the
//! policy ABI defines, and packed into a token budget with the model's own
//! tokenizer, each under a comment that names its file.

use crate::imports::{self, Target};
use crate::index_cache;
use crate::prompt::Counter;
use crate::symbols::{self, DEFINERS, Def};
use crate::terms::{self, Slim, Terms, TermsBuilder};
use kiln_sandbox::breaker::Ranker;
use kiln_sandbox::{Candidate, Cursor, RankInput};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Lines per chunk.
pub const CHUNK_LINES: usize = 20;
/// Files larger than this are skipped (generated code, data).
pub const MAX_FILE_BYTES: u64 = 512 * 1024;
/// At most this many files are indexed (under 2 KB of index each; see
/// [`crate::terms`]).
pub const MAX_FILES: usize = 200_000;
/// Candidates handed to the ranker after the lexical prefilter: this
/// many, or one per [`TOKENS_PER_CANDIDATE`] of the budget if that is more
/// (a 32K budget needs more than 64 chunks of about 200 tokens).
pub const MAX_CANDIDATES: usize = 64;
pub const TOKENS_PER_CANDIDATE: usize = 128;

const CODE_EXTENSIONS: &[&str] = &[
    "rs", "py", "js", "ts", "tsx", "jsx", "go", "c", "h", "cc", "cpp", "hpp", "java", "kt", "cs",
    "rb", "php", "swift", "scala", "lua", "sh", "sql", "zig", "hs", "ml", "ex", "exs", "erl", "jl",
    "r", "m", "dart", "vue", "svelte", "toml", "yaml", "yml", "md",
];

/// A candidate snippet, materialized: its text, its identifiers, the
/// names defined in it.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Relative to the workspace root.
    pub path: String,
    pub start_line: u32,
    pub text: String,
    words: Vec<String>,
    /// The names defined in it (their naming line is inside).
    defines: HashSet<String>,
    modified: Option<SystemTime>,
}

/// A file of the index.
struct Source {
    /// Relative to the workspace root.
    path: String,
    /// Its text, where the index was built from texts in memory; read
    /// again from disk (under the root) where it was walked.
    text: Option<Arc<str>>,
    modified: Option<SystemTime>,
    /// Its definitions: `Workspace::defs[defs]`, by line.
    defs: Range<u32>,
    /// Its chunks' identifier counts: `Workspace::chunk_words[chunks]`,
    /// one per [`CHUNK_LINES`] lines (0 for a blank chunk).
    chunks: Range<u32>,
    /// Its size as indexed (a text of another size has changed since).
    bytes: u64,
}

/// A chunk of an indexed file that lexical search found: its file and
/// lines (`start..end`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hit {
    file: u32,
    start: u32,
    end: u32,
}

/// At most this many files' chunks are scored for one lexical search
/// (those whose chunks can score best first; see [`crate::terms`]).
const MAX_SCANNED_FILES: usize = 512;

/// The indexed workspace: every file's definitions (the symbol index) and
/// which files hold each identifier, with the chunk statistics BM25 needs
/// ([`crate::terms`]). File texts are not kept: a file's chunks are
/// scored, and a snippet's lines read, when it is a candidate.
#[derive(Default)]
pub struct Workspace {
    pub root: Option<PathBuf>,
    sources: Vec<Source>,
    terms: Terms,
    /// Every file's definitions, file after file.
    defs: Vec<Slim>,
    /// Each file's chunks' identifier counts (BM25's chunk lengths).
    chunk_words: Vec<u32>,
    /// Chunks of [`CHUNK_LINES`] lines indexed, and their identifiers.
    chunks: u64,
    total_words: u64,
    avg_words: f32,
    /// Files by their name (the path's last component), and by their
    /// folder: where imports are resolved.
    files_named: HashMap<Box<str>, Vec<u32>>,
    folders: HashMap<Box<str>, Vec<u32>>,
}

impl Workspace {
    /// The repository's name in repository-level prompts: the root
    /// folder's name; `None` without a root.
    pub fn repo_name(&self) -> Option<String> {
        let root = self.root.as_ref()?;
        Some(root.file_name()?.to_string_lossy().into_owned())
    }
}

/// An open editor document, as a source of context.
pub struct OpenDoc<'a> {
    pub path: &'a str,
    pub text: &'a str,
    pub opened: Instant,
    pub edited: Option<Instant>,
    /// Its ranges edited last, newest first (the edit ring).
    pub edits: &'a [Edited],
}

/// A range of an open document's lines the editor changed lately (the
/// language server's `didChange`s; `crate::lsp::document::ring_add`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edited {
    /// The lines as the text is now, 0-based, the end exclusive.
    pub start_line: u32,
    pub end_line: u32,
    pub at: Instant,
}

/// Lines around an edited range that come with it, and the most lines of
/// one edited-range candidate.
const EDIT_CONTEXT_LINES: u32 = 3;
const EDIT_MAX_LINES: u32 = 40;

/// Identifiers of at least 2 characters.
pub fn words(text: &str) -> Vec<String> {
    idents(text).map(str::to_string).collect()
}

/// Words that say nothing about what a snippet is about.
const KEYWORDS: &[&str] = &[
    "return", "if", "else", "elif", "for", "while", "in", "import", "from", "self", "None", "True",
    "False", "null", "true", "false", "pub", "use", "as", "and", "or", "not", "is", "this", "new",
    "public", "private", "void", "int", "str", "the", "to", "of", "match", "crate", "super",
];

/// Whether `word` says nothing about what code is about (a keyword).
pub fn is_keyword(word: &str) -> bool {
    // Asked of every identifier an index loads: one lookup, not a scan.
    static SET: std::sync::OnceLock<rustc_hash::FxHashSet<&str>> = std::sync::OnceLock::new();
    let set = SET.get_or_init(|| DEFINERS.iter().chain(KEYWORDS).copied().collect());
    set.contains(word)
}

/// Chunks of [`CHUNK_LINES`] lines of `text` with something in them:
/// (first line, end line, the lines joined).
fn spans_of(text: &str) -> Vec<(u32, u32, String)> {
    let lines: Vec<&str> = text.lines().collect();
    (lines.chunks(CHUNK_LINES).enumerate())
        .filter_map(|(i, ls)| {
            let joined = ls.join("\n");
            let start = (i * CHUNK_LINES) as u32;
            (!joined.trim().is_empty()).then(|| (start, start + ls.len() as u32, joined))
        })
        .collect()
}

/// The names of `defs` whose naming line is in `start..end`.
fn defined_in(defs: &[Def], start: u32, end: u32) -> HashSet<String> {
    (defs.iter())
        .filter(|d| d.line >= start && d.line < end)
        .map(|d| d.name.clone())
        .collect()
}

fn chunk_file(path: &str, text: &str, defs: &[Def], modified: Option<SystemTime>) -> Vec<Chunk> {
    (spans_of(text).into_iter())
        .map(|(start, end, text)| Chunk {
            path: path.to_string(),
            start_line: start,
            defines: defined_in(defs, start, end),
            words: words(&text),
            text,
            modified,
        })
        .collect()
}

/// The lines `start..end` of `text`, joined.
fn line_range(text: &str, start: u32, end: u32) -> String {
    let lines: Vec<&str> = (text.lines())
        .skip(start as usize)
        .take(end.saturating_sub(start) as usize)
        .collect();
    lines.join("\n")
}

/// Files indexed at once (each batch on every core).
const INDEX_BATCH: usize = 512;

/// A file the walk found: relative path, full path, when modified, size.
type Found = (String, PathBuf, Option<SystemTime>, u64);

/// The source files under `root` the index reads, up to the limits above
/// (`.gitignore`, `.ignore` and hidden files respected).
fn walk(root: &Path) -> Vec<Found> {
    let walk = ignore::WalkBuilder::new(root)
        .require_git(false)
        .follow_links(false)
        .build();
    let mut found = Vec::new();
    for entry in walk.flatten() {
        if found.len() >= MAX_FILES {
            break;
        }
        let path = entry.path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !CODE_EXTENSIONS.contains(&ext) || !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.len() > MAX_FILE_BYTES {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(path).to_string_lossy();
        found.push((
            rel.into_owned(),
            path.to_path_buf(),
            meta.modified().ok(),
            meta.len(),
        ));
    }
    found
}

/// The source files under `root` the index reads, (relative path, text).
pub fn read_files(root: &Path) -> Vec<(String, String)> {
    (walk(root).into_iter())
        .filter_map(|(rel, path, ..)| Some((rel, std::fs::read_to_string(path).ok()?)))
        .collect()
}

/// One file, indexed (on any thread).
pub(crate) struct FileIndex {
    pub path: String,
    pub text: Option<Arc<str>>,
    pub modified: Option<SystemTime>,
    /// The size of the text indexed.
    pub bytes: u64,
    pub defs: Vec<Def>,
    /// (first line, end line, identifier counts, identifiers): the
    /// counts are `terms[range]`.
    pub spans: Vec<(u32, u32, Range<u32>, u32)>,
    /// Every span's (identifier, count), the identifier a range of
    /// `words` (one buffer, not a string each: loading a large index is
    /// mostly allocation otherwise).
    pub terms: Vec<(Range<u32>, u32)>,
    pub words: String,
}

impl FileIndex {
    /// Appends an identifier and its count to the last span's terms.
    pub(crate) fn add_term(&mut self, word: &str, count: u32) {
        let start = self.words.len() as u32;
        self.words.push_str(word);
        self.terms.push((start..self.words.len() as u32, count));
    }

    /// A span's (identifier, count) pairs.
    pub(crate) fn terms_of(&self, terms: &Range<u32>) -> impl Iterator<Item = (&str, u32)> {
        (self.terms[terms.start as usize..terms.end as usize].iter())
            .map(|(w, c)| (&self.words[w.start as usize..w.end as usize], *c))
    }
}

/// How an index was built.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IndexStats {
    /// Files parsed now (new or changed).
    pub parsed: usize,
    /// Files taken from the persisted index.
    pub reused: usize,
    pub seconds: f64,
    /// Why the persisted index could not be used or written, if so.
    pub cache_error: Option<String>,
}

/// What indexing one file came to.
enum Indexed {
    /// Parsed now: the entry to keep, and its content hash.
    Parsed(FileIndex, String),
    /// Its size and time are as recorded: taken from the cache.
    Reused(FileIndex),
    /// Changed time, known content (sha256): its entry is in the cache.
    Known(String),
}

fn index_file(path: String, text: &str, keep: bool, modified: Option<SystemTime>) -> FileIndex {
    let mut index = FileIndex {
        defs: symbols::definitions(&path, text),
        path,
        text: keep.then(|| Arc::from(text)),
        modified,
        bytes: text.len() as u64,
        spans: Vec::new(),
        terms: Vec::new(),
        words: String::new(),
    };
    for (start, end, joined) in spans_of(text) {
        let mut counts: HashMap<&str, u32> = HashMap::new();
        let mut n = 0;
        for w in idents(&joined) {
            *counts.entry(w).or_default() += 1;
            n += 1;
        }
        let first = index.terms.len() as u32;
        for (w, c) in counts {
            index.add_term(w, c);
        }
        let terms = first..index.terms.len() as u32;
        index.spans.push((start, end, terms, n));
    }
    index
}

/// Indexes `n` files on every core: `file(i)` gives the i-th (`None`
/// when it cannot be read as text), in order.
fn index_all<T: Send>(n: usize, file: &(dyn Fn(usize) -> Option<T> + Sync)) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(16);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            break mine;
                        }
                        if let Some(f) = file(i) {
                            mine.push((i, f));
                        }
                    }
                })
            })
            .collect();
        (workers.into_iter())
            .flat_map(|w| w.join().expect("an indexing thread panicked"))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, f)| f).collect()
}

impl Workspace {
    /// Walks `root` (`.gitignore`, `.ignore` and hidden files respected)
    /// and indexes the source files up to the limits above, on every core.
    pub fn index(root: &Path) -> Workspace {
        Workspace::index_cached(root, None).0
    }

    /// [`Workspace::index`] through the persisted index at `cache`
    /// ([`crate::index_cache`]): only new and changed files are parsed.
    pub fn index_cached(root: &Path, cache: Option<&Path>) -> (Workspace, IndexStats) {
        let started = Instant::now();
        let found = walk(root);
        let mut ws = Workspace {
            root: Some(root.to_path_buf()),
            ..Workspace::default()
        };
        let mut stats = IndexStats::default();
        let mut cache = cache.and_then(|path| {
            index_cache::Cache::open(path)
                .map_err(|e| stats.cache_error = Some(e))
                .ok()
        });
        let key = root.to_string_lossy().into_owned();
        let seen = cache.as_ref().map(|c| c.seen(&key)).unwrap_or_default();
        let known: HashSet<&str> = seen.values().map(|s| s.sha256.as_str()).collect();
        let caching = cache.is_some();
        let mut recorded = false;
        let mut builder = TermsBuilder::default();
        // In batches, so that no more than a batch's files are held as
        // parsed, uncompacted text at once.
        for batch in found.chunks(INDEX_BATCH) {
            // Entries of files whose size and time are as recorded.
            let kept: HashMap<usize, Vec<u8>> = match &cache {
                Some(c) => (batch.iter().enumerate())
                    .filter_map(|(i, (rel, _, modified, size))| {
                        let s = seen.get(rel)?;
                        let same = s.size == *size
                            && s.mtime_ns == index_cache::mtime_ns(*modified)
                            && s.mtime_ns >= 0;
                        same.then(|| Some((i, c.parsed(&s.sha256, index_cache::ext(rel))?)))?
                    })
                    .collect(),
                None => HashMap::new(),
            };
            let results = index_all(batch.len(), &|i| {
                let (rel, path, modified, size) = &batch[i];
                if let Some(bytes) = kept.get(&i)
                    && let Some(f) = index_cache::decode(rel.clone(), *modified, *size, bytes)
                {
                    return Some((i, Indexed::Reused(f)));
                }
                let text = std::fs::read_to_string(path).ok()?; // not UTF-8 text
                let sha = kiln_runtime::plugin::sha256_hex(text.as_bytes());
                if caching && !kept.contains_key(&i) && known.contains(sha.as_str()) {
                    return Some((i, Indexed::Known(sha)));
                }
                Some((
                    i,
                    Indexed::Parsed(index_file(rel.clone(), &text, false, *modified), sha),
                ))
            });
            let mut files = Vec::with_capacity(results.len());
            let mut record = Vec::new();
            for (i, result) in results {
                let (rel, path, modified, size) = &batch[i];
                let file = match result {
                    Indexed::Reused(f) => {
                        stats.reused += 1;
                        f
                    }
                    Indexed::Known(sha) => {
                        let cached = (cache.as_ref())
                            .and_then(|c| c.parsed(&sha, index_cache::ext(rel)))
                            .and_then(|b| index_cache::decode(rel.clone(), *modified, *size, &b));
                        let (f, data) = match cached {
                            Some(f) => {
                                stats.reused += 1;
                                (f, None)
                            }
                            None => {
                                let Ok(text) = std::fs::read_to_string(path) else {
                                    continue;
                                };
                                stats.parsed += 1;
                                let f = index_file(rel.clone(), &text, false, *modified);
                                let data = index_cache::encode(&f);
                                (f, Some(data))
                            }
                        };
                        record.push(index_cache::Record::new(rel, *size, *modified, sha, data));
                        f
                    }
                    Indexed::Parsed(f, sha) => {
                        stats.parsed += 1;
                        if cache.is_some() {
                            let data = Some(index_cache::encode(&f));
                            record.push(index_cache::Record::new(rel, *size, *modified, sha, data));
                        }
                        f
                    }
                };
                files.push(file);
            }
            recorded |= !record.is_empty();
            if let Some(c) = &mut cache
                && !record.is_empty()
                && let Err(e) = c.record(&key, &record, &[])
            {
                stats.cache_error = Some(e);
            }
            ws.add(&mut builder, files);
        }
        if let Some(c) = &mut cache {
            let present: HashSet<&str> = found.iter().map(|f| f.0.as_str()).collect();
            let gone: Vec<String> = (seen.keys())
                .filter(|p| !present.contains(p.as_str()))
                .cloned()
                .collect();
            if !gone.is_empty()
                && let Err(e) = c.record(&key, &[], &gone)
            {
                stats.cache_error = Some(e);
            }
            if (recorded || !gone.is_empty())
                && let Err(e) = c.collect()
            {
                stats.cache_error = Some(e);
            }
        }
        // What the walk and the cache said is not needed to finish.
        drop(known);
        drop((seen, found, cache));
        ws.finish(builder);
        // Loading freed about as much as the index keeps.
        kiln_runtime::measure::release_free_memory();
        stats.seconds = started.elapsed().as_secs_f64();
        (ws, stats)
    }

    /// The index of `files` (relative path, text) read from `root`, which
    /// keeps their texts.
    pub fn of_files(root: &Path, files: &[(String, String)]) -> Workspace {
        let indexed: Vec<FileIndex> = index_all(files.len(), &|i| {
            let (rel, text) = &files[i];
            Some(index_file(rel.clone(), text, true, None))
        });
        let mut ws = Workspace {
            root: Some(root.to_path_buf()),
            ..Workspace::default()
        };
        let mut builder = TermsBuilder::default();
        ws.add(&mut builder, indexed);
        ws.finish(builder);
        ws
    }

    /// Adds indexed files.
    fn add(&mut self, b: &mut TermsBuilder, files: Vec<FileIndex>) {
        let mut ids = Vec::new();
        for file in files {
            let first = self.defs.len() as u32;
            for def in &file.defs {
                let kind = (symbols::KINDS.iter())
                    .position(|&k| k == def.kind)
                    .unwrap_or(0) as u8;
                let term = b.id(terms::hash(&def.name));
                (self.defs).push(Slim::new(
                    term,
                    kind,
                    def.line,
                    def.start,
                    def.signature_end,
                    def.end,
                ));
            }
            ids.clear();
            let first_chunk = self.chunk_words.len();
            for (start, _, range, n) in &file.spans {
                let c = first_chunk + *start as usize / CHUNK_LINES;
                if self.chunk_words.len() <= c {
                    self.chunk_words.resize(c + 1, 0);
                }
                self.chunk_words[c] = *n;
                self.chunks += 1;
                self.total_words += u64::from(*n);
                // Keywords are never searched for: not indexed.
                for (w, _) in file.terms_of(range) {
                    if !is_keyword(w) {
                        let id = b.id(terms::hash(w));
                        b.in_chunk(id);
                        ids.push(id);
                    }
                }
            }
            b.add_file(&mut ids);
            self.sources.push(Source {
                path: file.path,
                text: file.text,
                modified: file.modified,
                defs: first..self.defs.len() as u32,
                chunks: first_chunk as u32..self.chunk_words.len() as u32,
                bytes: file.bytes,
            });
        }
    }

    fn finish(&mut self, b: TermsBuilder) {
        let (terms, new_id) = b.finish();
        self.terms = terms;
        for d in &mut self.defs {
            d.term = new_id[d.term as usize];
        }
        self.defs.shrink_to_fit();
        self.sources.shrink_to_fit();
        self.chunk_words.shrink_to_fit();
        self.avg_words = self.total_words as f32 / self.chunks.max(1) as f32;
        for (f, source) in self.sources.iter().enumerate() {
            let (folder, name) = split_path(&source.path);
            (self.files_named.entry(name.into()).or_default()).push(f as u32);
            (self.folders.entry(folder.into()).or_default()).push(f as u32);
        }
        self.files_named.shrink_to_fit();
        self.folders.shrink_to_fit();
    }

    /// The heap the index holds, in bytes (its tables; file texts where
    /// it keeps them).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        let sources: usize = (self.sources.iter())
            .map(|s| s.path.capacity() + s.text.as_ref().map_or(0, |t| t.len()))
            .sum();
        let by_path = |m: &HashMap<Box<str>, Vec<u32>>| -> usize {
            m.capacity() * (size_of::<(Box<str>, Vec<u32>)>() + 1)
                + (m.iter())
                    .map(|(k, v)| k.len() + v.capacity() * 4)
                    .sum::<usize>()
        };
        self.sources.capacity() * size_of::<Source>()
            + sources
            + self.terms.heap_bytes()
            + self.defs.capacity() * size_of::<Slim>()
            + self.chunk_words.capacity() * 4
            + by_path(&self.files_named)
            + by_path(&self.folders)
    }

    /// The files an import of the file at `from` names: those of its first
    /// target that names any, the nearest to `from` where several do.
    fn resolve(&self, from: &str, import: &[Target]) -> Vec<u32> {
        let (dir, _) = split_path(from);
        let tail = |path: &str, s: &str| {
            path == s
                || (path.len() > s.len()
                    && path.ends_with(s)
                    && path[..path.len() - s.len()].ends_with('/'))
        };
        let nearest = |mut found: Vec<(usize, u32)>| -> Vec<u32> {
            let best = found.iter().map(|(d, _)| *d).min().unwrap_or(0);
            found.retain(|(d, _)| *d == best);
            found.into_iter().map(|(_, f)| f).collect()
        };
        // A workspace that is itself a package (`email/`, its files
        // `email/utils.py` named `utils.py`) is named by its imports'
        // first segment: those are tried without it too.
        let root = self.repo_name();
        let unrooted: Vec<Target> = (import.iter())
            .filter_map(|t| match (t, &root) {
                (Target::Suffix(s), Some(r)) => s
                    .strip_prefix(r.as_str())
                    .and_then(|s| s.strip_prefix('/'))
                    .map(|s| Target::Suffix(s.to_string())),
                _ => None,
            })
            .collect();
        for target in import.iter().chain(&unrooted) {
            let found = match target {
                Target::Relative(rel) => {
                    let Some(path) = normalize(&format!("{dir}/{rel}")) else {
                        continue;
                    };
                    let (_, name) = split_path(&path);
                    (self.files_named.get(name).into_iter().flatten())
                        .filter(|&&f| self.sources[f as usize].path == path)
                        .copied()
                        .collect()
                }
                Target::Suffix(s) => {
                    let (_, name) = split_path(s);
                    nearest(
                        (self.files_named.get(name).into_iter().flatten())
                            .filter(|&&f| tail(&self.sources[f as usize].path, s))
                            .map(|&f| (path_distance(&self.sources[f as usize].path, from), f))
                            .collect(),
                    )
                }
                Target::Folder(s) => {
                    let folders: Vec<(usize, &[u32])> = (self.folders.iter())
                        .filter(|(folder, _)| tail(folder, s))
                        .map(|(folder, files)| {
                            (path_distance(&format!("{folder}/"), from), files.as_slice())
                        })
                        .collect();
                    let best = folders.iter().map(|(d, _)| *d).min().unwrap_or(0);
                    let mut files: Vec<u32> = (folders.into_iter())
                        .filter(|(d, _)| *d == best)
                        .flat_map(|(_, files)| files.iter().copied())
                        .collect();
                    files.sort_unstable();
                    files
                }
            };
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }

    /// The files the file at `path` (its text now, `text`) imports, 1, and
    /// those they import, 2: indexed files by number of hops. Up to
    /// [`MAX_HOP_FILES`] of the first hop's files are read for the second.
    pub fn import_hops(&self, path: &str, text: &str) -> HashMap<u32, u8> {
        let mut hops: HashMap<u32, u8> = HashMap::new();
        for import in imports::imports(path, text) {
            for f in self.resolve(path, &import) {
                hops.insert(f, 1);
            }
        }
        let mut first: Vec<u32> = hops.keys().copied().collect();
        first.sort_unstable();
        for f in first.into_iter().take(MAX_HOP_FILES) {
            let from = &self.sources[f as usize].path;
            let Some(text) = self.text(f) else {
                continue;
            };
            for import in imports::imports(from, &text) {
                for g in self.resolve(from, &import) {
                    hops.entry(g).or_insert(2);
                }
            }
        }
        hops.retain(|&f, _| self.sources[f as usize].path != path);
        hops
    }

    /// How many files the index holds.
    pub fn files(&self) -> usize {
        self.sources.len()
    }

    /// How many definitions the symbol index holds.
    pub fn definitions(&self) -> usize {
        self.defs.len()
    }

    /// How many chunks the lexical index holds.
    pub fn chunks(&self) -> usize {
        self.chunks as usize
    }

    /// The names a file defines on lines `start..end`, whose text is
    /// `lines`: each read back from its naming line, the identifier there
    /// with its name's hash.
    fn names_in(&self, f: u32, start: u32, end: u32, lines: &str) -> HashSet<String> {
        let r = &self.sources[f as usize].defs;
        let defs: Vec<&Slim> = (self.defs[r.start as usize..r.end as usize].iter())
            .filter(|d| d.line >= start && d.line < end)
            .collect();
        let mut names = HashSet::new();
        if defs.is_empty() {
            return names;
        }
        for (i, line) in lines.lines().enumerate() {
            let i = start as usize + i;
            for d in defs.iter().filter(|d| d.line as usize == i) {
                let want = self.terms.hash_of(d.term);
                let mut idents = line.split(|c: char| !word_char(c));
                if let Some(name) = idents.find(|w| !w.is_empty() && terms::hash(w) == want) {
                    names.insert(name.to_string());
                }
            }
        }
        names
    }

    /// The definitions of `name`: (file, definition). Looked for in the
    /// files whose text holds the name (a definition's naming line does),
    /// so a name that is never indexed as a word (a keyword, a single
    /// character) has none here; selection never asks for those.
    fn defined(&self, name: &str) -> Vec<(u32, Def)> {
        let Some(id) = self.terms.id(terms::hash(name)) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for f in self.terms.files(id) {
            let r = &self.sources[f as usize].defs;
            for slim in &self.defs[r.start as usize..r.end as usize] {
                if slim.term == id {
                    let def = Def {
                        name: name.to_string(),
                        kind: symbols::KINDS[slim.kind()],
                        line: slim.line,
                        start: slim.start(),
                        signature_end: slim.signature_end(),
                        end: slim.end(),
                    };
                    found.push((f, def));
                }
            }
        }
        found
    }

    /// A file's text: kept, or read again.
    fn text(&self, f: u32) -> Option<Arc<str>> {
        let source = &self.sources[f as usize];
        if let Some(text) = &source.text {
            return Some(text.clone());
        }
        let root = self.root.as_ref()?;
        std::fs::read_to_string(root.join(&source.path))
            .ok()
            .map(Arc::from)
    }

    /// BM25's IDF of a term held by `df` chunks.
    fn idf_of(&self, df: u32) -> f32 {
        let n = self.chunks.max(1) as f32;
        let df = df.max(1) as f32;
        ((n - df + 0.5) / (df + 0.5) + 1.0).ln()
    }

    fn idf(&self, word: &str) -> f32 {
        let df = (self.terms.id(terms::hash(word))).map_or(1, |t| self.terms.chunks(t));
        self.idf_of(df)
    }

    fn bm25_term(&self, idf: f32, f: f32, len: f32) -> f32 {
        let (k1, b) = (BM25_K1, 0.75f32);
        idf * f * (k1 + 1.0) / (f + k1 * (1.0 - b + b * len / self.avg_words.max(1.0)))
    }

    /// BM25 of a chunk outside the index (an open document's, a
    /// definition's), with the index's statistics.
    fn bm25(&self, query: &HashSet<String>, chunk: &Chunk) -> f32 {
        let len = chunk.words.len() as f32;
        // Summed in word order (a hash map's order differs from map to
        // map, and so would the f32 sum's last bits, and so ties).
        let mut tf: std::collections::BTreeMap<&str, u32> = Default::default();
        for w in &chunk.words {
            if query.contains(w) {
                *tf.entry(w.as_str()).or_default() += 1;
            }
        }
        (tf.iter())
            .map(|(w, &f)| self.bm25_term(self.idf(w), f as f32, len))
            .sum()
    }

    /// The `k` indexed chunks of best BM25 for `query` (positive only),
    /// best first, leaving out files `skip` says. The files holding query
    /// terms are taken by the most a chunk of theirs can score (each term
    /// at most `idf * (k1 + 1)`), best first, and their chunks scored from
    /// their texts (read into `texts`), until no file left can reach the
    /// `k`th chunk found or [`MAX_SCANNED_FILES`] were scored.
    fn best_spans(
        &self,
        query: &HashSet<String>,
        skip: &dyn Fn(&str) -> bool,
        k: usize,
        texts: &mut HashMap<u32, Option<Arc<str>>>,
    ) -> Vec<(f32, Hit)> {
        // Word by word in a fixed order, so that each chunk's f32 sum (and
        // the ranking of near ties) is the same from call to call.
        let mut words: Vec<&str> = query.iter().map(String::as_str).collect();
        words.sort_unstable();
        let found: Vec<(&str, u32, f32)> = (words.into_iter())
            .filter_map(|w| {
                let id = self.terms.id(terms::hash(w))?;
                let df = self.terms.chunks(id);
                (df > 0).then(|| (w, id, self.idf_of(df)))
            })
            .collect();
        if found.is_empty() || k == 0 {
            return Vec::new();
        }
        let mut bound = vec![0f32; self.sources.len()];
        let mut files = Vec::new();
        for &(_, id, idf) in &found {
            for f in self.terms.files(id) {
                if bound[f as usize] == 0.0 {
                    files.push(f);
                }
                bound[f as usize] += idf;
            }
        }
        files.retain(|&f| !skip(&self.sources[f as usize].path));
        files.sort_by(|&a, &b| {
            bound[b as usize]
                .total_cmp(&bound[a as usize])
                .then(a.cmp(&b))
        });
        // The query's identifiers, found in a file's text as whole words.
        let patterns = found.iter().map(|(w, ..)| *w);
        let search = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(patterns)
            .expect("a few short identifiers make an automaton");
        let mut hits: Vec<(f32, Hit)> = Vec::new();
        // The k best scores so far, least first.
        let mut best: std::collections::BinaryHeap<std::cmp::Reverse<u32>> = Default::default();
        let mut tf = vec![0u32; found.len()];
        let mut found_at: Vec<(u32, u32)> = Vec::new();
        for (i, &f) in files.iter().enumerate() {
            // A little over the bound, for the rounding of the sums.
            let most = bound[f as usize] * (BM25_K1 + 1.0) * 1.0001;
            if i >= MAX_SCANNED_FILES
                || (best.len() >= k && best.peek().is_some_and(|b| f32::from_bits(b.0) > most))
            {
                break;
            }
            let Some(text) = texts.entry(f).or_insert_with(|| self.text(f)).clone() else {
                continue;
            };
            // (chunk, query term) of each occurrence, in text order.
            found_at.clear();
            let (bytes, mut line, mut counted) = (text.as_bytes(), 0, 0);
            for m in search.find_iter(&*text) {
                let before = text[..m.start()].chars().next_back();
                let after = text[m.end()..].chars().next();
                if before.is_some_and(word_char) || after.is_some_and(word_char) {
                    continue; // inside a longer identifier
                }
                line += memchr::memchr_iter(b'\n', &bytes[counted..m.start()]).count();
                counted = m.start();
                found_at.push(((line / CHUNK_LINES) as u32, m.pattern().as_u32()));
            }
            if found_at.is_empty() {
                continue;
            }
            let lines = (memchr::memchr_iter(b'\n', bytes).count()
                + usize::from(!text.is_empty() && !text.ends_with('\n')))
                as u32;
            let source = &self.sources[f as usize];
            let counts = match text.len() as u64 == source.bytes {
                true => &self.chunk_words[source.chunks.start as usize..source.chunks.end as usize],
                false => &[][..], // changed since it was indexed
            };
            for group in found_at.chunk_by(|a, b| a.0 == b.0) {
                let c = group[0].0;
                let start = c * CHUNK_LINES as u32;
                let end = (start + CHUNK_LINES as u32).min(lines);
                tf.fill(0);
                for &(_, t) in group {
                    tf[t as usize] += 1;
                }
                // Its length as indexed; counted now where the file has
                // changed since (or the index has no such chunk).
                let n = match counts.get(c as usize) {
                    Some(&n) if n > 0 => n,
                    _ => idents(&line_range(&text, start, end)).count() as u32,
                };
                let score: f32 = (found.iter().zip(&tf))
                    .filter(|(_, c)| **c > 0)
                    .map(|((_, _, idf), &c)| self.bm25_term(*idf, c as f32, n as f32))
                    .sum();
                if score > 0.0 {
                    hits.push((
                        score,
                        Hit {
                            file: f,
                            start,
                            end,
                        },
                    ));
                    best.push(std::cmp::Reverse(score.to_bits()));
                    if best.len() > k {
                        best.pop();
                    }
                }
            }
        }
        hits.sort_by(by_rank);
        hits.truncate(k);
        hits
    }

    /// The definitions of `name` at `places` (path, naming line) as
    /// snippets: (path, body, signature). ctxbench's oracle context.
    pub(crate) fn definition_texts(
        &self,
        name: &str,
        places: &[(String, u32)],
    ) -> Vec<(String, String, String)> {
        (self.defined(name).into_iter())
            .filter_map(|(f, d)| {
                let path = &self.sources[f as usize].path;
                if !places.iter().any(|(p, l)| p == path && *l == d.line) {
                    return None;
                }
                let text = self.text(f)?;
                let (start, end) = d.body_lines();
                Some((
                    path.clone(),
                    line_range(&text, start, end),
                    line_range(&text, d.start, d.signature_end),
                ))
            })
            .collect()
    }

    /// A chunk lexical search found, with its text (its file's, `text`;
    /// `None` if it no longer has those lines).
    fn chunk(&self, hit: Hit, text: &str) -> Option<Chunk> {
        let body = line_range(text, hit.start, hit.end);
        if body.trim().is_empty() {
            return None;
        }
        let source = &self.sources[hit.file as usize];
        Some(Chunk {
            path: source.path.clone(),
            start_line: hit.start,
            defines: self.names_in(hit.file, hit.start, hit.end, &body),
            words: words(&body),
            text: body,
            modified: source.modified,
        })
    }
}

const BM25_K1: f32 = 1.2;

/// Lexical hits best first; ties in file and line order.
fn by_rank(a: &(f32, Hit), b: &(f32, Hit)) -> std::cmp::Ordering {
    (b.0.total_cmp(&a.0))
        .then(a.1.file.cmp(&b.1.file))
        .then(a.1.start.cmp(&b.1.start))
}

/// Whether `c` may be part of an identifier (as [`words`] splits).
fn word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Identifiers of at least 2 characters, not starting with a digit, as
/// slices of `text` (bytes at a time where they are ASCII: this runs over
/// every file indexed and every chunk lexical search counts again).
fn idents(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut at = 0;
    // Whether the character at `i` is a word character, and its length.
    let char_at = move |i: usize| -> (bool, usize) {
        let b = bytes[i];
        if b < 0x80 {
            (b.is_ascii_alphanumeric() || b == b'_', 1)
        } else {
            let c = text[i..].chars().next().expect("at a char boundary");
            (word_char(c), c.len_utf8())
        }
    };
    std::iter::from_fn(move || {
        loop {
            while at < bytes.len() {
                match char_at(at) {
                    (true, _) => break,
                    (false, n) => at += n,
                }
            }
            if at >= bytes.len() {
                return None;
            }
            let start = at;
            while at < bytes.len() {
                match char_at(at) {
                    (true, n) => at += n,
                    (false, _) => break,
                }
            }
            let w = &text[start..at];
            if w.len() >= 2 && !bytes[start].is_ascii_digit() {
                return Some(w);
            }
        }
    })
}

/// At most this many definitions of one name are candidates (the files
/// nearest the cursor's first).
const DEFS_PER_NAME: usize = 3;
/// Definitions are candidates as signatures, one per this many tokens of
/// the budget (at least [`MAX_CANDIDATES`], at most
/// [`MAX_DEF_CANDIDATES`]), and as bodies too for the names nearest the
/// cursor, one per [`TOKENS_PER_BODY`] (at least 4).
const TOKENS_PER_SIGNATURE: usize = 16;
const MAX_DEF_CANDIDATES: usize = 512;
const TOKENS_PER_BODY: usize = 512;
/// The signatures of the imported files' definitions are candidates too,
/// one per this many tokens of the budget (16 to [`MAX_IMPORTED`]).
const TOKENS_PER_IMPORTED: usize = 32;
const MAX_IMPORTED: usize = 256;

/// Where a definition's text is.
#[derive(Clone, Copy)]
enum DefText<'a> {
    /// An indexed file's (read when needed).
    Indexed(u32),
    /// An open document's, with its definitions.
    Open(&'a str, &'a [Def]),
}

/// A definition of a name near the cursor, where it is.
struct DefAt<'a> {
    path: &'a str,
    text: DefText<'a>,
    def: Def,
    modified: Option<SystemTime>,
    doc: Option<&'a OpenDoc<'a>>,
}

/// A candidate snippet before ranking.
struct Scored<'a> {
    bm25: f32,
    chunk: &'a Chunk,
    doc: Option<&'a OpenDoc<'a>>,
    /// The definition it shows (the packer takes one snippet per group).
    group: Option<u32>,
    resolution: &'static str,
    /// The weight of the module named at the cursor, when it is a member
    /// of that module's file; 0 otherwise.
    member_of: f32,
    /// When its lines were edited, for a range of the edit ring.
    edited: Option<Instant>,
}

/// Folders between two files' folders: up from `b`'s to the one they
/// share, then down to `a`'s.
fn path_distance(a: &str, b: &str) -> usize {
    let dirs = |p: &'_ str| -> Vec<String> {
        let mut parts: Vec<String> = p.split(['/', '\\']).map(str::to_string).collect();
        parts.pop();
        parts
    };
    let (a, b) = (dirs(a), dirs(b));
    let common = (a.iter().zip(b.iter())).take_while(|(x, y)| x == y).count();
    (a.len() - common) + (b.len() - common)
}

/// The identifiers of the cursor's file (its text before and after the
/// cursor), each weighted by its nearest occurrence (1 on the cursor's
/// line, 1/2 at [`NEAR_LINES`] lines away, falling with distance) and a
/// little for each use (a tenth of the log of their count). Keywords left
/// out.
fn cursor_identifiers(prefix: &str, suffix: &str) -> HashMap<String, f32> {
    let before: Vec<&str> = prefix.split('\n').collect();
    let cursor = before.len() - 1;
    let lines = (before.iter().enumerate())
        .map(|(i, l)| (cursor - i, *l))
        .chain(suffix.split('\n').enumerate());
    let mut near: HashMap<String, (f32, u32)> = HashMap::new();
    for (distance, line) in lines {
        let weight = 1.0 / (1.0 + distance as f32 / NEAR_LINES);
        for word in words(line) {
            if is_keyword(&word) {
                continue;
            }
            let (w, uses) = near.entry(word).or_insert((0.0, 0));
            *w = w.max(weight);
            *uses += 1;
        }
    }
    (near.into_iter())
        .map(|(word, (w, uses))| (word, w + 0.1 * (1.0 + uses as f32).ln()))
        .collect()
}

/// The most files of an import's first hop read for its second.
const MAX_HOP_FILES: usize = 32;

/// A relative path's folder (empty at the root) and name, split at its
/// last `/` (or `\\`).
fn split_path(path: &str) -> (&str, &str) {
    match path.rfind(['/', '\\']) {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// `a/./b/../c` as `a/c`; `None` where `..` climbs out of the root.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Lines from the cursor at which a name's weight halves.
const NEAR_LINES: f32 = 16.0;

/// One snippet of the context block, and why it is there.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Snippet {
    /// Relative to the workspace root (or the open document's path).
    pub path: String,
    /// The lines it spans, 0-based, the end exclusive (as LSP ranges).
    pub start_line: u32,
    pub end_line: u32,
    /// `signature` or `body` of a definition, or `lines` (a chunk of a
    /// file found by its words).
    pub resolution: &'static str,
    /// Its exact token count in the block (with the line naming its file).
    pub tokens: usize,
    /// The ranker's score.
    pub score: f32,
    /// The features that scored it, in words.
    pub why: String,
    /// Where its block (the line naming its file, then its text) is in
    /// [`Packed::text`], in bytes.
    #[serde(skip)]
    pub block: std::ops::Range<usize>,
}

/// What went into the prompt's context block.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Packed {
    pub text: String,
    pub snippets: Vec<Snippet>,
    pub tokens: usize,
    /// `policy` or `builtin` (with why, when a policy failed).
    pub ranked_by: String,
    /// The ranking policy's call, for the decision log; `None` when no
    /// policy was called.
    #[serde(skip)]
    pub call: Option<kiln_sandbox::breaker::Call>,
    /// Every candidate (path, first line, end line), best-ranked first,
    /// packed or not: ctxbench's MRR.
    #[serde(skip)]
    pub ranking: Vec<(String, u32, u32)>,
}

/// Picks snippets for a completion in `cursor_path` and packs them into
/// `budget` tokens ([`crate::pack`]: a relevance floor, a redundancy
/// penalty, a knapsack, a stable layout with the best snippet last).
#[allow(clippy::too_many_arguments)]
pub fn select(
    ws: &Workspace,
    open: &[OpenDoc<'_>],
    cursor_path: &str,
    prefix: &str,
    suffix: &str,
    ranker: &Ranker,
    tok: &Counter<'_>,
    budget: usize,
) -> Packed {
    let at = SelectAt {
        path: cursor_path,
        prefix,
        suffix,
        last_completion: None,
    };
    select_with(ws, open, &at, ranker, tok, budget, Selection::Kiln)
}

/// How candidates are gathered and fill the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Chunks defining identifiers near the cursor among the candidates
    /// whatever their BM25, packed by [`crate::pack::choose`].
    Kiln,
    /// kiln's first context (a ctxbench baseline): the BM25 top
    /// candidates, packed in rank order, each that still fits.
    Bm25FirstFit,
}

/// The cursor as selection sees it: its file and the text around it.
pub struct SelectAt<'a> {
    pub path: &'a str,
    pub prefix: &'a str,
    pub suffix: &'a str,
    /// The completion last shown at this cursor, if any: a second query
    /// (its identifiers join the query and the names near the cursor,
    /// weighted as if [`NEAR_LINES`] lines away), so the definitions the
    /// model reached for come into the next prompt.
    pub last_completion: Option<&'a str>,
}

/// The weight of a name the last completion uses (one [`NEAR_LINES`]
/// lines from the cursor).
const LAST_COMPLETION_WEIGHT: f32 = 0.5;

/// [`select`] with a choice of packing.
pub fn select_with(
    ws: &Workspace,
    open: &[OpenDoc<'_>],
    at: &SelectAt<'_>,
    ranker: &Ranker,
    tok: &Counter<'_>,
    budget: usize,
    selection: Selection,
) -> Packed {
    let (cursor_path, suffix) = (at.path, at.suffix);
    // The word being typed at the cursor is not a name yet: leaving it
    // out keeps the choice, and so the prompt's start, the same while it
    // is typed.
    let prefix = at
        .prefix
        .trim_end_matches(|c: char| c.is_alphanumeric() || c == '_');
    if budget == 0 {
        return Packed::default();
    }
    // The query: identifiers in the last lines before the cursor and the
    // first lines after it.
    let tail: Vec<&str> = prefix.lines().rev().take(30).collect();
    let head: Vec<&str> = suffix.lines().take(10).collect();
    let second: Vec<String> = match (selection, at.last_completion) {
        (Selection::Kiln, Some(text)) => (words(text).into_iter())
            .filter(|w| !is_keyword(w))
            .collect(),
        _ => Vec::new(),
    };
    let query: HashSet<String> = words(&tail.join("\n"))
        .into_iter()
        .chain(words(&head.join("\n")))
        .filter(|w| !is_keyword(w))
        .chain(second.iter().cloned())
        .collect();
    if query.is_empty() {
        return Packed::default();
    }
    let now = SystemTime::now();
    let current = prefix.to_string() + suffix;
    let open_docs: Vec<(&OpenDoc<'_>, Arc<Vec<Def>>)> = (open.iter())
        .filter(|d| d.path != cursor_path)
        .map(|d| (d, symbols::definitions_memo(d.path, d.text)))
        .collect();
    let open_chunks: Vec<(Chunk, &OpenDoc<'_>)> = (open_docs.iter())
        .flat_map(|(d, defs)| {
            chunk_file(d.path, d.text, defs, None)
                .into_iter()
                .map(move |c| (c, *d))
        })
        .collect();
    let open_paths: HashSet<&str> = open.iter().map(|d| d.path).collect();
    // The definitions in other files of the names near the cursor (the
    // workspace's, and the open documents' as they are now); names the
    // cursor's file defines itself need none.
    let mut near = match selection {
        Selection::Kiln => cursor_identifiers(prefix, suffix),
        Selection::Bm25FirstFit => HashMap::new(),
    };
    for name in &second {
        let w = near.entry(name.clone()).or_insert(0.0);
        *w = w.max(LAST_COMPLETION_WEIGHT);
    }
    let near = near;
    let own: HashSet<String> = if near.is_empty() {
        HashSet::new()
    } else {
        (symbols::definitions(cursor_path, &current).into_iter())
            .map(|d| d.name)
            .collect()
    };
    // The files the cursor's file imports (1 hop), and those import (2).
    let hops: HashMap<u32, u8> = match selection {
        Selection::Kiln => ws.import_hops(cursor_path, &current),
        Selection::Bm25FirstFit => HashMap::new(),
    };
    let hops_of_path: HashMap<&str, u8> = (hops.iter())
        .map(|(&f, &h)| (ws.sources[f as usize].path.as_str(), h))
        .collect();
    let hops_of = |path: &str| hops_of_path.get(path).copied().unwrap_or(0);
    let mut defs_of: HashMap<&str, Vec<DefAt<'_>>> = HashMap::new();
    for name in near.keys().filter(|n| !own.contains(*n)) {
        let indexed = (ws.defined(name).into_iter()).filter_map(|(f, def)| {
            let src = &ws.sources[f as usize];
            (src.path != cursor_path && !open_paths.contains(src.path.as_str())).then(|| DefAt {
                path: &src.path,
                text: DefText::Indexed(f),
                def,
                modified: src.modified,
                doc: None,
            })
        });
        let opened = (open_docs.iter()).flat_map(|(doc, defs)| {
            (defs.iter().filter(|d| &d.name == name)).map(|def| DefAt {
                path: doc.path,
                text: DefText::Open(doc.text, defs),
                def: def.clone(),
                modified: None,
                doc: Some(*doc),
            })
        });
        let found: Vec<DefAt<'_>> = indexed.chain(opened).collect();
        if !found.is_empty() {
            defs_of.insert(name, found);
        }
    }
    // A candidate's `definition` feature: the nearness of the nearest
    // name it defines (one defined in another file, where the cursor's
    // file does not define it).
    let definition = |defines: &HashSet<String>| -> f32 {
        (defines.iter())
            .filter(|n| defs_of.contains_key(n.as_str()))
            .map(|n| near[n.as_str()])
            .fold(0.0, f32::max)
    };
    // Those names, nearest first, for `why`.
    let defined = |defines: &HashSet<String>| -> Vec<String> {
        let mut names: Vec<String> = (defines.iter())
            .filter(|n| defs_of.contains_key(n.as_str()))
            .cloned()
            .collect();
        names.sort_by(|a, b| near[b].total_cmp(&near[a]).then(a.cmp(b)));
        names
    };
    let max_candidates = match selection {
        Selection::Kiln => MAX_CANDIDATES.max(budget / TOKENS_PER_CANDIDATE),
        Selection::Bm25FirstFit => MAX_CANDIDATES,
    };
    // Definitions of the nearest names first, each at two resolutions (its
    // signature, its body) of which the packer takes at most one; the
    // nearest files' first where a name has several.
    let mut names: Vec<&str> = defs_of.keys().copied().collect();
    names.sort_by(|a, b| near[*b].total_cmp(&near[*a]).then(a.cmp(b)));
    let max_defs = (budget / TOKENS_PER_SIGNATURE).clamp(MAX_CANDIDATES, MAX_DEF_CANDIDATES);
    let with_body = (budget / TOKENS_PER_BODY).max(4);
    // (chunk, open document, group, resolution, the weight of the module
    // named at the cursor when the chunk is a member of it).
    type DefChunk<'a> = (Chunk, Option<&'a OpenDoc<'a>>, u32, &'static str, f32);
    let mut def_chunks: Vec<DefChunk<'_>> = Vec::new();
    // The indexed files' texts, read once per selection.
    let mut texts: HashMap<u32, Option<Arc<str>>> = HashMap::new();
    'names: for (rank, name) in names.into_iter().enumerate() {
        let mut found: Vec<&DefAt<'_>> = defs_of[name].iter().collect();
        // Where a name is defined more than once, the files the cursor's
        // file imports first, then the nearest folders'.
        found.sort_by_key(|d| {
            let hops = match hops_of(d.path) {
                0 => u8::MAX,
                h => h,
            };
            (hops, path_distance(d.path, cursor_path), d.path, d.def.line)
        });
        for d in found.into_iter().take(DEFS_PER_NAME) {
            let group = def_chunks.len() as u32;
            let (body_start, body_end) = d.def.body_lines();
            let mut resolutions = vec![("signature", d.def.start, d.def.signature_end)];
            if rank < with_body && body_end > d.def.signature_end {
                resolutions.push(("body", body_start, body_end));
            }
            for (resolution, start, end) in resolutions {
                let (text, defines) = match d.text {
                    DefText::Open(text, defs) => {
                        (line_range(text, start, end), defined_in(defs, start, end))
                    }
                    DefText::Indexed(f) => match texts.entry(f).or_insert_with(|| ws.text(f)) {
                        Some(text) => {
                            let lines = line_range(text, start, end);
                            let names = ws.names_in(f, start, end, &lines);
                            (lines, names)
                        }
                        None => continue, // gone since it was indexed
                    },
                };
                if text.trim().is_empty() {
                    continue;
                }
                def_chunks.push((
                    Chunk {
                        path: d.path.to_string(),
                        start_line: start,
                        words: words(&text),
                        defines,
                        text,
                        modified: d.modified,
                    },
                    d.doc,
                    group,
                    resolution,
                    0.0,
                ));
            }
            if def_chunks.len() >= max_defs {
                break 'names;
            }
        }
    }
    // Then the signatures of what the imported files define (what code
    // reached through an import calls without naming it in the file yet:
    // `module.function`, a method of an imported type), one hop first.
    let mut imported: Vec<(u8, u32)> = hops.iter().map(|(&f, &h)| (h, f)).collect();
    imported.sort_unstable();
    let max_imported = def_chunks.len() + (budget / TOKENS_PER_IMPORTED).clamp(16, MAX_IMPORTED);
    let shown: HashSet<(&str, u32)> = (def_chunks.iter())
        .map(|(c, ..)| (c.path.as_str(), c.start_line))
        .collect();
    // The module named right before the cursor (`geometry::`, `utils.`):
    // an imported file of that name is what is being completed from.
    let receiver = prefix
        .strip_suffix("::")
        .or(prefix.strip_suffix('.'))
        .and_then(|p| words(p.lines().last().unwrap_or("")).pop());
    let mut more = Vec::new();
    'files: for (hop, f) in imported {
        let source = &ws.sources[f as usize];
        if open_paths.contains(source.path.as_str()) {
            continue;
        }
        let (folder, name) = split_path(&source.path);
        let stem = name.split('.').next().unwrap_or("");
        let module = match stem {
            "mod" | "__init__" | "index" | "lib" => split_path(folder).1,
            _ if name.ends_with(".go") => split_path(folder).1,
            _ => stem,
        };
        let member_of = match &receiver {
            Some(r) if hop == 1 && r == module => near.get(r).copied().unwrap_or(1.0),
            _ => 0.0,
        };
        let Some(text) = texts.entry(f).or_insert_with(|| ws.text(f)).clone() else {
            continue;
        };
        for slim in &ws.defs[source.defs.start as usize..source.defs.end as usize] {
            let (start, signature_end) = (slim.start(), slim.signature_end());
            if symbols::KINDS[slim.kind()] == "field"
                || shown.contains(&(source.path.as_str(), start))
            {
                continue;
            }
            let body = line_range(&text, start, signature_end);
            if body.trim().is_empty() {
                continue;
            }
            more.push((
                Chunk {
                    path: source.path.clone(),
                    start_line: start,
                    words: words(&body),
                    defines: ws.names_in(f, start, signature_end, &body),
                    text: body,
                    modified: source.modified,
                },
                None,
                (def_chunks.len() + more.len()) as u32,
                "signature",
                member_of,
            ));
            if def_chunks.len() + more.len() >= max_imported {
                break 'files;
            }
        }
    }
    def_chunks.extend(more);
    // Then chunks by BM25, but not those holding a definition offered
    // above (it would be there twice).
    let offered: HashSet<(&str, &str)> = (def_chunks.iter())
        .flat_map(|(c, ..)| c.defines.iter().map(|n| (c.path.as_str(), n.as_str())))
        .collect();
    let fresh =
        |c: &Chunk| !(c.defines.iter()).any(|n| offered.contains(&(c.path.as_str(), n.as_str())));
    let skip = |path: &str| path == cursor_path || open_paths.contains(path);
    // A few more than needed: some will repeat a definition.
    let best = ws.best_spans(&query, &skip, 2 * max_candidates, &mut texts);
    let indexed_chunks: Vec<(f32, Chunk)> = (best.into_iter())
        .filter_map(|(score, hit)| {
            let text = texts.get(&hit.file)?.as_ref()?;
            Some((score, ws.chunk(hit, text)?))
        })
        .collect();
    let mut lexical: Vec<(f32, &Chunk, Option<&OpenDoc<'_>>)> = (indexed_chunks.iter())
        .map(|(score, c)| (*score, c, None))
        .chain(
            open_chunks
                .iter()
                .map(|(c, d)| (ws.bm25(&query, c), c, Some(*d))),
        )
        .filter(|(s, c, _)| *s > 0.0 && fresh(c))
        .collect();
    lexical.sort_by(|a, b| b.0.total_cmp(&a.0));
    lexical.truncate(max_candidates);
    // The ranges edited last in the other open documents, with a few
    // lines around each (what the user is in the middle of changing).
    let edited: Vec<(Chunk, &OpenDoc<'_>, Instant)> = (open_docs.iter())
        .flat_map(|(d, defs)| {
            let lines = d.text.lines().count() as u32;
            (d.edits.iter()).filter_map(move |e| {
                let start = e.start_line.saturating_sub(EDIT_CONTEXT_LINES);
                let end = (e.end_line + EDIT_CONTEXT_LINES)
                    .min(start + EDIT_MAX_LINES)
                    .min(lines);
                let text = line_range(d.text, start, end);
                (!text.trim().is_empty()).then(|| {
                    let chunk = Chunk {
                        path: d.path.to_string(),
                        start_line: start,
                        words: words(&text),
                        defines: defined_in(defs, start, end),
                        text,
                        modified: None,
                    };
                    (chunk, *d, e.at)
                })
            })
        })
        .collect();
    let mut scored: Vec<Scored<'_>> = (def_chunks.iter())
        .map(|(c, doc, group, resolution, member_of)| Scored {
            bm25: ws.bm25(&query, c),
            chunk: c,
            doc: *doc,
            group: Some(*group),
            resolution,
            member_of: *member_of,
            edited: None,
        })
        .chain(lexical.into_iter().map(|(bm25, chunk, doc)| Scored {
            bm25,
            chunk,
            doc,
            group: None,
            resolution: "lines",
            member_of: 0.0,
            edited: None,
        }))
        .chain(edited.iter().map(|(chunk, doc, at)| Scored {
            bm25: ws.bm25(&query, chunk),
            chunk,
            doc: Some(*doc),
            group: None,
            resolution: "edit",
            member_of: 0.0,
            edited: Some(*at),
        }))
        .collect();
    scored.sort_by(|a, b| b.bm25.total_cmp(&a.bm25));
    if scored.is_empty() {
        return Packed::default();
    }
    let current_words: HashSet<String> = words(&current).into_iter().collect();
    // Each candidate as it would be packed, and its exact token count (the
    // ranker sees the count, and the packer spends it).
    let blocks: Vec<(String, usize)> = (scored.iter())
        .map(|Scored { chunk: c, .. }| {
            let block = tok.snippet(cursor_path, &c.path, &c.text);
            let n = tok.count(&block);
            (block, n)
        })
        .collect();
    // Each candidate's identifiers: its Jaccard feature and the packer's
    // redundancy penalty.
    let word_sets: Vec<HashSet<&str>> = (scored.iter())
        .map(|Scored { chunk: c, .. }| c.words.iter().map(String::as_str).collect())
        .collect();
    let candidates: Vec<Candidate> = scored
        .iter()
        .enumerate()
        .map(|(i, sc)| {
            let Scored {
                bm25,
                chunk: c,
                doc,
                ..
            } = sc;
            let cw = &word_sets[i];
            let inter = query.iter().filter(|w| cw.contains(w.as_str())).count();
            let union = query.len() + cw.len() - inter;
            let stem = Path::new(&c.path)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("");
            let age = |t: Option<SystemTime>| {
                t.and_then(|t| now.duration_since(t).ok())
                    .map_or(-1.0, |d| d.as_secs_f32())
            };
            Candidate {
                id: i as u32,
                path: c.path.clone(),
                text: c.text.clone(),
                token_count: blocks[i].1.min(u32::MAX as usize) as u32,
                bm25: *bm25,
                jaccard: inter as f32 / union.max(1) as f32,
                edit_recency_s: match (sc.edited, doc) {
                    (Some(t), _) => t.elapsed().as_secs_f32(),
                    (None, Some(d)) => d.edited.map_or(-1.0, |t| t.elapsed().as_secs_f32()),
                    (None, None) => age(c.modified),
                },
                open_recency_s: doc.map_or(-1.0, |d| d.opened.elapsed().as_secs_f32()),
                line_distance: -1,
                same_file: false,
                import_related: hops_of(&c.path) > 0
                    || (stem.len() >= 2 && current_words.contains(stem)),
                import_hops: u32::from(hops_of(&c.path)),
                open_in_editor: doc.is_some(),
                symbol_overlap: query.iter().filter(|w| c.defines.contains(*w)).count() as f32
                    / query.len() as f32,
                definition: definition(&c.defines).max(sc.member_of),
                resolution: match sc.resolution {
                    "signature" => kiln_sandbox::RESOLUTION_SIGNATURE,
                    "body" => kiln_sandbox::RESOLUTION_BODY,
                    "edit" => kiln_sandbox::RESOLUTION_EDIT,
                    _ => kiln_sandbox::RESOLUTION_LINES,
                },
                path_distance: path_distance(&c.path, cursor_path) as i32,
            }
        })
        .collect();
    let input = RankInput {
        cursor: Cursor {
            language: Path::new(cursor_path)
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_string(),
            path: cursor_path.to_string(),
            prefix: tail.iter().rev().copied().collect::<Vec<_>>().join("\n"),
            suffix: head.join("\n"),
            line: prefix.lines().count() as u32,
            column: 0,
        },
        candidates,
    };
    let mut ranked = ranker.rank(&input);
    let ranked_by = match &ranked.source {
        kiln_sandbox::breaker::Source::Policy => "policy".to_string(),
        kiln_sandbox::breaker::Source::Builtin(None) => "builtin".to_string(),
        kiln_sandbox::breaker::Source::Builtin(Some(why)) => format!("builtin ({why})"),
    };
    let items: Vec<crate::pack::Item<'_>> = (0..scored.len())
        .map(|i| crate::pack::Item {
            score: ranked.scores[i],
            tokens: blocks[i].1,
            words: &word_sets[i],
            key: (&scored[i].chunk.path, scored[i].chunk.start_line),
            group: scored[i].group,
            definition: scored[i].group.is_some(),
        })
        .collect();
    let mut by_rank: Vec<usize> = (0..items.len()).collect();
    by_rank.sort_by(|&a, &b| items[b].score.total_cmp(&items[a].score));
    let order = match selection {
        Selection::Kiln => crate::pack::choose(&items, budget),
        Selection::Bm25FirstFit => {
            let mut left = budget;
            (by_rank.iter().copied())
                .filter(|&i| {
                    let fits = items[i].tokens <= left;
                    if fits {
                        left -= items[i].tokens;
                    }
                    fits
                })
                .collect()
        }
    };
    let ranking = (by_rank.iter())
        .map(|&i| {
            let c = scored[i].chunk;
            let end = c.start_line + c.text.lines().count() as u32;
            (c.path.clone(), c.start_line, end)
        })
        .collect();
    let mut packed = Packed {
        ranked_by,
        call: ranked.call.take(),
        ranking,
        ..Packed::default()
    };
    for i in order {
        let c = &input.candidates[i];
        let (block, n) = &blocks[i];
        packed.tokens += n;
        let start = packed.text.len();
        packed.text.push_str(block);
        let chunk = scored[i].chunk;
        packed.snippets.push(Snippet {
            path: c.path.clone(),
            start_line: chunk.start_line,
            end_line: chunk.start_line + chunk.text.lines().count() as u32,
            resolution: scored[i].resolution,
            tokens: *n,
            score: ranked.scores[i],
            why: why(c, &defined(&chunk.defines)),
            block: start..packed.text.len(),
        });
    }
    packed
}

/// A candidate's features in words, for `kiln context`: `defined` are
/// the names near the cursor it defines, nearest first.
fn why(c: &Candidate, defined: &[String]) -> String {
    let mut parts = vec![
        format!("bm25 {:.2}", c.bm25),
        format!("jaccard {:.2}", c.jaccard),
    ];
    if !defined.is_empty() {
        let more = match defined.len() {
            1..=3 => String::new(),
            n => format!(" and {} more", n - 3),
        };
        parts.push(format!(
            "defines {}{more} (definition {:.2})",
            defined[..defined.len().min(3)].join(", "),
            c.definition
        ));
    }
    if c.symbol_overlap > 0.0 {
        parts.push(format!(
            "defines {:.0}% of the identifiers near the cursor",
            100.0 * c.symbol_overlap
        ));
    }
    match c.import_hops {
        1 => parts.push("the cursor's file imports it".into()),
        2 => parts.push("imported by a file the cursor's file imports".into()),
        _ if c.import_related => parts.push("its file is named near the cursor".into()),
        _ => {}
    }
    if c.resolution == kiln_sandbox::RESOLUTION_EDIT {
        parts.push(format!("edited {:.0} s ago", c.edit_recency_s));
    } else if c.open_in_editor {
        parts.push("open in the editor".into());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo model's tokenizer, for exact token counts.
    struct Demo {
        tok: kiln_runtime::tokenizer::Tokenizer,
        memo: crate::prompt::TokenCounts,
    }

    /// (path, text) pairs as `Workspace::of_files` takes them.
    fn owned(files: &[(&str, &str)]) -> Vec<(String, String)> {
        (files.iter())
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    impl Demo {
        fn new(dir: &Path) -> Demo {
            let model_path = dir.join("m.gguf");
            crate::demo::write_demo_model(&model_path).unwrap();
            let model = kiln_runtime::model::Model::load(&model_path).unwrap();
            Demo {
                tok: model.tokenizer().unwrap(),
                memo: crate::prompt::TokenCounts::default(),
            }
        }

        fn counter(&self) -> Counter<'_> {
            Counter {
                tok: &self.tok,
                memo: &self.memo,
                repo: None,
            }
        }
    }

    fn hit(file: u32, start: u32, end: u32) -> Hit {
        Hit { file, start, end }
    }

    impl Workspace {
        /// The `k` best chunks for `query`, every chunk of every file
        /// scored from its text as the index chunks it.
        fn every_chunk(&self, query: &HashSet<String>, k: usize) -> Vec<(f32, Hit)> {
            let mut q: Vec<&String> = query.iter().collect();
            q.sort();
            let mut all = Vec::new();
            for f in 0..self.files() as u32 {
                let text = self.text(f).unwrap();
                for (start, end, joined) in spans_of(&text) {
                    let words = words(&joined);
                    let score: f32 = (q.iter())
                        .map(|w| (w, words.iter().filter(|x| x == w).count()))
                        .filter(|(_, c)| *c > 0)
                        .map(|(w, c)| self.bm25_term(self.idf(w), c as f32, words.len() as f32))
                        .sum();
                    if score > 0.0 {
                        all.push((score, hit(f, start, end)));
                    }
                }
            }
            all.sort_by(by_rank);
            all.truncate(k);
            all
        }

        /// Every name defined, read back from the files.
        fn defined_names(&self) -> Vec<String> {
            let mut names: Vec<String> = (0..self.sources.len() as u32)
                .flat_map(|f| self.names_in(f, 0, u32::MAX, &self.text(f).unwrap()))
                .collect();
            names.sort();
            names.dedup();
            names
        }
    }

    #[test]
    fn the_walk_respects_gitignore_and_chunks_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".gitignore"), "target/\n*.gen.rs\n").unwrap();
        std::fs::create_dir(dir.path().join("target")).unwrap();
        std::fs::write(dir.path().join("target/big.rs"), "fn hidden() {}\n").unwrap();
        std::fs::write(dir.path().join("x.gen.rs"), "fn generated() {}\n").unwrap();
        let body: String = (0..45).map(|i| format!("let v{i} = {i};\n")).collect();
        std::fs::write(
            dir.path().join("lib.rs"),
            format!("fn visible() {{}}\n{body}"),
        )
        .unwrap();
        std::fs::write(dir.path().join("data.bin"), [0u8, 159, 146, 150]).unwrap();
        let ws = Workspace::index(dir.path());
        assert_eq!(ws.files(), 1);
        assert_eq!(ws.chunks(), 3, "46 lines in chunks of {CHUNK_LINES}");
        assert!(
            ws.sources
                .iter()
                .all(|s| s.path == "lib.rs" && s.text.is_none())
        );
        assert_eq!(ws.defined("visible")[0].0, 0);
        // A chunk's text is read again from the file.
        let text = ws.text(0).unwrap();
        let first = ws.chunk(hit(0, 0, 20), &text).unwrap();
        assert!(first.text.starts_with("fn visible() {}\nlet v0 = 0;"));
        assert!(first.defines.contains("visible"));
        // The index finds the chunk that holds a word.
        let query: HashSet<String> = ["v44".to_string()].into();
        let best = ws.best_spans(&query, &|_| false, 5, &mut HashMap::new());
        assert_eq!(
            best.iter().map(|b| b.1).collect::<Vec<_>>(),
            [hit(0, 40, 46)]
        );
        let skipped = ws.best_spans(&query, &|p| p == "lib.rs", 5, &mut HashMap::new());
        assert!(skipped.is_empty());
    }

    #[test]
    fn keywords_are_known_by_one_lookup() {
        for k in DEFINERS.iter().chain(KEYWORDS) {
            assert!(is_keyword(k), "{k}");
        }
        assert!(!is_keyword("interfaces") && !is_keyword("Self") && !is_keyword(""));
    }

    #[test]
    fn identifiers_counted_in_place_are_the_words_indexed() {
        for text in [
            "fn a() {}\r\nlet b_c = 9x + xy;\n\né_ok ünï 1a a1",
            "",
            "ab—cd →ef\u{a0}gh ½x 日本語 x²y _x __",
        ] {
            let ours: Vec<&str> = idents(text).collect();
            assert_eq!(ours, words(text), "{text:?}");
        }
    }

    /// Lexical search takes files by a bound on what their chunks can
    /// score and stops where no file left can reach the k best: the same
    /// chunks, and scores to the bit, as scoring every chunk.
    #[test]
    fn lexical_search_finds_what_scoring_every_chunk_finds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let ws = Workspace::index(&root);
        assert!(ws.files() > 20);
        for query in [
            &["Workspace", "terms", "hash"][..],
            &["select_with", "budget", "Ranker", "tok", "Packed"],
            &[
                "json",
                "Value",
                "status",
                "engine",
                "out",
                "reply",
                "unwrap_or_else",
            ],
            &["nothing_has_this_name"],
        ] {
            let query: HashSet<String> = query.iter().map(|w| w.to_string()).collect();
            for k in [1, 5, 40, 1000] {
                let found = ws.best_spans(&query, &|_| false, k, &mut HashMap::new());
                assert_eq!(found, ws.every_chunk(&query, k), "{query:?}, k {k}");
            }
        }
    }

    /// The same where words hide in longer identifiers, lines end in
    /// CRLF, text is not ASCII, and a file changed after it was indexed.
    #[test]
    fn lexical_search_counts_whole_words_as_the_index_does() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            (
                "a.rs",
                "let ab = xab + ab_cd + 1ab + ab1;\r\n// ab, (ab) ab.é ab\r\n".repeat(30),
            ),
            (
                "b.py",
                "résumé = ab\n\n".to_string() + &"pass\n".repeat(45) + "ab ab ab cd",
            ),
            ("c.js", "const cd = 'ab';\n".repeat(3)),
            ("d.go", "var ab_ = cdab\n".to_string()),
        ];
        for (name, text) in &files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let ws = Workspace::index(dir.path());
        // Changed since: more lines, and chunks the index does not have.
        std::fs::write(dir.path().join("c.js"), "const cd = 'ab';\n".repeat(50)).unwrap();
        let query: HashSet<String> = ["ab".to_string(), "cd".to_string()].into();
        let every = ws.every_chunk(&query, 100);
        let found = ws.best_spans(&query, &|_| false, 100, &mut HashMap::new());
        assert_eq!(found, every);
        assert!(found.iter().any(|(_, h)| h.start == 40), "{found:?}");
    }

    #[test]
    fn bm25_scores_have_the_same_bits_whatever_order_a_query_set_iterates_in() {
        // Each HashSet iterates in its own order; scores summed in that
        // order differed in their last bits, and near ties (so contexts)
        // from one selection to the next.
        let dir = tempfile::tempdir().unwrap();
        let vocab: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
        // Words of every frequency, lines of every length.
        let mut x = 12345u64;
        let mut next = |n: usize| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as usize) % n
        };
        for f in 0..6 {
            let text: String = (0..40)
                .map(|_| {
                    let n = 1 + next(9);
                    let words: Vec<&str> = (0..n)
                        .map(|_| vocab[next(vocab.len()).min(next(vocab.len()))].as_str())
                        .collect();
                    format!("let x = {};\n", words.join(" + "))
                })
                .collect();
            std::fs::write(dir.path().join(format!("f{f}.rs")), text).unwrap();
        }
        let ws = Workspace::index(dir.path());
        let chunk = {
            let text = ws.text(0).unwrap();
            ws.chunk(hit(0, 0, 20), &text).unwrap()
        };
        let runs: Vec<(Vec<(u32, Hit)>, u32)> = (0..20)
            .map(|_| {
                let query: HashSet<String> = vocab[..40].iter().cloned().collect();
                let best = ws.best_spans(&query, &|_| false, 50, &mut HashMap::new());
                (
                    best.iter().map(|(s, h)| (s.to_bits(), *h)).collect(),
                    ws.bm25(&query, &chunk).to_bits(),
                )
            })
            .collect();
        assert!(runs[0].0.len() > 10);
        assert!(runs.iter().all(|r| *r == runs[0]));
    }

    #[test]
    fn the_persisted_index_is_reused_updated_and_survives_a_broken_cache() {
        let dir = tempfile::tempdir().unwrap();
        let home = tempfile::tempdir().unwrap();
        let cache = home.path().join("cache").join("index.db");
        let root = dir.path();
        std::fs::write(root.join("a.py"), "def alpha():\n    return 1\n").unwrap();
        std::fs::write(root.join("b.rs"), "pub struct Beta {\n    x: u32,\n}\n").unwrap();
        std::fs::write(
            root.join("c.go"),
            "package c\n\nfunc Gamma() int { return 3 }\n",
        )
        .unwrap();
        let names = |ws: &Workspace| ws.defined_names();
        let (first, stats) = Workspace::index_cached(root, Some(&cache));
        assert_eq!((stats.parsed, stats.reused), (3, 0), "{stats:?}");
        assert!(stats.cache_error.is_none(), "{stats:?}");
        assert_eq!(names(&first), ["Beta", "Gamma", "alpha", "x"]);
        // Nothing changed: nothing parsed, the same index.
        let (again, stats) = Workspace::index_cached(root, Some(&cache));
        assert_eq!((stats.parsed, stats.reused), (0, 3), "{stats:?}");
        assert_eq!(names(&again), names(&first));
        assert_eq!(again.chunks(), first.chunks());
        let query: HashSet<String> = ["Gamma".to_string()].into();
        assert_eq!(
            again.best_spans(&query, &|_| false, 3, &mut HashMap::new()),
            first.best_spans(&query, &|_| false, 3, &mut HashMap::new())
        );
        assert_eq!(again.defined("alpha")[0].1, first.defined("alpha")[0].1);
        // One file edited: it alone is parsed, and its new definition
        // replaces the old.
        std::fs::write(root.join("a.py"), "def alpha2():\n    return 2\n\n\n").unwrap();
        let (edited, stats) = Workspace::index_cached(root, Some(&cache));
        assert_eq!((stats.parsed, stats.reused), (1, 2), "{stats:?}");
        assert_eq!(names(&edited), ["Beta", "Gamma", "alpha2", "x"]);
        // The same bytes with a new time: read and hashed, not parsed.
        let file = std::fs::File::options()
            .write(true)
            .open(root.join("b.rs"))
            .unwrap();
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(60))
            .unwrap();
        drop(file);
        let (_, stats) = Workspace::index_cached(root, Some(&cache));
        assert_eq!((stats.parsed, stats.reused), (0, 3), "{stats:?}");
        // A file removed is forgotten.
        std::fs::remove_file(root.join("c.go")).unwrap();
        let (removed, _) = Workspace::index_cached(root, Some(&cache));
        assert_eq!(names(&removed), ["Beta", "alpha2", "x"]);
        let c = index_cache::Cache::open(&cache).unwrap();
        assert_eq!(c.seen(&root.to_string_lossy()).len(), 2);
        drop(c);
        // The entries of a.py's old text and of c.go are dropped.
        let conn = rusqlite::Connection::open(&cache).unwrap();
        let entries: i64 =
            (conn.query_row("SELECT count(*) FROM parsed", [], |r| r.get(0))).unwrap();
        assert_eq!(entries, 2);
        drop(conn);
        // A cache that is not a database is moved aside and rebuilt; the
        // index is the one built without it.
        for aux in ["index.db-wal", "index.db-shm"] {
            let _ = std::fs::remove_file(home.path().join("cache").join(aux));
        }
        std::fs::write(
            &cache,
            b"not a database at all, but long enough to look like one..........",
        )
        .unwrap();
        let (rebuilt, stats) = Workspace::index_cached(root, Some(&cache));
        assert!(stats.cache_error.is_none(), "{stats:?}");
        assert_eq!((stats.parsed, stats.reused), (2, 0), "{stats:?}");
        assert!(home.path().join("cache").join("index.db.broken").exists());
        assert_eq!(names(&rebuilt), names(&Workspace::index(root)));
        // An entry that does not decode is parsed again.
        let conn = rusqlite::Connection::open(&cache).unwrap();
        conn.execute("UPDATE parsed SET data = x'0102'", [])
            .unwrap();
        drop(conn);
        let (_, stats) = Workspace::index_cached(root, Some(&cache));
        assert_eq!((stats.parsed, stats.reused), (2, 0), "{stats:?}");
        // A cache that cannot be created is reported, and the index built.
        let blocked = home.path().join("file");
        std::fs::write(&blocked, "").unwrap();
        let (ws, stats) = Workspace::index_cached(root, Some(&blocked.join("index.db")));
        assert!(stats.cache_error.is_some() && ws.files() == 2, "{stats:?}");
    }

    #[test]
    fn imports_resolve_to_workspace_files_one_and_two_hops_away() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            (
                "src/geometry.rs",
                "use crate::units::Meters;\npub fn area(w: Meters) -> f64 {\n    w.0 * w.0\n}\n",
            ),
            ("src/units.rs", "pub struct Meters(pub f64);\n"),
            (
                "src/net/client.rs",
                "pub struct Client;\nimpl Client {\n    pub fn get(&self) {}\n}\n",
            ),
            ("src/other/client.rs", "pub struct Client;\n"),
            ("pkg/a.py", "from .b import helper\nimport pkg.c\n"),
            ("pkg/b.py", "def helper():\n    pass\n"),
            (
                "pkg/c.py",
                "from ..tools import x\nfrom email.mime.text import T\n",
            ),
            ("mime/text.py", "class T:\n    pass\n"),
            (
                "web/app.ts",
                "import { f } from './lib/f.js';\nimport g from '../shared/g';\n",
            ),
            ("web/lib/f.ts", "export function f() {}\n"),
            ("shared/g/index.ts", "export default 1;\n"),
        ];
        let files = owned(&files);
        let root = dir.path().join("email");
        let ws = Workspace::of_files(&root, &files);
        let named = |hops: &HashMap<u32, u8>| -> Vec<(String, u8)> {
            let mut v: Vec<(String, u8)> = (hops.iter())
                .map(|(&f, &h)| (ws.sources[f as usize].path.clone(), h))
                .collect();
            v.sort();
            v
        };
        let main = "mod geometry;\nuse crate::net::client::Client;\nuse std::io;\n";
        assert_eq!(
            named(&ws.import_hops("src/main.rs", main)),
            [
                ("src/geometry.rs".to_string(), 1),
                ("src/net/client.rs".to_string(), 1),
                ("src/units.rs".to_string(), 2),
            ]
        );
        // A file's own imports of itself do not count; `..` out of the
        // root names nothing.
        assert_eq!(
            named(&ws.import_hops("pkg/a.py", &files[4].1)),
            [
                ("mime/text.py".to_string(), 2),
                ("pkg/b.py".to_string(), 1),
                ("pkg/c.py".to_string(), 1)
            ]
        );
        assert_eq!(
            named(&ws.import_hops("web/app.ts", &files[8].1)),
            [
                ("shared/g/index.ts".to_string(), 1),
                ("web/lib/f.ts".to_string(), 1)
            ]
        );
        assert!(ws.import_hops("notes.txt", main).is_empty());
    }

    #[test]
    fn imported_files_lead_where_names_alone_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo::new(dir.path());
        let files = owned(&[
            (
                "src/geometry.rs",
                "/// The area of a square.\npub fn square_area(side: f64) -> f64 {\n    side * side\n}\n",
            ),
            ("src/net/client.rs", "pub struct Client;\n"),
            ("src/other/client.rs", "pub struct Client;\n"),
        ]);
        let ws = Workspace::of_files(dir.path(), &files);
        let ranker = Ranker::new(None, 3);
        let counter = demo.counter();
        // `square_area` is named nowhere in the file: only the import
        // brings its signature.
        let prefix = "mod geometry;\nuse crate::net::client::Client;\n\nfn main() {\n    let c: Client;\n    let a = geometry::";
        let p = select(
            &ws,
            &[],
            "src/main.rs",
            prefix,
            "\n}\n",
            &ranker,
            &counter,
            10_000,
        );
        let area = (p.snippets.iter())
            .find(|s| s.path == "src/geometry.rs")
            .unwrap_or_else(|| panic!("{:#?}", p.snippets));
        assert_eq!(area.resolution, "signature");
        assert!(
            area.why.contains("the cursor's file imports it"),
            "{}",
            area.why
        );
        // Of two definitions of `Client`, the imported one ranks first.
        let rank = |path: &str| {
            (p.ranking.iter().position(|(p, ..)| p == path))
                .unwrap_or_else(|| panic!("{path}: {:?}", p.ranking))
        };
        assert!(
            rank("src/net/client.rs") < rank("src/other/client.rs"),
            "{:?}",
            p.ranking
        );
    }

    #[test]
    fn ranges_edited_in_other_open_documents_are_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo::new(dir.path());
        let ws = Workspace::of_files(dir.path(), &[]);
        let ranker = Ranker::new(None, 3);
        let counter = demo.counter();
        let filler: String = (0..60)
            .map(|i| format!("let unrelated_{i} = {i};\n"))
            .collect();
        let text = format!("{filler}let retry_budget = backoff(3);\n{filler}");
        let edits = [Edited {
            start_line: 60,
            end_line: 61,
            at: Instant::now(),
        }];
        let open = [OpenDoc {
            path: "src/net.rs",
            text: &text,
            opened: Instant::now(),
            edited: Some(Instant::now()),
            edits: &edits,
        }];
        let prefix = "fn main() {\n    let b = retry_budget";
        let pick = |open: &[OpenDoc<'_>]| {
            let at = "src/main.rs";
            select(&ws, open, at, prefix, "\n}\n", &ranker, &counter, 4_000)
        };
        let p = pick(&open);
        let edit = (p.snippets.iter())
            .find(|s| s.resolution == "edit")
            .unwrap_or_else(|| panic!("{:#?}", p.snippets));
        // The range and the lines around it, not the whole file.
        assert_eq!(
            (edit.path.as_str(), edit.start_line, edit.end_line),
            ("src/net.rs", 57, 64)
        );
        assert!(edit.why.contains("edited 0 s ago"), "{}", edit.why);
        // Without the ring, only chunks of the document found by its words.
        let open = [OpenDoc {
            edits: &[],
            ..open[0]
        }];
        let p = pick(&open);
        assert!(p.snippets.iter().all(|s| s.resolution != "edit"));
    }

    #[test]
    fn the_last_completion_is_a_second_query() {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo::new(dir.path());
        let files = owned(&[
            (
                "src/http.rs",
                "/// Reads a request's header block.\npub fn parse_header(buf: &[u8]) -> Header {\n    Header::from_lines(buf.split(|&b| b == b'\\n'))\n}\n",
            ),
            (
                "src/log.rs",
                "pub fn note(msg: &str) {\n    eprintln!(\"{msg}\");\n}\n",
            ),
        ]);
        let ws = Workspace::of_files(dir.path(), &files);
        let ranker = Ranker::new(None, 3);
        let counter = demo.counter();
        let pick = |last: Option<&str>| {
            let at = SelectAt {
                path: "src/main.rs",
                prefix: "fn serve(input: String) {\n    note(\"start\");\n    let h = ",
                suffix: "\n}\n",
                last_completion: last,
            };
            select_with(&ws, &[], &at, &ranker, &counter, 2_000, Selection::Kiln)
        };
        let has = |p: &Packed| p.snippets.iter().any(|s| s.path == "src/http.rs");
        assert!(!has(&pick(None)), "nothing near the cursor names it");
        let p = pick(Some("parse_header(input.as_bytes());"));
        let http = (p.snippets.iter())
            .find(|s| s.path == "src/http.rs")
            .unwrap_or_else(|| panic!("{:#?}", p.snippets));
        assert!(
            http.why.contains("defines parse_header (definition 0.50)"),
            "{}",
            http.why
        );
        // What the cursor's own lines name still leads.
        let note = p
            .snippets
            .iter()
            .position(|s| s.path == "src/log.rs")
            .unwrap();
        let at = p
            .snippets
            .iter()
            .position(|s| s.path == "src/http.rs")
            .unwrap();
        assert!(note > at, "the best snippet is last: {:#?}", p.snippets);
    }

    #[test]
    fn selection_prefers_what_the_cursor_needs_and_fits_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let demo = Demo::new(dir.path());
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(
            src.join("shapes.py"),
            "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
        )
        .unwrap();
        std::fs::write(
            src.join("net.py"),
            "def fetch(url):\n    return urlopen(url).read()\n",
        )
        .unwrap();
        let ws = Workspace::index(dir.path());
        assert_eq!(ws.files(), 2);
        let ranker = Ranker::new(None, 3);
        let counter = demo.counter();
        let open = [OpenDoc {
            path: "notes.py",
            text: "# radius of the wheel\nwheel_radius = 4\n",
            opened: Instant::now(),
            edited: None,
            edits: &[],
        }];
        let prefix = "from shapes import circle_area\n\ndef wheel():\n    return circle_area(";
        let p = select(
            &ws, &open, "main.py", prefix, ")\n", &ranker, &counter, 10_000,
        );
        assert_eq!(p.ranked_by, "builtin");
        // The most relevant snippet last, nearest the cursor.
        let shapes = p.text.find("# src/shapes.py\ndef circle_area");
        assert!(shapes > p.text.find("# notes.py"), "{}", p.text);
        assert!(p.text.ends_with("radius * radius\n"), "{}", p.text);
        assert!(
            !p.text.contains("urlopen"),
            "unrelated files stay out: {}",
            p.text
        );
        assert!(p.text.contains("# notes.py\n"), "open documents take part");
        assert_eq!(p.tokens, demo.tok.encode(&p.text, false).unwrap().len());
        // A budget too small for any snippet leaves the block empty.
        let p = select(&ws, &open, "main.py", prefix, ")\n", &ranker, &counter, 5);
        assert!(p.text.is_empty() && p.tokens == 0);
    }
}
