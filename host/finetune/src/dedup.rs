//! Exact and near-duplicate files.
//!
//! Exact: the same text once trailing whitespace and blank lines at the
//! ends are ignored. Near: MinHash (Broder 1997) over the file's word
//! 5-grams, [`PERMUTATIONS`] hash functions, candidates found by
//! locality-sensitive hashing in [`BANDS`] bands, and a candidate is a
//! duplicate when its estimated Jaccard similarity is at least
//! [`THRESHOLD`] (the threshold code datasets such as The Stack use). Of a
//! group of duplicates the first file offered is kept.

use std::collections::{HashMap, HashSet};

pub const PERMUTATIONS: usize = 128;
pub const BANDS: usize = 16;
const ROWS: usize = PERMUTATIONS / BANDS;
pub const THRESHOLD: f64 = 0.85;
/// Words per shingle.
const SHINGLE: usize = 5;

/// What [`Dedup::offer`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Exact,
    Near,
}

/// The files kept so far.
#[derive(Default)]
pub struct Dedup {
    exact: HashSet<u64>,
    signatures: Vec<[u64; PERMUTATIONS]>,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

fn mix(mut x: u64) -> u64 {
    // splitmix64's finalizer.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The text's exact-duplicate key.
fn exact_key(text: &str) -> u64 {
    let mut h = 0u64;
    for line in text.trim().lines() {
        h = mix(h ^ fnv(line.trim_end().as_bytes()));
    }
    h
}

/// The MinHash signature of `text`'s word 5-grams; `None` for text with
/// fewer words than a shingle.
pub fn signature(text: &str) -> Option<[u64; PERMUTATIONS]> {
    let words: Vec<u64> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(|w| fnv(w.as_bytes()))
        .collect();
    if words.len() < SHINGLE {
        return None;
    }
    let shingles: HashSet<u64> = words
        .windows(SHINGLE)
        .map(|w| w.iter().fold(0u64, |h, &x| mix(h.rotate_left(17) ^ x)))
        .collect();
    let mut sig = [u64::MAX; PERMUTATIONS];
    for s in shingles {
        for (i, m) in sig.iter_mut().enumerate() {
            *m = (*m).min(mix(s ^ SEEDS[i]));
        }
    }
    Some(sig)
}

const SEEDS: [u64; PERMUTATIONS] = {
    let mut s = [0u64; PERMUTATIONS];
    let mut i = 0;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while i < PERMUTATIONS {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        s[i] = z ^ (z >> 31);
        i += 1;
    }
    s
};

/// The estimated Jaccard similarity of two signatures.
pub fn similarity(a: &[u64; PERMUTATIONS], b: &[u64; PERMUTATIONS]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / PERMUTATIONS as f64
}

impl Dedup {
    /// Whether `text` duplicates a file kept before; a new one is kept.
    pub fn offer(&mut self, text: &str) -> Seen {
        if !self.exact.insert(exact_key(text)) {
            return Seen::Exact;
        }
        let Some(sig) = signature(text) else {
            return Seen::New;
        };
        let keys: Vec<(usize, u64)> = (0..BANDS)
            .map(|b| {
                let band = &sig[b * ROWS..(b + 1) * ROWS];
                (b, band.iter().fold(0u64, |h, &x| mix(h ^ x)))
            })
            .collect();
        let near = keys
            .iter()
            .filter_map(|k| self.buckets.get(k))
            .flatten()
            .any(|&i| similarity(&self.signatures[i], &sig) >= THRESHOLD);
        if near {
            return Seen::Near;
        }
        let id = self.signatures.len();
        self.signatures.push(sig);
        for k in keys {
            self.buckets.entry(k).or_default().push(id);
        }
        Seen::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(seed: u64, lines: usize) -> String {
        let mut rng = fastrand::Rng::with_seed(seed);
        let words = [
            "alpha", "beta", "gamma", "delta", "value", "count", "index", "state",
        ];
        (0..lines)
            .map(|i| {
                let a = words[rng.usize(..words.len())];
                let b = words[rng.usize(..words.len())];
                format!(
                    "let {a}_{i} = {b}_{} + {};\n",
                    rng.u32(..1000),
                    rng.u32(..100)
                )
            })
            .collect()
    }

    #[test]
    fn exact_near_and_distinct_files() {
        let base = code(1, 200);
        let mut d = Dedup::default();
        assert_eq!(d.offer(&base), Seen::New);
        // Trailing whitespace and final newlines do not make a file new.
        let spaced = base.replace(";\n", ";  \n") + "\n\n";
        assert_eq!(d.offer(&spaced), Seen::Exact);
        // Three lines of 200 changed: a near duplicate.
        let mut lines: Vec<&str> = base.lines().collect();
        let edits = ["let x = 1;", "let y = 2;", "let z = 3;"];
        for (i, e) in edits.iter().enumerate() {
            lines[40 + 50 * i] = e;
        }
        assert_eq!(d.offer(&lines.join("\n")), Seen::Near);
        // Other code of the same vocabulary is not.
        assert_eq!(d.offer(&code(2, 200)), Seen::New);
        // Half the file replaced is not a duplicate either.
        let half: String = base
            .lines()
            .take(100)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            + &code(3, 100);
        assert_eq!(d.offer(&half), Seen::New);
        // Tiny files are compared exactly only.
        assert_eq!(d.offer("fn f() {}"), Seen::New);
        assert_eq!(d.offer("fn f() {}\n"), Seen::Exact);
        assert_eq!(d.offer("fn g() {}"), Seen::New);
    }

    #[test]
    fn estimated_similarity_tracks_the_true_one() {
        // Sets of shingles with a known overlap: the estimate is within
        // four standard deviations (sqrt(J(1-J)/128) ≈ 0.044 at J = 0.5).
        let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let a = words[..300].join(" ");
        let b = words[100..].join(" ");
        let truth = 196.0 / 396.0; // shared 5-grams / all 5-grams
        let s = similarity(&signature(&a).unwrap(), &signature(&b).unwrap());
        assert!((s - truth).abs() < 0.18, "{s} vs {truth}");
    }
}
