//! `kiln quantize`: GGUF in, GGUF out, each quantized tensor byte-identical
//! to llama.cpp's reference quantization of the same input.
//!
//! Which tensors change, and to what, follows llama.cpp's rules
//! (`llama_model_quantize` without `--pure`, for these targets):
//! - only tensors whose name ends in `weight`, with at least 2 dimensions,
//!   that are not norms (`*_norm.weight`) or MoE routers
//!   (`ffn_gate_inp.weight`), are quantized; everything else is copied;
//! - for a Q4_0/Q5_0 target, `output.weight` (or `token_embd.weight` when
//!   the output is tied to it) becomes Q6_K, or Q8_0 when its rows are not
//!   a multiple of 256; for a Q8_0 target it stays Q8_0;
//! - F16/BF16 targets convert every quantizable tensor, output included;
//! - a tensor already in the target type is copied; a quantized source is
//!   refused (requantizing loses precision twice; start from F16/BF16/F32);
//! - metadata is copied with `general.file_type` set to llama.cpp's ftype
//!   number and `general.quantization_version` = 2, plus kiln's
//!   `kiln.quantized_from.sha256` (the input's hash, so `kiln models add`
//!   records the new version's parent).
//!
//! The output streams tensor by tensor: memory beyond the mapped input is
//! one tensor's result. Rows are split across threads. The file is written
//! to a temporary name, fsynced and renamed (see `gguf::GgufWriter`).

use crate::gguf::{GgufError, GgufFile, GgufWriter, TensorInfo, TensorSpec, Value};
use kiln_blocks::{dequantize_row, quantize_row};
use kiln_plugin_api::DType;
use serde::Serialize;
use std::path::Path;

/// What `--type` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Q4_0,
    Q5_0,
    Q8_0,
    F16,
    BF16,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        Some(match s.to_ascii_lowercase().as_str() {
            "q4_0" => Target::Q4_0,
            "q5_0" => Target::Q5_0,
            "q8_0" => Target::Q8_0,
            "f16" => Target::F16,
            "bf16" => Target::BF16,
            _ => return None,
        })
    }

    pub fn dtype(self) -> DType {
        match self {
            Target::Q4_0 => DType::Q4_0,
            Target::Q5_0 => DType::Q5_0,
            Target::Q8_0 => DType::Q8_0,
            Target::F16 => DType::F16,
            Target::BF16 => DType::BF16,
        }
    }

    /// llama.cpp's `llama_ftype` number, stored as `general.file_type`.
    pub fn ftype(self) -> u32 {
        match self {
            Target::F16 => 1,
            Target::Q4_0 => 2,
            Target::Q8_0 => 7,
            Target::Q5_0 => 8,
            Target::BF16 => 32,
        }
    }
}

/// What happens to one tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorPlan {
    pub name: String,
    pub from: String,
    pub to: String,
    pub why: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {what}")]
    Refused { path: String, what: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn is_quantizable(t: &TensorInfo) -> bool {
    t.name.ends_with("weight")
        && t.n_dims >= 2
        && !t.name.contains("_norm.weight")
        && !t.name.contains("ffn_gate_inp.weight")
}

/// The type each tensor of `file` gets for `target`, with the reason.
pub fn plan(file: &GgufFile, target: Target) -> Result<Vec<(DType, &'static str)>, QuantizeError> {
    let has_output = file.tensor("output.weight").is_some();
    let refuse = |what: String| QuantizeError::Refused {
        path: file.path().display().to_string(),
        what,
    };
    file.tensors
        .iter()
        .map(|t| {
            if !is_quantizable(t) {
                return Ok((t.dtype, "kept: not a 2-D weight, or a norm"));
            }
            let is_output = t.name == "output.weight" || (!has_output && t.name == "token_embd.weight");
            let mut to = target.dtype();
            let mut why = "quantized to the target type";
            if is_output && to.is_quantized() && to != DType::Q8_0 {
                (to, why) = if t.ne[0] % 256 == 0 {
                    (DType::Q6_K, "output tensor: Q6_K (llama.cpp keeps it at higher precision)")
                } else {
                    (DType::Q8_0, "output tensor: Q8_0 (rows not a multiple of 256)")
                };
            }
            if t.dtype == to {
                return Ok((to, "kept: already the target type"));
            }
            if t.dtype.is_quantized() {
                return Err(refuse(format!(
                    "tensor {:?} is already quantized ({}); requantizing loses precision twice: quantize from the F16, BF16 or F32 model",
                    t.name, t.dtype
                )));
            }
            if t.ne[0] % to.block_len() as u64 != 0 {
                return Err(refuse(format!(
                    "tensor {:?} has rows of {} elements, not a multiple of {}'s block of {}",
                    t.name,
                    t.ne[0],
                    to,
                    to.block_len()
                )));
            }
            Ok((to, why))
        })
        .collect()
}

/// Per-tensor error of the result against the source.
#[derive(Clone, Debug, Serialize)]
pub struct TensorError {
    pub name: String,
    pub dtype: String,
    pub rmse: f64,
    pub cosine: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub tensors: Vec<TensorPlan>,
    /// With `validate`: the error of every quantized tensor.
    pub errors: Vec<TensorError>,
}

/// Quantizes `input` into `output`. `progress(done, total, name)` follows
/// the bytes of input processed.
pub fn quantize(
    input: &Path,
    output: &Path,
    target: Target,
    threads: usize,
    validate: bool,
    mut progress: impl FnMut(u64, u64, &str),
) -> Result<Summary, QuantizeError> {
    let file = GgufFile::open(input)?;
    let types = plan(&file, target)?;
    let mut metadata = file.metadata.clone();
    set_u32(&mut metadata, "general.quantization_version", 2);
    set_u32(&mut metadata, "general.file_type", target.ftype());
    // The source's identity, so the model store can link versions.
    let source = crate::store::hash_file(input, |_| {}).map_err(|e| QuantizeError::Refused {
        path: input.display().to_string(),
        what: e.to_string(),
    })?;
    match metadata
        .iter_mut()
        .find(|(k, _)| k == crate::store::PARENT_KEY)
    {
        Some((_, v)) => *v = Value::String(source),
        None => metadata.push((crate::store::PARENT_KEY.to_string(), Value::String(source))),
    }
    let specs: Vec<TensorSpec> = file
        .tensors
        .iter()
        .zip(&types)
        .map(|(t, (to, _))| TensorSpec {
            name: t.name.clone(),
            dtype: *to,
            ne: t.ne,
            n_dims: t.n_dims,
        })
        .collect();
    let write_err = |source| QuantizeError::Write {
        path: output.display().to_string(),
        source,
    };
    let mut writer = GgufWriter::create(output, &metadata, &specs).map_err(write_err)?;
    let total: u64 = file.tensors.iter().map(|t| t.size).sum();
    let mut done = 0;
    let mut errors = Vec::new();
    for (t, (to, _)) in file.tensors.iter().zip(&types) {
        progress(done, total, &t.name);
        let src = file.tensor_data(t);
        if t.dtype == *to {
            writer.write_tensor(src).map_err(write_err)?;
        } else {
            let out = convert(src, t, *to, threads);
            if validate {
                errors.push(measure(t, src, *to, &out));
            }
            writer.write_tensor(&out).map_err(write_err)?;
        }
        done += t.size;
    }
    progress(total, total, "");
    writer.finish().map_err(write_err)?;
    let output_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(Summary {
        input_bytes: std::fs::metadata(input).map(|m| m.len()).unwrap_or(0),
        output_bytes,
        tensors: file
            .tensors
            .iter()
            .zip(&types)
            .map(|(t, (to, why))| TensorPlan {
                name: t.name.clone(),
                from: t.dtype.to_string(),
                to: to.to_string(),
                why,
            })
            .collect(),
        errors,
    })
}

fn set_u32(metadata: &mut Vec<(String, Value)>, key: &str, v: u32) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) => *old = Value::U32(v),
        None => metadata.push((key.to_string(), Value::U32(v))),
    }
}

/// Converts one tensor's rows from its type to `to`, rows split across threads.
fn convert(src: &[u8], t: &TensorInfo, to: DType, threads: usize) -> Vec<u8> {
    let n = t.ne[0] as usize;
    let rows = (t.n_elements() / t.ne[0]) as usize;
    let (in_row, out_row) = (
        t.dtype.row_bytes(n).expect("checked at open"),
        to.row_bytes(n).expect("checked by plan"),
    );
    let mut out = vec![0u8; rows * out_row];
    let per_thread = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (src_chunk, out_chunk) in src
            .chunks(per_thread * in_row)
            .zip(out.chunks_mut(per_thread * out_row))
        {
            s.spawn(move || {
                let mut f = vec![0f32; n];
                for (i, o) in src_chunk
                    .chunks_exact(in_row)
                    .zip(out_chunk.chunks_exact_mut(out_row))
                {
                    dequantize_row(t.dtype, i, &mut f);
                    quantize_row(to, &f, o);
                }
            });
        }
    });
    out
}

fn measure(t: &TensorInfo, src: &[u8], to: DType, out: &[u8]) -> TensorError {
    let n = t.ne[0] as usize;
    let (in_row, out_row) = (t.dtype.row_bytes(n).unwrap(), to.row_bytes(n).unwrap());
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    let (mut err, mut dot, mut na, mut nb) = (0f64, 0f64, 0f64, 0f64);
    for (i, o) in src.chunks_exact(in_row).zip(out.chunks_exact(out_row)) {
        dequantize_row(t.dtype, i, &mut a);
        dequantize_row(to, o, &mut b);
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (x as f64, y as f64);
            err += (x - y) * (x - y);
            dot += x * y;
            na += x * x;
            nb += y * y;
        }
    }
    let count = t.n_elements() as f64;
    TensorError {
        name: t.name.clone(),
        dtype: to.to_string(),
        rmse: (err / count).sqrt(),
        cosine: if na == 0.0 || nb == 0.0 {
            1.0
        } else {
            dot / (na.sqrt() * nb.sqrt())
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{TensorSpec, ValueType};

    fn model(dir: &Path, tied: bool) -> std::path::PathBuf {
        let path = dir.join("m.gguf");
        let mut specs = vec![
            ("token_embd.weight", DType::F16, [256, 8, 1, 1], 2),
            ("blk.0.attn_norm.weight", DType::F32, [256, 1, 1, 1], 1),
            ("blk.0.attn_q.weight", DType::F16, [256, 256, 1, 1], 2),
            ("blk.0.attn_q.bias", DType::F32, [256, 1, 1, 1], 1),
            ("output_norm.weight", DType::F32, [256, 1, 1, 1], 1),
        ];
        if !tied {
            specs.push(("output.weight", DType::F16, [256, 8, 1, 1], 2));
        }
        let specs: Vec<TensorSpec> = specs
            .into_iter()
            .map(|(name, dtype, ne, n_dims)| TensorSpec {
                name: name.into(),
                dtype,
                ne,
                n_dims,
            })
            .collect();
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.file_type".to_string(), Value::U32(1)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(ValueType::String, vec![]),
            ),
        ];
        let mut w = GgufWriter::create(&path, &meta, &specs).unwrap();
        let mut rng = fastrand::Rng::with_seed(5);
        for s in &specs {
            let n = (s.ne[0] * s.ne[1]) as usize;
            let values: Vec<f32> = (0..n).map(|_| rng.f32() - 0.5).collect();
            let mut data = vec![0u8; s.size() as usize];
            for (row, out) in values
                .chunks(s.ne[0] as usize)
                .zip(data.chunks_mut(s.dtype.row_bytes(s.ne[0] as usize).unwrap()))
            {
                quantize_row(s.dtype, row, out);
            }
            w.write_tensor(&data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn types_after(path: &Path) -> Vec<(String, DType)> {
        GgufFile::open(path)
            .unwrap()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype))
            .collect()
    }

    #[test]
    fn follows_llama_cpp_rules_for_q4_0() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path(), false);
        let out = dir.path().join("q.gguf");
        let s = quantize(&input, &out, Target::Q4_0, 2, true, |_, _, _| {}).unwrap();
        assert_eq!(
            types_after(&out),
            vec![
                ("token_embd.weight".into(), DType::Q4_0),
                ("blk.0.attn_norm.weight".into(), DType::F32),
                ("blk.0.attn_q.weight".into(), DType::Q4_0),
                ("blk.0.attn_q.bias".into(), DType::F32),
                ("output_norm.weight".into(), DType::F32),
                ("output.weight".into(), DType::Q6_K),
            ]
        );
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.get("general.file_type"), Some(&Value::U32(2)));
        assert_eq!(f.get("general.quantization_version"), Some(&Value::U32(2)));
        assert_eq!(s.errors.len(), 3);
        for e in &s.errors {
            assert!(e.cosine > 0.98 && e.rmse < 0.05, "{e:?}");
        }
    }

    #[test]
    fn tied_embeddings_take_the_output_rule_and_q8_0_keeps_q8_0() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path(), true);
        let out = dir.path().join("q.gguf");
        quantize(&input, &out, Target::Q5_0, 1, false, |_, _, _| {}).unwrap();
        assert_eq!(
            types_after(&out)[0],
            ("token_embd.weight".into(), DType::Q6_K)
        );
        quantize(&input, &out, Target::Q8_0, 1, false, |_, _, _| {}).unwrap();
        assert_eq!(
            types_after(&out)[0],
            ("token_embd.weight".into(), DType::Q8_0)
        );
    }

    #[test]
    fn requantizing_is_refused_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path(), false);
        let q = dir.path().join("q.gguf");
        quantize(&input, &q, Target::Q8_0, 1, false, |_, _, _| {}).unwrap();
        let again = dir.path().join("again.gguf");
        let err = quantize(&q, &again, Target::Q4_0, 1, false, |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("already quantized (q8_0)"), "{err}");
        assert!(!again.exists());
    }

    #[test]
    fn the_thread_count_does_not_change_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path(), false);
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        quantize(&input, &a, Target::Q4_0, 1, false, |_, _, _| {}).unwrap();
        quantize(&input, &b, Target::Q4_0, 3, false, |_, _, _| {}).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }
}
