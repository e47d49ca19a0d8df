//! A ranking policy with a parameter (ABI 1.4): BM25 plus a bonus for
//! lines near the cursor that halves `reach` lines away. Set it in
//! config.toml's [policies.params.near]; see plugins/policies/README.md.

use kiln_policy::{export_ranker, RankInput};

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    let reach = input.param(0, 20.0) as f32; // the default if the host sent none
    for c in input.candidates() {
        let d = c.line_distance();
        let near = if d >= 0 { 1.0 / (1.0 + d as f32 / reach) } else { 0.0 };
        scores.push(c.bm25() + near);
    }
}

export_ranker!(
    rank,
    b"{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"near\",\"version\":\"1.0.0\",\"params\":[\
{\"name\":\"reach\",\"default\":20,\"min\":1,\"max\":2000,\"log\":true,\"doc\":\"lines until the bonus halves\"}]}"
);
