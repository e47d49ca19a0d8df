//! Adapters and checkpoints on disk, both GGUF written atomically by
//! kiln's writer (a temporary file, fsynced, renamed).
//!
//! An adapter is llama.cpp's LoRA format: `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, the base model's
//! `general.architecture`, and per adapted projection
//! `blk.N.<name>.weight.lora_a` (extents `[in, r]`: `A`, r rows of `in`)
//! and `.lora_b` (`[r, out]`: `B`, `out` rows of `r`), so llama.cpp loads
//! it (`--lora`, llama-cpp-python's `lora_path`) and applies
//! `W·x + alpha/r · B·A·x` as kiln trains it.
//!
//! A checkpoint holds the adapter, AdamW's moments and step count, and
//! the run's settings under `kiln.finetune.*`, to resume exactly.

use super::model::{Adapter, Base, Pair, TARGETS};
use super::optim::AdamW;
use kiln_plugin_api::DType;
use kiln_runtime::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use std::path::Path;

fn spec(name: String, ne: &[usize]) -> TensorSpec {
    TensorSpec::new(name, DType::F32, ne)
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every pair as (GGUF tensor base name, pair).
fn named(adapter: &Adapter<f32>) -> Vec<(String, &Pair<f32>)> {
    let mut out = Vec::new();
    for (l, layer) in adapter.layers.iter().enumerate() {
        for (t, p) in layer.iter().enumerate() {
            if let Some(p) = p {
                out.push((format!("blk.{l}.{}.weight", TARGETS[t]), p));
            }
        }
    }
    out
}

fn write_pairs(
    path: &Path,
    metadata: Vec<(String, Value)>,
    groups: &[(&str, &Adapter<f32>)],
) -> Result<(), String> {
    let mut specs = Vec::new();
    let mut data: Vec<&[f32]> = Vec::new();
    for (prefix, adapter) in groups {
        for (name, p) in named(adapter) {
            let r = adapter.rank;
            specs.push(spec(format!("{prefix}{name}.lora_a"), &[p.cols, r]));
            specs.push(spec(format!("{prefix}{name}.lora_b"), &[r, p.rows]));
            data.push(&p.a);
            data.push(&p.b);
        }
    }
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut w = GgufWriter::create(path, &metadata, &specs).map_err(err)?;
    for d in data {
        w.write_tensor(&bytes(d)).map_err(err)?;
    }
    w.finish().map_err(err)
}

fn adapter_metadata(base: &Base, adapter: &Adapter<f32>) -> Vec<(String, Value)> {
    let s = |k: &str, v: &str| (k.to_string(), Value::String(v.to_string()));
    vec![
        s("general.architecture", base.cfg.arch.name()),
        s("general.type", "adapter"),
        s("adapter.type", "lora"),
        ("adapter.lora.alpha".into(), Value::F32(adapter.alpha)),
        s("general.name", "kiln LoRA adapter"),
    ]
}

/// Writes `adapter` (for `base`) in llama.cpp's LoRA format.
pub fn write_adapter(path: &Path, base: &Base, adapter: &Adapter<f32>) -> Result<(), String> {
    write_adapter_with(path, base, adapter, &[])
}

/// [`write_adapter`] with more metadata (a DP run's privacy spent).
pub fn write_adapter_with(
    path: &Path,
    base: &Base,
    adapter: &Adapter<f32>,
    extra: &[(String, Value)],
) -> Result<(), String> {
    let mut metadata = adapter_metadata(base, adapter);
    metadata.extend_from_slice(extra);
    write_pairs(path, metadata, &[("", adapter)])
}

/// Reads a LoRA adapter in llama.cpp's format (kiln's, or one
/// llama.cpp's `convert_lora_to_gguf.py` made) for `base`.
pub fn read_adapter(path: &Path, base: &Base) -> Result<Adapter<f32>, String> {
    let f = GgufFile::open(path).map_err(|e| e.to_string())?;
    let meta = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let fail = |what: String| Err(format!("{}: {what}", path.display()));
    if meta("general.type") != "adapter" || meta("adapter.type") != "lora" {
        return fail("not a LoRA adapter (general.type = adapter, adapter.type = lora)".into());
    }
    if meta("general.architecture") != base.cfg.arch.name() {
        return fail(format!(
            "an adapter for {} models, not {}",
            meta("general.architecture"),
            base.cfg.arch.name()
        ));
    }
    read_pairs(&f, "", base, path)
}

fn read_pairs(
    f: &GgufFile,
    prefix: &str,
    base: &Base,
    path: &Path,
) -> Result<Adapter<f32>, String> {
    let alpha = f
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0) as f32;
    let mut rank = 0;
    let mut layers = Vec::new();
    let mut found = 0;
    for l in 0..base.cfg.n_layer {
        let mut layer: [Option<Pair<f32>>; 7] = Default::default();
        for (t, slot) in layer.iter_mut().enumerate() {
            let name = format!("{prefix}blk.{l}.{}.weight", TARGETS[t]);
            let (Some(a), Some(b)) = (
                f.tensor(&format!("{name}.lora_a")),
                f.tensor(&format!("{name}.lora_b")),
            ) else {
                continue;
            };
            let (rows, cols) = base.shape(l, t);
            let r = a.ne[1] as usize;
            if a.ne[0] as usize != cols || b.ne[0] as usize != r || b.ne[1] as usize != rows {
                return Err(format!(
                    "{}: {name}: lora_a {:?} and lora_b {:?} do not fit the model's {rows} × {cols} weight",
                    path.display(),
                    &a.ne[..2],
                    &b.ne[..2]
                ));
            }
            if rank != 0 && r != rank {
                return Err(format!(
                    "{}: {name} has rank {r}, other pairs {rank}; kiln needs one rank",
                    path.display()
                ));
            }
            rank = r;
            let dense = |t: &kiln_runtime::gguf::TensorInfo| {
                let n = t.ne[0] as usize;
                let mut out = vec![0f32; t.n_elements() as usize];
                let data = f.tensor_data(t);
                let row = t.dtype.row_bytes(n).expect("checked by the reader");
                for (o, src) in out.chunks_mut(n).zip(data.chunks(row)) {
                    kiln_blocks::dequantize_row(t.dtype, src, o);
                }
                out
            };
            *slot = Some(Pair {
                a: dense(a),
                b: dense(b),
                rows,
                cols,
            });
            found += 1;
        }
        layers.push(layer);
    }
    if found == 0 {
        return Err(format!(
            "{}: no LoRA pair for any of this model's projections",
            path.display()
        ));
    }
    Ok(Adapter {
        rank,
        alpha: if alpha == 0.0 { rank as f32 } else { alpha },
        layers,
    })
}

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// Steps done.
    pub step: usize,
    /// The run's settings (JSON), compared on resume.
    pub settings: String,
    /// The loss of each step done, to continue the curve (`None` for a
    /// DP step that sampled nothing).
    pub losses: Vec<Option<f64>>,
}

/// Writes a checkpoint: the adapter, AdamW's moments, and `resume`.
pub fn write_checkpoint(
    path: &Path,
    base: &Base,
    adapter: &Adapter<f32>,
    opt: &AdamW,
    resume: &Resume,
) -> Result<(), String> {
    let mut metadata = adapter_metadata(base, adapter);
    metadata.push((
        "kiln.finetune.resume".into(),
        Value::String(serde_json::to_string(resume).expect("JSON")),
    ));
    metadata.push(("kiln.finetune.adam_t".into(), Value::U64(opt.t)));
    write_pairs(
        path,
        metadata,
        &[("", adapter), ("adam_m.", &opt.m), ("adam_v.", &opt.v)],
    )
}

/// Reads a checkpoint [`write_checkpoint`] wrote.
pub fn read_checkpoint(
    path: &Path,
    base: &Base,
    weight_decay: f64,
) -> Result<(Adapter<f32>, AdamW, Resume), String> {
    let f = GgufFile::open(path).map_err(|e| e.to_string())?;
    let resume: Resume = f
        .get("kiln.finetune.resume")
        .and_then(|v| v.as_str())
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| format!("{}: not a kiln training checkpoint", path.display()))?;
    let adapter = read_pairs(&f, "", base, path)?;
    let mut opt = AdamW::new(&adapter, weight_decay);
    opt.m = read_pairs(&f, "adam_m.", base, path)?;
    opt.v = read_pairs(&f, "adam_v.", base, path)?;
    opt.m.alpha = adapter.alpha;
    opt.v.alpha = adapter.alpha;
    opt.t = f
        .get("kiln.finetune.adam_t")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    Ok((adapter, opt, resume))
}
