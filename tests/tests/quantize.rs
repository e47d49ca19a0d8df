//! `kiln quantize` against llama.cpp: every tensor the `gguf` package can
//! quantize (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) is byte-identical to its
//! reference, and, where llama.cpp itself is installed, the whole file's
//! tensors (Q6_K output included, and every K-quant preset's per-tensor
//! types) are byte-identical to llama.cpp's own `llama_model_quantize`
//! output.

use kiln_tests::{Home, llama_cpp_available, oracle, quantize_like_llama_cpp, tiny_model};

/// 256-wide so that the output tensor takes llama.cpp's Q6_K rule.
const SHAPE: &[&str] = &[
    "--dtype",
    "f16",
    "--embd",
    "256",
    "--ff",
    "512",
    "--heads",
    "4",
    "--kv-heads",
    "2",
];

#[test]
fn every_quantized_tensor_matches_the_gguf_reference() {
    let home = Home::default();
    let src = tiny_model(SHAPE);
    for target in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16"] {
        let out = home.path().join(format!("{target}.gguf"));
        home.ok(&[
            "quantize",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            target,
        ]);
        let report: serde_json::Value = serde_json::from_str(&oracle(
            "check_quantized.py",
            &[src.as_os_str(), out.as_os_str()],
        ))
        .unwrap();
        assert_eq!(
            report["mismatched"],
            serde_json::json!([]),
            "{target}: {report}"
        );
        // 2 layers × 7 matrices + token_embd, and output unless it is Q6_K.
        let checked = report["checked"].as_array().unwrap().len();
        let unchecked = report["unchecked"].as_array().unwrap();
        match target {
            "q4_0" | "q4_1" | "q5_0" | "q5_1" => {
                assert_eq!(checked, 15, "{report}");
                assert_eq!(
                    unchecked,
                    &vec![serde_json::json!(["output.weight", "Q6_K"])]
                );
            }
            _ => assert_eq!(checked, 16, "{report}"),
        }
    }
}

/// [`quantize_like_llama_cpp`], its file removed.
fn same_as_llama_cpp(home: &Home, src: &std::path::Path, target: &str) {
    let ours = quantize_like_llama_cpp(home, src, target, &[]);
    std::fs::remove_file(ours).unwrap();
}

#[test]
fn whole_files_match_llama_cpp() {
    if !llama_cpp_available() {
        return;
    }
    let home = Home::default();
    let src = tiny_model(SHAPE);
    for target in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16"] {
        same_as_llama_cpp(&home, &src, target);
    }
}

/// Every K-quant preset on two shapes: 8 layers with 4 query heads per KV
/// head (the per-layer rules and the grouped-attention ones), and rows of
/// 288 with tied embeddings (every type's fallback to a 32-element type).
#[test]
fn k_quant_presets_match_llama_cpp() {
    if !llama_cpp_available() {
        return;
    }
    let home = Home::default();
    let deep = tiny_model(&[
        "--dtype",
        "f16",
        "--embd",
        "256",
        "--ff",
        "512",
        "--heads",
        "4",
        "--kv-heads",
        "1",
        "--layers",
        "8",
    ]);
    let narrow = tiny_model(&[
        "--dtype",
        "f32",
        "--embd",
        "288",
        "--ff",
        "512",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--tied",
    ]);
    for target in [
        "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
    ] {
        same_as_llama_cpp(&home, &deep, target);
        same_as_llama_cpp(&home, &narrow, target);
    }
}

#[test]
fn interrupted_or_refused_runs_leave_no_file() {
    let home = Home::default();
    let src = tiny_model(SHAPE);
    let q = home.path().join("q.gguf");
    home.ok(&[
        "quantize",
        src.to_str().unwrap(),
        q.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    let again = home.path().join("again.gguf");
    let err = home.fails(&[
        "quantize",
        q.to_str().unwrap(),
        again.to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    assert!(err.contains("already quantized"), "{err}");
    let err = home.fails(&[
        "quantize",
        src.to_str().unwrap(),
        again.to_str().unwrap(),
        "--type",
        "q2_k_s",
    ]);
    assert!(
        err.contains("unknown --type") && err.contains("importance matrix"),
        "{err}"
    );
    // Killed midway: no file at the destination, and no temp file left
    // to be mistaken for a model (it is a dot-file removed on the next run).
    let mut child = home
        .command(&[
            "quantize",
            src.to_str().unwrap(),
            again.to_str().unwrap(),
            "--type",
            "q4_0",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let _ = child.kill();
    let status = child.wait().unwrap();
    if !status.success() {
        assert!(
            !again.exists(),
            "a killed quantize left a file at the destination"
        );
    }
    let names: Vec<String> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf"))
        .collect();
    assert!(
        names.iter().all(|n| n == "q.gguf" || n == "again.gguf"),
        "{names:?}"
    );
    let bad = home.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0garbage").unwrap();
    let err = home.fails(&[
        "quantize",
        bad.to_str().unwrap(),
        again.to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    assert!(err.contains("bad.gguf: at byte 8: truncated"), "{err}");
}
