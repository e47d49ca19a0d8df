//! The workspace index's tables, kept small enough for 100,000 files: an
//! identifier is its 64-bit hash (no string is kept; a definition's name
//! is read back from its line when a snippet shows it), the lexical index
//! lists the *files* each identifier occurs in (varint gaps, one buffer),
//! and a definition is three words.
//!
//! Lexical search is then two steps ([`crate::context::Workspace`]'s
//! `best_spans`): files are ordered by a bound on the BM25 score any of
//! their chunks can reach (the sum of the query terms' IDF they hold,
//! times `k1 + 1`), and the chunks of the best files are scored exactly
//! (the query's words found in the text as whole words by one Aho-Corasick
//! pass; the chunk-level statistics and each chunk's length are kept
//! here) until no file left can beat the chunks found or a file limit is
//! reached.

use rustc_hash::FxBuildHasher;
use std::hash::BuildHasher;

/// An identifier's key.
pub(crate) fn hash(word: &str) -> u64 {
    FxBuildHasher.hash_one(word)
}

fn put(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u32) -> u32 {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Reads a varint at `*at`.
fn get(bytes: &[u8], at: &mut usize) -> u32 {
    let mut v = 0u32;
    let mut shift = 0;
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u32::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// The identifiers of the index: sorted hashes (a term's id is its
/// position), how many chunks hold each, and the files each occurs in.
#[derive(Default)]
pub(crate) struct Terms {
    hashes: Vec<u64>,
    chunks: Vec<u32>,
    /// `files[files_at[t]..files_at[t + 1]]`: file numbers, varint gaps.
    files_at: Vec<u32>,
    files: Vec<u8>,
}

impl Terms {
    pub fn id(&self, hash: u64) -> Option<u32> {
        self.hashes.binary_search(&hash).ok().map(|i| i as u32)
    }

    pub fn hash_of(&self, id: u32) -> u64 {
        self.hashes[id as usize]
    }

    /// Chunks holding the term (its document frequency).
    pub fn chunks(&self, id: u32) -> u32 {
        self.chunks[id as usize]
    }

    /// The files holding the term, ascending.
    pub fn files(&self, id: u32) -> impl Iterator<Item = u32> + '_ {
        let (start, end) = (
            self.files_at[id as usize] as usize,
            self.files_at[id as usize + 1] as usize,
        );
        let mut at = start;
        let mut last: Option<u32> = None;
        std::iter::from_fn(move || {
            (at < end).then(|| {
                let gap = get(&self.files, &mut at);
                let f = last.map_or(gap, |l| l + 1 + gap);
                last = Some(f);
                f
            })
        })
    }

    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * 8
            + (self.chunks.capacity() + self.files_at.capacity()) * 4
            + self.files.capacity()
    }
}

/// [`Terms`] as files are added: ids in the order first seen, and each
/// file's term ids (a forward index, inverted by [`TermsBuilder::finish`]).
#[derive(Default)]
pub(crate) struct TermsBuilder {
    /// Ids, found by their hash (`hashes[id]`, itself the table's hash).
    ids: hashbrown::HashTable<u32>,
    hashes: Vec<u64>,
    chunks: Vec<u32>,
    /// Per file: its number of terms, then their ids ascending as gaps.
    forward: Vec<u8>,
    files: u32,
}

impl TermsBuilder {
    /// The id of the term of `hash`, new if unseen.
    pub fn id(&mut self, hash: u64) -> u32 {
        let hashes = &self.hashes;
        let entry = self.ids.entry(
            hash,
            |&id| hashes[id as usize] == hash,
            |&id| hashes[id as usize],
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(e) => *e.get(),
            hashbrown::hash_table::Entry::Vacant(e) => {
                let id = self.hashes.len() as u32;
                e.insert(id);
                self.hashes.push(hash);
                self.chunks.push(0);
                id
            }
        }
    }

    /// A chunk holds the term `id`.
    pub fn in_chunk(&mut self, id: u32) {
        self.chunks[id as usize] += 1;
    }

    /// The next file holds the terms `ids` (any order, repeats allowed).
    pub fn add_file(&mut self, ids: &mut Vec<u32>) {
        ids.sort_unstable();
        ids.dedup();
        put(&mut self.forward, ids.len() as u32);
        let mut last: Option<u32> = None;
        for &id in ids.iter() {
            put(&mut self.forward, last.map_or(id, |l| id - l - 1));
            last = Some(id);
        }
        self.files += 1;
    }

    /// The finished tables, and each build id's final id (for the
    /// definitions' names).
    pub fn finish(self) -> (Terms, Vec<u32>) {
        let n = self.hashes.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by_key(|&i| self.hashes[i as usize]);
        let mut new_id = vec![0u32; n];
        for (new, &old) in order.iter().enumerate() {
            new_id[old as usize] = new as u32;
        }
        drop(self.ids);
        let hashes: Vec<u64> = order.iter().map(|&o| self.hashes[o as usize]).collect();
        drop(self.hashes);
        let chunks: Vec<u32> = order.iter().map(|&o| self.chunks[o as usize]).collect();
        drop(self.chunks);
        drop(order);
        // Invert the forward index: sizes first (each term's gaps), then
        // the bytes.
        let walk = |visit: &mut dyn FnMut(u32, u32)| {
            let mut at = 0;
            for f in 0..self.files {
                let count = get(&self.forward, &mut at);
                let mut last: Option<u32> = None;
                for _ in 0..count {
                    let gap = get(&self.forward, &mut at);
                    let id = last.map_or(gap, |l| l + 1 + gap);
                    last = Some(id);
                    visit(new_id[id as usize], f);
                }
            }
        };
        let mut last_file: Vec<u32> = vec![u32::MAX; n];
        let mut size = vec![0u32; n + 1];
        walk(&mut |t, f| {
            let l = last_file[t as usize];
            size[t as usize] += varint_len(if l == u32::MAX { f } else { f - l - 1 });
            last_file[t as usize] = f;
        });
        let mut files_at = size;
        let mut total = 0u32;
        for s in files_at.iter_mut() {
            let len = *s;
            *s = total;
            total += len;
        }
        let mut files = vec![0u8; total as usize];
        let mut fill: Vec<u32> = files_at[..n].to_vec();
        last_file.fill(u32::MAX);
        let mut buf = Vec::with_capacity(5);
        walk(&mut |t, f| {
            let l = last_file[t as usize];
            buf.clear();
            put(&mut buf, if l == u32::MAX { f } else { f - l - 1 });
            let at = fill[t as usize] as usize;
            files[at..at + buf.len()].copy_from_slice(&buf);
            fill[t as usize] += buf.len() as u32;
            last_file[t as usize] = f;
        });
        let terms = Terms {
            hashes,
            chunks,
            files_at,
            files,
        };
        (terms, new_id)
    }
}

/// A definition as the index keeps it: its name's term, its naming line,
/// and the rest of its lines (see [`crate::symbols::Def`]) relative to
/// that line in one word: the kind (4 bits), the lines of leading docs
/// above it (8), the signature's lines (8) and the body's past the
/// signature (12), each saturating; a saturated body still runs past the
/// body resolution's cut, so the snippets are the same.
#[derive(Clone, Copy)]
pub(crate) struct Slim {
    pub term: u32,
    pub line: u32,
    packed: u32,
}

impl Slim {
    pub fn new(term: u32, kind: u8, line: u32, start: u32, signature_end: u32, end: u32) -> Slim {
        let doc = line.saturating_sub(start).min(0xff);
        let sig = signature_end.saturating_sub(line).min(0xff);
        let body = end.saturating_sub(signature_end).min(0xfff);
        Slim {
            term,
            line,
            packed: u32::from(kind & 0xf) | doc << 4 | sig << 12 | body << 20,
        }
    }

    pub fn kind(&self) -> usize {
        (self.packed & 0xf) as usize
    }

    pub fn start(&self) -> u32 {
        self.line - (self.packed >> 4 & 0xff)
    }

    pub fn signature_end(&self) -> u32 {
        self.line + (self.packed >> 12 & 0xff)
    }

    pub fn end(&self) -> u32 {
        self.signature_end() + (self.packed >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_inverted_and_ids_sorted_by_hash() {
        let mut b = TermsBuilder::default();
        let words = ["alpha", "beta", "gamma", "delta"];
        let ids: Vec<u32> = words.iter().map(|w| b.id(hash(w))).collect();
        assert_eq!(b.id(hash("beta")), ids[1]);
        // File 0: alpha, beta; 1: nothing; 2: beta (twice); 200: all.
        b.add_file(&mut vec![ids[0], ids[1]]);
        b.add_file(&mut vec![]);
        b.add_file(&mut vec![ids[1], ids[1]]);
        for _ in 3..200 {
            b.add_file(&mut vec![]);
        }
        b.add_file(&mut ids.clone());
        b.in_chunk(ids[1]);
        let (t, perm) = b.finish();
        assert_eq!(t.hashes.len(), 4);
        for (i, w) in words.iter().enumerate() {
            let id = t.id(hash(w)).unwrap();
            assert_eq!(perm[ids[i] as usize], id);
            assert_eq!(t.hash_of(id), hash(w));
        }
        let files = |w: &str| t.files(t.id(hash(w)).unwrap()).collect::<Vec<_>>();
        assert_eq!(files("alpha"), [0, 200]);
        assert_eq!(files("beta"), [0, 2, 200]);
        assert_eq!(files("delta"), [200]);
        assert_eq!(t.chunks(t.id(hash("beta")).unwrap()), 1);
        assert_eq!(t.id(hash("epsilon")), None);
    }

    #[test]
    fn a_definition_packs_into_three_words() {
        let d = Slim::new(7, 3, 100, 96, 102, 140);
        assert_eq!(
            (d.kind(), d.start(), d.signature_end(), d.end()),
            (3, 96, 102, 140)
        );
        // Past what the bits hold: docs cut, a body that still runs past
        // the body resolution's cut.
        let d = Slim::new(7, 3, 1000, 0, 1001, 100_000);
        assert_eq!(d.start(), 1000 - 255);
        assert!(d.end() > d.start() + crate::symbols::BODY_LINES);
    }
}
