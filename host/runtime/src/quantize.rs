//! `kiln quantize`: GGUF in, GGUF out, each quantized tensor byte-identical
//! to llama.cpp's reference quantization of the same input.
//!
//! Which tensors change, and to what, follows llama.cpp's rules
//! (`llama_model_quantize` without `--pure` or an importance matrix):
//! - only tensors whose name ends in `weight`, with at least 2 dimensions,
//!   that are not norms (`*_norm.weight`) or MoE routers
//!   (`ffn_gate_inp.weight`), are quantized; everything else is copied;
//! - `output.weight` (or `token_embd.weight` when the output is tied to
//!   it) becomes Q6_K for every quantized target but Q8_0, which it keeps;
//! - the K-quant presets (`q2_k` … `q6_k`) give some tensors more bits:
//!   the attention V and output projections and `ffn_down`, by layer
//!   (llama.cpp's `use_more_bits`), by grouped-query ratio and for
//!   70B-class models, exactly as `llama_tensor_get_type_impl` does;
//! - a type whose block does not divide a tensor's rows falls back as in
//!   llama.cpp (Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
//!   and F16 when not even 32 divides them);
//! - F16/BF16 targets convert every quantizable tensor, output included;
//! - a tensor already in the target type is copied; a quantized source is
//!   refused (requantizing loses precision twice; start from F16/BF16/F32)
//!   unless [`Options::allow_requantize`] says otherwise;
//! - llama.cpp counts layers in its own tensor order (by layer number,
//!   then name), and so does [`plan`];
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

/// What `--type` accepts: a single type, or one of llama.cpp's K-quant
/// presets (a default type plus per-tensor choices). Not `q2_k_s` and the
/// IQ presets: llama.cpp makes them only with an importance matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(non_camel_case_types)]
pub enum Target {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    F16,
    BF16,
    Q2_K,
    Q3_K_S,
    Q3_K_M,
    Q3_K_L,
    Q4_K_S,
    Q4_K_M,
    Q5_K_S,
    Q5_K_M,
    Q6_K,
}

impl Target {
    pub const ALL: [Target; 16] = [
        Target::Q4_0,
        Target::Q4_1,
        Target::Q5_0,
        Target::Q5_1,
        Target::Q8_0,
        Target::F16,
        Target::BF16,
        Target::Q2_K,
        Target::Q3_K_S,
        Target::Q3_K_M,
        Target::Q3_K_L,
        Target::Q4_K_S,
        Target::Q4_K_M,
        Target::Q5_K_S,
        Target::Q5_K_M,
        Target::Q6_K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Q4_0 => "q4_0",
            Target::Q4_1 => "q4_1",
            Target::Q5_0 => "q5_0",
            Target::Q5_1 => "q5_1",
            Target::Q8_0 => "q8_0",
            Target::F16 => "f16",
            Target::BF16 => "bf16",
            Target::Q2_K => "q2_k",
            Target::Q3_K_S => "q3_k_s",
            Target::Q3_K_M => "q3_k_m",
            Target::Q3_K_L => "q3_k_l",
            Target::Q4_K_S => "q4_k_s",
            Target::Q4_K_M => "q4_k_m",
            Target::Q5_K_S => "q5_k_s",
            Target::Q5_K_M => "q5_k_m",
            Target::Q6_K => "q6_k",
        }
    }

    /// A name from [`Target::name`], any case; `q3_k`, `q4_k` and `q5_k`
    /// mean their `_m` presets, as in llama.cpp's `llama-quantize`.
    pub fn parse(s: &str) -> Option<Target> {
        let s = s.to_ascii_lowercase();
        let s = match s.as_str() {
            "q3_k" => "q3_k_m",
            "q4_k" => "q4_k_m",
            "q5_k" => "q5_k_m",
            other => other,
        };
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    /// The type every quantizable tensor gets unless a rule says otherwise.
    pub fn dtype(self) -> DType {
        match self {
            Target::Q4_0 => DType::Q4_0,
            Target::Q4_1 => DType::Q4_1,
            Target::Q5_0 => DType::Q5_0,
            Target::Q5_1 => DType::Q5_1,
            Target::Q8_0 => DType::Q8_0,
            Target::F16 => DType::F16,
            Target::BF16 => DType::BF16,
            Target::Q2_K => DType::Q2_K,
            Target::Q3_K_S | Target::Q3_K_M | Target::Q3_K_L => DType::Q3_K,
            Target::Q4_K_S | Target::Q4_K_M => DType::Q4_K,
            Target::Q5_K_S | Target::Q5_K_M => DType::Q5_K,
            Target::Q6_K => DType::Q6_K,
        }
    }

    /// llama.cpp's `llama_ftype` number, stored as `general.file_type`.
    pub fn ftype(self) -> u32 {
        match self {
            Target::F16 => 1,
            Target::Q4_0 => 2,
            Target::Q4_1 => 3,
            Target::Q8_0 => 7,
            Target::Q5_0 => 8,
            Target::Q5_1 => 9,
            Target::Q2_K => 10,
            Target::Q3_K_S => 11,
            Target::Q3_K_M => 12,
            Target::Q3_K_L => 13,
            Target::Q4_K_S => 14,
            Target::Q4_K_M => 15,
            Target::Q5_K_S => 16,
            Target::Q5_K_M => 17,
            Target::Q6_K => 18,
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

/// llama.cpp's broad tensor categories (`tensor_get_category`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    Output,
    /// `attn_v`, `attn_qkv`, `attn_kv_b`: the tensors llama.cpp counts as
    /// the sensitive "attention V" ones.
    AttnV,
    AttnOutput,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if ["attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"]
        .iter()
        .any(|n| name.contains(n))
    {
        Category::AttnV
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// llama.cpp's order of a model's tensors (`weight_name_comparer`): by
/// layer number (tensors outside a layer first), then by name. Its
/// per-layer rules count tensors in this order.
fn llama_order(names: &[&str]) -> Vec<usize> {
    let layer = |n: &str| -> i64 {
        n.strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|d| d.parse().ok())
            .unwrap_or(-1)
    };
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| {
        (layer(names[a]), names[a].as_bytes()).cmp(&(layer(names[b]), names[b].as_bytes()))
    });
    order
}

/// What llama.cpp's per-tensor rules read of the model.
struct Shape {
    n_layer: i64,
    /// How many attention-V tensors the file has (one per layer).
    n_v: i64,
    /// Query heads per KV head.
    n_gqa: u64,
    /// llama.cpp's "70B" model type (80 layers of Llama with grouped
    /// attention, or of Qwen2), whose V projections get more bits.
    is_70b: bool,
    tied: bool,
}

impl Shape {
    fn of(file: &GgufFile) -> Shape {
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let uint = |k: &str| file.get(&format!("{arch}.{k}")).and_then(|v| v.as_u64());
        let n_layer = uint("block_count").unwrap_or(0);
        let n_head = uint("attention.head_count").unwrap_or(0);
        let n_head_kv = uint("attention.head_count_kv").unwrap_or(n_head);
        Shape {
            n_layer: n_layer as i64,
            n_v: file
                .tensors
                .iter()
                .filter(|t| category(&t.name) == Category::AttnV)
                .count() as i64,
            n_gqa: n_head.checked_div(n_head_kv).unwrap_or(0),
            is_70b: n_layer == 80 && ((arch == "llama" && n_head != n_head_kv) || arch == "qwen2"),
            tied: file.tensor("output.weight").is_none(),
        }
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers,
/// and every third one between.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The type llama.cpp's preset rules (`llama_tensor_get_type_impl`, for
/// the presets kiln writes, without an importance matrix) give a
/// quantizable tensor. `i_v` and `i_down` count the attention-V and
/// `ffn_down` tensors seen so far in llama.cpp's order.
fn preset_type(
    target: Target,
    t: &TensorInfo,
    shape: &Shape,
    i_v: &mut i64,
    i_down: &mut i64,
) -> (DType, &'static str) {
    use Target as T;
    let default = target.dtype();
    let cat = category(&t.name);
    if cat == Category::Output || (shape.tied && cat == Category::TokenEmbd) {
        return if !t.ne[0].is_multiple_of(default.block_len() as u64) {
            (
                DType::Q8_0,
                "output tensor: Q8_0 (rows not a multiple of the block)",
            )
        } else if default != DType::Q8_0 {
            (
                DType::Q6_K,
                "output tensor: Q6_K (llama.cpp keeps it at higher precision)",
            )
        } else {
            (default, "output tensor: Q8_0")
        };
    }
    let to = match cat {
        Category::AttnV => {
            let (i, n) = (*i_v, shape.n_v);
            *i_v += 1;
            let gqa4 = shape.n_gqa >= 4;
            let to = match target {
                T::Q2_K if gqa4 => DType::Q4_K,
                T::Q2_K => DType::Q3_K,
                T::Q3_K_M if i < 2 => DType::Q5_K,
                T::Q3_K_M => DType::Q4_K,
                T::Q3_K_L => DType::Q5_K,
                T::Q4_K_M | T::Q5_K_M if use_more_bits(i, n) => DType::Q6_K,
                T::Q4_K_S if i < 4 => DType::Q5_K,
                _ => default,
            };
            if shape.is_70b && matches!(to, DType::Q3_K | DType::Q4_K) {
                DType::Q5_K
            } else {
                to
            }
        }
        Category::FfnDown => {
            let (i, n) = (*i_down, shape.n_layer);
            *i_down += 1;
            match target {
                T::Q2_K => DType::Q3_K,
                T::Q3_K_M if i < n / 16 => DType::Q5_K,
                T::Q3_K_M => DType::Q4_K,
                T::Q3_K_L => DType::Q5_K,
                T::Q4_K_M | T::Q5_K_M if use_more_bits(i, n) => DType::Q6_K,
                T::Q4_K_S if i < n / 8 => DType::Q5_K,
                _ => default,
            }
        }
        Category::AttnOutput => match target {
            T::Q2_K => DType::Q3_K,
            T::Q3_K_M => DType::Q4_K,
            T::Q3_K_L => DType::Q5_K,
            _ => default,
        },
        _ => default,
    };
    if to == default {
        (to, "quantized to the target type")
    } else {
        (to, "the preset gives it more bits")
    }
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide
/// the rows gives way to a 32-element one, or to F16.
fn fallback(to: DType, ne0: u64) -> (DType, bool) {
    if ne0.is_multiple_of(to.block_len() as u64) {
        return (to, false);
    }
    let small = match to {
        DType::Q2_K | DType::Q3_K => DType::Q4_0,
        DType::Q4_K => DType::Q5_0,
        DType::Q5_K => DType::Q5_1,
        DType::Q6_K => DType::Q8_0,
        DType::IQ4_XS => DType::IQ4_NL,
        other => other,
    };
    if ne0.is_multiple_of(small.block_len() as u64) {
        (small, true)
    } else {
        (DType::F16, true)
    }
}

/// The type each tensor of `file` gets for `target`, with the reason.
pub fn plan(
    file: &GgufFile,
    target: Target,
    allow_requantize: bool,
) -> Result<Vec<(DType, &'static str)>, QuantizeError> {
    let refuse = |what: String| QuantizeError::Refused {
        path: file.path().display().to_string(),
        what,
    };
    let shape = Shape::of(file);
    let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
    let (mut i_v, mut i_down) = (0, 0);
    let mut types = vec![(DType::F32, ""); file.tensors.len()];
    for i in llama_order(&names) {
        let t = &file.tensors[i];
        types[i] = if !is_quantizable(t) {
            (t.dtype, "kept: not a 2-D weight, or a norm")
        } else if !target.dtype().is_quantized() {
            (target.dtype(), "converted to the target type")
        } else {
            let (to, why) = preset_type(target, t, &shape, &mut i_v, &mut i_down);
            match fallback(to, t.ne[0]) {
                (to, false) => (to, why),
                (DType::F16, true) => (
                    DType::F16,
                    "F16: rows not a multiple of 32 (llama.cpp's fallback)",
                ),
                (to, true) => (
                    to,
                    "a 32-element type: rows not a multiple of 256 (llama.cpp's fallback)",
                ),
            }
        };
        let (to, _) = types[i];
        if t.dtype == to {
            types[i].1 = "kept: already the target type";
        } else if t.dtype.is_quantized() && !allow_requantize {
            return Err(refuse(format!(
                "tensor {:?} is already quantized ({}); requantizing loses precision twice: quantize from the F16, BF16 or F32 model, or pass --allow-requantize",
                t.name, t.dtype
            )));
        }
    }
    Ok(types)
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

/// How to quantize.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub target: Target,
    /// Rows are split across this many threads (at least 1).
    pub threads: usize,
    /// Measure every quantized tensor's error against the source.
    pub validate: bool,
    /// Quantize tensors that already are (llama.cpp's `--allow-requantize`):
    /// they are dequantized exactly first, but lose precision twice.
    pub allow_requantize: bool,
}

impl Options {
    /// `target` on one thread, nothing else.
    pub fn new(target: Target) -> Options {
        Options {
            target,
            threads: 1,
            validate: false,
            allow_requantize: false,
        }
    }
}

/// Quantizes `input` into `output`. `progress(done, total, name)` follows
/// the bytes of input processed.
pub fn quantize(
    input: &Path,
    output: &Path,
    options: Options,
    mut progress: impl FnMut(u64, u64, &str),
) -> Result<Summary, QuantizeError> {
    let Options {
        target,
        threads,
        validate,
        allow_requantize,
    } = options;
    let file = GgufFile::open(input)?;
    let types = plan(&file, target, allow_requantize)?;
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
    let total = file.tensor_bytes();
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
        let s = quantize(
            &input,
            &out,
            Options {
                threads: 2,
                validate: true,
                ..Options::new(Target::Q4_0)
            },
            |_, _, _| {},
        )
        .unwrap();
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
        quantize(&input, &out, Options::new(Target::Q5_0), |_, _, _| {}).unwrap();
        assert_eq!(
            types_after(&out)[0],
            ("token_embd.weight".into(), DType::Q6_K)
        );
        quantize(&input, &out, Options::new(Target::Q8_0), |_, _, _| {}).unwrap();
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
        quantize(&input, &q, Options::new(Target::Q8_0), |_, _, _| {}).unwrap();
        let again = dir.path().join("again.gguf");
        let err = quantize(&q, &again, Options::new(Target::Q4_0), |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("already quantized (q8_0)"), "{err}");
        assert!(err.contains("--allow-requantize"), "{err}");
        assert!(!again.exists());
        let allowed = Options {
            allow_requantize: true,
            ..Options::new(Target::Q4_0)
        };
        quantize(&q, &again, allowed, |_, _, _| {}).unwrap();
        assert_eq!(
            types_after(&again)[2],
            ("blk.0.attn_q.weight".into(), DType::Q4_0)
        );
    }

    #[test]
    fn presets_follow_llama_cpp_order_layers_and_fallbacks() {
        // Layers 10 and 2 sort by number, not by name; other tensors first.
        let names = [
            "blk.10.attn_v.weight",
            "output.weight",
            "blk.2.attn_v.weight",
        ];
        assert_eq!(llama_order(&names), vec![1, 2, 0]);
        // 32 layers: the first 4, the last 4 and every third between.
        let more: Vec<i64> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(fallback(DType::Q4_K, 576), (DType::Q5_0, true));
        assert_eq!(fallback(DType::Q5_K, 576), (DType::Q5_1, true));
        assert_eq!(fallback(DType::Q6_K, 576), (DType::Q8_0, true));
        assert_eq!(fallback(DType::Q2_K, 576), (DType::Q4_0, true));
        assert_eq!(fallback(DType::Q4_K, 1536), (DType::Q4_K, false));
        assert_eq!(fallback(DType::Q4_0, 100), (DType::F16, true));
        assert_eq!(Target::parse("Q4_K"), Some(Target::Q4_K_M));
        assert_eq!(Target::parse("q3_k_s"), Some(Target::Q3_K_S));
        assert_eq!(Target::parse("q4_k_x"), None);
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()), Some(t));
        }
    }

    #[test]
    fn the_thread_count_does_not_change_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let input = model(dir.path(), false);
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        quantize(&input, &a, Options::new(Target::Q4_0), |_, _, _| {}).unwrap();
        quantize(
            &input,
            &b,
            Options {
                threads: 3,
                validate: false,
                ..Options::new(Target::Q4_0)
            },
            |_, _, _| {},
        )
        .unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }
}
