//! A sliding-window Jaccard ranker: the snippet whose 3-word windows
//! overlap most with the code just before the cursor ranks first. It
//! recomputes the similarity on the text itself (the host's `jaccard`
//! feature is a lighter estimate), adds small locality bonuses, and (ABI
//! 1.2) ranks the definitions of the names used near the cursor up.

use kiln_policy::{export_ranker, formula, RankInput};
use std::collections::HashSet;

/// The last this many bytes of the prefix form the query.
const QUERY_BYTES: usize = 600;
const WINDOW: usize = 3;
/// What a definition of a name used on the cursor's line adds (a perfect
/// window overlap adds 4).
const DEFINITION: f32 = 8.0;

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hashes of every window of `WINDOW` consecutive identifier-like words.
fn windows(text: &str) -> HashSet<u64> {
    let words: Vec<u64> = text
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(fnv)
        .collect();
    let mut set = HashSet::new();
    if words.len() < WINDOW {
        set.extend(words);
        return set;
    }
    for w in words.windows(WINDOW) {
        let mut h: u64 = 0;
        for x in w {
            h = h.rotate_left(17) ^ x;
        }
        set.insert(h);
    }
    set
}

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    let prefix = input.cursor().prefix();
    let mut start = prefix.len().saturating_sub(QUERY_BYTES);
    while !prefix.is_char_boundary(start) {
        start += 1;
    }
    let query = windows(&prefix[start..]);
    for c in input.candidates() {
        let cand = windows(c.text());
        let inter = cand.intersection(&query).count() as f32;
        let union = (cand.len() + query.len()) as f32 - inter;
        let jaccard = if union > 0.0 { inter / union } else { 0.0 };
        // ABI 1.2: the definitions of the names used near the cursor.
        let mut score = 4.0 * jaccard + c.jaccard() + DEFINITION * c.definition();
        if c.flags() & formula::SAME_FILE != 0 {
            score += 0.2;
        }
        if c.flags() & formula::IMPORT_RELATED != 0 {
            score += 0.1;
        }
        scores.push(score);
    }
}

export_ranker!(
    rank,
    b"{\"abi\":\"1.2\",\"kind\":\"rank\",\"name\":\"jaccard-windows\",\"version\":\"1.1.0\"}"
);
