//! Hyperparameters of a llama-family model, read from GGUF metadata, and
//! the check that every weight tensor has the shape they imply.

use crate::gguf::{GgufError, GgufFile, TensorInfo};
use kiln_plugin_api::abi::{KILN_ROPE_NEOX, KILN_ROPE_NORMAL};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_vocab: usize,
    /// The context length the model was trained with.
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates.
    pub n_rot: usize,
    pub rope_mode: i32,
    pub rope_freq_base: f32,
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    /// Q, K and V have biases (qwen2).
    pub qkv_bias: bool,
    /// No `output.weight`: the output projection is the token embedding.
    pub tied_output: bool,
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig, GgufError> {
        let arch_name = f
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| f.error("missing general.architecture; is this a model file?"))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(f.error(format!(
                    "architecture {other:?} is not supported; kiln runs llama and qwen2 models (Llama, TinyLlama, CodeLlama, Mistral, Qwen2/2.5-Coder, DeepSeek-Coder)"
                )));
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let uint = |k: &str| -> Result<usize, GgufError> {
            f.get(&key(k))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| f.error(format!("missing or non-integer metadata {}", key(k))))
        };
        let float = |k: &str, default: f32| -> Result<f32, GgufError> {
            match f.get(&key(k)) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| f.error(format!("metadata {} is not a number", key(k)))),
            }
        };
        let n_embd = uint("embedding_length")?;
        let n_head = uint("attention.head_count")?;
        let n_head_kv = match f.get(&key("attention.head_count_kv")) {
            None => n_head,
            Some(_) => uint("attention.head_count_kv")?,
        };
        if n_head == 0 || n_head_kv == 0 || n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(f.error(format!(
                "inconsistent attention: {n_embd} embedding dims, {n_head} heads, {n_head_kv} KV heads"
            )));
        }
        let head_dim = n_embd / n_head;
        let n_rot = match f.get(&key("rope.dimension_count")) {
            None => head_dim,
            Some(_) => uint("rope.dimension_count")?,
        };
        if n_rot == 0 || n_rot > head_dim || n_rot % 2 != 0 {
            return Err(f.error(format!(
                "rope.dimension_count {n_rot} must be even and at most {head_dim}"
            )));
        }
        let token_embd = f
            .tensor("token_embd.weight")
            .ok_or_else(|| f.error("missing tensor token_embd.weight"))?;
        let n_vocab = token_embd.ne[1] as usize;
        let scaling = f
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            .unwrap_or("none");
        let rope_freq_scale = match scaling {
            "none" => 1.0,
            "linear" => 1.0 / float("rope.scaling.factor", 1.0)?,
            other => {
                return Err(f.error(format!(
                    "rope scaling {other:?} is not supported yet (kiln supports none and linear)"
                )));
            }
        };
        let cfg = ModelConfig {
            arch,
            n_vocab,
            n_ctx_train: uint("context_length")?,
            n_embd,
            n_layer: uint("block_count")?,
            n_head,
            n_head_kv,
            n_ff: uint("feed_forward_length")?,
            head_dim,
            n_rot,
            rope_mode: match arch {
                Arch::Llama => KILN_ROPE_NORMAL,
                Arch::Qwen2 => KILN_ROPE_NEOX,
            },
            rope_freq_base: float("rope.freq_base", 10000.0)?,
            rope_freq_scale,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5)?,
            qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            tied_output: f.tensor("output.weight").is_none(),
        };
        cfg.check_tensors(f)?;
        Ok(cfg)
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Every tensor the forward pass reads, with the extents it expects.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, kv, ff, v) = (self.n_embd, self.kv_dim(), self.n_ff, self.n_vocab);
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![e, v]),
            ("output_norm.weight".to_string(), vec![e]),
        ];
        if !self.tied_output {
            t.push(("output.weight".to_string(), vec![e, v]));
        }
        for l in 0..self.n_layer {
            let b = |n: &str| format!("blk.{l}.{n}");
            t.push((b("attn_norm.weight"), vec![e]));
            t.push((b("attn_q.weight"), vec![e, e]));
            t.push((b("attn_k.weight"), vec![e, kv]));
            t.push((b("attn_v.weight"), vec![e, kv]));
            if self.qkv_bias {
                t.push((b("attn_q.bias"), vec![e]));
                t.push((b("attn_k.bias"), vec![kv]));
                t.push((b("attn_v.bias"), vec![kv]));
            }
            t.push((b("attn_output.weight"), vec![e, e]));
            t.push((b("ffn_norm.weight"), vec![e]));
            t.push((b("ffn_gate.weight"), vec![e, ff]));
            t.push((b("ffn_up.weight"), vec![e, ff]));
            t.push((b("ffn_down.weight"), vec![ff, e]));
        }
        t
    }

    fn check_tensors(&self, f: &GgufFile) -> Result<(), GgufError> {
        for (name, want) in self.expected_tensors() {
            let t: &TensorInfo = f.tensor(&name).ok_or_else(|| {
                f.error(format!(
                    "missing tensor {name} (a {} model with these dimensions needs it)",
                    self.arch.name()
                ))
            })?;
            let got: Vec<usize> = t.ne[..t.n_dims as usize]
                .iter()
                .map(|&n| n as usize)
                .collect();
            if got != want {
                return Err(f.error(format!(
                    "tensor {name} has shape {got:?}, but the metadata implies {want:?}"
                )));
            }
            let is_vector = want.len() == 1;
            if is_vector && t.dtype != kiln_plugin_api::DType::F32 {
                return Err(f.error(format!(
                    "tensor {name} is {}, norms and biases must be f32",
                    t.dtype
                )));
            }
        }
        Ok(())
    }
}
