//! The BM25+recency ranking policy: the same formula as kiln's built-in
//! ranker (`sdk/src/formula.rs`, compiled into both), so its scores are
//! bit-identical to the fallback's for the same weights. Its weights are
//! parameters (ABI 1.4): `[policies.params.bm25-recency]` in kiln's
//! `config.toml` sets them, and `kiln tune --objective quality` fits them
//! to a repository. The declaration below lists `formula::PARAMS`.

use kiln_policy::{export_ranker, formula, RankInput};

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    let w = formula::Weights::from_values(&input.params());
    for c in input.candidates() {
        scores.push(formula::bm25_recency(
            &w,
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
    b"{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"bm25-recency\",\"version\":\"1.2.0\",\"params\":[\
{\"name\":\"definition\",\"default\":32,\"min\":0,\"max\":128,\"doc\":\"what a definition of a name used on the cursor's line is worth, in BM25 units\"},\
{\"name\":\"import\",\"default\":2,\"min\":0,\"max\":16,\"doc\":\"a snippet of a file the cursor's file imports (half that two imports away)\"},\
{\"name\":\"edit\",\"default\":2,\"min\":0,\"max\":16,\"doc\":\"a file edited just now (halved after edit_seconds)\"},\
{\"name\":\"edit_seconds\",\"default\":60,\"min\":1,\"max\":86400,\"log\":true,\"doc\":\"seconds after which an edit's bonus is halved\"},\
{\"name\":\"open\",\"default\":1,\"min\":0,\"max\":16,\"doc\":\"a file opened or viewed just now (halved after open_seconds)\"},\
{\"name\":\"open_seconds\",\"default\":300,\"min\":1,\"max\":86400,\"log\":true,\"doc\":\"seconds after which a view's bonus is halved\"},\
{\"name\":\"same_file\",\"default\":1,\"min\":0,\"max\":16,\"doc\":\"a snippet of the cursor's own file\"},\
{\"name\":\"nearby\",\"default\":1,\"min\":0,\"max\":16,\"doc\":\"a snippet of the cursor's file at the cursor (halved nearby_lines away)\"},\
{\"name\":\"nearby_lines\",\"default\":50,\"min\":1,\"max\":10000,\"log\":true,\"doc\":\"lines from the cursor after which the nearby bonus is halved\"},\
{\"name\":\"import_related\",\"default\":0.75,\"min\":0,\"max\":16,\"doc\":\"a file related by imports or whose name is used near the cursor\"},\
{\"name\":\"open_in_editor\",\"default\":0.25,\"min\":0,\"max\":16,\"doc\":\"a file open in the editor\"}]}"
);
