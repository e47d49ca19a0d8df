//! Real plugins end to end: a C plugin compiled here against the header, a
//! plugin built for ABI 1.0, the CPU backend built as a Rust cdylib. Each is
//! added through the real `kiln` binary (preflight, dlopen, negotiation,
//! conformance, store, registry) and then run through the host's executor.

use kiln_plugin_api::types::f32_param;
use kiln_plugin_api::{DType, OpKind};
use kiln_runtime::backend::exec::{Executor, HostGraph, HostOp, HostTensor};
use kiln_runtime::backend::{Backend, BackendSet};
use kiln_tests::{Home, ManifestSpec, c_fixture, plugin_dir, rust_cdylib};
use std::sync::atomic::Ordering;

/// A decoder-shaped graph: matmul, residual add, norm, rope, silu, mul.
/// `width` sets the hidden size (the fixture's FAIL_LARGE variant fails
/// above 4096 elements).
fn decoder_graph(width: usize, seed: u64) -> HostGraph {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut rand = |n: usize| (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect::<Vec<f32>>();
    let tokens = 3;
    let mut g = HostGraph::default();
    let w = g.add_tensor(HostTensor::from_f32(
        [width, width, 1, 1],
        &rand(width * width),
    ));
    let x = g.add_tensor(HostTensor::from_f32(
        [width, tokens, 1, 1],
        &rand(width * tokens),
    ));
    let norm_w = g.add_tensor(HostTensor::from_f32([width, 1, 1, 1], &rand(width)));
    let pos = g.add_tensor(HostTensor::from_i32([tokens, 1, 1, 1], &[0, 1, 2]));
    let h = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    let r = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    let n = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    let nw = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    let roped = g.add_tensor(HostTensor::zeros(DType::F32, [width / 8, 8, tokens, 1]));
    let act = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    let out = g.add_tensor(HostTensor::zeros(DType::F32, [width, tokens, 1, 1]));
    g.ops.push(HostOp::new(OpKind::MulMat, &[w, x], h));
    g.ops.push(HostOp::new(OpKind::Add, &[h, x], r));
    g.ops
        .push(HostOp::new(OpKind::RmsNorm, &[r], n).with_params(&[f32_param(1e-5)]));
    g.ops.push(HostOp::new(OpKind::Mul, &[n, norm_w], nw));
    // rope views the hidden state as [head_dim, heads, tokens]: same bytes.
    g.tensors[roped].data = vec![0; g.tensors[nw].data.len()];
    g.ops.push(HostOp::new(OpKind::Cpy, &[nw], act));
    g.ops.push(HostOp::new(OpKind::Silu, &[act], out));
    let rope_in = g.add_tensor(HostTensor::from_f32(
        [width / 8, 8, tokens, 1],
        &rand(width * tokens),
    ));
    g.ops.push(
        HostOp::new(OpKind::Rope, &[rope_in, pos], roped).with_params(&[
            (width / 8) as i32,
            2,
            f32_param(10000.0),
            f32_param(1.0),
        ]),
    );
    g
}

fn cpu_result(mut g: HostGraph) -> Vec<Vec<f32>> {
    Executor::new(Backend::builtin_cpu(), 0)
        .run(&mut g.as_graph())
        .unwrap();
    g.tensors.iter().map(|t| t.to_f32()).collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "tensor {i}: {x} vs {y}"
            );
        }
    }
}

/// The C fixture device `accel` (f32 products, adds, muls and norms; the
/// rest falls back to the CPU), added to `home`.
fn accel(home: &Home) -> std::sync::Arc<Backend> {
    let lib = c_fixture("kiln_fixture_model", &[]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("accel", "1.0.0"));
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    added_backend(home, "accel")
}

fn added_backend(home: &Home, name: &str) -> std::sync::Arc<Backend> {
    let set = BackendSet::load(&home.registry());
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    set.backends
        .into_iter()
        .find(|b| b.name() == name)
        .expect("plugin is active")
}

#[test]
fn c_plugin_loads_passes_conformance_and_runs_ops_with_cpu_fallback() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_good", &[]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("c-fixture", "0.1.0"));
    let added = home.json(&["plugins", "add", dir.to_str().unwrap(), "--json"]);
    let c = &added["conformance"];
    assert_eq!(c["failed"], 0, "{added:#}");
    // The fixture claims f32 matmul (3 cases), add (2), mul (2), scale,
    // silu and rms_norm.
    assert_eq!(c["passed"], 10, "{added:#}");
    assert!(c["not_claimed"].as_u64().unwrap() > 0, "{added:#}");

    let plugin = added_backend(&home, "c-fixture");
    assert_eq!(plugin.devices[0].name, "kiln C fixture device");
    assert_eq!(&plugin.devices[0].uuid, b"kiln-c-fixture!!");
    assert_eq!(
        plugin.handle().device_memory(0).unwrap().unwrap(),
        (1 << 29, 1 << 30)
    );
    let mut g = decoder_graph(64, 1);
    let want = cpu_result(g.clone());
    let exec = Executor::new(plugin.clone(), 0);
    assert_eq!(
        exec.plan(&g.as_graph()),
        vec![true, true, true, true, false, true, false]
    );
    let report = exec.run(&mut g.as_graph()).unwrap();
    assert_eq!(report.ops_on_target, 5);
    assert_eq!(report.ops_unsupported_on_cpu, 2);
    assert!(report.reruns.is_empty());
    let got: Vec<Vec<f32>> = g.tensors.iter().map(|t| t.to_f32()).collect();
    assert_close(&got, &want);
    assert!(
        plugin
            .stats
            .ops_unsupported_fallback
            .load(Ordering::Relaxed)
            >= 2
    );

    // The devices are scored and the best one chosen; scores are cached.
    let b = home.json(&["backends", "--json"]);
    let devices: Vec<&serde_json::Value> = b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| x["devices"].as_array().unwrap())
        .collect();
    assert_eq!(devices.len(), 2, "{b:#}");
    let best = devices
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert_eq!(b["chosen"]["score"].as_f64().unwrap(), best);
    let fixture = &b["backends"][1];
    assert_eq!(fixture["name"], "c-fixture");
    assert_eq!(
        fixture["abi"],
        format!("1.{}", kiln_plugin_api::KILN_ABI_VERSION_MINOR)
    );
    // It has no Q4_0 product: it is measured with F32 weights.
    let measured = &fixture["devices"][0]["measurement"];
    assert_eq!(measured["weights"], "f32", "{b:#}");
    assert!(measured["decode_graph_ms"].as_f64().unwrap() > 0.0, "{b:#}");
    assert!(measured["prompt_batch_ms"].as_f64().unwrap() > 0.0, "{b:#}");
    assert_eq!(
        b["backends"][0]["devices"][0]["measurement"]["weights"],
        "q4_0"
    );
    let again = home.json(&["backends", "--json"]);
    assert_eq!(again["backends"][1]["devices"][0]["score_cached"], true);
    assert_eq!(again["chosen"], b["chosen"]);
    // The plugin's row carries its benchmark results.
    let list = home.json(&["plugins", "list", "--json"]);
    assert_eq!(
        list["plugins"][0]["scores"][0]["score"],
        fixture["devices"][0]["score"]
    );
}

#[test]
fn an_op_that_fails_at_run_time_is_rerun_on_the_cpu_and_counted() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_fail_large", &["-DFIXTURE_FAIL_LARGE"]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("small-gpu", "1.0.0"));
    // Conformance shapes are small, so it passes the gate...
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let plugin = added_backend(&home, "small-gpu");
    // ...but a 128-wide layer has a 16384-element weight: the matmul fails.
    let mut g = decoder_graph(128, 2);
    let want = cpu_result(g.clone());
    let exec = Executor::new(plugin.clone(), 0);
    let report = exec.run(&mut g.as_graph()).unwrap();
    assert_eq!(report.reruns.len(), 1, "{report:?}");
    assert_eq!(report.reruns[0].0, 0..4);
    assert!(
        report.reruns[0].1.contains("scratch memory exhausted"),
        "{report:?}"
    );
    assert!(report.reruns[0].1.contains("(op 0)"), "{report:?}");
    let got: Vec<Vec<f32>> = g.tensors.iter().map(|t| t.to_f32()).collect();
    assert_close(&got, &want);
    assert_eq!(
        plugin.stats.runtime_failures_rerun.load(Ordering::Relaxed),
        1
    );
    // A small graph still runs on the plugin.
    let mut small = decoder_graph(32, 3);
    assert!(exec.run(&mut small.as_graph()).unwrap().reruns.is_empty());
}

#[test]
fn a_plugin_built_for_abi_1_0_loads_in_this_host() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_abi_1_0", &["-DKILN_ABI_TARGET_MINOR=0"]);
    let mut spec = ManifestSpec::new("old-plugin", "0.9.0");
    spec.abi = "1.0".into();
    let dir = plugin_dir(home.path(), &lib, &spec);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let plugin = added_backend(&home, "old-plugin");
    assert_eq!(plugin.handle().abi_minor(), 0);
    // The 1.1 additions read as absent, not as garbage.
    assert!(plugin.handle().device_memory(0).is_none());
    assert_eq!(plugin.devices[0].uuid, [0; 16]);
    assert_eq!(plugin.devices[0].name, "kiln C fixture device");
    let b = home.json(&["backends", "--json"]);
    assert_eq!(b["backends"][1]["abi"], "1.0");
    computes_like_the_cpu(&plugin);
}

/// A small decoder graph on `plugin` gives the CPU's results.
fn computes_like_the_cpu(plugin: &std::sync::Arc<Backend>) {
    let mut g = decoder_graph(32, 4);
    let want = cpu_result(g.clone());
    Executor::new(plugin.clone(), 0)
        .run(&mut g.as_graph())
        .unwrap();
    let got: Vec<Vec<f32>> = g.tensors.iter().map(|t| t.to_f32()).collect();
    assert_close(&got, &want);
}

/// A plugin built against the 1.1 header (before `weight_layout`) loads and
/// runs; the 1.2 query reads as absent (GGUF's layouts), and the CPU plugin
/// built with this crate answers it through the ABI.
#[test]
fn a_plugin_built_for_abi_1_1_loads_and_weight_layouts_come_through_the_abi() {
    use kiln_plugin_api::DType;
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_abi_1_1", &["-DKILN_ABI_TARGET_MINOR=1"]);
    let mut spec = ManifestSpec::new("older-plugin", "1.1.0");
    spec.abi = "1.1".into();
    let dir = plugin_dir(home.path(), &lib, &spec);
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let plugin = added_backend(&home, "older-plugin");
    assert_eq!(plugin.handle().abi_minor(), 1);
    assert!(plugin.handle().device_memory(0).is_some());
    assert_eq!(plugin.weight_layout(0, DType::Q5_0), DType::Q5_0);
    computes_like_the_cpu(&plugin);
    // The built-in CPU backend answers through the same call: Q5_0
    // interleaved where its AVX-512 kernels run, Q4_0 there and on AVX2,
    // GGUF's layout elsewhere; its reference never repacks.
    use kiln_cpu::kernels::Isa;
    let cpu = Backend::builtin_cpu();
    let isa = Isa::current();
    let (want4, want5) = match isa {
        Isa::Avx512 => (DType::Q4_0X16, DType::Q5_0X16),
        Isa::Avx2 | Isa::AvxVnni => (DType::Q4_0X16, DType::Q5_0),
        _ => (DType::Q4_0, DType::Q5_0),
    };
    assert_eq!(
        cpu.handle().abi_minor(),
        kiln_plugin_api::KILN_ABI_VERSION_MINOR
    );
    assert_eq!(cpu.weight_layout(0, DType::Q5_0), want5);
    assert_eq!(cpu.weight_layout(0, DType::Q4_0), want4);
    assert_eq!(cpu.weight_layout(0, DType::Q8_0), DType::Q8_0);
    for ty in [DType::Q4_0, DType::Q5_0] {
        assert_eq!(Backend::reference_cpu().weight_layout(0, ty), ty);
    }
}

/// A plugin whose `weight_layout` names a kiln layout of another type, or
/// a number that is no type, is not believed: the host keeps GGUF's layout
/// (repacking Q4_0 rows as Q5_0X16 would scramble the weights).
#[test]
fn a_plugin_naming_a_wrong_weight_layout_is_not_believed() {
    use kiln_plugin_api::DType;
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_bad_layout", &["-DFIXTURE_BAD_LAYOUT"]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("bad-layout", "1.0.0"));
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let plugin = added_backend(&home, "bad-layout");
    assert_eq!(
        plugin.handle().abi_minor(),
        kiln_plugin_api::KILN_ABI_VERSION_MINOR
    );
    for ty in [DType::Q4_0, DType::Q5_0, DType::Q8_0] {
        assert_eq!(plugin.weight_layout(0, ty), ty, "{ty}");
    }
    computes_like_the_cpu(&plugin);
}

#[test]
fn every_cpu_kernel_path_passes_conformance_against_the_reference() {
    // The CPU backend as a plugin, its kernels forced to each path this
    // machine has, is checked case by case against the scalar reference.
    let lib = rust_cdylib("kiln-cpu-plugin", "kiln_cpu_plugin");
    for isa in kiln_cpu::kernels::Isa::available() {
        let home = Home::default();
        let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("cpu-plugin", "0.1.0"));
        let out = home
            .command(&["plugins", "add", dir.to_str().unwrap(), "--json"])
            .env("KILN_CPU_ISA", isa.name())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            isa.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            added["conformance"]["failed"],
            0,
            "{}: {added:#}",
            isa.name()
        );
        // doctor says which path and how many threads kiln runs.
        let out = home
            .command(&["doctor", "--json"])
            .env("KILN_CPU_ISA", isa.name())
            .env("KILN_THREADS", "3")
            .output()
            .unwrap();
        let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doctor["cpu"]["kernels"], isa.name());
        assert_eq!(doctor["cpu"]["threads"], 3);
    }
}

#[test]
fn products_of_one_tensor_in_a_row_give_each_products_own_bits() {
    // Q, K and V (or gate and up) read one tensor in turn, and the CPU
    // backend quantizes it once for all of them. Each result must still be
    // the bits its product gives alone: next to products of other weight
    // types (other activation rows) and after the tensor is overwritten.
    let (k, n) = (256, 32);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut rand = |len: usize| {
        (0..len)
            .map(|_| rng.f32() * 2.0 - 1.0)
            .collect::<Vec<f32>>()
    };
    for m in [1, 8] {
        let mut weights = |dtype: DType| {
            let values = rand(k * n);
            let row = dtype.row_bytes(k).unwrap();
            let mut data = vec![0u8; row * n];
            for (v, d) in values.chunks(k).zip(data.chunks_mut(row)) {
                kiln_blocks::quantize_row(dtype, v, d);
            }
            HostTensor {
                dtype,
                ne: [k, n, 1, 1],
                data,
            }
        };
        let ws = [
            weights(DType::Q8_0),
            weights(DType::Q8_0),
            weights(DType::Q4_0),
            weights(DType::Q4_K),
            weights(DType::Q4_1),
        ];
        let (x, z) = (rand(k * m), rand(k * m));
        // Products of x by weights 0, 1, 2, 3, 1, 0 and 4; then z copied
        // over x and products by 4 (what x's last product had), 0 and 1.
        let before = [0, 1, 2, 3, 1, 0, 4];
        let after = [4, 0, 1];
        let mut g = HostGraph::default();
        let w: Vec<usize> = ws.iter().map(|t| g.add_tensor(t.clone())).collect();
        let xt = g.add_tensor(HostTensor::from_f32([k, m, 1, 1], &x));
        let zt = g.add_tensor(HostTensor::from_f32([k, m, 1, 1], &z));
        let mut outs = Vec::new();
        for (i, &j) in before.iter().chain(&after).enumerate() {
            if i == before.len() {
                g.ops.push(HostOp::new(OpKind::Cpy, &[zt], xt));
            }
            let out = g.add_tensor(HostTensor::zeros(DType::F32, [n, m, 1, 1]));
            g.ops.push(HostOp::new(OpKind::MulMat, &[w[j], xt], out));
            outs.push(out);
        }
        let got = cpu_result(g);
        for (i, &j) in before.iter().chain(&after).enumerate() {
            // Alone: after a product of another tensor, so that nothing
            // made before (where an earlier graph's tensor lay at the same
            // address) can be taken for this one's rows.
            let mut alone = HostGraph::default();
            let wa = alone.add_tensor(ws[j].clone());
            let input = if i < before.len() { &x } else { &z };
            let xa = alone.add_tensor(HostTensor::from_f32([k, m, 1, 1], input));
            let other = alone.add_tensor(HostTensor::from_f32([k, m, 1, 1], &z));
            let first = alone.add_tensor(HostTensor::zeros(DType::F32, [n, m, 1, 1]));
            let out = alone.add_tensor(HostTensor::zeros(DType::F32, [n, m, 1, 1]));
            alone
                .ops
                .push(HostOp::new(OpKind::MulMat, &[wa, other], first));
            alone.ops.push(HostOp::new(OpKind::MulMat, &[wa, xa], out));
            let want = cpu_result(alone);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got[outs[i]]),
                bits(&want[out]),
                "{m} rows, product {i} ({})",
                ws[j].dtype
            );
        }
    }
}

#[test]
fn the_cpu_backend_as_a_rust_cdylib_passes_every_case() {
    let home = Home::default();
    let lib = rust_cdylib("kiln-cpu-plugin", "kiln_cpu_plugin");
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("cpu-plugin", "0.1.0"));
    let added = home.json(&["plugins", "add", dir.to_str().unwrap(), "--json"]);
    let c = &added["conformance"];
    assert_eq!(c["failed"], 0);
    assert_eq!(
        c["not_claimed"], 0,
        "the reference claims every case: {added:#}"
    );
    let list = home.json(&["plugins", "list", "--json"]);
    let p = &list["plugins"][0];
    assert_eq!(p["name"], "cpu-plugin");
    assert_eq!(p["state"], "active");
    // Installed versions are copied into the store, so later changes to the
    // source directory cannot change what kiln loads.
    let stored = std::path::PathBuf::from(p["library_path"].as_str().unwrap());
    assert!(stored.starts_with(home.path().join("store/plugins/cpu-plugin/0.1.0")));
    std::fs::write(dir.join("libkiln_cpu_plugin.so"), b"overwritten").unwrap();
    assert!(
        home.json(&["backends", "--json"])["problems"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // `kiln doctor` loads it and lists its device beside the built-in one.
    let doctor = home.json(&["doctor", "--json"]);
    let names: Vec<_> = (doctor["backends"].as_array().unwrap().iter())
        .map(|b| {
            (
                b["name"].as_str().unwrap(),
                b["devices"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(names, [("cpu", 1), ("cpu-plugin", 1)], "{doctor:#}");
    // The stored copy damaged: one problem, named once (not again when the
    // backends are loaded), and no crash.
    std::fs::write(&stored, b"damaged").unwrap();
    let out = home.kiln(&["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = doctor["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{doctor:#}");
    assert!(
        problems[0].as_str().unwrap().contains("cpu-plugin@0.1.0"),
        "{doctor:#}"
    );
}

#[test]
fn discovered_plugins_are_listed_and_added_by_name() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_discovered", &[]);
    let drop_in = home.path().join("plugins");
    plugin_dir(&drop_in, &lib, &ManifestSpec::new("dropped-in", "1.0.0"));
    let list = home.json(&["plugins", "list", "--json"]);
    assert_eq!(list["discovered_not_installed"][0]["name"], "dropped-in");
    let doctor = home.json(&["doctor", "--json"]);
    assert_eq!(doctor["discovered_plugins"][0]["status"], "not installed");
    home.ok(&["plugins", "add", "dropped-in"]);
    let list = home.json(&["plugins", "list", "--json"]);
    assert!(
        list["discovered_not_installed"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(list["plugins"][0]["name"], "dropped-in");
}

#[test]
fn a_model_runs_on_a_plugin_device_with_the_cpu_taking_the_rest() {
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::{Model, Session};
    let home = Home::default();
    let plugin = accel(&home);
    // An F32 model: the fixture runs its f32 matmuls, adds, muls and norms;
    // rope, softmax, get_rows and the f16 cache writes fall back to the CPU.
    let model_path = kiln_tests::tiny_llama("f32");
    let prompt = [1u32, 40, 41, 42, 43, 44, 45];
    let run = |exec: Executor| {
        let mut s = Session::new(Model::load(&model_path).unwrap(), exec, Some(64)).unwrap();
        // The fixture has no fused attention, so its session runs the
        // unfused graph: the CPU's runs the same one here.
        s.set_unfused_attention().unwrap();
        let mut all = s.eval(&prompt, LogitsFor::All).unwrap();
        all.extend(s.eval(&[50], LogitsFor::Last).unwrap());
        (all, s)
    };
    let (on_cpu, _) = run(Executor::new(Backend::builtin_cpu(), 0));
    let (on_plugin, session) = run(Executor::new(plugin.clone(), 0));
    let ran = plugin.stats.ops_run.load(Ordering::Relaxed);
    let fell_back = plugin
        .stats
        .ops_unsupported_fallback
        .load(Ordering::Relaxed);
    assert!(
        ran > 0 && fell_back > 0,
        "plugin ran {ran} ops, {fell_back} fell back"
    );
    assert_eq!(session.executor().target.name(), "accel");
    // supports_op is asked once per op signature: a decode step asks only
    // about the ops whose shapes grow with the position (attention's).
    let mut session = session;
    let queries = || plugin.stats.supports_op_queries.load(Ordering::Relaxed);
    let before = queries();
    for t in 51..55 {
        session.eval(&[t], LogitsFor::Last).unwrap();
    }
    let per_step = (queries() - before) as f64 / 4.0;
    let m = Model::load(&model_path).unwrap();
    let (graph, _, _) = kiln_runtime::model::forward::build(
        &m.config,
        &m.file,
        64,
        10,
        1,
        LogitsFor::Last,
        kiln_runtime::model::forward::Attention::new(64, Default::default()),
    );
    let ops_per_step = graph.ops.len() as f64;
    // Per layer: K's view, the scores, their mask and softmax, V's view.
    assert!(
        per_step <= 4.0 * m.config.n_layer as f64,
        "{per_step} supports_op queries per decode step of {ops_per_step} ops"
    );
    let max = on_cpu
        .iter()
        .zip(&on_plugin)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // The fixture sums its f32 products in f64, the CPU in f32 lanes
    // (`kiln_blocks::fused_dot`): their last bits differ, and now and then
    // that flips a rounding of K or V to f16 in the cache, which moves a
    // logit by about 7e-4 of their spread here; a misrouted or
    // wrong op moves them by the spread itself.
    let mean = on_cpu.iter().sum::<f32>() / on_cpu.len() as f32;
    let spread =
        (on_cpu.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / on_cpu.len() as f32).sqrt();
    assert!(
        max < 1e-2 * spread,
        "logits differ by {max} (spread {spread})"
    );
    // A cache of 3M positions (768 MiB) does not fit the fixture's 512 MiB
    // free: refused up front, with the numbers, before any allocation.
    let err = Session::new(
        Model::load(&model_path).unwrap(),
        Executor::new(plugin.clone(), 0),
        Some(3 << 20),
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("accel device 0 (kiln C fixture device)")
            && msg.contains("768 MiB of KV cache")
            && msg.contains("it has 512 MiB free"),
        "{msg}"
    );
}

/// The flaky-device fixture (kiln's CPU kernels behind device buffers: see
/// `tests/fixtures/flaky-device`), added through the gate.
fn flaky_devices(home: &Home) -> std::sync::Arc<Backend> {
    let lib = rust_cdylib("kiln-fixture-flaky-device", "kiln_fixture_flaky_device");
    let dir = plugin_dir(
        home.path(),
        &lib,
        &ManifestSpec::new("flaky-device", "0.1.0"),
    );
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    added_backend(home, "flaky-device")
}

#[test]
fn a_decode_step_on_a_device_moves_its_token_in_and_its_logits_out() {
    let home = Home::default();
    let plugin = flaky_devices(&home);
    let f16 = |arch: &str, extra: &[&'static str]| {
        let mut args = vec!["--arch", arch, "--dtype", "f16", "--vocab", "300"];
        args.extend_from_slice(extra);
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        kiln_tests::tiny_model(&owned.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let llama = f16("llama", &[]);
    let q8 = home.path().join("llama-q8_0.gguf");
    let q4k = home.path().join("llama-q4_k_m.gguf");
    for (out, t) in [(&q8, "Q8_0"), (&q4k, "Q4_K_M")] {
        home.ok(&[
            "quantize",
            llama.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            t,
        ]);
    }
    // Gemma 3's windowed layers rewrite a window row each step.
    let gemma = f16("gemma3", &["--window", "8", "--head-dim", "32"]);
    let prompt = [1u32, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49];
    for model in [llama, q8, q4k, gemma] {
        let (cpu, _) = kiln_tests::greedy_with_transfers(
            &model,
            Executor::new(Backend::builtin_cpu(), 0),
            &prompt,
            12,
        );
        let (dev, moved) = kiln_tests::greedy_with_transfers(
            &model,
            Executor::new(plugin.clone(), 0),
            &prompt,
            12,
        );
        assert_eq!(dev, cpu, "{}: the device's greedy tokens", model.display());
        kiln_tests::assert_decode_transfers(model.as_path(), &moved, 300);
    }
    assert_eq!(plugin.stats.device_losses.load(Ordering::Relaxed), 0);
    assert_eq!(
        plugin.stats.runtime_failures_rerun.load(Ordering::Relaxed),
        0
    );
}

/// A device that fails in the middle of a request (device 1 of the
/// fixture: lost for good; device 2: out of memory once) loses the KV cache
/// it held: the session evaluates its tokens again on the CPU and the
/// request goes on, with the CPU's tokens.
#[test]
fn a_device_failing_mid_request_ends_in_a_cpu_rerun_with_the_cpus_tokens() {
    let home = Home::default();
    let plugin = flaky_devices(&home);
    let model = kiln_tests::tiny_model(&["--arch", "qwen2", "--dtype", "f16", "--vocab", "300"]);
    let prompt = [1u32, 60, 61, 62, 63, 64, 65];
    let (cpu, _) = kiln_tests::greedy_with_transfers(
        &model,
        Executor::new(Backend::builtin_cpu(), 0),
        &prompt,
        8,
    );
    for device in [1, 2] {
        let losses = plugin.stats.device_losses.load(Ordering::Relaxed);
        let exec = Executor::new(plugin.clone(), device);
        let (got, _) = kiln_tests::greedy_with_transfers(&model, exec, &prompt, 8);
        assert_eq!(got, cpu, "device {device}");
        assert_eq!(
            plugin.stats.device_losses.load(Ordering::Relaxed),
            losses + 1,
            "device {device}"
        );
    }
}

/// `kiln serve` on a device that is lost in the middle of the second
/// request: every request is answered, with the CPU's text, and `/metrics`
/// shows the loss and the bytes moved.
#[test]
fn kiln_serve_answers_through_a_device_loss_with_the_cpus_text() {
    use kiln_tests::serve::{completions_then_metrics, demo_model, http_server_with, metric};
    let home = Home::default();
    flaky_devices(&home);
    let model = demo_model();
    let prompts = ["def add(a, b):", "fn main() {", "class Stack:"];
    let run = |backend: &str| {
        let srv = http_server_with(&home, &model, &["--backend", backend]);
        completions_then_metrics(&srv, &prompts)
    };
    let (cpu, _) = run("cpu");
    let (dev, metrics) = run("flaky-device:1");
    assert_eq!(dev, cpu);
    let key = |labels: &str| format!("kiln:backend_{labels}");
    assert_eq!(
        metric(
            &metrics,
            &key("fallbacks_total{backend=\"flaky-device\",reason=\"device_lost\"}")
        ),
        1
    );
    for direction in ["to_device", "from_device"] {
        let k = key(&format!(
            "transfer_bytes_total{{backend=\"flaky-device\",direction=\"{direction}\"}}"
        ));
        assert!(metric(&metrics, &k) > 0, "{metrics}");
    }
}

/// A quantized KV cache on a device without fused attention: the device
/// runs what it can, attention runs on the CPU over the cache (moved
/// where it is needed), and the logits are the CPU's.
#[test]
fn a_quantized_kv_cache_on_a_device_without_fused_attention_runs_its_attention_on_the_cpu() {
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::{Model, Session};
    let home = Home::default();
    let plugin = accel(&home);
    // Heads of 32: whole q8_0 blocks.
    let model_path = kiln_tests::tiny_model(&[
        "--arch",
        "llama",
        "--dtype",
        "f32",
        "--embd",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--ff",
        "128",
        "--vocab",
        "300",
    ]);
    let prompt = [1u32, 40, 41, 42, 43, 44, 45, 46, 47];
    let run = |exec: Executor| {
        let m = Model::load(&model_path).unwrap();
        let mut s = Session::with_kv_type(m, exec, Some(64), DType::Q8_0).unwrap();
        assert!(s.kv_cache().fused && s.kv_cache().dtype == DType::Q8_0);
        let mut all = s.eval(&prompt, LogitsFor::All).unwrap();
        for t in [50, 51, 52] {
            all.extend(s.eval(&[t], LogitsFor::Last).unwrap());
        }
        all
    };
    let on_cpu = run(Executor::new(Backend::builtin_cpu(), 0));
    let ran = plugin.stats.ops_run.load(Ordering::Relaxed);
    let on_plugin = run(Executor::new(plugin.clone(), 0));
    assert!(plugin.stats.ops_run.load(Ordering::Relaxed) > ran);
    assert!(
        plugin
            .stats
            .ops_unsupported_fallback
            .load(Ordering::Relaxed)
            > 0
    );
    let max = on_cpu
        .iter()
        .zip(&on_plugin)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 1e-3, "logits differ by {max}");
}
