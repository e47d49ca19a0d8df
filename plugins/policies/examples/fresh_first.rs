//! A complete ranking policy in Rust: BM25, plus bonuses for snippets
//! from the file being edited and from files edited in the last ten
//! minutes, plus the ABI 1.1 symbol overlap. Build and try it: see plugins/policies/README.md.

use kiln_policy::{export_ranker, formula::SAME_FILE, RankInput};

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    for c in input.candidates() {
        let edited = c.edit_recency_s();
        let fresh = if (0.0..600.0).contains(&edited) { 2.0 } else { 0.0 };
        let here = if c.flags() & SAME_FILE != 0 { 3.0 } else { 0.0 };
        scores.push(c.bm25() + fresh + here + 3.0 * c.symbol_overlap());
    }
}

export_ranker!(
    rank,
    b"{\"abi\":\"1.1\",\"kind\":\"rank\",\"name\":\"fresh-first\",\"version\":\"0.1.0\"}"
);
