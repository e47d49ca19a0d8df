//! `kiln convert DIR OUT.gguf`: a Hugging Face checkpoint (safetensors
//! shards, `config.json`, `tokenizer.json`) to GGUF, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it for llama and qwen2 models:
//! the same tensor names and metadata keys, Q and K rows of llama models
//! permuted from Hugging Face's rotate-half order to the interleaved order
//! of GGUF, norms and biases in f32, and the tokenizer carried into
//! `tokenizer.ggml.*` (see `tokenizer::gguf_metadata`).

use crate::gguf::{GgufWriter, TensorSpec, Value, ValueType};
use kiln_blocks::{dequantize_row, quantize_row};
use kiln_plugin_api::DType;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct ConvertError {
    pub path: PathBuf,
    pub what: String,
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
}

fn default_ctx() -> usize {
    4096
}

fn default_eps() -> f64 {
    1e-6
}

/// The type of the converted matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    /// Keep each matrix's type (F32, F16 or BF16).
    Auto,
    F32,
    F16,
    BF16,
}

impl OutType {
    pub fn parse(s: &str) -> Option<OutType> {
        Some(match s {
            "auto" => OutType::Auto,
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            _ => return None,
        })
    }
}

fn source_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// What one output tensor is made of.
struct Planned {
    spec: TensorSpec,
    source: String,
    /// Permute rows for these many heads (llama Q and K).
    permute_heads: Option<usize>,
}

/// Converts the checkpoint in `dir` into `out`. Returns the tensor count.
pub fn convert(
    dir: &Path,
    out: &Path,
    outtype: OutType,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize, ConvertError> {
    let err = |path: &Path, what: String| ConvertError {
        path: path.to_path_buf(),
        what,
    };
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| err(&config_path, format!("cannot read: {e}")))?;
    let cfg: HfConfig = serde_json::from_str(&text)
        .map_err(|e| err(&config_path, format!("not a model config: {e}")))?;
    let arch = match cfg.architectures.first().map(String::as_str) {
        Some("LlamaForCausalLM" | "MistralForCausalLM") => "llama",
        Some("Qwen2ForCausalLM") => "qwen2",
        other => {
            return Err(err(
                &config_path,
                format!(
                    "architecture {other:?} is not supported; kiln converts LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"
                ),
            ));
        }
    };
    let n_head = cfg.num_attention_heads;
    let n_head_kv = cfg.num_key_value_heads.unwrap_or(n_head);
    if n_head == 0
        || !cfg.hidden_size.is_multiple_of(n_head)
        || !n_head.is_multiple_of(n_head_kv.max(1))
    {
        return Err(err(&config_path, "inconsistent head counts".into()));
    }
    let head_dim = cfg.hidden_size / n_head;

    // The tokenizer.
    let tok_path = dir.join("tokenizer.json");
    let tok_text = std::fs::read_to_string(&tok_path).map_err(|e| {
        err(
            &tok_path,
            format!("cannot read ({e}); kiln needs the tokenizer to run the model"),
        )
    })?;
    let tok_json: serde_json::Value =
        serde_json::from_str(&tok_text).map_err(|e| err(&tok_path, format!("not JSON: {e}")))?;
    let tok_config: Option<serde_json::Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let tok_meta = crate::tokenizer::gguf_metadata(&tok_json, tok_config.as_ref(), cfg.vocab_size)
        .map_err(|e| err(&tok_path, e))?;

    // The weights, from every shard.
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(err(dir, "no .safetensors files".into()));
    }
    let maps: Vec<Mmap> = shards
        .iter()
        .map(|p| {
            let f = std::fs::File::open(p).map_err(|e| err(p, format!("cannot open: {e}")))?;
            // SAFETY: read-only map of a checkpoint that is not modified while kiln converts it.
            unsafe { Mmap::map(&f) }.map_err(|e| err(p, format!("cannot map: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let files: Vec<SafeTensors<'_>> = maps
        .iter()
        .zip(&shards)
        .map(|(m, p)| {
            SafeTensors::deserialize(m).map_err(|e| err(p, format!("not a safetensors file: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        for name in f.names() {
            index.insert(name.to_string(), i);
        }
    }

    // The plan: GGUF tensor, HF source, shape, permutation.
    let e = cfg.hidden_size;
    let kv = head_dim * n_head_kv;
    let (ff, v) = (cfg.intermediate_size, cfg.vocab_size);
    let tied = cfg.tie_word_embeddings || !index.contains_key("lm_head.weight");
    let mut wanted: Vec<(String, String, Vec<usize>, Option<usize>)> = vec![(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![v, e],
        None,
    )];
    let llama = arch == "llama";
    for l in 0..cfg.n_layers() {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let gg = |s: &str| format!("blk.{l}.{s}");
        wanted.push((
            gg("attn_norm.weight"),
            hf("input_layernorm.weight"),
            vec![e],
            None,
        ));
        wanted.push((
            gg("attn_q.weight"),
            hf("self_attn.q_proj.weight"),
            vec![e, e],
            llama.then_some(n_head),
        ));
        wanted.push((
            gg("attn_k.weight"),
            hf("self_attn.k_proj.weight"),
            vec![kv, e],
            llama.then_some(n_head_kv),
        ));
        wanted.push((
            gg("attn_v.weight"),
            hf("self_attn.v_proj.weight"),
            vec![kv, e],
            None,
        ));
        if index.contains_key(&hf("self_attn.q_proj.bias")) {
            wanted.push((
                gg("attn_q.bias"),
                hf("self_attn.q_proj.bias"),
                vec![e],
                llama.then_some(n_head),
            ));
            wanted.push((
                gg("attn_k.bias"),
                hf("self_attn.k_proj.bias"),
                vec![kv],
                llama.then_some(n_head_kv),
            ));
            wanted.push((
                gg("attn_v.bias"),
                hf("self_attn.v_proj.bias"),
                vec![kv],
                None,
            ));
        }
        wanted.push((
            gg("attn_output.weight"),
            hf("self_attn.o_proj.weight"),
            vec![e, e],
            None,
        ));
        wanted.push((
            gg("ffn_norm.weight"),
            hf("post_attention_layernorm.weight"),
            vec![e],
            None,
        ));
        wanted.push((
            gg("ffn_gate.weight"),
            hf("mlp.gate_proj.weight"),
            vec![ff, e],
            None,
        ));
        wanted.push((
            gg("ffn_up.weight"),
            hf("mlp.up_proj.weight"),
            vec![ff, e],
            None,
        ));
        wanted.push((
            gg("ffn_down.weight"),
            hf("mlp.down_proj.weight"),
            vec![e, ff],
            None,
        ));
    }
    wanted.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![e],
        None,
    ));
    if !tied {
        wanted.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![v, e],
            None,
        ));
    }
    let mut plan = Vec::new();
    let mut main_type = None;
    for (gguf_name, hf_name, shape, permute_heads) in wanted {
        let Some(&shard) = index.get(&hf_name) else {
            return Err(err(
                dir,
                format!("missing tensor {hf_name} (for {gguf_name})"),
            ));
        };
        let view = files[shard].tensor(&hf_name).expect("indexed");
        if view.shape() != shape.as_slice() {
            return Err(err(
                &shards[shard],
                format!(
                    "{hf_name} has shape {:?}, config.json implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        let src = source_dtype(view.dtype()).ok_or_else(|| {
            err(
                &shards[shard],
                format!(
                    "{hf_name} is {:?}; kiln converts F32, F16 and BF16 checkpoints",
                    view.dtype()
                ),
            )
        })?;
        let dtype = if shape.len() == 1 {
            DType::F32
        } else {
            match outtype {
                OutType::Auto => src,
                OutType::F32 => DType::F32,
                OutType::F16 => DType::F16,
                OutType::BF16 => DType::BF16,
            }
        };
        if shape.len() == 2 {
            main_type.get_or_insert(dtype);
        }
        let mut ne = [1u64; 4];
        for (d, n) in shape.iter().rev().enumerate() {
            ne[d] = *n as u64;
        }
        plan.push(Planned {
            spec: TensorSpec {
                name: gguf_name,
                dtype,
                ne,
                n_dims: shape.len() as u32,
            },
            source: hf_name,
            permute_heads,
        });
    }

    let key = |k: &str| format!("{arch}.{k}");
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let file_type = match main_type.unwrap_or(DType::F16) {
        DType::F32 => 0,
        DType::BF16 => 32,
        _ => 1,
    };
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        (
            key("context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Value::U32(e as u32)),
        (key("block_count"), Value::U32(cfg.n_layers() as u32)),
        (key("feed_forward_length"), Value::U32(ff as u32)),
        (key("attention.head_count"), Value::U32(n_head as u32)),
        (key("attention.head_count_kv"), Value::U32(n_head_kv as u32)),
        (
            key("rope.freq_base"),
            Value::F32(cfg.rope_theta.unwrap_or(10000.0) as f32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("general.file_type".into(), Value::U32(file_type)),
    ];
    if llama {
        meta.push((key("rope.dimension_count"), Value::U32(head_dim as u32)));
        meta.push((key("vocab_size"), Value::U32(v as u32)));
    }
    if let Some(s) = &cfg.rope_scaling
        && s["type"].as_str().or(s["rope_type"].as_str()) == Some("linear")
    {
        meta.push((key("rope.scaling.type"), Value::String("linear".into())));
        meta.push((
            key("rope.scaling.factor"),
            Value::F32(s["factor"].as_f64().unwrap_or(1.0) as f32),
        ));
    }
    meta.extend(tok_meta);
    meta.push((
        "general.source".into(),
        Value::Array(
            ValueType::String,
            vec![Value::String("kiln convert".into())],
        ),
    ));

    let specs: Vec<TensorSpec> = plan.iter().map(|p| p.spec.clone()).collect();
    let write_err = |e: std::io::Error| err(out, format!("cannot write: {e}"));
    let mut writer = GgufWriter::create(out, &meta, &specs).map_err(write_err)?;
    for (i, p) in plan.iter().enumerate() {
        progress(i, plan.len());
        let view = files[index[&p.source]].tensor(&p.source).expect("indexed");
        let data = convert_tensor(
            view.data(),
            source_dtype(view.dtype()).expect("checked"),
            &p.spec,
            p.permute_heads,
        );
        writer.write_tensor(&data).map_err(write_err)?;
    }
    progress(plan.len(), plan.len());
    writer.finish().map_err(write_err)?;
    Ok(plan.len())
}

impl HfConfig {
    fn n_layers(&self) -> usize {
        self.num_hidden_layers
    }
}

/// Converts one tensor's rows to the spec's type, permuting rows of llama
/// Q/K from rotate-half order (`[head][half][i]`) to interleaved
/// (`[head][i][half]`), as llama.cpp's converter does.
fn convert_tensor(
    src: &[u8],
    from: DType,
    spec: &TensorSpec,
    permute_heads: Option<usize>,
) -> Vec<u8> {
    let row_len = spec.ne[0] as usize;
    let rows = (spec.ne[1] * spec.ne[2] * spec.ne[3]) as usize;
    let (in_row, out_row) = (
        from.row_bytes(row_len).unwrap(),
        spec.dtype.row_bytes(row_len).unwrap(),
    );
    // For a 1-D tensor (a bias), the "rows" to permute are its elements.
    let (unit_len, units) = if spec.n_dims == 1 {
        (1, row_len)
    } else {
        (row_len, rows)
    };
    let source_unit = |u: usize| -> usize {
        match permute_heads {
            Some(h) => {
                let per_head = units / h;
                let half = per_head / 2;
                let (head, rest) = (u / per_head, u % per_head);
                let (i, j) = (rest / 2, rest % 2);
                head * per_head + j * half + i
            }
            None => u,
        }
    };
    let mut values = vec![0f32; row_len * rows];
    for (r, out) in values.chunks_exact_mut(row_len).enumerate() {
        dequantize_row(from, &src[r * in_row..][..in_row], out);
    }
    if permute_heads.is_some() {
        let orig = values.clone();
        for u in 0..units {
            let s = source_unit(u);
            values[u * unit_len..][..unit_len].copy_from_slice(&orig[s * unit_len..][..unit_len]);
        }
    }
    let mut out = vec![0u8; out_row * rows];
    for (v, o) in values
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(out_row))
    {
        quantize_row(spec.dtype, v, o);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_each_head() {
        // One head of 4 rows of length 1: HF order [a0, a1, b0, b1] (halves)
        // becomes GGUF order [a0, b0, a1, b1].
        let src: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let spec = TensorSpec {
            name: "q".into(),
            dtype: DType::F32,
            ne: [1, 4, 1, 1],
            n_dims: 2,
        };
        let out = convert_tensor(&src, DType::F32, &spec, Some(1));
        let got: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vec![1., 3., 2., 4.]);
    }
}
