//! Hyperparameters of a model, read from GGUF metadata, and the check that
//! every weight tensor has the shape they imply.
//!
//! One description per architecture: the forward pass
//! (`forward.rs`) is shared, and what sets an architecture apart is a few
//! fields here (RMS or LayerNorm, biases, Q/K norms, post-norms, the
//! feed-forward's activation, embedding scaling, sliding-window layers,
//! RoPE's mode and bases).

use crate::gguf::{GgufError, GgufFile, TensorInfo};
use kiln_plugin_api::abi::{KILN_ROPE_NEOX, KILN_ROPE_NORMAL};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
    Starcoder2,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Gemma3,
        Arch::Starcoder2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Starcoder2 => "starcoder2",
        }
    }
}

/// The feed-forward's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ffn {
    /// `silu(gate) · up` (Llama, Qwen).
    SwiGlu,
    /// `gelu_tanh(gate) · up` (Gemma).
    GeGlu,
    /// `gelu_tanh(up)`, no gate (StarCoder2).
    Gelu,
}

/// The normalization before attention, before the feed-forward and at the
/// output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// `x / rms(x) · weight`.
    Rms,
    /// LayerNorm: `(x − mean) / std · weight + bias` (StarCoder2).
    Layer,
}

/// Sliding-window attention: most layers see only the last `window`
/// positions; every `pattern`-th layer (the last of each group) sees all.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SlidingWindow {
    pub window: usize,
    pub pattern: usize,
    /// RoPE's base on the windowed (local) layers.
    pub rope_freq_base: f32,
}

/// YaRN (`rope.scaling.type = yarn`, or its keys set): RoPE's
/// frequencies mixed between interpolated and extrapolated along a ramp
/// over the dimensions, and sin and cos scaled, as llama.cpp runs it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RopeYarn {
    /// How much of the extrapolated frequency the ramp mixes in (1 for
    /// YaRN, 0 to turn the ramp off).
    pub ext_factor: f32,
    /// sin and cos are multiplied by this (`yarn_attn_factor` ×
    /// `rope.scaling.attn_factor`), and by 1 + 0.1 ln(factor) when the
    /// ramp is on.
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// The context the model was trained with before the extension.
    pub n_ctx_orig: usize,
}

impl RopeYarn {
    /// ggml's correction dimensions for a RoPE of `n_rot` dimensions and
    /// base `base`: where the ramp starts and ends.
    pub fn corr_dims(&self, n_rot: usize, base: f32) -> (f32, f32) {
        let dim = |beta: f32| {
            n_rot as f32 * (self.n_ctx_orig as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let start = dim(self.beta_fast).floor();
        let end = dim(self.beta_slow).ceil();
        (start.max(0.0), end.min(n_rot as f32 - 1.0))
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
    /// YaRN, where the file asks for it.
    pub rope_yarn: Option<RopeYarn>,
    /// The file has per-dimension frequency factors (`rope_freqs.weight`,
    /// Llama 3.1's long-context scaling), applied on every layer.
    pub rope_freqs: bool,
    pub norm: Norm,
    /// The norms' epsilon.
    pub norm_eps: f32,
    /// Q, K and V have biases (qwen2, starcoder2).
    pub qkv_bias: bool,
    /// The attention output and the feed-forward's projections have biases
    /// (starcoder2).
    pub out_ffn_bias: bool,
    /// No `output.weight`: the output projection is the token embedding.
    pub tied_output: bool,
    /// Each head's Q and K are RMS-normed before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// The attention and feed-forward outputs are RMS-normed before they
    /// join the residual (gemma3).
    pub post_norms: bool,
    pub ffn: Ffn,
    /// The token embeddings are multiplied by this (gemma3: √n_embd).
    pub embd_scale: Option<f32>,
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig, GgufError> {
        let arch_name = f
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| f.error("missing general.architecture; is this a model file?"))?;
        let arch = match Arch::ALL.into_iter().find(|a| a.name() == arch_name) {
            Some(a) => a,
            None => {
                return Err(f.error(format!(
                    "architecture {arch_name:?} is not supported; kiln runs {} models (Llama, SmolLM, TinyLlama, CodeLlama, Mistral, Qwen2/2.5-Coder, Qwen3, DeepSeek-Coder, Gemma 3, StarCoder2)",
                    Arch::ALL.map(Arch::name).join(", ")
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
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(f.error(format!(
                "inconsistent attention: {n_head} heads, {n_head_kv} KV heads"
            )));
        }
        // The head size: attention.key_length where the file gives it
        // (Qwen3 and Gemma 3 heads are not n_embd / n_head wide).
        let head_dim = match f.get(&key("attention.key_length")) {
            Some(_) => uint("attention.key_length")?,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(f.error(format!(
                    "inconsistent attention: {n_embd} embedding dims for {n_head} heads, and no attention.key_length"
                )));
            }
        };
        if let Some(v) = f.get(&key("attention.value_length"))
            && v.as_u64() != Some(head_dim as u64)
        {
            return Err(f.error(format!(
                "attention.value_length {v:?} differs from the key length {head_dim}; kiln needs them equal"
            )));
        }
        if head_dim == 0 {
            return Err(f.error("attention.key_length is 0"));
        }
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
        // As llama.cpp reads them: no type means linear (with a factor
        // of 1 unless the file sets one, under this name or the old one).
        let scaling = f
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            .unwrap_or("linear");
        let factor = match f.get(&key("rope.scaling.factor")) {
            Some(_) => float("rope.scaling.factor", 0.0)?,
            None => float("rope.scale_linear", 0.0)?,
        };
        if !(factor == 0.0 || factor.is_finite() && factor > 0.0) {
            return Err(f.error(format!("rope.scaling.factor {factor} must be positive")));
        }
        let rope_freq_scale = match scaling {
            "none" => 1.0,
            "linear" | "yarn" if factor > 0.0 => 1.0 / factor,
            "linear" | "yarn" => 1.0,
            other => {
                return Err(f.error(format!(
                    "rope scaling {other:?} is not supported (kiln runs none, linear and yarn)"
                )));
            }
        };
        let yarn = RopeYarn {
            ext_factor: match f.get(&key("rope.scaling.yarn_ext_factor")) {
                Some(_) => float("rope.scaling.yarn_ext_factor", 0.0)?,
                None if scaling == "yarn" => 1.0,
                None => 0.0,
            },
            attn_factor: float("rope.scaling.yarn_attn_factor", 1.0)?
                * float("rope.scaling.attn_factor", 1.0)?,
            beta_fast: float("rope.scaling.yarn_beta_fast", 32.0)?,
            beta_slow: float("rope.scaling.yarn_beta_slow", 1.0)?,
            n_ctx_orig: match f.get(&key("rope.scaling.original_context_length")) {
                Some(_) => uint("rope.scaling.original_context_length")?,
                None => uint("context_length")?,
            },
        };
        let rope_yarn = (yarn.ext_factor != 0.0 || yarn.attn_factor != 1.0).then_some(yarn);
        if let Some(y) = rope_yarn
            && !([y.ext_factor, y.attn_factor, y.beta_fast, y.beta_slow]
                .iter()
                .all(|x| x.is_finite())
                && y.n_ctx_orig > 0)
        {
            return Err(f.error(format!("rope YaRN parameters are not usable: {y:?}")));
        }
        let gemma = arch == Arch::Gemma3;
        let starcoder = arch == Arch::Starcoder2;
        let sliding_window = match (gemma, f.get(&key("attention.sliding_window"))) {
            (true, Some(_)) => Some(SlidingWindow {
                window: uint("attention.sliding_window")?,
                // llama.cpp's Gemma 3: five local layers, then a global one;
                // the local RoPE base from rope.freq_base_swa, else 10000.
                pattern: 6,
                rope_freq_base: float("rope.freq_base_swa", 10_000.0)?,
            }),
            _ => None,
        };
        if sliding_window.is_some_and(|s| s.window == 0) {
            return Err(f.error("attention.sliding_window is 0"));
        }
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
                Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 | Arch::Starcoder2 => KILN_ROPE_NEOX,
            },
            rope_freq_base: float("rope.freq_base", 10000.0)?,
            rope_freq_scale,
            rope_yarn,
            rope_freqs: f.tensor("rope_freqs.weight").is_some(),
            norm: if starcoder { Norm::Layer } else { Norm::Rms },
            norm_eps: if starcoder {
                float("attention.layer_norm_epsilon", 1e-5)?
            } else {
                float("attention.layer_norm_rms_epsilon", 1e-5)?
            },
            qkv_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            out_ffn_bias: starcoder,
            tied_output: f.tensor("output.weight").is_none(),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma,
            ffn: match arch {
                Arch::Gemma3 => Ffn::GeGlu,
                Arch::Starcoder2 => Ffn::Gelu,
                _ => Ffn::SwiGlu,
            },
            embd_scale: gemma.then(|| (n_embd as f32).sqrt()),
            sliding_window,
        };
        cfg.check_tensors(f)?;
        Ok(cfg)
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Q's width: every head's.
    pub fn q_dim(&self) -> usize {
        self.head_dim * self.n_head
    }

    /// Whether layer `l` attends within the sliding window only.
    pub fn is_local(&self, l: usize) -> bool {
        self.sliding_window
            .is_some_and(|s| l % s.pattern < s.pattern - 1)
    }

    /// RoPE's base on layer `l`.
    pub fn rope_base(&self, l: usize) -> f32 {
        match self.sliding_window {
            Some(s) if self.is_local(l) => s.rope_freq_base,
            _ => self.rope_freq_base,
        }
    }

    /// The ROPE op's parameters on layer `l`: the windowed layers of a
    /// sliding-window model are never frequency-scaled (llama.cpp's
    /// Gemma 3), the others as the file says.
    pub fn rope_params(&self, l: usize) -> [i32; 8] {
        use kiln_plugin_api::abi::KILN_ROPE_EXT;
        use kiln_plugin_api::types::f32_param;
        let base = self.rope_base(l);
        let scale = if self.is_local(l) {
            1.0
        } else {
            self.rope_freq_scale
        };
        let mut p = [
            self.n_rot as i32,
            self.rope_mode,
            f32_param(base),
            f32_param(scale),
            0,
            0,
            0,
            0,
        ];
        if let Some(y) = self.rope_yarn {
            let (lo, hi) = y.corr_dims(self.n_rot, base);
            p[1] |= KILN_ROPE_EXT;
            p[4..].copy_from_slice(&[y.ext_factor, y.attn_factor, lo, hi].map(f32_param));
        }
        p
    }

    /// Every tensor the forward pass reads, with the extents it expects.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (e, kv, ff, v) = (self.n_embd, self.kv_dim(), self.n_ff, self.n_vocab);
        let (q, hd) = (self.q_dim(), self.head_dim);
        let layer_norm = self.norm == Norm::Layer;
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![e, v]),
            ("output_norm.weight".to_string(), vec![e]),
        ];
        if layer_norm {
            t.push(("output_norm.bias".to_string(), vec![e]));
        }
        if !self.tied_output {
            t.push(("output.weight".to_string(), vec![e, v]));
        }
        if self.rope_freqs {
            t.push(("rope_freqs.weight".to_string(), vec![self.n_rot / 2]));
        }
        for l in 0..self.n_layer {
            let b = |n: &str| format!("blk.{l}.{n}");
            t.push((b("attn_norm.weight"), vec![e]));
            if layer_norm {
                t.push((b("attn_norm.bias"), vec![e]));
            }
            t.push((b("attn_q.weight"), vec![e, q]));
            t.push((b("attn_k.weight"), vec![e, kv]));
            t.push((b("attn_v.weight"), vec![e, kv]));
            if self.qkv_bias {
                t.push((b("attn_q.bias"), vec![q]));
                t.push((b("attn_k.bias"), vec![kv]));
                t.push((b("attn_v.bias"), vec![kv]));
            }
            if self.qk_norm {
                t.push((b("attn_q_norm.weight"), vec![hd]));
                t.push((b("attn_k_norm.weight"), vec![hd]));
            }
            t.push((b("attn_output.weight"), vec![q, e]));
            if self.out_ffn_bias {
                t.push((b("attn_output.bias"), vec![e]));
            }
            if self.post_norms {
                t.push((b("post_attention_norm.weight"), vec![e]));
                t.push((b("post_ffw_norm.weight"), vec![e]));
            }
            t.push((b("ffn_norm.weight"), vec![e]));
            if layer_norm {
                t.push((b("ffn_norm.bias"), vec![e]));
            }
            if self.ffn != Ffn::Gelu {
                t.push((b("ffn_gate.weight"), vec![e, ff]));
            }
            t.push((b("ffn_up.weight"), vec![e, ff]));
            t.push((b("ffn_down.weight"), vec![ff, e]));
            if self.out_ffn_bias {
                t.push((b("ffn_up.bias"), vec![ff]));
                t.push((b("ffn_down.bias"), vec![e]));
            }
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

#[cfg(test)]
mod tests {
    use super::RopeYarn;

    #[test]
    fn yarn_correction_dimensions_are_ggmls() {
        // n_rot 128, trained on 4096, base 10000, betas 32 and 1:
        // floor(128 ln(4096 / 64π) / 2 ln 10000) = 20 and
        // ceil(128 ln(4096 / 2π) / 2 ln 10000) = 46.
        let y = RopeYarn {
            ext_factor: 1.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 4096,
        };
        assert_eq!(y.corr_dims(128, 10_000.0), (20.0, 46.0));
        // Clamped to the dimensions there are.
        let short = RopeYarn { n_ctx_orig: 8, ..y };
        assert_eq!(short.corr_dims(128, 10_000.0), (0.0, 2.0));
        let long = RopeYarn {
            n_ctx_orig: 1_000_000_000,
            ..y
        };
        assert_eq!(long.corr_dims(8, 10_000.0).1, 7.0);
    }
}
