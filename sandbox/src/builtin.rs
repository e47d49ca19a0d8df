//! The built-in ranker, native Rust: what kiln uses without a policy and
//! whenever a policy fails. It is the `bm25-recency` policy compiled
//! natively: its formula is that policy's own source file, compiled here
//! too, and its weights are that policy's parameters (set by
//! `[policies.params.bm25-recency]`), so the two give the same bits.

#[path = "../../plugins/policies/sdk/src/formula.rs"]
pub mod formula;

use crate::abi::RankInput;
use crate::meta::ParamDecl;
pub use formula::Weights;

/// The policy the built-in ranker is, whose parameters it shares.
pub const NAME: &str = "bm25-recency";

/// The parameters the built-in ranker (and the `bm25-recency` policy)
/// declares, in order.
pub fn params() -> Vec<ParamDecl> {
    formula::PARAMS
        .iter()
        .map(|p| ParamDecl {
            name: p.name.to_string(),
            default: p.default,
            min: p.min,
            max: p.max,
            log: p.log,
            integer: false,
            doc: p.doc.to_string(),
        })
        .collect()
}

/// Scores every candidate, in input order, with the default weights.
pub fn rank(input: &RankInput) -> Vec<f32> {
    rank_with(input, &Weights::defaults())
}

/// Scores every candidate, in input order.
pub fn rank_with(input: &RankInput, w: &Weights) -> Vec<f32> {
    input
        .candidates
        .iter()
        .map(|c| {
            formula::bm25_recency(
                w,
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
