//! The built-in ranker, native Rust: what kiln uses without a policy and
//! whenever a policy fails. Its formula is the `bm25-recency` policy's own
//! source file, compiled here too, so the two give the same bits.

#[path = "../../plugins/policies/sdk/src/formula.rs"]
mod formula;

use crate::abi::RankInput;

/// Scores every candidate, in input order.
pub fn rank(input: &RankInput) -> Vec<f32> {
    input
        .candidates
        .iter()
        .map(|c| {
            formula::bm25_recency(
                c.bm25,
                c.edit_recency_s,
                c.open_recency_s,
                c.line_distance,
                c.flags(),
                c.definition,
                c.import_hops,
            )
        })
        .collect()
}
