//! Running models through the real binary, the model store, and bad input:
//! each bad file or request gets an error that names the cause (and the
//! file and byte offset where there is one), exit code 1, no panic.

use kiln_runtime::gguf::{Value, ValueType};
use kiln_tests::{Home, tiny_model};
use std::path::{Path, PathBuf};

use kiln_tests::TINY_LLAMA as TINY;

/// A copy of `src` with its metadata edited by `edit` (tensors unchanged).
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    kiln_tests::rewrite_gguf(src, dst, edit);
}

fn set(meta: &mut [(String, Value)], key: &str, v: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
}

fn run_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "run",
        model,
        "--prompt",
        "t1 t2",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn run_prints_text_and_json_with_timings() {
    let home = Home::default();
    let m = tiny_model(TINY);
    let j = home.json(&run_args(m.to_str().unwrap(), &["--json"]));
    let n = j["token_ids"].as_array().unwrap().len();
    assert!(
        n == 3 || (n < 3 && j["stop_reason"] == "end_of_generation"),
        "{j}"
    );
    assert_eq!(j["prompt_token_ids"][0], 1, "BOS first");
    assert!(j["backend"].as_str().unwrap().starts_with("cpu"));
    for k in [
        "load_ms",
        "time_to_first_token_ms",
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(j["timings"][k].as_f64().unwrap() >= 0.0, "{k}");
    }
    // Greedy is deterministic; the plain output is the same text.
    let again = home.json(&run_args(m.to_str().unwrap(), &["--json"]));
    assert_eq!(again["token_ids"], j["token_ids"]);
    let plain = home.ok(&run_args(m.to_str().unwrap(), &[]));
    assert_eq!(plain.trim_end_matches('\n'), j["text"].as_str().unwrap());
    // Seeds reproduce sampled runs.
    let sampled = |seed: &str| {
        home.json(&[
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            "--max-tokens",
            "8",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--json",
        ])["token_ids"]
            .clone()
    };
    assert_eq!(sampled("5"), sampled("5"));
}

#[test]
fn bad_model_files_are_named_with_the_cause() {
    let home = Home::default();
    let good = tiny_model(TINY);
    let bytes = std::fs::read(&good).unwrap();
    let p = |n: &str| home.path().join(n);

    std::fs::write(p("truncated.gguf"), &bytes[..bytes.len() / 3]).unwrap();
    let err = home.fails(&run_args(p("truncated.gguf").to_str().unwrap(), &[]));
    assert!(
        err.contains("truncated.gguf: at byte") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(p("notes.gguf"), "just some notes\n").unwrap();
    let err = home.fails(&run_args(p("notes.gguf").to_str().unwrap(), &[]));
    assert!(err.contains("not a GGUF file"), "{err}");

    rewrite(&good, &p("falcon.gguf"), |m| {
        set(m, "general.architecture", Value::String("falcon".into()))
    });
    let err = home.fails(&run_args(p("falcon.gguf").to_str().unwrap(), &[]));
    assert!(
        err.contains("architecture \"falcon\" is not supported"),
        "{err}"
    );

    // RoPE scaling kiln does not run is named, with what it runs.
    rewrite(&good, &p("longrope.gguf"), |m| {
        m.push((
            "llama.rope.scaling.type".into(),
            Value::String("longrope".into()),
        ))
    });
    let err = home.fails(&run_args(p("longrope.gguf").to_str().unwrap(), &[]));
    assert!(
        err.contains("rope scaling \"longrope\" is not supported")
            && err.contains("none, linear and yarn"),
        "{err}"
    );
    rewrite(&good, &p("negative-factor.gguf"), |m| {
        m.push(("llama.rope.scaling.factor".into(), Value::F32(-2.0)))
    });
    let err = home.fails(&run_args(p("negative-factor.gguf").to_str().unwrap(), &[]));
    assert!(
        err.contains("rope.scaling.factor -2 must be positive"),
        "{err}"
    );

    rewrite(&good, &p("short-vocab.gguf"), |m| {
        let tokens = m
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .unwrap();
        if let Value::Array(_, items) = &mut tokens.1 {
            items.truncate(200);
        }
        for key in ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
            if let Value::Array(_, items) = &mut m.iter_mut().find(|(k, _)| k == key).unwrap().1 {
                items.truncate(200);
            }
        }
    });
    let err = home.fails(&run_args(p("short-vocab.gguf").to_str().unwrap(), &[]));
    assert!(
        err.contains("the tokenizer has 200 tokens but token_embd.weight has 300 rows"),
        "{err}"
    );

    // Tensor types kiln does not load, written raw: an IQ2 type, and
    // kiln's own in-memory layouts (Q4_0X16 = 258, Q5_0X16 = 262), which
    // no file may hold.
    for (raw_type, named) in [
        (16u32, "ggml type 16 (IQ2_XXS)"),
        (258, "ggml type 258 (unknown)"),
        (262, "ggml type 262 (unknown)"),
    ] {
        let mut raw = Vec::new();
        raw.extend_from_slice(b"GGUF");
        raw.extend_from_slice(&3u32.to_le_bytes());
        raw.extend_from_slice(&1u64.to_le_bytes());
        raw.extend_from_slice(&0u64.to_le_bytes());
        let name = b"blk.0.attn_q.weight";
        raw.extend_from_slice(&(name.len() as u64).to_le_bytes());
        raw.extend_from_slice(name);
        raw.extend_from_slice(&2u32.to_le_bytes());
        raw.extend_from_slice(&256u64.to_le_bytes());
        raw.extend_from_slice(&1u64.to_le_bytes());
        raw.extend_from_slice(&raw_type.to_le_bytes());
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.resize(raw.len().div_ceil(32) * 32 + 352, 0);
        let file = p(&format!("type-{raw_type}.gguf"));
        std::fs::write(&file, raw).unwrap();
        let err = home.fails(&run_args(file.to_str().unwrap(), &[]));
        assert!(
            err.contains(&format!(
                "{named}, which kiln cannot load; kiln loads F32, F16, BF16, Q4_0, Q4_1"
            )),
            "{err}"
        );
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn bad_requests_are_named() {
    let home = Home::default();
    let m = tiny_model(TINY);
    let m = m.to_str().unwrap();
    let long: String = "t5 ".repeat(40);
    let err = home.fails(&[
        "run",
        m,
        "--prompt",
        &long,
        "--ctx",
        "16",
        "--max-tokens",
        "2",
    ]);
    assert!(err.contains("do not fit the context of 16"), "{err}");
    let err = home.fails(&["run", m, "--prompt", "x", "--ctx", "4000000000"]);
    assert!(
        err.contains("MiB of memory is free") && err.contains("smaller context"),
        "{err}"
    );
    let err = home.fails(&["run", m, "--prompt", "x", "--temperature=-1"]);
    assert!(err.contains("temperature -1 must be"), "{err}");
    let err = home.fails(&["run", m, "--prompt", "x", "--top-p", "0"]);
    assert!(err.contains("top_p 0 must be in (0, 1]"), "{err}");
    let err = home.fails(&["run", "no-such-model", "--prompt", "x"]);
    assert!(
        err.contains("neither a model file nor a registered model"),
        "{err}"
    );
    let err = home.fails(&["run", m, "--prompt", "x", "--backend", "cuda"]);
    assert!(
        err.contains("no usable backend device cuda; available (`kiln backends`): cpu:0"),
        "{err}"
    );
    let err = home.fails(&["run", m, "--prompt", "x", "--backend", "cpu:1"]);
    assert!(err.contains("device cpu:1; available"), "{err}");
}

#[test]
fn the_model_store_versions_verifies_and_rolls_back() {
    let home = Home::default();
    let f16 = tiny_model(TINY);
    let q8 = home.path().join("q8.gguf");
    home.ok(&[
        "quantize",
        f16.to_str().unwrap(),
        q8.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    home.ok(&["models", "add", f16.to_str().unwrap(), "--name", "coder"]);
    let added = home.json(&[
        "models",
        "add",
        q8.to_str().unwrap(),
        "--name",
        "coder",
        "--json",
    ]);
    assert_eq!(added["model"]["version"], 2);
    assert_eq!(added["model"]["parent"], "coder@1");
    assert_eq!(added["model"]["quant_type"], "q8_0");
    let blob = PathBuf::from(added["model"]["blob_path"].as_str().unwrap());
    let sha = added["model"]["sha256"].as_str().unwrap().to_string();
    assert_eq!(blob, home.path().join(format!("models/blobs/sha256-{sha}")));
    assert_eq!(kiln_tests::sha256_file(&blob), sha);
    // Adding the same file again is refused and changes nothing.
    let before = home.json(&["models", "list", "--json"]);
    let err = home.fails(&["models", "add", q8.to_str().unwrap(), "--name", "coder"]);
    assert!(err.contains("already coder@2"), "{err}");
    assert_eq!(home.json(&["models", "list", "--json"]), before);
    // A bad file is refused before anything is copied.
    let bad = home.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\0\0\0").unwrap();
    assert!(
        home.fails(&["models", "add", bad.to_str().unwrap()])
            .contains("bad.gguf: at byte 8")
    );
    assert_eq!(
        std::fs::read_dir(home.path().join("models/blobs"))
            .unwrap()
            .count(),
        2
    );
    // Run by name, roll back, run again.
    home.ok(&run_args("coder", &[]));
    assert!(home.ok(&["models", "rollback", "coder"]).contains("2 -> 1"));
    let list = home.json(&["models", "list", "--json"]);
    let active: Vec<u64> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "active")
        .map(|m| m["version"].as_u64().unwrap())
        .collect();
    assert_eq!(active, [1]);
    home.ok(&run_args("coder@2", &[]));
    // Verify finds a corrupted blob, reports it and deletes nothing.
    assert!(home.ok(&["models", "verify"]).contains("0 problem(s)"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let out = home.kiln(&["models", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"], 1);
    let corrupt: Vec<&serde_json::Value> = report["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "corrupt")
        .collect();
    assert_eq!(corrupt[0]["model"], "coder@2");
    assert!(blob.exists(), "verify must never delete");
    // The audit log records model changes.
    let log = home.registry().audit_log(100).unwrap();
    assert!(
        log.iter()
            .any(|e| e.kind == "model" && e.action == "rollback")
    );
}

#[test]
fn gguf_written_by_kiln_is_read_by_the_gguf_package() {
    // The reverse direction of the format oracle: llama.cpp's Python reader
    // reads every file kiln writes (here: a quantized model and a metadata rewrite).
    let home = Home::default();
    let src = tiny_model(TINY);
    let q = home.path().join("q.gguf");
    home.ok(&[
        "quantize",
        src.to_str().unwrap(),
        q.to_str().unwrap(),
        "--type",
        "q4_0",
    ]);
    let r = home.path().join("r.gguf");
    rewrite(&src, &r, |m| {
        m.push((
            "kiln.test.array".into(),
            Value::Array(ValueType::U16, vec![Value::U16(1), Value::U16(2)]),
        ))
    });
    for f in [&q, &r] {
        let cmp: serde_json::Value = serde_json::from_str(&kiln_tests::oracle(
            "compare_gguf.py",
            &[f.as_os_str(), f.as_os_str()],
        ))
        .unwrap();
        assert_eq!(cmp["tensor_differences"], serde_json::json!([]));
        assert!(cmp["tensors"].as_u64().unwrap() > 10);
    }
}

/// Attention in blocks of queries (each block's scores stop at its last
/// query) gives the very bits of attention in one block: a prompt of
/// several blocks, the last one partial, then a batch that continues the
/// cached prefix.
#[test]
fn attention_in_blocks_gives_the_bits_of_one_block() {
    use kiln_runtime::backend::{Backend, exec::Executor};
    use kiln_runtime::model::{Model, Session, forward::LogitsFor};
    let model = tiny_model(TINY);
    let prompt: Vec<u32> = (0..150).map(|i| 1 + (i * 37 % 290) as u32).collect();
    let run = |block: usize| {
        let m = Model::load(&model).unwrap();
        let mut s = Session::new(m, Executor::new(Backend::builtin_cpu(), 0), Some(256)).unwrap();
        s.set_attention_block(block);
        let mut all = s.eval(&prompt[..100], LogitsFor::All).unwrap();
        all.extend(s.eval(&prompt[100..], LogitsFor::All).unwrap());
        all.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let whole = run(usize::MAX);
    for block in [kiln_runtime::model::forward::ATTENTION_BLOCK, 7] {
        assert!(
            run(block) == whole,
            "attention in blocks of {block} queries changed the logits"
        );
    }
}

/// A prompt evaluated in batches of any size (`[engine] prompt_batch`,
/// a `kiln tune` knob) gives the bits of one batch: only speed and work
/// space are at stake.
#[test]
fn a_prompt_in_batches_gives_the_bits_of_one_batch() {
    use kiln_runtime::backend::{Backend, exec::Executor};
    use kiln_runtime::model::{Model, Session, forward::LogitsFor};
    let model = tiny_model(TINY);
    let prompt: Vec<u32> = (0..150).map(|i| 1 + (i * 37 % 290) as u32).collect();
    let run = |batch: usize| {
        let m = Model::load(&model).unwrap();
        let mut s = Session::new(m, Executor::new(Backend::builtin_cpu(), 0), Some(256)).unwrap();
        s.set_prompt_batch(batch);
        assert_eq!(s.prompt_batch(), batch);
        let logits = s.eval(&prompt, LogitsFor::All).unwrap();
        (
            logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s.scratch_bytes(),
        )
    };
    let (whole, whole_scratch) = run(256);
    for batch in [64, 7] {
        let (bits, scratch) = run(batch);
        assert!(
            bits == whole,
            "batches of {batch} tokens changed the logits"
        );
        assert!(scratch < whole_scratch, "{scratch} >= {whole_scratch}");
    }
}

/// The decode graph is built once per session and moved to each position
/// by its follow rules: at every position it is the graph a fresh build
/// makes (every op, every tensor's type, extents and strides, every place
/// outside the scratch), and tokens one at a time give the bits of the
/// same tokens in one batch.
#[test]
fn the_reused_decode_graph_is_the_graph_of_each_position() {
    use kiln_runtime::backend::{Backend, exec::Executor};
    use kiln_runtime::model::forward::{Attention, KvCache, LogitsFor, SCRATCH, build};
    use kiln_runtime::model::{Model, Session};
    let model = tiny_model(TINY);
    let m = Model::load(&model).unwrap();
    let n_ctx = 64;
    let (mut template, _, _) = build(
        &m.config,
        &m.file,
        n_ctx,
        n_ctx - 1,
        1,
        LogitsFor::Last,
        Attention::new(64, KvCache::default()),
    );
    for n_past in [0, 1, 17, 40, n_ctx - 1] {
        for (t, rule) in &template.follows {
            rule.apply(&mut template.tensors[*t], n_past, 1);
        }
        let (fresh, _, _) = build(
            &m.config,
            &m.file,
            n_ctx,
            n_past,
            1,
            LogitsFor::Last,
            Attention::new(64, KvCache::default()),
        );
        assert_eq!(template.tensors.len(), fresh.tensors.len());
        for (i, (a, b)) in template.tensors.iter().zip(&fresh.tensors).enumerate() {
            assert_eq!(a.desc, b.desc, "tensor {i} at n_past {n_past}");
            assert_eq!(a.storage, b.storage, "tensor {i}");
            if a.storage != SCRATCH {
                assert_eq!(a.offset, b.offset, "tensor {i} at n_past {n_past}");
            }
        }
        for (a, b) in template.ops.iter().zip(&fresh.ops) {
            assert_eq!(
                (a.kind, &a.src, a.dst, a.params),
                (b.kind, &b.src, b.dst, b.params)
            );
        }
    }
    let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37 % 290) as u32).collect();
    let new = || {
        Session::new(
            m.clone(),
            Executor::new(Backend::builtin_cpu(), 0),
            Some(n_ctx),
        )
        .unwrap()
    };
    let mut batch = new();
    let all = batch.eval(&prompt, LogitsFor::All).unwrap();
    let mut one_by_one = new();
    let mut rows = Vec::new();
    for &t in &prompt {
        rows.extend(one_by_one.eval(&[t], LogitsFor::Last).unwrap());
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&rows) == bits(&all),
        "decode steps differ from the batch"
    );
}

/// Q4_0 and Q5_0 weights repacked at load for the CPU kernels
/// (interleaved on AVX-512, and Q4_0 on AVX2) give the very logits of the
/// file's layout, on the kernels and on the reference, and the file is
/// never written.
#[test]
fn repacked_weights_give_the_bits_of_the_file_layout() {
    use kiln_cpu::kernels::Isa;
    use kiln_plugin_api::DType;
    use kiln_runtime::backend::{Backend, exec::Executor};
    use kiln_runtime::model::{Model, Session, forward::LogitsFor};
    const WIDE: &[&str] = &[
        "--arch",
        "llama",
        "--dtype",
        "f16",
        "--embd",
        "512",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--ff",
        "544",
        "--vocab",
        "300",
    ];
    let home = Home::default();
    let src = tiny_model(WIDE);
    for (ty, name, layout) in [
        (DType::Q4_0, "q4_0", DType::Q4_0X16),
        (DType::Q5_0, "q5_0", DType::Q5_0X16),
    ] {
        let file = home.path().join(format!("{name}.gguf"));
        home.ok(&[
            "quantize",
            src.to_str().unwrap(),
            file.to_str().unwrap(),
            "--type",
            name,
        ]);
        let before = kiln_tests::sha256_file(&file);
        let cpu = Backend::builtin_cpu();
        let want = cpu.weight_layout(0, ty);
        let isa = Isa::current();
        if isa == Isa::Avx512 || (isa >= Isa::Avx2 && ty == DType::Q4_0) {
            assert_eq!(want, layout);
        }
        let packed = Model::load_for(&file, &cpu, 0).unwrap();
        for t in &packed.file.tensors {
            let matrix = t.name.starts_with("blk.") && t.name.ends_with("_up.weight");
            if matrix {
                assert_eq!(t.dtype, want, "{}", t.name);
            }
            if t.name == "token_embd.weight" {
                assert_eq!(t.dtype, ty, "rows of the embedding are read one by one");
            }
        }
        // Repacking reads the file into memory: one copy, counted.
        let copied = if want == layout {
            std::fs::metadata(&file).unwrap().len()
        } else {
            0
        };
        assert_eq!(packed.file.copied_bytes(), copied);
        let prompt: Vec<u32> = (0..40).map(|i| 1 + (i * 37 % 290) as u32).collect();
        for backend in [Backend::builtin_cpu(), Backend::reference_cpu()] {
            let run = |m| {
                let mut s = Session::new(m, Executor::new(backend.clone(), 0), Some(64)).unwrap();
                let mut all = s.eval(&prompt, LogitsFor::All).unwrap();
                for t in [5, 77, 123] {
                    all.extend(s.eval(&[t], LogitsFor::Last).unwrap());
                }
                all.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert!(
                run(Model::load(&file).unwrap()) == run(Model::load_for(&file, &cpu, 0).unwrap()),
                "{} {name}: repacked weights changed the logits",
                backend.name()
            );
        }
        drop(packed);
        assert_eq!(
            kiln_tests::sha256_file(&file),
            before,
            "loading wrote the model file"
        );
    }
}

/// `kiln doctor` reports what each active model needs (weights, the KV
/// cache at its default context, a prompt batch's work space) against the
/// memory available, with the numbers a session allocates; a model file
/// that cannot be read is a problem named with the cause.
#[test]
fn doctor_reports_each_active_models_memory_budget() {
    use kiln_runtime::model::session::{DEFAULT_BATCH, Session, default_n_ctx};
    use kiln_runtime::model::{Model, forward};
    let home = Home::default();
    let path = tiny_model(TINY);
    home.ok(&["models", "add", path.to_str().unwrap(), "--name", "coder"]);
    let v = home.json(&["doctor", "--json"]);
    let m = &v["models"][0];
    assert_eq!(m["model"], "coder@1", "{v:#}");
    let model = Model::load(&path).unwrap();
    let n_ctx = default_n_ctx(&model.config, None);
    assert_eq!(m["n_ctx"].as_u64().unwrap() as usize, n_ctx);
    assert_eq!(m["weights_bytes"].as_u64().unwrap(), model.weight_bytes());
    assert_eq!(
        m["kv_bytes"].as_u64().unwrap() as usize,
        forward::kv_bytes(&model.config, forward::KvCache::default(), n_ctx)
    );
    // The work space of a prompt batch: a session that evaluates one
    // allocates that much.
    let scratch = m["scratch_bytes"].as_u64().unwrap() as usize;
    assert!(scratch > 0);
    let mut s = Session::new(
        model.clone(),
        kiln_runtime::backend::exec::Executor::new(
            kiln_runtime::backend::Backend::builtin_cpu(),
            0,
        ),
        None,
    )
    .unwrap();
    let batch: Vec<u32> = (0..DEFAULT_BATCH.min(n_ctx) as u32)
        .map(|i| 1 + i % 200)
        .collect();
    s.eval(&batch, forward::LogitsFor::Last).unwrap();
    assert_eq!(s.scratch_bytes(), scratch);
    // On the CPU, with a KV cache for each of the requests `kiln serve`
    // decodes together (`[engine] decode_batch`, 4 by default).
    let kv = forward::kv_bytes(&model.config, forward::KvCache::default(), n_ctx);
    assert_eq!(m["sequences"], 4, "{v:#}");
    assert_eq!(m["batch_kv_bytes"].as_u64().unwrap() as usize, 3 * kv);
    assert_eq!(
        m["total_bytes"].as_u64().unwrap(),
        (model.weight_bytes() as usize + 4 * kv + scratch) as u64
    );
    assert_eq!(m["fits"], true);
    assert!(v["memory"]["available_bytes"].as_u64().unwrap() > 0);
    // A registered file that has gone bad: named, with advice.
    let listed = home.json(&["models", "list", "--json"]);
    let blob = listed["models"][0]["blob_path"]
        .as_str()
        .unwrap()
        .to_string();
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    std::fs::write(&blob, b"not a model").unwrap();
    let out = home.command(&["doctor", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("model coder@1 cannot be read")
            && problems.contains("kiln models verify"),
        "{problems}"
    );
}

#[test]
fn the_kv_cache_type_comes_from_the_flag_else_config_toml_per_model() {
    let home = Home::default();
    // Heads of 32: quantized caches take whole blocks of a head.
    let mut shape = TINY.to_vec();
    shape[5] = "128";
    let model = tiny_model(&shape);
    home.ok(&["models", "add", model.to_str().unwrap(), "--name", "coder"]);
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "coder",
            "--prompt-tokens",
            "40",
            "--decode-tokens",
            "4",
        ];
        args.extend_from_slice(extra);
        args.push("--json");
        home.json(&args)
    };
    let v = bench(&[]);
    assert_eq!(v["kv_type"], "f16", "{v:#}");
    assert_eq!(v["fused_attention"], true, "{v:#}");
    let f16_bytes = v["kv_bytes"].as_u64().unwrap();
    // Per model in config.toml, by name: q8_0 blocks of 32 take 34 bytes.
    std::fs::write(
        home.path().join("config.toml"),
        "[kv_cache]\ntype = \"q4_0\"\n[kv_cache.models]\ncoder = \"q8_0\"\n",
    )
    .unwrap();
    let v = bench(&[]);
    assert_eq!(v["kv_type"], "q8_0", "{v:#}");
    assert_eq!(v["kv_bytes"].as_u64().unwrap(), f16_bytes * 34 / 64);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // The flag wins; other models get `type`.
    assert_eq!(bench(&["--kv-type", "f16"])["kv_type"], "f16");
    // Repeated, the fastest of the prompt's runs is reported.
    let v = bench(&["--repetitions", "3"]);
    let each: Vec<f64> = (v["prompt_tokens_per_s_each"].as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(each.len(), 3, "{v:#}");
    let best = each.iter().copied().fold(0.0, f64::max);
    assert!(
        (v["prompt_tokens_per_s"].as_f64().unwrap() - best).abs() < 1e-9 * best,
        "{v:#}"
    );
    assert!(
        home.fails(&["bench", "coder", "--repetitions", "0"])
            .contains("at least 1")
    );
    let v = home.json(&["doctor", "--json"]);
    assert_eq!(v["models"][0]["kv_type"], "q8_0", "{v:#}");
    let out = home.json(&[
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "a",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert!(out["token_ids"].is_array(), "{out:#}");
    // Bad names are refused, with the choices or the line to fix.
    // (A usage error: clap's exit status, 2.)
    let out = home.kiln(&["bench", "coder", "--kv-type", "q5_1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("f16, q8_0 or q4_0"), "{err}");
    let narrow = tiny_model(TINY);
    let err = home.fails(&["bench", narrow.to_str().unwrap(), "--kv-type", "q4_0"]);
    assert!(
        err.contains("multiple of 32") && err.contains("is 16") && err.contains("use f16"),
        "{err}"
    );
    std::fs::write(
        home.path().join("config.toml"),
        "[kv_cache]\ntype = \"q5_1\"\n",
    )
    .unwrap();
    let err = home.fails(&["run", model.to_str().unwrap(), "--prompt", "a"]);
    assert!(
        err.contains("config.toml is not a valid kiln config") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn a_prompt_switched_back_to_comes_from_the_prefix_tree_with_the_same_logits() {
    use kiln_runtime::backend::Backend;
    use kiln_runtime::backend::exec::Executor;
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::{Model, Session};
    let m = Model::load(&tiny_model(TINY)).unwrap();
    let session = || {
        Session::new(
            m.clone(),
            Executor::new(Backend::builtin_cpu(), 0),
            Some(256),
        )
    };
    // Two files' prompts, then the first again with a few more tokens.
    let a: Vec<u32> = (0..120).map(|i| 3 + i % 250).collect();
    let b: Vec<u32> = (0..100).map(|i| 7 + (i * 7) % 250).collect();
    let tail = [11u32, 12, 13];
    let again: Vec<u32> = a.iter().chain(&tail).copied().collect();
    let mut s = session().unwrap();
    for p in [&a, &b] {
        let n = s.reuse_prefix(p);
        assert_eq!(n, 0);
        s.eval(&p[n..], LogitsFor::Last).unwrap();
    }
    // b replaced a in the live cache; a was kept in the tree.
    assert!(s.prefix_bytes() > 0);
    let n = s.reuse_prefix(&again);
    assert_eq!(n, a.len());
    assert_eq!(
        (s.prefix_restores, s.prefix_restored_tokens),
        (1, a.len() as u64)
    );
    let got = s.eval(&again[n..], LogitsFor::All).unwrap();
    // The same bits as a session that never left a.
    let mut stayed = session().unwrap();
    stayed.eval(&a, LogitsFor::Last).unwrap();
    let want = stayed.eval(&tail, LogitsFor::All).unwrap();
    assert_eq!(
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // And b is kept now: back to it, from the tree again.
    assert_eq!(s.reuse_prefix(&b), b.len() - 1);
    assert_eq!(s.prefix_restores, 2);
    // Typing at the end of a prompt keeps the live cache and the tree as
    // they were.
    let bytes = s.prefix_bytes();
    let mut typed = b.clone();
    *typed.last_mut().unwrap() = 99;
    typed.push(100);
    assert_eq!(s.reuse_prefix(&typed), b.len() - 1);
    assert_eq!((s.prefix_restores, s.prefix_bytes()), (2, bytes));
    // Without a budget, nothing is kept.
    let mut none = session().unwrap().with_prefix_budget(0);
    none.eval(&a, LogitsFor::Last).unwrap();
    assert_eq!(none.reuse_prefix(&b), 0);
    none.eval(&b, LogitsFor::Last).unwrap();
    assert_eq!(none.reuse_prefix(&again), 0);
    assert_eq!(none.prefix_bytes(), 0);
}

#[test]
fn the_kv_cache_grows_by_pages_and_keeps_what_it_holds() {
    use kiln_runtime::backend::Backend;
    use kiln_runtime::backend::exec::Executor;
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::{Model, Session};
    let m = Model::load(&tiny_model(TINY)).unwrap();
    let session = || {
        Session::new(
            m.clone(),
            Executor::new(Backend::builtin_cpu(), 0),
            Some(1024),
        )
    };
    let a: Vec<u32> = (0..300).map(|i| 3 + (i * 13) % 250).collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // One page first; 200 positions fit it.
    let mut s = session().unwrap();
    assert_eq!(s.capacity(), 256);
    let page = s.kv_bytes();
    s.eval(&a[..200], LogitsFor::Last).unwrap();
    assert_eq!(s.capacity(), 256);
    // 100 more: the cache doubles, its 200 positions moved.
    let grown = s.eval(&a[200..], LogitsFor::All).unwrap();
    assert_eq!((s.capacity(), s.kv_bytes()), (512, 2 * page));
    let mut whole = session().unwrap();
    let all = whole.eval(&a, LogitsFor::All).unwrap();
    assert_eq!(bits(&grown), bits(&all[all.len() - grown.len()..]));
    // A prefix kept before the cache grew comes back into the grown one.
    let b: Vec<u32> = (0..40).map(|i| 7 + i).collect();
    let c: Vec<u32> = (0..600).map(|i| 5 + (i * 3) % 250).collect();
    let mut s = session().unwrap();
    s.eval(&b, LogitsFor::Last).unwrap();
    assert_eq!(s.reuse_prefix(&c), 0);
    s.eval(&c, LogitsFor::Last).unwrap();
    assert_eq!(s.capacity(), 768);
    let back: Vec<u32> = b.iter().chain(&[1, 2]).copied().collect();
    assert_eq!(s.reuse_prefix(&back), b.len());
    let got = s.eval(&back[b.len()..], LogitsFor::All).unwrap();
    let mut fresh = session().unwrap();
    let want = fresh.eval(&back, LogitsFor::All).unwrap();
    assert_eq!(bits(&got), bits(&want[want.len() - got.len()..]));
    // Never past n_ctx.
    let mut s = Session::new(
        m.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(300),
    )
    .unwrap();
    s.eval(&a, LogitsFor::Last).unwrap();
    assert_eq!(s.capacity(), 300);
    assert!(s.eval(&[1], LogitsFor::Last).is_err());
}
