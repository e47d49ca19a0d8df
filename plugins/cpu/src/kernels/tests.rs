//! Every kernel path this CPU has against the scalar reference, on random
//! inputs of odd sizes, broadcasts included, single- and multi-threaded.

use super::*;
use crate::ops::{self, Desc};
use kiln_blocks::random_row;

fn view(desc: Desc, data: &mut [u8]) -> View {
    assert!(desc.extent().unwrap() <= data.len());
    View {
        data: data.as_mut_ptr(),
        desc,
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The (reference, fast) outputs of one mat-mul.
fn both(isa: Isa, dtype: DType, shape: [usize; 5], seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (r, f, _) = both_with_bound(isa, dtype, shape, seed);
    (r, f)
}

/// As [`both`], with each output's sum of |w|·|x| (x as the reference
/// rounds it): the scale of a rounding-order difference.
fn both_with_bound(
    isa: Isa,
    dtype: DType,
    [k, n, m, w2, x2]: [usize; 5],
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let wd = Desc::contiguous(dtype, [k, n, w2, 1]);
    let xd = Desc::contiguous(DType::F32, [k, m, x2, 1]);
    let dd = Desc::contiguous(DType::F32, [n, m, x2, 1]);
    ops::check(OpKind::MulMat, &[wd, xd], &dd, &[0; 8]).unwrap();
    let mut w: Vec<u8> = (0..n * w2)
        .flat_map(|_| random_row(dtype, k, &mut rng))
        .collect();
    let mut x: Vec<u8> = (0..k * m * x2)
        .flat_map(|_| (rng.f32() * 4.0 - 2.0).to_le_bytes())
        .collect();
    let (wv, xv) = (view(wd, &mut w), view(xd, &mut x));
    let mut reference = vec![0u8; dd.extent().unwrap()];
    let mut fast = vec![0u8; dd.extent().unwrap()];
    // SAFETY: every view covers its own Vec, and `check` accepted the shapes.
    unsafe {
        ops::run(
            OpKind::MulMat,
            &[wv, xv],
            &view(dd, &mut reference),
            &[0; 8],
        )
        .unwrap();
        run(
            isa,
            OpKind::MulMat,
            &[wv, xv],
            &view(dd, &mut fast),
            &[0; 8],
        )
        .expect("a fast path");
    }
    let wf: Vec<Vec<f32>> = w
        .chunks_exact(dtype.row_bytes(k).unwrap())
        .map(|r| {
            let mut v = vec![0.0; k];
            kiln_blocks::dequantize_row(dtype, r, &mut v);
            v
        })
        .collect();
    let mut bound = Vec::new();
    for i2 in 0..x2 {
        for mi in 0..m {
            let mut xr = f32s(&x[(i2 * m + mi) * k * 4..][..k * 4]);
            kiln_blocks::round_activations(dtype, &mut xr);
            for ni in 0..n {
                let wr = &wf[(i2 / (x2 / w2)) * n + ni];
                bound.push(
                    if matches!(dtype, DType::Q2_K | DType::Q4_K | DType::Q5_K) {
                        let wmax = wr.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        2.0 * wmax * xr.iter().map(|v| v.abs() as f64).sum::<f64>()
                    } else {
                        wr.iter().zip(&xr).map(|(a, b)| (a * b).abs() as f64).sum()
                    },
                );
            }
        }
    }
    (f32s(&reference), f32s(&fast), bound)
}

fn assert_close(isa: Isa, dtype: DType, k: usize, reference: &[f32], fast: &[f32]) {
    // Quantized types sum exact block terms in `kiln_blocks::q8_dot`'s
    // order, F16, BF16 and F32 products in `fused_dot`'s, the same
    // everywhere: the bits.
    for (i, (a, b)) in reference.iter().zip(fast).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{} {dtype} k={k}: output {i}: reference {a}, kernel {b}",
            isa.name()
        );
    }
}

#[test]
fn mul_mat_matches_the_reference_on_every_path() {
    let sizes = [
        (32, 1, 1),
        (96, 3, 2),
        (160, 17, 1),
        (2080, 67, 5),
        (64, 129, 3),
        // Four rows and more take the lane-wise GEMM where there is one:
        // whole and partial groups of 16 weight rows and of 4 activations.
        (96, 16, 4),
        (320, 33, 9),
        (32, 1, 4),
        // Decode on AVX-512 gives each of 16 blocks a lane: one whole
        // group, groups and a tail, for one to three activation rows.
        (512, 3, 1),
        (1056, 5, 3),
        (2592, 2, 2),
    ];
    for isa in Isa::available() {
        for dtype in [
            DType::F16,
            DType::BF16,
            DType::F32,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q5_0X16,
            DType::Q4_0X16,
            DType::Q8_0,
            DType::IQ4_NL,
        ] {
            for (i, &(k, n, m)) in sizes.iter().enumerate() {
                let (r, f) = both(isa, dtype, [k, n, m, 1, 1], i as u64);
                assert_close(isa, dtype, k, &r, &f);
            }
            // Float rows need not be whole blocks: tails of every length.
            if Float::of(dtype).is_some() {
                for (i, k) in [1, 7, 15, 17, 45, 77, 1003].into_iter().enumerate() {
                    // One and two activation rows take the row kernels,
                    // five the tiles.
                    for m in [1, 2, 5] {
                        let (r, f) = both(isa, dtype, [k, 9, m, 1, 1], 50 + i as u64);
                        assert_close(isa, dtype, k, &r, &f);
                    }
                }
            }
            // Broadcast over dimension 2 (grouped-query attention's shape),
            // decode's one row per slice included (with and without lanes).
            let (r, f) = both(isa, dtype, [64, 5, 3, 2, 4], 99);
            assert_close(isa, dtype, 64, &r, &f);
            for (k, seed) in [(64, 97), (544, 96)] {
                let (r, f) = both(isa, dtype, [k, 7, 1, 2, 4], seed);
                assert_close(isa, dtype, k, &r, &f);
            }
            let (r, f) = both(isa, dtype, [64, 18, 6, 2, 4], 98);
            assert_close(isa, dtype, 64, &r, &f);
        }
    }
}

#[test]
fn float_products_at_their_limits_give_the_reference_bits_on_every_path() {
    // Signed zeros, values whose bf16 products fall below f32's normal
    // range (the one case where a fused multiply-add and a sum of the
    // rounded product differ), f16 subnormals, infinities (and the NaN
    // of ∞ · 0), cancellation: every path must add them as the reference.
    let specials = [
        0.0f32, -0.0, 1e-20, -3e-21, 6e-8, -6e-8, 1e-30, 65504.0, -65504.0, 1.0, -1.0, 3.0e38,
        1e-38,
    ];
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (seed, (k, m)) in [(3, 1), (13, 2), (29, 5), (64, 7)].into_iter().enumerate() {
            let mut rng = fastrand::Rng::with_seed(seed as u64);
            let n = 6;
            let pick = |rng: &mut fastrand::Rng| {
                if rng.u8(..) < 160 {
                    specials[rng.usize(..specials.len())]
                } else {
                    rng.f32() * 4.0 - 2.0
                }
            };
            let wv: Vec<f32> = (0..n * k).map(|_| pick(&mut rng)).collect();
            let xv: Vec<f32> = (0..m * k)
                .map(|i| {
                    // A row of only ±0 and tiny products, and rows with ∞.
                    if i / k == 0 {
                        specials[i % 5]
                    } else {
                        pick(&mut rng)
                    }
                })
                .collect();
            let mut w = vec![0u8; dtype.row_bytes(n * k).unwrap()];
            kiln_blocks::quantize_row(dtype, &wv, &mut w);
            let mut x: Vec<u8> = xv.iter().flat_map(|v| v.to_le_bytes()).collect();
            let wd = Desc::contiguous(dtype, [k, n, 1, 1]);
            let xd = Desc::contiguous(DType::F32, [k, m, 1, 1]);
            let dd = Desc::contiguous(DType::F32, [n, m, 1, 1]);
            let (wv, xv) = (view(wd, &mut w), view(xd, &mut x));
            let mut want = vec![0u8; dd.extent().unwrap()];
            // SAFETY: every view covers its own Vec; the shapes agree.
            unsafe { ops::run(OpKind::MulMat, &[wv, xv], &view(dd, &mut want), &[0; 8]).unwrap() };
            for isa in Isa::available() {
                let mut got = vec![0u8; want.len()];
                // SAFETY: as above.
                unsafe {
                    run(isa, OpKind::MulMat, &[wv, xv], &view(dd, &mut got), &[0; 8])
                        .expect("a fast path")
                };
                for (i, (a, b)) in f32s(&want).iter().zip(f32s(&got)).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(),
                        "{} {dtype} k={k}: output {i}: reference {a:e}, kernel {b:e}",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn interleaved_layouts_give_the_bits_of_their_types_on_every_path() {
    // Decode (lanes: whole groups, a tail, fewer than 16 blocks), up to
    // four rows per pass, the GEMM's batches, and slices broadcast.
    let shapes = [
        [32, 3, 1, 1, 1],
        [512, 5, 1, 1, 1],
        [544, 7, 2, 1, 1],
        [1056, 4, 3, 1, 1],
        [2080, 9, 4, 1, 1],
        [1056, 17, 5, 1, 1],
        [544, 7, 1, 2, 4],
        [512, 18, 6, 2, 4],
    ];
    for (isa, layout) in Isa::available()
        .into_iter()
        .flat_map(|i| [(i, DType::Q4_0X16), (i, DType::Q5_0X16)])
    {
        let ty = kiln_plugin_api::interleave::plain(layout);
        for (seed, [k, n, m, w2, x2]) in shapes.into_iter().enumerate() {
            let mut rng = fastrand::Rng::with_seed(seed as u64);
            let row = ty.row_bytes(k).unwrap();
            let mut plain: Vec<u8> = (0..n * w2)
                .flat_map(|_| random_row(ty, k, &mut rng))
                .collect();
            let mut packed = plain.clone();
            packed
                .chunks_exact_mut(row)
                .for_each(|r| kiln_plugin_api::interleave::pack(layout, r));
            let mut x: Vec<u8> = (0..k * m * x2)
                .flat_map(|_| (rng.f32() * 4.0 - 2.0).to_le_bytes())
                .collect();
            let xd = Desc::contiguous(DType::F32, [k, m, x2, 1]);
            let dd = Desc::contiguous(DType::F32, [n, m, x2, 1]);
            let mut outs = Vec::new();
            for (dtype, w) in [(ty, &mut plain), (layout, &mut packed)] {
                let wd = Desc::contiguous(dtype, [k, n, w2, 1]);
                let mut d = vec![0u8; dd.extent().unwrap()];
                // SAFETY: every view covers its own Vec; the shapes are
                // a product's.
                unsafe {
                    run(
                        isa,
                        OpKind::MulMat,
                        &[view(wd, w), view(xd, &mut x)],
                        &view(dd, &mut d),
                        &[0; 8],
                    )
                    .expect("a fast path");
                }
                outs.push(bits(&f32s(&d)));
            }
            assert_eq!(
                outs[0],
                outs[1],
                "{} {layout} {:?}",
                isa.name(),
                shapes[seed]
            );
        }
    }
}

/// The types whose activations are Q8_K.
const K_TYPES: [DType; 6] = [
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_XS,
];

#[test]
fn k_quant_mul_mat_matches_the_reference_within_rounding() {
    // The reference multiplies by fl(q·d), the kernel by q and d apart (as
    // ggml does), and Q4_K's weights d·sc·q − dmin·m are rounded in the
    // reference, exact here: an f32 rounding per term apart, of the terms'
    // own size (bounded by 2·max|w|·|x| for Q4_K's cancelling minimums).
    for isa in Isa::available() {
        for (dtype, (i, &(k, n, m, w2, x2))) in K_TYPES.into_iter().flat_map(|t| {
            [
                (256, 1, 1, 1, 1),
                (768, 7, 3, 1, 1),
                (2304, 33, 2, 1, 1),
                (512, 5, 6, 1, 1),
                (768, 35, 9, 1, 1),
                // Decode over slices: one activation row, broadcast.
                (512, 9, 1, 2, 4),
            ]
            .iter()
            .enumerate()
            .map(move |c| (t, c))
        }) {
            let (r, f, bound) = both_with_bound(isa, dtype, [k, n, m, w2, x2], i as u64);
            for (j, ((a, b), s)) in r.iter().zip(&f).zip(&bound).enumerate() {
                assert!(
                    ((a - b).abs() as f64) <= 2e-7 * s + 1e-6 * (a.abs() as f64) + 1e-30,
                    "{} {dtype} k={k}: output {j}: reference {a}, kernel {b} (bound {s})",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn k_quant_rows_give_the_portable_kernels_bits_on_every_path() {
    // Exact integer sums per block, scaled in the same f64 order: the
    // SIMD row kernels (one to four activation rows) must not move a bit,
    // on random weights and on the extremes of every code and scale.
    let mut rng = fastrand::Rng::with_seed(5);
    for dtype in K_TYPES {
        // Whole groups of four blocks (the AVX2 Q4_K kernel's step), and
        // groups with a tail.
        for (k, case) in [1024, 1792]
            .into_iter()
            .flat_map(|k| (0..4).map(move |c| (k, c)))
        {
            let bytes = dtype.row_bytes(k).unwrap();
            // Random blocks; then every byte 0xff, 0x00 or random, with
            // each block's f16 scales set finite.
            let w: Vec<u8> = match case {
                0 => random_row(dtype, k, &mut rng),
                _ => {
                    let mut w: Vec<u8> = (0..bytes)
                        .map(|_| [0xff, 0x00, rng.u8(..)][case - 1])
                        .collect();
                    let (block, at): (usize, &[usize]) = match dtype {
                        DType::Q2_K => (84, &[80, 82]),
                        DType::Q3_K => (110, &[108]),
                        DType::IQ4_XS => (136, &[0]),
                        DType::Q4_K => (144, &[0, 2]),
                        DType::Q5_K => (176, &[0, 2]),
                        _ => (210, &[208]),
                    };
                    for blk in w.chunks_exact_mut(block) {
                        for &a in at {
                            blk[a..a + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                        }
                    }
                    w
                }
            };
            let rows: Vec<kquant::Q8KRow> = (0..4)
                .map(|r| {
                    let x: Vec<f32> = (0..k)
                        .map(|i| {
                            if r == 3 && i % 7 == 0 {
                                8.0
                            } else {
                                rng.f32() * 6.0 - 3.0
                            }
                        })
                        .collect();
                    let mut row = kquant::Q8KRow::new(k);
                    row.quantize(Isa::Scalar, &x);
                    row
                })
                .collect();
            for n in 1..=4 {
                let xs: Vec<&kquant::Q8KRow> = rows[..n].iter().collect();
                let mut want = vec![0f32; n];
                kquant::row_dot(dtype)(Isa::Scalar, &w, &xs, &mut want);
                for isa in Isa::available() {
                    let mut got = vec![0f32; n];
                    kquant::row_dot(dtype)(isa, &w, &xs, &mut got);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{} {dtype}, case {case}, {n} rows",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn k_quant_row_ranges_give_each_rows_kernel_bits() {
    // Decode's loop over rows (`kquant::dot_row_range`, which runs the
    // Q4_K/Q5_K/Q6_K kernels inside one function) against the one-row
    // kernel per row, on every path: not a bit moved, odd block counts
    // (the two-block step's tail) included, the rows read where `w` says.
    let mut rng = fastrand::Rng::with_seed(11);
    for dtype in K_TYPES {
        for k in [256, 1792, 2048] {
            let n = 9;
            let bytes = dtype.row_bytes(k).unwrap();
            let w: Vec<u8> = (0..n)
                .flat_map(|_| random_row(dtype, k, &mut rng))
                .collect();
            let x: Vec<f32> = (0..k).map(|_| rng.f32() * 6.0 - 3.0).collect();
            let mut row = kquant::Q8KRow::new(k);
            for isa in Isa::available() {
                row.quantize(isa, &x);
                let mut want = vec![0f32; n];
                for (r, o) in want.iter_mut().enumerate() {
                    let mut v = [0f32];
                    kquant::row_dot(dtype)(isa, &w[r * bytes..][..bytes], &[&row], &mut v);
                    *o = v[0];
                }
                let mut got = vec![f32::NAN; n];
                kquant::dot_row_range(
                    isa,
                    dtype,
                    &row,
                    // In decode's order: rows from several places.
                    streams(2..n, DECODE_STREAMS),
                    |r| &w[r * bytes..][..bytes],
                    |r, v| got[r] = v,
                );
                assert_eq!(
                    bits(&got[2..]),
                    bits(&want[2..]),
                    "{} {dtype}, k = {k}",
                    isa.name()
                );
                assert!(
                    got[..2].iter().all(|v| v.is_nan()),
                    "rows outside the range"
                );
            }
        }
    }
}

#[test]
fn decode_visits_every_row_once_in_several_places_at_once() {
    for start in [0, 5] {
        for len in 0..40 {
            let order: Vec<usize> = streams(start..start + len, DECODE_STREAMS).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (start..start + len).collect::<Vec<_>>(),
                "{len} rows"
            );
            // The first rows visited lie in different parts, a part apart.
            if len >= DECODE_STREAMS * 2 {
                let per = len.div_ceil(DECODE_STREAMS);
                let first: Vec<usize> = (0..DECODE_STREAMS).map(|s| start + s * per).collect();
                assert_eq!(order[..DECODE_STREAMS], first[..], "{len} rows");
            }
            // One part (the float types' batched rows): the range itself.
            assert!(streams(start..start + len, 1).eq(start..start + len));
        }
    }
}

#[test]
#[should_panic(expected = "rows visited from no place")]
fn rows_from_no_place_are_refused_not_skipped() {
    // Zero parts would visit no row: a product silently left
    // unwritten.
    let _ = streams(0..8, 0).count();
}

#[test]
fn every_path_gives_the_same_bits_single_or_multi_threaded() {
    // Work large enough to wake the pool; outputs are per row, so the
    // thread count must not change a bit.
    // Decode's shape (one activation row) over several slices too, where
    // a thread's rows cross from one slice to the next.
    let _pool = pool_to_myself();
    let before = threads();
    for isa in Isa::available() {
        for shape in [[1024, 301, 2, 1, 1], [1024, 301, 1, 2, 4]] {
            set_threads(1);
            let (_, one) = both(isa, DType::Q4_0, shape, 7);
            set_threads(3);
            let (reference, three) = both(isa, DType::Q4_0, shape, 7);
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                three.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{} {shape:?}",
                isa.name()
            );
            assert_close(isa, DType::Q4_0, 1024, &reference, &three);
        }
    }
    set_threads(before);
}

/// Serializes the tests that set the pool's thread count (tests run in
/// parallel, and the count is global).
fn pool_to_myself() -> std::sync::MutexGuard<'static, ()> {
    static POOL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_panicking_task_reaches_the_caller_and_the_pool_keeps_working() {
    let _pool = pool_to_myself();
    let before = threads();
    set_threads(2);
    let hit = std::panic::catch_unwind(|| {
        threads::parallel_for(64, 1 << 20, &|r| {
            if r.contains(&63) {
                panic!("boom");
            }
        })
    });
    assert!(hit.is_err());
    let sum = std::sync::atomic::AtomicUsize::new(0);
    threads::parallel_for(1000, 1 << 20, &|r| {
        sum.fetch_add(r.sum::<usize>(), std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(sum.into_inner(), 999 * 1000 / 2);
    // And still with its worker: the panic did not leave ops to run on
    // their calling thread alone.
    let n = threads_of_a_pooled_op(|| {});
    set_threads(before);
    assert_eq!(n, Some(2), "ops after a panic run on one thread");
}

/// The number of threads that took part in the first op that ran on
/// the pool (not on its calling thread alone, as an op does while another
/// test's op holds the pool), each op `before` something; `None` if no op
/// finished on the pool within a minute. Runs on a thread of its own, so
/// that an op stuck on a worker that never wakes fails the caller instead
/// of hanging it.
fn threads_of_a_pooled_op(before: fn()) -> Option<usize> {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            before();
            // Each chunk waits a little for a second thread to show up.
            let seen = Mutex::new(HashSet::new());
            let calls = AtomicUsize::new(0);
            threads::parallel_for(8, 1 << 20, &|_| {
                calls.fetch_add(1, Ordering::Relaxed);
                seen.lock().unwrap().insert(std::thread::current().id());
                let start = Instant::now();
                while seen.lock().unwrap().len() < 2 && start.elapsed() < Duration::from_millis(200)
                {
                    std::hint::spin_loop();
                }
            });
            if calls.into_inner() > 1 {
                let _ = tx.send(seen.into_inner().unwrap().len());
                return;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(90)).ok()
}

#[test]
fn workers_asleep_between_ops_wake_for_the_next_one() {
    let _pool = pool_to_myself();
    let before = threads();
    set_threads(2);
    let n = threads_of_a_pooled_op(|| {
        // The worker exists (spawned by the first op it takes part in),
        // and 2 ms later it has stopped spinning and sleeps.
        threads::parallel_for(8, 1 << 20, &|_| {});
        std::thread::sleep(std::time::Duration::from_millis(2));
    });
    set_threads(before);
    assert_eq!(
        n,
        Some(2),
        "a sleeping worker was not woken for the next op"
    );
}

/// The live threads of this process named `prefix…`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A graph given its own threads runs on a pool of its calling thread's
/// own, of that many threads, and the shared pool stays as it was; the
/// pool's workers end with the thread.
#[test]
fn a_thread_may_run_its_ops_on_a_pool_of_its_own() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let _pool = pool_to_myself();
    let shared = threads();
    let owner = std::thread::spawn(move || {
        let mut most = 0;
        for _ in 0..50 {
            let seen = std::sync::Mutex::new(std::collections::HashSet::new());
            let sum = AtomicUsize::new(0);
            with_threads(3, || {
                assert_eq!(threads(), 3);
                threads::parallel_for(1000, 1 << 20, &|r| {
                    seen.lock().unwrap().insert(std::thread::current().id());
                    sum.fetch_add(r.sum::<usize>(), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                });
            });
            assert_eq!(sum.into_inner(), 999 * 1000 / 2);
            most = most.max(seen.into_inner().unwrap().len());
        }
        assert_eq!(threads(), shared, "outside, the shared pool");
        (most, threads_named("kiln-own"))
    });
    let (most, workers) = owner.join().unwrap();
    assert!((2..=3).contains(&most), "{most} threads took part");
    assert_eq!(workers, 2, "its pool's workers while the thread lived");
    let start = std::time::Instant::now();
    while threads_named("kiln-own") > 0 && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(threads_named("kiln-own"), 0, "its workers outlived it");
}

#[test]
fn weights_the_kernels_cannot_walk_fall_back_to_the_reference() {
    // Every weight type has a kernel; a transposed view (elements not
    // contiguous along a row) has none and goes to the reference.
    assert!(has_mul_mat(DType::F32));
    let mut wd = Desc::contiguous(DType::F32, [32, 2, 1, 1]);
    wd.nb[0] = 8;
    wd.nb[1] = 4;
    let xd = Desc::contiguous(DType::F32, [32, 1, 1, 1]);
    let dd = Desc::contiguous(DType::F32, [2, 1, 1, 1]);
    let (mut w, mut x, mut d) = (vec![0u8; 256], vec![0u8; 128], vec![0u8; 8]);
    // SAFETY: the views cover their Vecs.
    let r = unsafe {
        run(
            Isa::current(),
            OpKind::MulMat,
            &[view(wd, &mut w), view(xd, &mut x)],
            &view(dd, &mut d),
            &[0; 8],
        )
    };
    assert!(r.is_none());
}

#[test]
fn f16_rounding_of_activations_is_the_same_on_every_path() {
    let mut rng = fastrand::Rng::with_seed(5);
    let mut x: Vec<f32> = (0..1003)
        .map(|i| match i % 5 {
            0 => (rng.f32() - 0.5) * 1e-5, // f16 subnormals
            1 => (rng.f32() - 0.5) * 1e6,  // beyond f16's range
            _ => (rng.f32() - 0.5) * 8.0,
        })
        .collect();
    // Exact ties between two f16 values, and the specials.
    x.extend([
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        f32::INFINITY,
        -0.0,
        65520.0,
    ]);
    let mut want = vec![0.0; x.len()];
    float::round_row(Isa::Scalar, &x, &mut want);
    for isa in Isa::available() {
        let mut got = vec![0.0; x.len()];
        float::round_row(isa, &x, &mut got);
        for (i, (a, b)) in want.iter().zip(&got).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{} element {i}: {}",
                isa.name(),
                x[i]
            );
        }
    }
}

#[test]
fn activation_quantization_is_the_same_on_every_path() {
    let mut rng = fastrand::Rng::with_seed(11);
    let k = 256 * 5;
    let mut x: Vec<f32> = (0..k)
        .map(|i| match i % 7 {
            0 => (rng.f32() - 0.5) * 1e-6,
            1 => ((rng.i32(-40..40)) as f32) * 0.25, // exact halves after scaling
            _ => (rng.f32() - 0.5) * 8.0,
        })
        .collect();
    // A block of zeros; blocks whose largest magnitude comes twice, with
    // either sign first (the first one sets the K-quant scale's sign).
    x[256..512].fill(0.0);
    x[520] = -20.0;
    x[700] = 20.0;
    x[800] = 30.0;
    x[1000] = -30.0;
    let mut want8 = Q8Row::new(k, DType::Q4_0);
    let mut want_k = kquant::Q8KRow::new(k);
    want8.quantize(Isa::Scalar, &x);
    want_k.quantize(Isa::Scalar, &x);
    for isa in Isa::available() {
        let mut got8 = Q8Row::new(k, DType::Q4_0);
        let mut got_k = kquant::Q8KRow::new(k);
        got8.quantize(isa, &x);
        got_k.quantize(isa, &x);
        let name = isa.name();
        assert_eq!(got8.qs, want8.qs, "{name}");
        assert_eq!(got8.sums, want8.sums, "{name}");
        assert_eq!(got8.offset_sums, want8.offset_sums, "{name}");
        assert_eq!(bits(&got8.d), bits(&want8.d), "{name}");
        assert_eq!(got_k.qs, want_k.qs, "{name}");
        assert_eq!(got_k.sums16, want_k.sums16, "{name}");
        assert_eq!(got_k.sums32, want_k.sums32, "{name}");
        assert_eq!(got_k.sums_pairs, want_k.sums_pairs, "{name}");
        assert_eq!(bits(&got_k.d), bits(&want_k.d), "{name}");
        // Q4_1/Q5_1 rows: the same codes, and Q8_1's sums as the
        // reference computes them, twice over one row (reused, not grown).
        let mut got1 = Q8Row::new(k, DType::Q4_1);
        for _ in 0..2 {
            got1.quantize(isa, &x);
            assert_eq!(got1.qs, want8.qs, "{name}");
            assert_eq!(bits(&got1.s), bits(&kiln_blocks::q8_1_sums(&x)), "{name}");
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn row_wise_ops_shared_between_threads_give_the_reference_bits() {
    let f = |v: f32| v.to_bits() as i32;
    let neox = kiln_plugin_api::abi::KILN_ROPE_NEOX;
    let f32s = |ne: [usize; 4]| Desc::contiguous(DType::F32, ne);
    let big = [300, 250, 1, 1];
    // (op, sources, dst, params); every dst has at least 2^16 elements.
    let cases: Vec<(OpKind, Vec<Desc>, Desc, [i32; 8])> = vec![
        (OpKind::Add, vec![f32s(big), f32s(big)], f32s(big), [0; 8]),
        (
            OpKind::Add,
            vec![f32s(big), f32s([300, 1, 1, 1])],
            f32s(big),
            [0; 8],
        ),
        (
            OpKind::Mul,
            vec![f32s([300, 50, 5, 1]), f32s([300, 50, 1, 1])],
            f32s([300, 50, 5, 1]),
            [0; 8],
        ),
        (
            OpKind::Scale,
            vec![f32s(big)],
            f32s(big),
            [f(0.3), 0, 0, 0, 0, 0, 0, 0],
        ),
        (OpKind::Silu, vec![f32s(big)], f32s(big), [0; 8]),
        (OpKind::Gelu, vec![f32s(big)], f32s(big), [0; 8]),
        (
            OpKind::RmsNorm,
            vec![f32s(big)],
            f32s(big),
            [f(1e-5), 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            OpKind::SoftMax,
            vec![f32s([300, 40, 8, 1]), f32s([300, 40, 1, 1])],
            f32s([300, 40, 8, 1]),
            [f(0.125), 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            OpKind::Rope,
            vec![
                f32s([64, 32, 40, 1]),
                Desc::contiguous(DType::I32, [40, 1, 1, 1]),
            ],
            f32s([64, 32, 40, 1]),
            [64, neox, f(10000.0), f(1.0), 0, 0, 0, 0],
        ),
        (
            OpKind::Rope,
            vec![
                f32s([64, 32, 40, 1]),
                Desc::contiguous(DType::I32, [40, 1, 1, 1]),
            ],
            f32s([64, 32, 40, 1]),
            [32, 0, f(500000.0), f(0.5), 0, 0, 0, 0],
        ),
        (
            OpKind::Cpy,
            vec![f32s(big)],
            Desc::contiguous(DType::F16, big),
            [0; 8],
        ),
    ];
    let _pool = pool_to_myself();
    let before = threads();
    set_threads(3);
    for (i, (kind, src, dst, params)) in cases.into_iter().enumerate() {
        ops::check(kind, &src, &dst, &params).unwrap();
        let mut rng = fastrand::Rng::with_seed(i as u64);
        let mut data: Vec<Vec<u8>> = src
            .iter()
            .map(|d| {
                (0..d.ne.iter().product::<usize>())
                    .flat_map(|j| match d.dtype {
                        DType::I32 => ((j * 7 % 100) as i32).to_le_bytes(),
                        // A causal-looking mask: −∞ above the diagonal.
                        _ if kind == OpKind::SoftMax && std::ptr::eq(d, &src[1]) => {
                            (if j % 300 > j / 300 + 100 {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            })
                            .to_le_bytes()
                        }
                        _ => (rng.f32() * 8.0 - 4.0).to_le_bytes(),
                    })
                    .collect()
            })
            .collect();
        let views: Vec<View> = src
            .iter()
            .zip(&mut data)
            .map(|(d, b)| view(*d, b))
            .collect();
        let mut want = vec![0u8; dst.extent().unwrap()];
        let mut got = vec![0u8; dst.extent().unwrap()];
        // SAFETY: every view covers its own Vec, and `check` accepted the op.
        unsafe {
            ops::run(kind, &views, &view(dst, &mut want), &params).unwrap();
            run(Isa::current(), kind, &views, &view(dst, &mut got), &params)
                .unwrap_or_else(|| panic!("{kind}: no parallel path"));
        }
        assert!(
            want == got,
            "{kind} (case {i}): the threads' rows differ from the reference"
        );
    }
    set_threads(before);
}

#[test]
fn softmax_and_silu_rows_give_the_reference_bits_on_every_path() {
    let mut rng = fastrand::Rng::with_seed(11);
    let lens = (1..=40).chain([255, 256, 257, 1000]);
    for isa in Isa::available() {
        let fns = row_fns(isa);
        for n in lens.clone() {
            for case in 0..7 {
                // Ordinary logits, wide ones (exponentials down to
                // subnormals and 0), masked ones, a fully masked row, a
                // NaN, SiLU's extremes, and a causal row (masked from a
                // third on: whole masked chunks).
                let x: Vec<f32> = (0..n)
                    .map(|i| match case {
                        0 => rng.f32() * 8.0 - 4.0,
                        1 => rng.f32() * 1600.0 - 1500.0,
                        2 if i % 3 == 1 => f32::NEG_INFINITY,
                        3 => f32::NEG_INFINITY,
                        4 if i == n / 2 => f32::NAN,
                        5 => (rng.f32() - 0.5) * [1.0, 100.0, 1e30][i % 3],
                        6 if i > n / 3 => f32::NEG_INFINITY,
                        _ => rng.f32() * 20.0 - 10.0,
                    })
                    .collect();
                let (mut e_want, mut e_got) = (vec![0f64; n], vec![0f64; n]);
                let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                crate::math::softmax_row(&x, &mut e_want, &mut want);
                (fns.softmax)(&x, &mut e_got, &mut got);
                // Same bits, or NaN both (a NaN's payload may differ).
                let same = |op: &str, got: &[f32], want: &[f32]| {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert!(
                            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                            "{} {op}, n = {n}, case {case}, element {i}: {g} vs {w}",
                            isa.name()
                        );
                    }
                };
                same("softmax", &got, &want);
                // The exponentials themselves, which the f32 outputs
                // would hide a last-bit slip in.
                if !x.contains(&f32::NEG_INFINITY) || case == 2 || case == 6 {
                    let f = |e: &[f64]| e.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    if case != 4 {
                        assert_eq!(
                            f(&e_got),
                            f(&e_want),
                            "{} exp, n = {n}, case {case}",
                            isa.name()
                        );
                    }
                }
                crate::math::silu_row(&x, &mut want);
                (fns.silu)(&x, &mut got);
                same("silu", &got, &want);
            }
        }
    }
}

#[test]
fn the_standalone_neon_file_has_iq4_nls_table() {
    // neon.rs stands alone (Debian's rustc builds it for aarch64), so it
    // spells the table out; it must be kiln_blocks' one.
    let values: Vec<String> = kiln_blocks::IQ4_VALUES
        .iter()
        .map(|v| v.to_string())
        .collect();
    assert!(include_str!("neon.rs").contains(&values.join(", ")));
}

#[test]
fn the_paths_tested_are_those_the_cpu_has() {
    // Every test above runs each path of `Isa::available`: AVX-VNNI's is
    // there exactly where the CPU has AVX2 and AVX-VNNI (with or without
    // AVX-512), so a machine that has it tests it.
    let all = Isa::available();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        assert_eq!(all.contains(&Isa::Avx2), avx2);
        let vnni = avx2 && is_x86_feature_detected!("avxvnni");
        assert_eq!(all.contains(&Isa::AvxVnni), vnni, "{all:?}");
    }
}

#[test]
fn k_quant_gemms_give_the_row_kernels_bits() {
    // The lane-wise GEMMs (prompts) against the portable row kernel
    // (decode): the same integers, the same f64 order, so the same bits,
    // for a group of 16 weight rows and a part group, 3 and 4 activation
    // rows at a time.
    let mut rng = fastrand::Rng::with_seed(11);
    let k = 1024;
    for dtype in K_TYPES {
        let ws: Vec<Vec<u8>> = (0..19).map(|_| random_row(dtype, k, &mut rng)).collect();
        let rows: Vec<kquant::Q8KRow> = (0..7)
            .map(|_| {
                let x: Vec<f32> = (0..k).map(|_| rng.f32() * 6.0 - 3.0).collect();
                let mut row = kquant::Q8KRow::new(k);
                row.quantize(Isa::Scalar, &x);
                row
            })
            .collect();
        let xs: Vec<&kquant::Q8KRow> = rows.iter().collect();
        for isa in Isa::available() {
            if !kquant::has_gemm(isa, dtype) {
                continue;
            }
            for group in ws.chunks(16) {
                let wr: Vec<&[u8]> = group.iter().map(|w| w.as_slice()).collect();
                // Rows further apart than the group is wide, as a product's
                // own rows are: the kernel writes its 16 columns of each
                // and nothing between them.
                const STRIDE: usize = super::GEMM_GROUP + 5;
                let mut got = vec![f32::NAN; xs.len() * STRIDE];
                let mut scratch = kquant::GemmScratch::default();
                // SAFETY: `got` holds xs.len() rows STRIDE apart.
                let mut tile = unsafe { super::Tile::strided(got.as_mut_ptr(), STRIDE, xs.len()) };
                let ran = kquant::gemm16(isa, dtype, &wr, &xs, &mut scratch, &mut tile);
                assert!(ran, "{} {dtype}", isa.name());
                for m in 0..xs.len() {
                    let gap = &got[m * STRIDE + super::GEMM_GROUP..][..STRIDE - super::GEMM_GROUP];
                    assert!(
                        gap.iter().all(|v| v.is_nan()),
                        "{} {dtype}: row {m}'s gap written",
                        isa.name()
                    );
                }
                for (n, w) in wr.iter().enumerate() {
                    for (m, x) in xs.iter().enumerate() {
                        let mut want = [0f32];
                        kquant::row_dot(dtype)(Isa::Scalar, w, &[x], &mut want);
                        assert_eq!(
                            got[m * STRIDE + n].to_bits(),
                            want[0].to_bits(),
                            "{} {dtype}: weight row {n}, activation row {m}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }
}

/// One attention op, reference and fast: Q `[hd, n_q, n_head]`, K and V
/// `[hd, n_kv, n_head_kv]` of `dtype` with their heads interleaved as in
/// the KV cache, a causal mask (optionally windowed, optionally with a
/// query that sees nothing), dst written through a view of the merged
/// heads `[hd, n_head, n_q]`.
fn attention_both(
    isa: Isa,
    dtype: DType,
    [hd, n_q, n_head, n_kv, n_head_kv]: [usize; 5],
    window: Option<usize>,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let qd = Desc::contiguous(DType::F32, [hd, n_q, n_head, 1]);
    let qd = Desc {
        nb: [4, hd * n_head * 4, hd * 4, hd * n_head * n_q * 4],
        ..qd
    };
    let row = dtype.row_bytes(hd).unwrap();
    let kvd = Desc {
        dtype,
        ne: [hd, n_kv, n_head_kv, 1],
        nb: [
            dtype.block_bytes(),
            row * n_head_kv,
            row,
            row * n_head_kv * n_kv,
        ],
    };
    let md = Desc::contiguous(DType::F32, [n_kv, n_q, 1, 1]);
    let dd = qd;
    let params = {
        let mut p = [0; 8];
        p[0] = kiln_plugin_api::types::f32_param(1.0 / (hd as f32).sqrt());
        p
    };
    ops::check(OpKind::Attention, &[qd, kvd, kvd, md], &dd, &params).unwrap();
    let mut q: Vec<u8> = (0..hd * n_q * n_head)
        .flat_map(|_| (rng.f32() * 6.0 - 3.0).to_le_bytes())
        .collect();
    let mut k: Vec<u8> = (0..n_kv * n_head_kv)
        .flat_map(|_| random_row(dtype, hd, &mut rng))
        .collect();
    let mut v: Vec<u8> = (0..n_kv * n_head_kv)
        .flat_map(|_| random_row(dtype, hd, &mut rng))
        .collect();
    let n_past = n_kv - n_q;
    let mut mask = Vec::new();
    for i in 0..n_q {
        let p = n_past + i;
        for t in 0..n_kv {
            let seen = t <= p && window.is_none_or(|w| p - t < w) && !(i == 1 && n_q > 2);
            mask.extend_from_slice(&if seen { 0.0f32 } else { f32::NEG_INFINITY }.to_le_bytes());
        }
    }
    let src = [
        view(qd, &mut q),
        view(kvd, &mut k),
        view(kvd, &mut v),
        view(md, &mut mask),
    ];
    let mut reference = vec![0u8; dd.extent().unwrap()];
    let mut fast = vec![0u8; dd.extent().unwrap()];
    // SAFETY: every view covers its own Vec, and `check` accepted the shapes.
    unsafe {
        ops::run(OpKind::Attention, &src, &view(dd, &mut reference), &params).unwrap();
        run(isa, OpKind::Attention, &src, &view(dd, &mut fast), &params).expect("a fast path");
    }
    (f32s(&reference), f32s(&fast))
}

#[test]
fn fused_attention_matches_the_reference_on_every_path() {
    let _pool = pool_to_myself();
    let before = threads();
    for isa in Isa::available() {
        for (i, dtype) in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0]
            .into_iter()
            .enumerate()
        {
            for (j, (shape, window)) in [
                // Decode: one query, grouped heads, a long cache.
                ([64, 1, 9, 300, 3], None),
                // A prompt batch after a cached prefix, a windowed mask,
                // a query that sees nothing (the second).
                ([64, 37, 4, 100, 2], Some(20)),
                // Head size past the kernel's 512-wide output chunk, no GQA.
                ([544, 5, 2, 41, 2], None),
                ([32, 70, 6, 70, 1], None),
                // Prompt blocks (`blocked_path`): a last unit of rows
                // padded to the block (5 queries × 6 heads), head sizes
                // of 40 and 80 (the vector steps' tails; floats only).
                ([40, 37, 12, 100, 2], Some(20)),
                ([80, 20, 4, 60, 4], None),
                // Decoding at depth: positions split between units in
                // parts, merged (with a window, some parts see nothing).
                ([64, 1, 6, 1100, 2], None),
                ([64, 2, 4, 900, 1], Some(300)),
            ]
            .into_iter()
            .enumerate()
            {
                if dtype.row_bytes(shape[0]).is_none() {
                    continue; // blocks that do not divide the head size
                }
                for n in [1, 3] {
                    set_threads(n);
                    let (reference, fast) =
                        attention_both(isa, dtype, shape, window, (i * 10 + j) as u64);
                    for (k, (r, f)) in reference.iter().zip(&fast).enumerate() {
                        assert!(
                            (r - f).abs() <= 2e-5 * (1.0 + r.abs()),
                            "{} {dtype} {shape:?} element {k}: {r} vs {f}",
                            isa.name()
                        );
                    }
                    if shape[1] > 2 {
                        // The query that sees nothing gives zeros.
                        let hd = shape[0];
                        let row = &fast[hd * shape[2]..][..hd * shape[2]];
                        assert!(row.iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
    }
    set_threads(before);
}

/// The reference's row ops read and write dense f32 rows in place
/// (`ops::dst_row`): in place over their first source, and into a dst
/// that is not 4-byte aligned (written through a row of its own), they
/// give the bits they give into a separate dst.
#[test]
fn row_ops_in_place_and_unaligned_give_the_same_bits() {
    let f = |v: f32| v.to_bits() as i32;
    let shape = [96, 7, 3, 1];
    let d = Desc::contiguous(DType::F32, shape);
    let cases: Vec<(OpKind, Vec<Desc>, [i32; 8])> = vec![
        (OpKind::Add, vec![d, d], [0; 8]),
        (
            OpKind::Mul,
            vec![d, Desc::contiguous(DType::F32, [96, 1, 1, 1])],
            [0; 8],
        ),
        (OpKind::Scale, vec![d], [f(0.3), 0, 0, 0, 0, 0, 0, 0]),
        (OpKind::Silu, vec![d], [0; 8]),
        (OpKind::RmsNorm, vec![d], [f(1e-5), 0, 0, 0, 0, 0, 0, 0]),
        (
            OpKind::Rope,
            vec![d, Desc::contiguous(DType::I32, [3, 1, 1, 1])],
            [
                96,
                kiln_plugin_api::abi::KILN_ROPE_NEOX,
                f(10000.0),
                f(1.0),
                0,
                0,
                0,
                0,
            ],
        ),
    ];
    for (i, (kind, src, params)) in cases.into_iter().enumerate() {
        ops::check(kind, &src, &d, &params).unwrap();
        let mut rng = fastrand::Rng::with_seed(i as u64);
        let mut data: Vec<Vec<u8>> = src
            .iter()
            .map(|s| {
                (0..s.ne.iter().product::<usize>())
                    .flat_map(|j| match s.dtype {
                        DType::I32 => (j as i32 * 5).to_le_bytes(),
                        _ => (rng.f32() * 8.0 - 4.0).to_le_bytes(),
                    })
                    .collect()
            })
            .collect();
        let n = d.extent().unwrap();
        let mut want = vec![0u8; n];
        let mut shifted = vec![0u8; n + 1];
        let views: Vec<View> = src
            .iter()
            .zip(&mut data)
            .map(|(s, b)| view(*s, b))
            .collect();
        // SAFETY: every view covers its own Vec (the shifted one from its
        // second byte), and `check` accepted the op.
        unsafe {
            ops::run(kind, &views, &view(d, &mut want), &params).unwrap();
            ops::run(kind, &views, &view(d, &mut shifted[1..]), &params).unwrap();
            // In place: dst is the first source's memory.
            ops::run(kind, &views, &views[0], &params).unwrap();
        }
        assert!(want == shifted[1..], "{kind}: an unaligned dst differs");
        assert!(want == data[0], "{kind}: in place differs");
    }
}

/// A prompt's attention (blocks of rows) gives each query the bits that
/// query gets alone (decode's one-row blocks), on every path: the blocks
/// share loads, not arithmetic.
#[test]
fn prompt_attention_gives_each_query_its_decode_bits() {
    let _pool = pool_to_myself();
    let [hd, n_q, n_head, n_kv, n_head_kv] = [64, 37, 6, 100, 2];
    let mut rng = fastrand::Rng::with_seed(5);
    let qd = Desc {
        nb: [4, hd * n_head * 4, hd * 4, hd * n_head * n_q * 4],
        ..Desc::contiguous(DType::F32, [hd, n_q, n_head, 1])
    };
    let row = DType::F16.row_bytes(hd).unwrap();
    let kvd = Desc {
        dtype: DType::F16,
        ne: [hd, n_kv, n_head_kv, 1],
        nb: [2, row * n_head_kv, row, row * n_head_kv * n_kv],
    };
    let md = Desc::contiguous(DType::F32, [n_kv, n_q, 1, 1]);
    let mut params = [0; 8];
    params[0] = kiln_plugin_api::types::f32_param(0.125);
    let mut q: Vec<u8> = (0..hd * n_q * n_head)
        .flat_map(|_| (rng.f32() * 6.0 - 3.0).to_le_bytes())
        .collect();
    let mut kv: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            (0..n_kv * n_head_kv)
                .flat_map(|_| random_row(DType::F16, hd, &mut rng))
                .collect()
        })
        .collect();
    let mut mask: Vec<u8> = (0..n_q)
        .flat_map(|i| {
            (0..n_kv).map(move |t| {
                if t <= n_kv - n_q + i {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .flat_map(f32::to_le_bytes)
        .collect();
    let [kb, vb] = &mut kv[..] else {
        unreachable!()
    };
    let (k, v) = (view(kvd, kb), view(kvd, vb));
    let (qv, mv) = (view(qd, &mut q), view(md, &mut mask));
    for isa in Isa::available() {
        let mut all = vec![0u8; qd.extent().unwrap()];
        let mut one = vec![0u8; qd.extent().unwrap()];
        // SAFETY: every view covers its Vec; a query's views are row i of
        // Q, the mask and dst, with their strides.
        unsafe {
            run(
                isa,
                OpKind::Attention,
                &[qv, k, v, mv],
                &view(qd, &mut all),
                &params,
            )
            .unwrap();
            for i in 0..n_q {
                let narrow = |v: View, desc: Desc| View {
                    data: v.data.add(i * desc.nb[1]),
                    desc: Desc {
                        ne: [desc.ne[0], 1, desc.ne[2], 1],
                        ..desc
                    },
                };
                let dst = narrow(view(qd, &mut one), qd);
                run(
                    isa,
                    OpKind::Attention,
                    &[narrow(qv, qd), k, v, narrow(mv, md)],
                    &dst,
                    &params,
                )
                .unwrap();
            }
        }
        assert!(
            bits(&f32s(&all)) == bits(&f32s(&one)),
            "{}: a prompt's query differs from itself alone",
            isa.name()
        );
    }
}
