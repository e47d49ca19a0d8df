//! The CPU reference's block formats against llama.cpp's own Python
//! implementation (the `gguf` package): dequantization of every weight type
//! agrees exactly, and the reference quantizers (F16, BF16, Q4_0, Q5_0,
//! Q8_0) write the same bytes.
//!
//! Needs a Python with `gguf` and `numpy`: `KILN_PYTHON`, else the venv
//! `.ci/run` makes (`target/python-venv`), else `python3`. Without them this
//! test fails and says how to install them.

use kiln_blocks::{dequantize_row, quantize_row, random_row};
use kiln_plugin_api::DType;
use std::path::Path;
use std::process::Command;

fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("KILN_PYTHON") {
        return p.into();
    }
    let venv = kiln_tests::target_dir().join("python-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

fn oracle(op: &str, dtype: DType, input: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("in.bin"), dir.path().join("out.bin"));
    std::fs::write(&src, input).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("oracle/gguf_quants.py");
    let out = Command::new(python())
        .arg(script)
        .args([op, &dtype.name().to_uppercase()])
        .args([&src, &dst])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "the gguf oracle failed with {} (run .ci/run, or pip install gguf numpy, or set KILN_PYTHON):\n{}",
        python().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dst).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn dequantization_matches_gguf_for_every_weight_type() {
    let mut rng = fastrand::Rng::with_seed(11);
    for dtype in DType::WEIGHTS {
        let n = 256 * 6;
        let row = random_row(dtype, n, &mut rng);
        let mut ours = vec![0f32; n];
        dequantize_row(dtype, &row, &mut ours);
        let theirs = f32s(&oracle("dequantize", dtype, &row));
        assert_eq!(theirs.len(), n, "{dtype}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-6 * b.abs(),
                "{dtype} element {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn reference_quantizers_write_gguf_bytes() {
    let mut rng = fastrand::Rng::with_seed(12);
    for dtype in [
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_1,
    ] {
        // Mixed magnitudes, exact ties at block maxima, zeros and a zero block.
        let n = 32 * 40;
        let mut values: Vec<f32> = (0..n)
            .map(|_| (rng.f32() * 2.0 - 1.0) * 10f32.powi(rng.i32(-3..3)))
            .collect();
        values[..32].iter_mut().for_each(|v| *v = 0.0);
        values[40] = -values[41].abs().max(0.5);
        values[41] = -values[40];
        let mut ours = vec![0u8; dtype.row_bytes(n).unwrap()];
        quantize_row(dtype, &values, &mut ours);
        let input: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let theirs = oracle("quantize", dtype, &input);
        assert_eq!(ours.len(), theirs.len(), "{dtype}");
        if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            panic!(
                "{dtype}: first differing byte {i} (block {})",
                i / dtype.block_bytes()
            );
        }
    }
}
