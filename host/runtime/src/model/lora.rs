//! LoRA adapters applied at run time: `W·x + alpha/r · B·(A·x)` for each
//! adapted projection, with the base weights as they are stored (no
//! merged copy).
//!
//! The adapter is llama.cpp's GGUF format (`general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, per projection
//! `blk.N.<name>.weight.lora_a` of extents `[in, r]` and `.lora_b` of
//! `[r, out]`), kiln's own or one llama.cpp's converter made. [`read`]
//! checks it against the model and gives its matrices as f32 tensors, `B`
//! scaled by `alpha / r` as llama.cpp scales the product, under the same
//! names; [`crate::gguf::GgufFile::append_tensors`] puts them beside the
//! weights and [`super::forward`] adds the two products wherever a
//! projection has them.

use crate::gguf::{GgufFile, TensorInfo};
use kiln_plugin_api::DType;
use std::path::Path;

/// What an adapter applied to a model is: for reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Applied {
    pub path: std::path::PathBuf,
    /// Projections adapted.
    pub pairs: usize,
    /// The largest rank of its pairs.
    pub rank: usize,
    pub alpha: f32,
    /// Bytes of its matrices in memory (f32).
    pub bytes: u64,
}

/// Tensors to append to a model ([`crate::gguf::GgufFile::append_tensors`]).
pub type Tensors = Vec<(TensorInfo, Vec<u8>)>;

/// The projections an adapter may adapt, as GGUF names them
/// (`blk.N.<name>.weight`) and the forward pass runs them.
pub const TARGETS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Whether the tensor called `name` is one of the [`TARGETS`] of a layer.
pub fn is_target(name: &str) -> bool {
    name.strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, r)| l.parse::<usize>().ok().and(r.strip_suffix(".weight")))
        .is_some_and(|t| TARGETS.contains(&t))
}

/// Reads the adapter at `path` for the model `base`: its pairs as f32
/// tensors to append to the model (`B` scaled), and what it is. Refused,
/// naming the problem: a file that is not a LoRA adapter, one for another
/// architecture, a matrix for a tensor the model lacks or kiln does not
/// adapt, a pair with a half missing or extents that do not fit.
pub fn read(path: &Path, base: &GgufFile) -> Result<(Tensors, Applied), String> {
    read_with(path, base, true)
}

/// [`read`]'s checks and report from the adapter's header alone, its
/// matrices left unread (`base` may be a header too): what `kiln serve`
/// asks of a model's adapter before loading it (`Applied::bytes` is what
/// the model's memory budget adds) and `kiln doctor` of each one
/// configured.
pub fn check(path: &Path, base: &GgufFile) -> Result<Applied, String> {
    read_with(path, base, false).map(|(_, applied)| applied)
}

fn read_with(path: &Path, base: &GgufFile, data: bool) -> Result<(Tensors, Applied), String> {
    let fail = |what: String| format!("{}: {what}", path.display());
    let f = if data {
        GgufFile::open(path)
    } else {
        GgufFile::open_header(path)
    }
    .map_err(|e| e.to_string())?;
    let meta = |f: &GgufFile, k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    if meta(&f, "general.type") != "adapter" || meta(&f, "adapter.type") != "lora" {
        return Err(fail(
            "not a LoRA adapter (general.type = adapter, adapter.type = lora); `kiln finetune train` writes one".into(),
        ));
    }
    let (arch, base_arch) = (
        meta(&f, "general.architecture"),
        meta(base, "general.architecture"),
    );
    if arch != base_arch {
        return Err(fail(format!(
            "an adapter for {arch} models, not for this {base_arch} model"
        )));
    }
    let alpha = f
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0) as f32;
    let mut out = Vec::new();
    let (mut pairs, mut rank, mut bytes) = (0, 0, 0);
    for t in &f.tensors {
        let target = match (
            t.name.strip_suffix(".lora_a"),
            t.name.strip_suffix(".lora_b"),
        ) {
            (Some(w), _) => w,
            (_, Some(_)) => continue,
            _ => {
                return Err(fail(format!(
                    "tensor {:?} is not half of a LoRA pair (NAME.lora_a, NAME.lora_b)",
                    t.name
                )));
            }
        };
        let Some(w) = base.tensor(target) else {
            return Err(fail(format!(
                "{target}: the model has no such tensor; is the adapter for another model?"
            )));
        };
        if !is_target(target) {
            return Err(fail(format!(
                "{target}: kiln applies adapters to the attention and feed-forward projections ({}), not this tensor",
                TARGETS.join(", ")
            )));
        }
        let Some(b) = f.tensor(&format!("{target}.lora_b")) else {
            return Err(fail(format!("{target}: lora_a without its lora_b")));
        };
        let (cols, rows) = (w.ne[0], w.ne[1]);
        let r = t.ne[1];
        let fits =
            |i: &TensorInfo, ne: [u64; 2]| i.ne[..2] == ne && i.ne[2..].iter().all(|&n| n == 1);
        if r == 0 || !fits(t, [cols, r]) || !fits(b, [r, rows]) {
            return Err(fail(format!(
                "{target}: lora_a {:?} and lora_b {:?} do not fit the model's {rows} × {cols} weight (they need [{cols}, r] and [r, {rows}])",
                &t.ne[..2],
                &b.ne[..2]
            )));
        }
        // llama.cpp: the product scaled by alpha / r, or by 1 without alpha.
        let scale = if alpha == 0.0 { 1.0 } else { alpha / r as f32 };
        if data {
            out.push(dense(&f, t, 1.0));
            out.push(dense(&f, b, scale));
        }
        pairs += 1;
        rank = rank.max(r as usize);
        bytes += 4 * (t.n_elements() + b.n_elements());
    }
    if let Some(b) = (f.tensors.iter())
        .filter_map(|t| t.name.strip_suffix(".lora_b"))
        .find(|w| f.tensor(&format!("{w}.lora_a")).is_none())
    {
        return Err(fail(format!("{b}: lora_b without its lora_a")));
    }
    if pairs == 0 {
        return Err(fail("no LoRA pair in it".into()));
    }
    Ok((
        out,
        Applied {
            path: path.to_path_buf(),
            pairs,
            rank,
            alpha,
            bytes,
        },
    ))
}

/// Tensor `t` of `f` as f32 times `scale`, under its own name.
fn dense(f: &GgufFile, t: &TensorInfo, scale: f32) -> (TensorInfo, Vec<u8>) {
    let n = t.ne[0] as usize;
    let row = t.dtype.row_bytes(n).expect("checked by the reader");
    let mut values = vec![0f32; n];
    let mut bytes = Vec::with_capacity(4 * t.n_elements() as usize);
    for src in f.tensor_data(t).chunks_exact(row) {
        kiln_blocks::dequantize_row(t.dtype, src, &mut values);
        bytes.extend(values.iter().flat_map(|v| (v * scale).to_le_bytes()));
    }
    let info = TensorInfo {
        name: t.name.clone(),
        dtype: DType::F32,
        ne: t.ne,
        n_dims: t.n_dims,
        offset: 0,
        size: bytes.len() as u64,
    };
    (info, bytes)
}
