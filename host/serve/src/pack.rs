//! Which ranked snippets go into the context block, and in what order.
//!
//! Not first-fit in rank order (which lets one large snippet crowd out
//! several useful ones, or fills the budget with barely relevant text):
//!
//! 1. A relevance floor: snippets scoring under [`FLOOR`] of the best one
//!    of their kind (definitions, other snippets), or nothing, stay out
//!    even when there is room (padding costs the model's attention and the
//!    user's latency).
//! 2. A redundancy penalty: a snippet's value is its score less
//!    [`REDUNDANCY`] of it times its largest identifier overlap (Jaccard)
//!    with any snippet ranked above it, so near-copies (a file and its
//!    open, edited version; overloads) do not both spend the budget.
//! 3. A 0/1 knapsack over the exact token counts: the set of greatest
//!    total value within the budget (dynamic programming over the budget
//!    in units of at most 1/1024 of it, each snippet's tokens rounded up:
//!    the budget is never exceeded). Alternatives (one definition as its
//!    signature or its body) form a group of which at most one is taken;
//!    room left over then turns chosen signatures into their bodies.
//!    Definitions and text found by its words are mixed: the text may take
//!    up to [`LEXICAL_SHARE`] of the budget first, the definitions then
//!    take what it left, and the text what they left (a definition's score
//!    carries its name's weight and would otherwise crowd out the code
//!    that shows how things are used, which a model gains more from).
//! 4. Layout: the chosen snippets in a stable order (by path and line)
//!    with the most valuable one last, nearest the cursor. While a line is
//!    typed the chosen set rarely changes, and the block then stays
//!    byte-identical, so the KV cache keeps the prompt's prefix.

use std::collections::{HashMap, HashSet};

/// Snippets scoring under this share of the best one stay out.
pub const FLOOR: f32 = 0.2;
/// Share of a snippet's score taken off per unit of overlap with a
/// better-ranked one.
pub const REDUNDANCY: f32 = 0.5;
/// The budget is cut into at most this many units for the knapsack.
const UNITS: usize = 1024;

/// A ranked snippet as the packer sees it.
pub struct Item<'a> {
    pub score: f32,
    /// Exact tokens of its block in the prompt.
    pub tokens: usize,
    /// Its identifiers, for the redundancy penalty.
    pub words: &'a HashSet<&'a str>,
    /// Where it comes from (path, first line): the stable order.
    pub key: (&'a str, u32),
    /// Alternatives (one definition at several resolutions) share a group:
    /// at most one of them is taken.
    pub group: Option<u32>,
    /// A definition (of a name near the cursor, or in an imported file):
    /// it meets the floor against the best definition, the others against
    /// the best of the others (a definition's score carries the weight of
    /// the names it defines, which text found by its words never has).
    pub definition: bool,
}

fn jaccard(a: &HashSet<&str>, b: &HashSet<&str>) -> f32 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f32 / union as f32
    }
}

/// The share of the budget kept for text found by its words (code that
/// uses what the cursor uses) before definitions take the rest: on
/// ctxbench's model metrics (SmolLM2, `ignore`, 1,024 tokens) a context
/// of definitions alone gained half the ΔNLL of BM25's chunks alone.
pub const LEXICAL_SHARE: f32 = 0.5;

/// The best set of at most one item per group within `cap` units:
/// dynamic programming over (groups, units).
fn knapsack(groups: &[Vec<usize>], weights: &[usize], values: &[f32], cap: usize) -> Vec<usize> {
    let n = groups.len();
    // table[g][c]: the greatest value of the first g groups within c units
    // (at most one item of each); pick[g][c]: the item taken there.
    let mut table = vec![0.0f32; (n + 1) * (cap + 1)];
    let mut pick = vec![usize::MAX; (n + 1) * (cap + 1)];
    let at = |g: usize, c: usize| g * (cap + 1) + c;
    for g in 1..=n {
        for c in 0..=cap {
            let mut best = table[at(g - 1, c)];
            let mut took = usize::MAX;
            for &k in &groups[g - 1] {
                if weights[k] <= c {
                    let take = table[at(g - 1, c - weights[k])] + values[k];
                    if take > best {
                        best = take;
                        took = k;
                    }
                }
            }
            table[at(g, c)] = best;
            pick[at(g, c)] = took;
        }
    }
    let mut chosen = Vec::new();
    let mut c = cap;
    for g in (1..=n).rev() {
        let k = pick[at(g, c)];
        if k != usize::MAX {
            chosen.push(k);
            c -= weights[k];
        }
    }
    chosen
}

/// The items to pack within `budget` tokens, as indices in prompt order.
pub fn choose(items: &[Item<'_>], budget: usize) -> Vec<usize> {
    let best_of = |definitions: bool| {
        (items.iter())
            .filter(|i| i.definition == definitions)
            .map(|i| i.score)
            .fold(0.0f32, f32::max)
    };
    let best = [best_of(false), best_of(true)];
    if best.iter().all(|&b| b <= 0.0) || !best.iter().all(|b| b.is_finite()) || budget == 0 {
        return Vec::new();
    }
    let mut ranked: Vec<usize> = (0..items.len())
        .filter(|&i| {
            let it = &items[i];
            let best = best[usize::from(it.definition)];
            it.score > 0.0 && it.score >= FLOOR * best && it.tokens <= budget
        })
        .collect();
    ranked.sort_by(|&a, &b| items[b].score.total_cmp(&items[a].score).then(a.cmp(&b)));
    let values: Vec<f32> = (0..ranked.len())
        .map(|r| {
            let it = &items[ranked[r]];
            // Against other snippets only: a definition's own other
            // resolution is an alternative, not a copy.
            let overlap = ranked[..r]
                .iter()
                .filter(|&&above| it.group.is_none() || items[above].group != it.group)
                .map(|&above| jaccard(it.words, items[above].words))
                .fold(0.0f32, f32::max);
            it.score * (1.0 - REDUNDANCY * overlap)
        })
        .collect();

    // Knapsack over units of the budget; weights rounded up.
    let unit = budget.div_ceil(UNITS).max(1);
    let cap = budget / unit;
    let weights: Vec<usize> = (ranked.iter())
        .map(|&i| items[i].tokens.div_ceil(unit).max(1))
        .collect();
    // Alternatives together, in rank order of their best.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_at: HashMap<u32, usize> = HashMap::new();
    for (k, &i) in ranked.iter().enumerate() {
        match items[i].group {
            Some(g) => match group_at.get(&g) {
                Some(&at) => groups[at].push(k),
                None => {
                    group_at.insert(g, groups.len());
                    groups.push(vec![k]);
                }
            },
            None => groups.push(vec![k]),
        }
    }
    // Definitions and text found by its words share the budget: the text
    // gets up to LEXICAL_SHARE of it first, the definitions what it left,
    // then the text all the definitions left (so with only one kind, one
    // knapsack over the whole budget).
    let (lexical, definitions): (Vec<Vec<usize>>, Vec<Vec<usize>>) =
        (groups.into_iter()).partition(|g| !items[ranked[g[0]]].definition);
    let weight = |set: &[usize]| set.iter().map(|&k| weights[k]).sum::<usize>();
    let share = (cap as f32 * LEXICAL_SHARE) as usize;
    let first = knapsack(&lexical, &weights, &values, share);
    let defs = knapsack(&definitions, &weights, &values, cap - weight(&first));
    let mut chosen = knapsack(&lexical, &weights, &values, cap - weight(&defs));
    chosen.extend(defs);
    // Room left over goes to fuller resolutions: a chosen definition
    // becomes its largest alternative that the rest of the budget holds,
    // the most valuable first.
    let mut left = cap - chosen.iter().map(|&k| weights[k]).sum::<usize>();
    chosen.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    for k in chosen.iter_mut() {
        let Some(g) = items[ranked[*k]].group else {
            continue;
        };
        let fuller = (0..ranked.len())
            .filter(|&j| items[ranked[j]].group == Some(g) && weights[j] > weights[*k])
            .filter(|&j| weights[j] - weights[*k] <= left)
            .max_by_key(|&j| (weights[j], std::cmp::Reverse(j)));
        if let Some(j) = fuller {
            left -= weights[j] - weights[*k];
            *k = j;
        }
    }
    // Stable order, the most valuable last.
    let top = chosen
        .iter()
        .copied()
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)));
    let mut order: Vec<usize> = chosen.iter().copied().filter(|&k| Some(k) != top).collect();
    order.sort_by(|&a, &b| items[ranked[a]].key.cmp(&items[ranked[b]].key));
    order.extend(top);
    order.into_iter().map(|k| ranked[k]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(words: &[&'static str]) -> HashSet<&'static str> {
        words.iter().copied().collect()
    }

    fn items<'a>(specs: &'a [(f32, usize, HashSet<&'static str>, String)]) -> Vec<Item<'a>> {
        specs
            .iter()
            .map(|(score, tokens, words, path)| Item {
                score: *score,
                tokens: *tokens,
                words,
                key: (path, 0),
                group: None,
                definition: false,
            })
            .collect()
    }

    fn spec(
        score: f32,
        tokens: usize,
        words: &[&'static str],
        path: &str,
    ) -> (f32, usize, HashSet<&'static str>, String) {
        (score, tokens, set(words), path.to_string())
    }

    /// Definitions score far above text found by its words, yet the text
    /// keeps up to half the budget; what one kind leaves, the other takes.
    #[test]
    fn definitions_and_text_share_the_budget() {
        let specs = [
            spec(40.0, 100, &["a"], "d1.rs"),
            spec(39.0, 100, &["b"], "d2.rs"),
            spec(38.0, 100, &["c"], "d3.rs"),
            spec(37.0, 100, &["d"], "d4.rs"),
            spec(9.0, 100, &["e"], "t1.rs"),
            spec(8.5, 100, &["f"], "t2.rs"),
        ];
        let mut its = items(&specs);
        for (g, it) in its.iter_mut().take(4).enumerate() {
            it.group = Some(g as u32);
            it.definition = true;
        }
        let mut chosen = choose(&its, 400);
        chosen.sort();
        assert_eq!(chosen, vec![0, 1, 4, 5], "two of each kind");
        // Without text, definitions take the whole budget; with room for
        // all, all come.
        let only: Vec<usize> = choose(&its[..4], 400);
        assert_eq!(only.len(), 4);
        assert_eq!(choose(&its, 600).len(), 6);
        // Text that does not use its share leaves it to the definitions.
        let mut chosen = choose(&its[..5], 400);
        chosen.sort();
        assert_eq!(chosen, vec![0, 1, 2, 4]);
    }

    /// The chosen set's value equals the best of every subset that fits
    /// (brute force), on random instances without overlaps.
    #[test]
    fn the_knapsack_finds_the_best_set_that_fits() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..200 {
            let n = rng.usize(1..10);
            let budget = rng.usize(1..400);
            let specs: Vec<_> = (0..n)
                .map(|i| {
                    const WORDS: [&str; 10] =
                        ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"];
                    let path = format!("f{i}");
                    spec(rng.f32() + 0.2, rng.usize(1..200), &[WORDS[i]], &path)
                })
                .collect();
            let its = items(&specs);
            let chosen = choose(&its, budget);
            let tokens: usize = chosen.iter().map(|&i| its[i].tokens).sum();
            assert!(tokens <= budget);
            let value = |set: &[usize]| set.iter().map(|&i| its[i].score).sum::<f32>();
            let best = its.iter().map(|i| i.score).fold(0.0f32, f32::max);
            let mut brute = 0.0f32;
            for mask in 0u32..(1 << n) {
                let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let fits = set.iter().map(|&i| its[i].tokens).sum::<usize>() <= budget;
                let above_floor = set.iter().all(|&i| its[i].score >= FLOOR * best);
                if fits && above_floor {
                    brute = brute.max(value(&set));
                }
            }
            assert!(
                value(&chosen) >= brute - 1e-4,
                "{} < {brute}",
                value(&chosen)
            );
        }
    }

    /// Two small snippets that together beat one large one are taken
    /// instead of it, where first-fit in rank order would take the large.
    #[test]
    fn several_useful_snippets_beat_one_large_one() {
        let specs = [
            spec(1.0, 90, &["big"], "big.rs"),
            spec(0.8, 50, &["a"], "a.rs"),
            spec(0.7, 50, &["b"], "b.rs"),
        ];
        let its = items(&specs);
        let chosen = choose(&its, 100);
        assert_eq!(chosen, vec![2, 1], "b.rs, then the more valuable a.rs last");
    }

    #[test]
    fn the_floor_and_the_redundancy_penalty_keep_padding_and_copies_out() {
        let specs = [
            spec(1.0, 10, &["parse", "token", "lexer"], "lexer.rs"),
            spec(0.9, 10, &["parse", "token", "lexer"], "lexer_copy.rs"),
            spec(0.6, 10, &["ast", "node"], "ast.rs"),
            spec(0.1, 10, &["unrelated"], "misc.rs"),
        ];
        let its = items(&specs);
        // Room for everything: the copy is worth less than the distinct
        // snippet but still positive, so it is taken; padding is not.
        let all = choose(&its, 1000);
        assert!(!all.contains(&3), "below the floor: {all:?}");
        // Room for two: the original and the distinct one, not the copy.
        let two = choose(&its, 20);
        assert_eq!(two, vec![2, 0], "{two:?}");
    }

    /// One definition as a signature or a body: never both, the body where
    /// there is room for it, the signature where there is not.
    #[test]
    fn one_resolution_of_a_definition_is_taken() {
        let specs = [
            spec(1.0, 100, &["parse", "token", "body"], "lexer.rs"),
            spec(0.9, 20, &["parse"], "lexer.rs"),
            spec(0.5, 30, &["other"], "other.rs"),
        ];
        let mut its = items(&specs);
        its[0].group = Some(7);
        its[1].group = Some(7);
        assert_eq!(choose(&its, 1000), vec![2, 0], "the body, not both");
        assert_eq!(choose(&its, 60), vec![2, 1], "the signature fits");
        // The signature scores higher (BM25 favours short text), yet the
        // room left over takes the body.
        its[1].score = 1.1;
        assert_eq!(choose(&its, 1000), vec![2, 0], "the body where it fits");
        assert_eq!(choose(&its, 120), vec![2, 1], "not at the other's cost");
        // The best set of values, one per group, on random instances
        // (alternatives score alike, as a definition's resolutions do).
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..200 {
            let n = rng.usize(1..9);
            let group_scores = [rng.f32() + 0.2, rng.f32() + 0.2, rng.f32() + 0.2];
            let groups: Vec<u32> = (0..n).map(|_| rng.u32(0..3)).collect();
            let specs: Vec<_> = (0..n)
                .map(|i| {
                    const WORDS: [&str; 9] = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8"];
                    let score = group_scores[groups[i] as usize];
                    spec(score, rng.usize(1..100), &[WORDS[i]], &format!("f{i}"))
                })
                .collect();
            let mut its = items(&specs);
            for (it, &g) in its.iter_mut().zip(&groups) {
                it.group = Some(g);
                it.definition = true;
            }
            let budget = rng.usize(1..300);
            let chosen = choose(&its, budget);
            let groups: HashSet<Option<u32>> = chosen.iter().map(|&i| its[i].group).collect();
            assert_eq!(groups.len(), chosen.len(), "one per group: {chosen:?}");
            let best = its.iter().map(|i| i.score).fold(0.0f32, f32::max);
            let value = |set: &[usize]| set.iter().map(|&i| its[i].score).sum::<f32>();
            let mut brute = 0.0f32;
            for mask in 0u32..(1 << n) {
                let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                let distinct: HashSet<Option<u32>> = set.iter().map(|&i| its[i].group).collect();
                let fits = set.iter().map(|&i| its[i].tokens).sum::<usize>() <= budget;
                let above_floor = set.iter().all(|&i| its[i].score >= FLOOR * best);
                if fits && above_floor && distinct.len() == set.len() {
                    brute = brute.max(value(&set));
                }
            }
            assert!(
                value(&chosen) >= brute - 1e-4,
                "{} < {brute}",
                value(&chosen)
            );
        }
    }

    /// The order is by path except the most valuable snippet, last: scores
    /// that move while the set stays give the same bytes.
    #[test]
    fn the_layout_is_stable_while_the_set_stays() {
        let a = [
            spec(0.5, 10, &["x"], "z.rs"),
            spec(0.9, 10, &["y"], "m.rs"),
            spec(0.6, 10, &["w"], "a.rs"),
        ];
        let b = [
            spec(0.55, 10, &["x"], "z.rs"),
            spec(0.95, 10, &["y"], "m.rs"),
            spec(0.5, 10, &["w"], "a.rs"),
        ];
        assert_eq!(choose(&items(&a), 100), vec![2, 0, 1]);
        assert_eq!(choose(&items(&b), 100), vec![2, 0, 1]);
        assert!(choose(&items(&a), 0).is_empty());
        assert!(choose(&[], 100).is_empty());
    }
}
