//! The host's own work per decode step, against the step itself: building
//! the one-token graph and its inputs anew for every token (what kiln did
//! before, and still does for prompt batches) versus moving the session's
//! reused graph to the next position (what a decode step does now), beside
//! the whole step (`Session::eval` of one token on the built-in CPU
//! backend). Median and p99 over many steps at positions spread over the
//! context.
//!
//! `KILN_BENCH_MODEL=model.gguf cargo bench -p kiln-benches --bench decode_step`
//! (default: kiln's generated demo model).

use kiln_runtime::backend::{Backend, exec::Executor};
use kiln_runtime::model::forward::{Attention, InputLayout, KvCache, LogitsFor, build};
use kiln_runtime::model::{Model, Session};
use std::hint::black_box;
use std::time::Instant;

fn percentiles(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    let at = |p: f64| t[((p / 100.0) * (t.len() - 1) as f64).round() as usize];
    (at(50.0), at(99.0))
}

fn main() {
    let path = match std::env::var_os("KILN_BENCH_MODEL") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let dir = std::env::temp_dir().join("kiln-bench-demo");
            kiln_serve::demo::ensure_demo_model(&dir, &mut |_| {}).expect("write the demo model")
        }
    };
    let model = Model::load(&path).expect("load the model");
    let cfg = &model.config;
    let n_ctx = 1024;
    let positions: Vec<usize> = (0..400).map(|i| (i * 997) % (n_ctx - 1)).collect();

    // Before: a fresh graph, and the inputs with their mask, per token.
    let rebuild: Vec<f64> = positions
        .iter()
        .map(|&n_past| {
            let s = Instant::now();
            let (b, scratch, rows) = build(
                cfg,
                &model.file,
                n_ctx,
                n_past,
                1,
                LogitsFor::Last,
                Attention::new(64, KvCache::default()),
            );
            let t_len = n_past + 1;
            let window = cfg.sliding_window.map(|s| s.window);
            let layout = InputLayout::new(1, t_len, window.is_some());
            let mut inputs = vec![0u8; layout.bytes];
            inputs[layout.tokens..layout.tokens + 4].copy_from_slice(&7i32.to_le_bytes());
            inputs[layout.positions..layout.positions + 4]
                .copy_from_slice(&(n_past as i32).to_le_bytes());
            layout.fill_masks(&mut inputs, n_past, 1, t_len, window);
            black_box((b.tensors.len(), b.ops.len(), scratch, rows, inputs.len()));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();

    // Now: the graph built once, moved to each position.
    let (mut template, _, _) = build(
        cfg,
        &model.file,
        n_ctx,
        n_ctx - 1,
        1,
        LogitsFor::Last,
        Attention::new(64, KvCache::default()),
    );
    let layout = InputLayout::new(1, n_ctx, cfg.sliding_window.is_some());
    let mut inputs = vec![0u8; layout.bytes];
    let reuse: Vec<f64> = positions
        .iter()
        .map(|&n_past| {
            let s = Instant::now();
            for (t, rule) in &template.follows {
                rule.apply(&mut template.tensors[*t], n_past, 1);
            }
            inputs[layout.tokens..layout.tokens + 4].copy_from_slice(&7i32.to_le_bytes());
            inputs[layout.positions..layout.positions + 4]
                .copy_from_slice(&(n_past as i32).to_le_bytes());
            black_box((&template.tensors, &inputs));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();

    // The whole step, for scale.
    let mut session = Session::new(
        model.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(n_ctx),
    )
    .expect("a session");
    let prompt: Vec<u32> = (0..64).map(|i| (i * 31 % 200) as u32 + 1).collect();
    session.eval(&prompt, LogitsFor::Last).expect("prompt");
    let step: Vec<f64> = (0..200)
        .map(|i| {
            let s = Instant::now();
            black_box(
                session
                    .eval(&[(i % 200) as u32 + 1], LogitsFor::Last)
                    .expect("step"),
            );
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();

    let (r50, r99) = percentiles(rebuild);
    let (u50, u99) = percentiles(reuse);
    let (s50, s99) = percentiles(step);
    println!(
        "{} ({} layers), context {n_ctx}: the host's graph work per decode step, µs",
        path.display(),
        cfg.n_layer
    );
    println!("| per token | p50 µs | p99 µs | share of a step (p50) |");
    println!("|---|---|---|---|");
    println!(
        "| graph and inputs built anew (before) | {r50:.1} | {r99:.1} | {:.1} % |",
        100.0 * r50 / s50
    );
    println!(
        "| reused graph moved to the position (now) | {u50:.2} | {u99:.2} | {:.2} % |",
        100.0 * u50 / s50
    );
    println!("| the whole decode step (now) | {s50:.0} | {s99:.0} | 100 % |");
    println!("rebuild ÷ reuse: {:.0}×", r50 / u50.max(1e-3));
}
