//! ctxbench in CI: cross-file completion holes cut from a real repository
//! (the `ignore` crate at the exact version and checksum kiln's Cargo.lock
//! pins, from the cargo registry's sources), every selector scored, and a
//! floor per metric for kiln's selector so that a regression fails.

use kiln_tests::Home;
use kiln_tests::serve::demo_model;
use serde_json::Value;

#[test]
fn ctxbench_scores_selectors_on_a_pinned_crate_and_kiln_keeps_its_floors() {
    let home = Home::default();
    let repo = kiln_tests::locked_crate_sources("ignore");
    let holes = home.path().join("holes.jsonl");
    let cut = home.json(&[
        "ctxbench",
        "cut",
        repo.to_str().unwrap(),
        "--out",
        holes.to_str().unwrap(),
        "--holes",
        "40",
        "--seed",
        "1",
        "--json",
    ]);
    assert_eq!(cut["holes"]["cross_file"], 40, "{cut}");
    let model = demo_model();
    let run = home.json(&[
        "ctxbench",
        "run",
        repo.to_str().unwrap(),
        "--holes",
        holes.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--budgets",
        "512,2048,8192",
        "--json",
    ]);
    let score = |selector: &str, budget: u64, metric: &str| -> f64 {
        let scores = run["scores"].as_array().unwrap();
        let s: &Value = scores
            .iter()
            .find(|s| s["selector"] == selector && s["budget"] == budget)
            .unwrap_or_else(|| panic!("no {selector} at {budget}: {run:#}"));
        s[metric].as_f64().unwrap()
    };
    // No context finds nothing; every budget holds to its tokens.
    assert_eq!(score("none", 2048, "definition_recall"), 0.0);
    for sel in ["bm25_first_fit", "jaccard_windows", "kiln"] {
        for budget in [512, 2048, 8192] {
            assert!(score(sel, budget, "mean_context_tokens") <= budget as f64);
        }
    }
    // Floors for kiln's selector, with room for the sample (40 holes,
    // the demo model's tokenizer; it scored recall 0.525, 0.775 and 0.875
    // at 512, 2048 and 8192 tokens, density 0.38 and MRR 0.34 at 2048, and
    // 0.72, 0.87 and 0.92 on 100 holes with SmolLM2's tokenizer; before
    // the symbol index: 0.025, 0.1 and 0.275): what nothing may lower.
    assert!(score("kiln", 512, "definition_recall") >= 0.45, "{run:#}");
    assert!(score("kiln", 2048, "definition_recall") >= 0.7, "{run:#}");
    assert!(score("kiln", 8192, "definition_recall") >= 0.8, "{run:#}");
    assert!(score("kiln", 2048, "density") >= 0.3, "{run:#}");
    assert!(score("kiln", 2048, "mrr") >= 0.25, "{run:#}");
    assert!(score("kiln", 2048, "latency_ms_p99") < 5000.0, "{run:#}");
    // Cache stability: while a line is typed the block stays nearly the
    // same (it scored 15 of 2,022 tokens per keystroke on 100 holes with
    // SmolLM2's tokenizer; Jaccard windows 225).
    assert!(
        score("kiln", 2048, "unstable_tokens") <= 0.1 * score("kiln", 2048, "mean_context_tokens"),
        "{run:#}"
    );
    assert_eq!(score("none", 2048, "unstable_tokens"), 0.0);
    // Ahead of both baselines at every budget.
    for budget in [512, 2048, 8192] {
        for baseline in ["bm25_first_fit", "jaccard_windows"] {
            assert!(
                score("kiln", budget, "definition_recall")
                    > score(baseline, budget, "definition_recall"),
                "{run:#}"
            );
        }
    }

    // The model metrics: every selector and the oracle through a model
    // (the demo model: this checks the wiring and the statistics; the
    // numbers on a released model are the bench's, `kiln ctxbench
    // model`).
    let model_args = |count: &'static str| -> Vec<String> {
        let mut args: Vec<String> = ["ctxbench", "model", "--count", count, "--holes"]
            .map(String::from)
            .to_vec();
        args.push(holes.to_str().unwrap().into());
        args.extend(["--model".into(), model.to_str().unwrap().into()]);
        args.push(repo.to_str().unwrap().into());
        args
    };
    let mut args = model_args("3");
    args.extend(["--budget", "256", "--max-tokens", "4", "--json"].map(String::from));
    let model_run = home.json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let scores = model_run["scores"].as_array().unwrap();
    let names: Vec<&str> = scores
        .iter()
        .map(|s| s["selector"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "none",
            "bm25_first_fit",
            "jaccard_windows",
            "kiln",
            "kiln_second_query",
            "oracle"
        ],
        "{model_run:#}"
    );
    for s in scores {
        assert_eq!(s["holes"], 3, "{s}");
        assert!(s["mean_context_tokens"].as_f64().unwrap() <= 256.0, "{s}");
        for metric in ["delta_nll", "exact_match", "edit_similarity"] {
            let i = &s[metric];
            let (lo, mean, hi) = (
                i["lo"].as_f64().unwrap(),
                i["mean"].as_f64().unwrap(),
                i["hi"].as_f64().unwrap(),
            );
            assert!(lo <= mean + 1e-9 && mean <= hi + 1e-9, "{metric}: {s}");
        }
        for metric in ["exact_match", "edit_similarity"] {
            let mean = s[metric]["mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&mean), "{metric}: {s}");
        }
    }
    // No context against itself changes nothing; the oracle holds the
    // needed definitions, so it spends tokens.
    assert_eq!(scores[0]["delta_nll"]["mean"], 0.0, "{model_run:#}");
    assert!(
        scores[5]["mean_context_tokens"].as_f64().unwrap() > 0.0,
        "{model_run:#}"
    );
    // One selector, and the repository's own text scored: 1,100 tokens
    // (the first 512 of several files), the same under the same seed.
    let mut args = model_args("2");
    args.extend(
        [
            "--selectors",
            "kiln",
            "--nll-tokens",
            "1100",
            "--max-tokens",
            "4",
            "--json",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = home.json(&args);
    let scores = one["scores"].as_array().unwrap();
    assert_eq!(scores.len(), 1, "{one:#}");
    assert_eq!(scores[0]["selector"], "kiln");
    assert!(
        scores[0].get("delta_nll").is_none(),
        "no `none` to subtract"
    );
    assert!(scores[0]["nll_per_token"].as_f64().unwrap() > 0.0);
    let t = &one["text_nll"];
    assert_eq!(t["tokens"], 1100, "{t}");
    let nll = t["nll_per_token"].as_f64().unwrap();
    assert!(nll > 0.0 && nll.is_finite(), "{t}");
    assert_eq!(home.json(&args)["text_nll"], *t, "deterministic");
    let mut bad = model_args("2");
    bad.extend(["--selectors", "psychic"].map(String::from));
    let err = home.fails(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("unknown selector psychic"), "{err}");
    let err = home.fails(
        &model_args("0")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(err.contains("positive numbers"), "{err}");

    // A hole set from another tree is refused with the file named.
    let text = std::fs::read_to_string(&holes).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let tampered = text.replacen(first["sha256"].as_str().unwrap(), &"0".repeat(64), 1);
    std::fs::write(&holes, tampered).unwrap();
    let run_fails = || {
        home.fails(&[
            "ctxbench",
            "run",
            repo.to_str().unwrap(),
            "--holes",
            holes.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
    };
    let err = run_fails();
    assert!(err.contains("changed since the holes were cut"), "{err}");
    std::fs::write(&holes, "{not json\n").unwrap();
    let err = run_fails();
    assert!(err.contains("holes.jsonl:1: not a ctxbench hole"), "{err}");
}

/// `kiln policy test --ctxbench`: a ranking policy's recall, density and
/// MRR next to the built-in ranker's on the same holes; a tuning policy
/// is refused.
#[test]
fn policy_test_scores_a_ranking_policy_on_ctxbench_against_the_built_in_ranker() {
    let Some(policies) = kiln_tests::policies_dir() else {
        return;
    };
    let home = Home::default();
    let repo = kiln_tests::locked_crate_sources("ignore");
    let model = demo_model();
    let v = home.json(&[
        "policy",
        "test",
        policies.join("jaccard.wasm").to_str().unwrap(),
        "--ctxbench",
        repo.to_str().unwrap(),
        "--cut",
        "20",
        "--budgets",
        "2048",
        "--model",
        model.to_str().unwrap(),
        // What this test checks is the scoring; the gate's latency
        // ceiling (25 ms at p99, tested in policies.rs) is for release
        // builds, and this debug build's heaviest call took 26 ms once
        // with the rest of the suite running beside it.
        "--max-p99-ms",
        "250",
        "--json",
    ]);
    assert_eq!(v["report"]["passed"], true, "{v:#}");
    let b = &v["ctxbench"];
    assert_eq!(b["holes"], 20, "{v:#}");
    let row = &b["budgets"][0];
    assert_eq!(row["budget"], 2048);
    for who in ["policy", "builtin"] {
        let recall = row[who]["definition_recall"].as_f64().unwrap();
        assert!((0.5..=1.0).contains(&recall), "{who}: {v:#}");
        assert!(row[who]["mrr"].as_f64().unwrap() > 0.0, "{who}: {v:#}");
        assert_eq!(row[who]["selector"], "kiln");
    }
    let err = home.fails(&[
        "policy",
        "test",
        policies.join("tpe.wasm").to_str().unwrap(),
        "--ctxbench",
        repo.to_str().unwrap(),
    ]);
    assert!(err.contains("--ctxbench scores ranking policies"), "{err}");
}
