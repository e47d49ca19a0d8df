//! An adapter merged into its base model: each adapted projection written
//! as `W + alpha/r · B·A` in one type (F16 by default: no second
//! quantization), every other tensor and all metadata as they were. A
//! merged model runs anywhere the base runs (kiln's inference, llama.cpp),
//! and `kiln finetune eval` generates with one.

use super::linalg::{Op, gemm};
use super::model::{Adapter, Base, TARGETS};
use kiln_plugin_api::DType;
use kiln_runtime::gguf::{GgufWriter, TensorSpec, Value};
use std::path::Path;

/// Writes `base` with `adapter` merged to `out`, the adapted projections
/// in `dtype`; returns how many tensors changed.
pub fn write_merged(
    base: &Base,
    adapter: &Adapter<f32>,
    out: &Path,
    dtype: DType,
) -> Result<usize, String> {
    let file = base.file();
    let mut metadata = file.metadata.clone();
    metadata.retain(|(k, _)| k != "kiln.finetune.merged_adapter");
    metadata.push((
        "kiln.finetune.merged_adapter".into(),
        Value::String(format!(
            "rank {}, alpha {}, {} pairs",
            adapter.rank,
            adapter.alpha,
            adapter.pairs().count()
        )),
    ));
    let adapted = |name: &str| -> Option<(usize, usize)> {
        let rest = name.strip_prefix("blk.")?;
        let (l, rest) = rest.split_once('.')?;
        let target = rest.strip_suffix(".weight")?;
        let l: usize = l.parse().ok()?;
        let t = TARGETS.iter().position(|&n| n == target)?;
        adapter.layers.get(l)?.get(t)?.as_ref().map(|_| (l, t))
    };
    let specs: Vec<TensorSpec> = (file.tensors.iter())
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if adapted(&t.name).is_some() {
                dtype
            } else {
                t.dtype
            },
            ne: t.ne,
            n_dims: t.n_dims,
        })
        .collect();
    for s in &specs {
        if s.dtype.row_bytes(s.ne[0] as usize).is_none() {
            return Err(format!(
                "{}: rows of {} elements do not fit {} blocks; merge into f16 or f32",
                s.name,
                s.ne[0],
                s.dtype.name()
            ));
        }
    }
    let err = |e: std::io::Error| format!("{}: {e}", out.display());
    let mut w = GgufWriter::create(out, &metadata, &specs).map_err(err)?;
    let mut changed = 0;
    for (t, spec) in file.tensors.iter().zip(&specs) {
        let Some((l, target)) = adapted(&t.name) else {
            w.write_tensor(file.tensor_data(t)).map_err(err)?;
            continue;
        };
        let p = adapter.layers[l][target].as_ref().expect("adapted");
        let weight = base.weight(&t.name);
        let mut dense: Vec<f32> = weight.dense();
        let s = adapter.alpha / adapter.rank as f32;
        gemm(
            Op::N,
            Op::N,
            p.rows,
            p.cols,
            adapter.rank,
            s,
            &p.b,
            &p.a,
            1.0,
            &mut dense,
        );
        let row_bytes = dtype.row_bytes(p.cols).expect("checked above");
        let mut bytes = vec![0u8; row_bytes * p.rows];
        for (src, dst) in dense.chunks(p.cols).zip(bytes.chunks_mut(row_bytes)) {
            kiln_blocks::quantize_row(spec.dtype, src, dst);
        }
        w.write_tensor(&bytes).map_err(err)?;
        changed += 1;
    }
    w.finish().map_err(err)?;
    Ok(changed)
}
