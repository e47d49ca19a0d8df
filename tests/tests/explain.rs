//! `kiln explain` on a real released model with a planted case: of
//! several files in the prompt only one holds the answer, and it must
//! come out as the most important; the result is the same every run and
//! the work stays within its budget.

use kiln_tests::{Home, real_model};
use serde_json::Value;

const PLANTED: &str = "# colors.py\nRED = \"#ff0000\"\nGREEN = \"#00ff00\"\n\n\
# config.py\nDATABASE_PORT = 7913\nDATABASE_HOST = \"localhost\"\n\n\
# shapes.py\ndef square(x):\n    return x * x\n\n\
# main.py\nfrom config import DATABASE_PORT\nassert DATABASE_PORT ==";

fn explain(home: &Home, model: &str, budget: &str) -> Value {
    home.json(&[
        "explain",
        model,
        "--prompt",
        PLANTED,
        "--max-tokens",
        "5",
        "--budget-tokens",
        budget,
        "--json",
    ])["explanation"]
        .clone()
}

#[test]
fn the_snippet_that_holds_the_answer_matters_most_and_the_result_repeats() {
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let model = model.to_str().unwrap();
    let home = Home::default();
    let e = explain(&home, model, "4000");
    assert!(e["completion"].as_str().unwrap().contains("7913"), "{e}");
    let top = &e["parts"][0];
    assert_eq!(top["kind"], "block", "{e}");
    assert_eq!(top["label"], "# config.py", "{e}");
    assert!(top["importance"].as_f64().unwrap() > 1.0, "{e}");
    // The line inside it that carries the answer outranks its neighbours.
    assert_eq!(e["lines"][0]["label"], "DATABASE_PORT = 7913", "{e}");
    // Without it the model no longer says 7913.
    let cf = &e["counterfactual"];
    assert_eq!(cf["removed"]["label"], "# config.py");
    assert!(!cf["completion"].as_str().unwrap().contains("7913"), "{cf}");
    assert!(e["evaluated_tokens"].as_u64().unwrap() <= 4000);
    // Deterministic: the same numbers again.
    assert_eq!(explain(&home, model, "4000"), e);
    // A small budget measures fewer parts, says so, and keeps to it.
    let small = explain(&home, model, "150");
    assert!(
        small["evaluated_tokens"].as_u64().unwrap() <= 150,
        "{small}"
    );
    assert!(small["skipped_parts"].as_u64().unwrap() > 0, "{small}");
}
