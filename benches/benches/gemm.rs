//! One matrix product at a time, per weight type and per kernel path this
//! CPU has: the CPU backend's `MulMat` on random weights in the layout the
//! path wants (`kernels::weight_layout`), activations of `m` rows, on the
//! kernel thread pool. No model, no graph, no peers: what a kernel change
//! does to the kernel alone, with the noise of a whole-model run (memory
//! traffic of the other layers, the tokenizer, the sampler) left out.
//!
//! Every weight type a model may hold that has a fast kernel
//! (`KILN_GEMM_TYPES=q4_0,f16,…` picks some); each product runs
//! `KILN_GEMM_RUNS` times (default 9) after a warm-up,
//! the paths and types interleaved so that a slow spell of the machine
//! hits all of them alike; prints the median and best GFLOP/s
//! (2·k·n·m / time) and each path's median relative to the best path in
//! the same run. For judging a change, run it before and after and compare
//! the medians.
//!
//! ```text
//! cargo bench -p kiln-benches --bench gemm
//! KILN_GEMM_SHAPE=2048,5632,256 KILN_GEMM_TYPES=q4_0,q6_k KILN_GEMM_ISAS=avx2,avx512 \
//!   cargo bench -p kiln-benches --bench gemm
//! ```
//!
//! `KILN_GEMM_SHAPE` is `k,n,m` (inner size, weight rows, activation
//! rows; default 2048,5632,256: TinyLlama's FFN up-projection over a
//! 256-token prompt); types whose blocks do not divide `k` are left out
//! (the K-quants' 256 for SmolLM2's 576). With `m` = 1 it times decode's
//! products, the pool's dispatch included. `KILN_THREADS` sets the pool's size (the pool reads it, as in `kiln`).

use kiln_cpu::kernels::{self, Isa};
use kiln_cpu::ops::{self, Desc, View};
use kiln_plugin_api::{DType, OpKind};
use std::time::Instant;

fn list<T>(var: &str, all: Vec<T>, name: impl Fn(&T) -> String) -> Vec<T> {
    let Ok(want) = std::env::var(var) else {
        return all;
    };
    let want: Vec<String> = want.split(',').map(|s| s.trim().to_lowercase()).collect();
    let picked: Vec<T> = all
        .into_iter()
        .filter(|t| want.contains(&name(t).to_lowercase()))
        .collect();
    assert!(
        !picked.is_empty(),
        "{var}={want:?} names nothing this CPU runs"
    );
    picked
}

struct Case {
    isa: Isa,
    dtype: DType,
    w: Vec<u8>,
    wd: Desc,
    times: Vec<f64>,
}

fn main() {
    let shape: Vec<usize> = std::env::var("KILN_GEMM_SHAPE")
        .unwrap_or_else(|_| "2048,5632,256".into())
        .split(',')
        .map(|s| s.trim().parse().expect("KILN_GEMM_SHAPE is k,n,m"))
        .collect();
    let [k, n, m] = shape[..] else {
        panic!("KILN_GEMM_SHAPE is k,n,m")
    };
    let runs: usize = std::env::var("KILN_GEMM_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(9);
    let isas = list(
        "KILN_GEMM_ISAS",
        Isa::available()
            .into_iter()
            .filter(|&i| i > Isa::Scalar)
            .collect(),
        |i| i.name().to_string(),
    );
    let all = DType::WEIGHTS
        .into_iter()
        .filter(|&d| kernels::has_mul_mat(d));
    let mut types = list("KILN_GEMM_TYPES", all.collect(), |t| t.to_string());
    // A row must be whole blocks, in every layout a path repacks to.
    let whole = |d: DType| {
        isas.iter()
            .all(|&i| kernels::weight_layout(i, d).row_bytes(k).is_some())
    };
    let skipped: Vec<String> = types
        .iter()
        .filter(|&&d| !whole(d))
        .map(|d| d.to_string())
        .collect();
    types.retain(|&d| whole(d));
    if !skipped.is_empty() {
        println!(
            "k={k} is not whole blocks of {}: left out",
            skipped.join(", ")
        );
    }
    assert!(!types.is_empty(), "no type left to run");

    let mut rng = fastrand::Rng::with_seed(7);
    let mut x: Vec<u8> = (0..k * m)
        .flat_map(|_| (rng.f32() * 4.0 - 2.0).to_le_bytes())
        .collect();
    let xd = Desc::contiguous(DType::F32, [k, m, 1, 1]);
    let dd = Desc::contiguous(DType::F32, [n, m, 1, 1]);
    let mut out = vec![0u8; dd.extent().expect("small")];
    let mut cases: Vec<Case> = Vec::new();
    for &dtype in &types {
        for &isa in &isas {
            let layout = kernels::weight_layout(isa, dtype);
            // The same weights for every path: a layout is a repacking.
            let w = match cases
                .iter()
                .find(|c| c.dtype == dtype && c.wd.dtype == layout)
            {
                Some(c) => c.w.clone(),
                None => {
                    let mut rng = fastrand::Rng::with_seed(dtype as u64);
                    (0..n)
                        .flat_map(|_| kiln_blocks::random_row(layout, k, &mut rng))
                        .collect()
                }
            };
            let wd = Desc::contiguous(layout, [k, n, 1, 1]);
            ops::check(OpKind::MulMat, &[wd, xd], &dd, &[0; 8]).expect("a valid product");
            cases.push(Case {
                isa,
                dtype,
                w,
                wd,
                times: Vec::new(),
            });
        }
    }
    let flop = 2.0 * (k * n * m) as f64;
    println!(
        "k={k} n={n} m={m}, {} threads, {runs} runs each ({:.2} GFLOP a product)",
        kernels::threads(),
        flop / 1e9
    );
    for run in 0..=runs {
        for c in &mut cases {
            let wv = View {
                data: c.w.as_mut_ptr(),
                desc: c.wd,
            };
            let xv = View {
                data: x.as_mut_ptr(),
                desc: xd,
            };
            let dv = View {
                data: out.as_mut_ptr(),
                desc: dd,
            };
            let t = Instant::now();
            // SAFETY: each view covers its own Vec, and `check` accepted
            // the shapes.
            let ran = unsafe { kernels::run(c.isa, OpKind::MulMat, &[wv, xv], &dv, &[0; 8]) };
            let s = t.elapsed().as_secs_f64();
            assert!(ran.is_some(), "{} has no {} kernel", c.isa.name(), c.dtype);
            if run > 0 {
                c.times.push(s);
            }
        }
    }
    println!(
        "{:<8} {:<8} {:>10} {:>10} {:>8}",
        "type", "path", "median", "best", "÷ best path"
    );
    for dtype in types {
        let row: Vec<(Isa, f64, f64)> = cases
            .iter_mut()
            .filter(|c| c.dtype == dtype)
            .map(|c| {
                c.times.sort_by(f64::total_cmp);
                let median = c.times[c.times.len() / 2];
                (c.isa, flop / median / 1e9, flop / c.times[0] / 1e9)
            })
            .collect();
        let top = row.iter().map(|r| r.1).fold(0.0, f64::max);
        for (isa, median, best) in row {
            println!(
                "{:<8} {:<8} {:>10.1} {:>10.1} {:>8.2}",
                dtype.to_string(),
                isa.name(),
                median,
                best,
                median / top
            );
        }
    }
}
