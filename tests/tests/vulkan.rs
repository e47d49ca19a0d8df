//! The Vulkan plugin (`plugins/vulkan`) on Mesa's software Vulkan
//! (lavapipe), as CI runs it: built as a cdylib, added through the gate
//! like any vendor's plugin (every op it claims against the CPU
//! reference), then models run on it: the CPU's greedy tokens, the
//! weights and KV cache resident, a decode step moving a few bytes in and
//! one row of logits out, and the same text through `kiln run` with its
//! buffers mapped or staged.

use kiln_runtime::backend::exec::Executor;
use kiln_runtime::backend::{Backend, BackendSet};
use kiln_tests::{Home, ManifestSpec, greedy_with_transfers, plugin_dir, rust_cdylib, tiny_model};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Lavapipe is a CPU implementation, which the plugin hides unless asked.
/// Set once, before any test of this binary loads the plugin (in this
/// process or in a `kiln` it starts).
fn allow_lavapipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: every test here calls this first, before it starts any
        // thread or loads any library that reads the environment.
        unsafe { std::env::set_var("KILN_VULKAN_ALLOW_CPU", "1") };
    });
}

fn vulkan_dir(home: &Home) -> PathBuf {
    allow_lavapipe();
    let lib = rust_cdylib("kiln-vulkan", "kiln_vulkan");
    plugin_dir(home.path(), &lib, &ManifestSpec::new("vulkan", "0.1.0"))
}

/// The plugin added to `home` (through the gate) and loaded here.
fn vulkan(home: &Home) -> Arc<Backend> {
    let dir = vulkan_dir(home);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let set = BackendSet::load(&home.registry());
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    let b = set
        .backends
        .into_iter()
        .find(|b| b.name() == "vulkan")
        .expect("the Vulkan plugin is active");
    assert!(
        !b.devices.is_empty(),
        "no Vulkan device: install Mesa's lavapipe (apt-get install mesa-vulkan-drivers libvulkan1)"
    );
    b
}

/// Ops the plugin declined so far (they ran on the CPU instead).
fn fallbacks(plugin: &Backend) -> u64 {
    plugin
        .stats
        .ops_unsupported_fallback
        .load(Ordering::Relaxed)
}

#[test]
fn the_vulkan_plugin_passes_the_gate_and_names_its_device() {
    let home = Home::default();
    let plugin = vulkan(&home);
    let info = &plugin.devices[0];
    assert!(info.name.contains("llvmpipe"), "{info:?}");
    assert_ne!(info.uuid, [0; 16], "{info:?}");
    assert!(info.total_memory > 0, "{info:?}");
    let listed = home.json(&["backends", "--json"]);
    let text = listed.to_string();
    assert!(text.contains("llvmpipe"), "{text}");
    // Hidden without the switch: the plugin reports no device, and says why
    // (a warning, printed by default, since it leaves the plugin nothing).
    let without_switch = |args: &[&str]| {
        (home.command(args))
            .env_remove("KILN_VULKAN_ALLOW_CPU")
            .output()
            .unwrap()
    };
    let out = without_switch(&["backends", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CPU implementation, hidden (KILN_VULKAN_ALLOW_CPU=1 shows it)"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("llvmpipe"));
    // `kiln doctor` lists the device, or says why there is none.
    let doctor = home.json(&["doctor", "--json"]);
    let vulkan = |d: &serde_json::Value| {
        d["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "vulkan")
            .cloned()
            .unwrap_or_else(|| panic!("{d:#}"))
    };
    let listed = vulkan(&doctor)["devices"].to_string();
    assert!(listed.contains("llvmpipe"), "{doctor:#}");
    let out = without_switch(&["doctor", "--json"]);
    let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        vulkan(&doctor)["devices"],
        serde_json::json!([]),
        "{doctor:#}"
    );
    assert!(
        doctor["plugin_notes"]
            .to_string()
            .contains("CPU implementation, hidden"),
        "{doctor:#}"
    );
    assert!(
        out.status.success(),
        "no device is not a problem: {doctor:#}"
    );
}

/// A prompt of `n` tokens of a 300-token vocabulary, BOS first.
fn long_prompt(n: u32) -> Vec<u32> {
    std::iter::once(1)
        .chain((0..n - 1).map(|i| 40 + (i * 7) % 250))
        .collect()
}

#[test]
fn models_generate_the_cpus_greedy_tokens_on_vulkan_with_the_cache_on_the_device() {
    let home = Home::default();
    let plugin = vulkan(&home);
    let f16 = |arch: &str, extra: &[&str]| {
        let mut args = vec!["--arch", arch, "--dtype", "f16", "--vocab", "300"];
        args.extend_from_slice(extra);
        tiny_model(&args)
    };
    let quantized = |src: &Path, t: &str| {
        let out = home.path().join(format!(
            "{}-{t}.gguf",
            src.file_stem().unwrap().to_string_lossy()
        ));
        home.ok(&[
            "quantize",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            t,
        ]);
        out
    };
    let llama = f16("llama", &[]);
    let qwen2 = f16("qwen2", &[]);
    let gemma = f16("gemma3", &["--window", "8", "--head-dim", "32"]);
    let models = [
        llama.clone(),
        quantized(&llama, "Q8_0"),
        quantized(&llama, "Q4_0"),
        quantized(&qwen2, "Q4_1"),
        quantized(&qwen2, "Q5_0"),
        quantized(&llama, "Q5_1"),
        gemma,
    ];
    // Longer than a tile of the prompt kernel (mul_mm.glsl) in both
    // directions, so the prompt runs tiled and the steps after it do not.
    let prompt = long_prompt(41);
    for model in &models {
        let fallback = fallbacks(&plugin);
        // The device runs attention unfused (it has no fused op yet).
        let cpu = kiln_tests::greedy_unfused(model, &prompt, 10);
        let (dev, moved) =
            greedy_with_transfers(model, Executor::new(plugin.clone(), 0), &prompt, 10);
        assert_eq!(dev, cpu, "{}: greedy tokens on Vulkan", model.display());
        assert_eq!(
            fallbacks(&plugin),
            fallback,
            "{}: every op ran on the device",
            model.display()
        );
        kiln_tests::assert_decode_transfers(model.as_path(), &moved, 300);
    }
    assert_eq!(
        plugin.stats.runtime_failures_rerun.load(Ordering::Relaxed),
        0
    );
}

/// A LoRA adapter applied at run time on the device: its pairs (f32)
/// uploaded with the weights, its two products per projection run there
/// beside the quantized ones, the CPU's greedy tokens.
#[test]
fn an_adapted_model_generates_the_cpus_greedy_tokens_on_vulkan() {
    use kiln_finetune::train::model::{Adapter, Base};
    let home = Home::default();
    let plugin = vulkan(&home);
    let f16 = tiny_model(&["--arch", "llama", "--dtype", "f16", "--vocab", "300"]);
    let model = home.path().join("tiny-q8_0.gguf");
    home.ok(&[
        "quantize",
        f16.to_str().unwrap(),
        model.to_str().unwrap(),
        "--type",
        "Q8_0",
    ]);
    let base = Base::open(&model).unwrap();
    let mut adapter = Adapter::<f32>::new(&base, 4, 8.0, &[0, 1, 2, 3, 4, 5, 6], 5);
    let mut rng = fastrand::Rng::with_seed(11);
    for p in adapter.pairs_mut() {
        p.b.iter_mut()
            .for_each(|b| *b = (rng.f32() * 2.0 - 1.0) * 0.5);
    }
    let file = home.path().join("adapter.gguf");
    kiln_finetune::train::file::write_adapter(&file, &base, &adapter).unwrap();
    let prompt = long_prompt(41);
    let plain = kiln_tests::greedy_unfused(&model, &prompt, 10);
    let cpu = Executor::new(Backend::builtin_cpu(), 0);
    let (cpu, _) = kiln_tests::greedy_adapted(&model, &file, cpu, &prompt, 10, true);
    assert_ne!(cpu, plain, "the adapter should change the greedy tokens");
    let fallback = fallbacks(&plugin);
    let device = Executor::new(plugin.clone(), 0);
    let (dev, moved) = kiln_tests::greedy_adapted(&model, &file, device, &prompt, 10, false);
    assert_eq!(dev, cpu, "greedy tokens of the adapted model on Vulkan");
    assert_eq!(fallbacks(&plugin), fallback, "every op ran on the device");
    kiln_tests::assert_decode_transfers(model.as_path(), &moved, 300);
}

/// K-quants (rows of 256-element blocks: a wider model), every product on
/// the device, the CPU's tokens.
#[test]
fn k_quant_models_generate_the_cpus_greedy_tokens_on_vulkan() {
    let home = Home::default();
    let plugin = vulkan(&home);
    let wide = tiny_model(&[
        "--arch", "llama", "--dtype", "f16", "--embd", "256", "--ff", "512", "--vocab", "300",
    ]);
    let prompt = long_prompt(37);
    for t in ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K"] {
        let model = home.path().join(format!("wide-{t}.gguf"));
        home.ok(&[
            "quantize",
            wide.to_str().unwrap(),
            model.to_str().unwrap(),
            "--type",
            t,
        ]);
        let fallback = fallbacks(&plugin);
        let cpu = kiln_tests::greedy_unfused(&model, &prompt, 8);
        let (dev, _) = greedy_with_transfers(&model, Executor::new(plugin.clone(), 0), &prompt, 8);
        assert_eq!(dev, cpu, "{t}: greedy tokens on Vulkan");
        let fell_back = fallbacks(&plugin) - fallback;
        assert_eq!(fell_back, 0, "{t}: every op on the device");
    }
}

/// `kiln serve` on Vulkan with ops switched off in the plugin (they run on
/// the CPU) and with a device lost, or out of memory, in the middle of the
/// second request (simulated by the plugin: the CPU evaluates the tokens
/// again): every answer is the CPU's, and `/metrics` says what happened.
#[test]
fn kiln_serve_on_vulkan_survives_disabled_ops_and_a_lost_device() {
    use kiln_tests::serve::{completions_then_metrics, demo_model, http_server_env, metric};
    let home = Home::default();
    let dir = vulkan_dir(&home);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let model = demo_model();
    let prompts = ["def add(a, b):", "fn main() {", "class Stack:"];
    let serve = |backend: &str, env: &[(&str, &str)]| {
        let srv = http_server_env(&home, &model, &["--backend", backend], env);
        completions_then_metrics(&srv, &prompts)
    };
    let fallbacks = |metrics: &str, reason: &str| {
        metric(
            metrics,
            &format!("kiln:backend_fallbacks_total{{backend=\"vulkan\",reason=\"{reason}\"}}"),
        )
    };
    let (cpu, _) = serve("cpu", &[]);
    let (texts, metrics) = serve("vulkan", &[("KILN_VULKAN_DISABLE_OPS", "soft_max,rope")]);
    assert_eq!(texts, cpu, "with soft_max and rope on the CPU");
    assert!(fallbacks(&metrics, "unsupported_op") > 0, "{metrics}");
    for fault in ["lost:3", "oom:3"] {
        let (texts, metrics) = serve("vulkan", &[("KILN_VULKAN_FAULT", fault)]);
        assert_eq!(texts, cpu, "{fault}");
        assert_eq!(fallbacks(&metrics, "device_lost"), 1, "{fault}: {metrics}");
    }
}

/// `kiln run --json MODEL` with `--backend backend` and `env`: its text,
/// after checking that the weights' upload was reported and that, on a
/// plugin, no op failed there, and every op ran there unless a narrowed
/// binding range leaves some to the CPU.
fn run_text(home: &Home, model: &Path, backend: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = home.command(&[
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "abc",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--backend",
        backend,
        "--json",
    ]);
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Only the named backend's devices are measured.
    let other = if backend == "cpu" { "vulkan" } else { "cpu" };
    assert!(
        !stderr.contains(&format!("measuring {other} device")),
        "{stderr}"
    );
    // The weights' upload is reported (on a terminal as it goes).
    assert_eq!(
        stderr.contains(&format!("uploading the weights to {backend}:0: done")),
        backend == "vulkan",
        "{stderr}"
    );
    if backend == "vulkan" {
        let stats = &v["backend_stats"];
        assert!(stats["ops_run"].as_u64().unwrap() > 0, "{v}");
        let narrowed = env.iter().any(|(k, _)| *k == "KILN_VULKAN_MAX_RANGE");
        if !narrowed {
            assert_eq!(stats["ops_unsupported_on_cpu"], 0, "{env:?}: {v}");
        }
        for failed in ["segments_rerun_on_cpu", "device_losses"] {
            assert_eq!(stats[failed], 0, "{env:?}: {v}");
        }
    }
    v["text"].as_str().unwrap().to_string()
}

/// `kiln run` on Vulkan, its buffers mapped (lavapipe's memory is the
/// host's), through staging copies as on a discrete GPU, and with a
/// binding range narrower than the embeddings and the output matrix (split
/// by rows): the CPU's text, every op on the device.
#[test]
fn kiln_run_on_vulkan_gives_the_cpus_text_mapped_staged_or_split() {
    let home = Home::default();
    let dir = vulkan_dir(&home);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let model = tiny_model(&["--arch", "llama", "--dtype", "f16", "--vocab", "300"]);
    let cpu = run_text(&home, &model, "cpu", &[]);
    for env in [
        &[][..],
        &[("KILN_VULKAN_STAGING", "1")],
        &[("KILN_VULKAN_MAX_RANGE", "8192")],
    ] {
        assert_eq!(run_text(&home, &model, "vulkan", env), cpu, "{env:?}");
    }
}

/// A model file larger than the device's largest allocation goes up in
/// several buffers (runs of whole tensors) and gives the CPU's text with
/// every op on the device; where the work space cannot fit one buffer,
/// the model is refused up front with the numbers.
#[test]
fn weights_larger_than_one_allocation_go_up_in_pieces() {
    let home = Home::default();
    let dir = vulkan_dir(&home);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    // 4.8 MiB of weights; the work space is under 2 MB.
    let model = tiny_model(&[
        "--arch", "llama", "--dtype", "f16", "--vocab", "300", "--embd", "256", "--ff", "512",
        "--layers", "4",
    ]);
    let cpu = run_text(&home, &model, "cpu", &[]);
    let split = [("KILN_VULKAN_MAX_ALLOC", "2000000")];
    assert_eq!(run_text(&home, &model, "vulkan", &split), cpu);
    // The device benchmark's 2048 × 2048 matrices fit no allocation
    // there: the device scores 0 with the reason (and is used when named,
    // as above), not cached.
    let out = home
        .command(&["backends", "--json"])
        .envs(split)
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vulkan = &listed["backends"][1];
    assert_eq!(vulkan["name"], "vulkan", "{listed:#}");
    assert_eq!(vulkan["devices"][0]["score"], 0.0, "{listed:#}");
    assert_eq!(vulkan["devices"][0]["score_cached"], false, "{listed:#}");
    assert_eq!(listed["chosen"]["backend"], "cpu", "{listed:#}");
    assert!(
        listed["problems"].to_string().contains(
            "benchmark failed on vulkan device 0: out of memory: a buffer of 2359296 bytes"
        ),
        "{listed:#}"
    );
    let out = home
        .command(&[
            "run",
            model.to_str().unwrap(),
            "--prompt",
            "abc",
            "--backend",
            "vulkan",
        ])
        .env("KILN_VULKAN_MAX_ALLOC", "1000000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the work space needs one buffer of")
            && stderr.contains("allocates at most 976.6 KiB at once")
            && stderr.contains("--ctx"),
        "{stderr}"
    );
}

/// The gate's cases on device 0, each with its outcome, from `kiln
/// plugins add --json` run with `env`.
fn gate_cases(env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    gate_run(env).0
}

/// [`gate_cases`] and what the plugin logged at the info level.
fn gate_run(env: &[(&str, &str)]) -> (Vec<serde_json::Value>, String) {
    let home = Home::default();
    let dir = vulkan_dir(&home);
    let out = home
        .command(&["plugins", "add", dir.to_str().unwrap(), "--json"])
        .env("KILN_LOG", "info")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cases = v["cases"][0]["cases"].as_array().unwrap().clone();
    (cases, stderr.into_owned())
}

/// A device whose binding range is smaller than a weight matrix (forced
/// here) runs a matmul or a row lookup over it in parts of whole rows, and
/// passes the gate so; an activation larger than the range is not claimed.
#[test]
fn weights_larger_than_a_binding_are_split_by_rows_and_pass_the_gate() {
    let cases = gate_cases(&[("KILN_VULKAN_MAX_RANGE", "2560")]);
    let outcome = |label: &str| {
        let c = cases.iter().find(|c| c["case"] == label);
        c.unwrap_or_else(|| panic!("no case {label}: {cases:#?}"))["outcome"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // 2688, 2940, 10240 and 2720 bytes of weights: split.
    for label in [
        "mul_mat(f32[96,7], f32[96]) -> f32[7]",
        "mul_mat(f32[96,7], f32[96,5]) -> f32[7,5]",
        "mul_mat(q6_k[512,7], f32[512]) -> f32[7]",
        "get_rows(f32[256,10], i32[2]) -> f32[256,2]",
        "get_rows(q8_0[256,10], i32[2]) -> f32[256,2]",
    ] {
        assert_eq!(outcome(label), "passed", "{label}");
    }
    // 10240 bytes of activations: no binding holds them.
    assert_eq!(
        outcome("mul_mat(q6_k[512,7], f32[512,5]) -> f32[7,5]"),
        "not_claimed"
    );
}

/// CPY into every 32-element quantized type the CPU writes runs on the
/// device and writes the CPU's blocks: the dequantized results are equal
/// (NMSE 0), so every scale and code matched.
#[test]
fn copies_into_quantized_types_write_the_cpus_blocks() {
    let cases = gate_cases(&[]);
    let mut seen = 0;
    for case in &cases {
        let label = case["case"].as_str().unwrap();
        if label.starts_with("cpy(f32[64,3]) -> q") {
            assert_eq!(case["outcome"], "passed", "{case}");
            assert_eq!(case["nmse"], 0.0, "{case}");
            seen += 1;
        }
    }
    assert_eq!(seen, 5, "q4_0, q4_1, q5_0, q5_1, q8_0: {cases:?}");
}

/// Without shaderFloat64 (Apple's GPUs, some Intel ones), or on a GPU that
/// runs doubles slowly, MUL_MAT sums in float; without subgroup arithmetic
/// it reduces through shared memory; without the shared memory of a tile
/// prompts run as decode does; with packed 8-bit dot products and f16
/// arithmetic (forced on here, as on a GPU: lavapipe has both but does not
/// accelerate them) tiles of quantized weights take the dot products and
/// tiles of F16 weights multiply in f16, without overflowing where the CPU
/// does not (the gate has a case for that). Every combination is within
/// the gate's bounds, every case claimed, and the log names the paths the
/// device took.
#[test]
fn matmuls_on_every_path_pass_the_gate() {
    let runs: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("KILN_VULKAN_NO_F64", "1"),
                ("KILN_VULKAN_NO_SUBGROUPS", "1"),
                ("KILN_VULKAN_NO_TILES", "1"),
            ],
            "matmul sums in float, subgroup reductions: no, tiled prompts: no, \
             packed 8-bit dot products: no, f16 arithmetic: no",
        ),
        (
            &[
                ("KILN_VULKAN_F64", "0"),
                ("KILN_VULKAN_DOT", "1"),
                ("KILN_VULKAN_FP16", "1"),
            ],
            "matmul sums in float, subgroup reductions: yes, tiled prompts: yes, \
             packed 8-bit dot products: yes, f16 arithmetic: yes",
        ),
        (
            &[],
            "matmul sums in double, subgroup reductions: yes, tiled prompts: yes, \
             packed 8-bit dot products: no, f16 arithmetic: no",
        ),
    ];
    for (env, paths) in runs {
        let (cases, log) = gate_run(env);
        assert!(log.contains(paths), "{env:?}: {log}");
        let matmuls: Vec<_> = (cases.iter())
            .filter(|c| c["case"].as_str().unwrap().starts_with("mul_mat("))
            .collect();
        let passed = matmuls.iter().filter(|c| c["outcome"] == "passed").count();
        assert_eq!(passed, matmuls.len(), "{env:?}: {matmuls:#?}");
        // Summing in double gives the CPU's results to about the last bit,
        // decode and prompt kernels alike (one Q8_0 case is 1e-8 off in
        // both, from the activations' rounding they share; cause not yet
        // found), far inside the gate's bound.
        if env.is_empty() {
            for c in &matmuls {
                assert!(c["nmse"].as_f64().unwrap() < 1e-7, "{c}");
            }
        }
    }
}
