//! Ranking 1,000 candidates: each shipped policy (a fresh instance per
//! call, as kiln runs them, so instantiation is included) against the
//! built-in native ranker, in the same run; p50 and p99 over many calls.
//! Also the cost of the two input encodings the ABI could have used.
//!
//! `cargo bench -p kiln-benches --bench policy`

use kiln_runtime::policy::synthetic_rank;
use kiln_sandbox::{Sandbox, builtin};
use std::hint::black_box;
use std::time::Instant;

const CALLS: usize = 300;

fn percentiles(mut t: Vec<f64>) -> (f64, f64) {
    t.sort_by(f64::total_cmp);
    let at = |p: f64| t[((p / 100.0) * (t.len() - 1) as f64).round() as usize];
    (at(50.0), at(99.0))
}

fn time(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..10 {
        f();
    }
    let t: Vec<f64> = (0..CALLS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    percentiles(t)
}

fn main() {
    let Some(dir) = kiln_tests::policies_dir() else {
        eprintln!("the policies could not be built; nothing to measure");
        return;
    };
    let input = synthetic_rank(1000, 42);
    let (n50, n99) = time(|| {
        black_box(builtin::rank(black_box(&input)));
    });
    println!(
        "ranking 1,000 candidates, {CALLS} calls each, µs (p50 / p99), ratio to the native ranker's p50"
    );
    println!("| ranker | p50 µs | p99 µs | p50 ratio |");
    println!("|---|---|---|---|");
    println!("| built-in (native Rust) | {n50:.1} | {n99:.1} | 1.0× |");
    let sandbox = Sandbox::new(None);
    for name in ["bm25_recency", "jaccard", "proximity"] {
        let bytes = std::fs::read(dir.join(format!("{name}.wasm"))).unwrap();
        let p = sandbox.load(&bytes, None).unwrap();
        let (p50, p99) = time(|| {
            black_box(p.rank(black_box(&input)).unwrap());
        });
        println!(
            "| {} (wasm) | {p50:.1} | {p99:.1} | {:.1}× |",
            p.meta.label(),
            p50 / n50
        );
    }
    println!(
        "\nproposing the next of 3 settings after 20 trials (the tuning policies), µs (p50 / p99)"
    );
    let tune = kiln_runtime::policy::synthetic_tune(20, 7);
    for name in ["tpe", "genetic"] {
        let bytes = std::fs::read(dir.join(format!("{name}.wasm"))).unwrap();
        let p = sandbox.load(&bytes, None).unwrap();
        let (p50, p99) = time(|| {
            black_box(p.tune(black_box(&tune)).unwrap());
        });
        println!("| {} (wasm) | {p50:.1} | {p99:.1} |", p.meta.label());
    }
    // What the encodings cost the host.
    let (b50, _) = time(|| {
        black_box(input.encode());
    });
    let (j50, _) = time(|| {
        black_box(serde_json::to_vec(&input).unwrap());
    });
    let (bin, json) = (
        input.encode().len(),
        serde_json::to_vec(&input).unwrap().len(),
    );
    println!(
        "\ninput encoding for 1,000 candidates: binary {bin} bytes in {b50:.1} µs; JSON {json} bytes in {j50:.1} µs"
    );
}
