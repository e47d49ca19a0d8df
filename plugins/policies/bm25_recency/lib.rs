//! The BM25+recency ranking policy: the same formula as kiln's built-in
//! ranker (`sdk/src/formula.rs`, compiled into both), so its scores are
//! bit-identical to the fallback's.

use kiln_policy::{export_ranker, formula, RankInput};

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    for c in input.candidates() {
        scores.push(formula::bm25_recency(
            c.bm25(),
            c.edit_recency_s(),
            c.open_recency_s(),
            c.line_distance(),
            c.flags(),
            c.definition(),
            c.import_hops(),
        ));
    }
}

export_ranker!(
    rank,
    b"{\"abi\":\"1.3\",\"kind\":\"rank\",\"name\":\"bm25-recency\",\"version\":\"1.1.0\"}"
);
