//! The peer of `kiln finetune train` in benches/finetune_vs_candle.sh: LoRA
//! training of a llama-architecture GGUF model with candle's autograd, on
//! the sequences `kiln finetune prepare` wrote.
//!
//! candle's quantized mat-mul has no backward pass, so the frozen base
//! weights are dequantized to f32 once at load (kiln keeps them in their
//! stored type). The layer is llama's: RMS norm, rotary positions on
//! adjacent pairs (GGUF's layout), grouped-query causal attention, SwiGLU,
//! with a rank-r pair (A, B; B zero at the start, scale alpha/r) on q, k,
//! v, o, gate, up and down, AdamW on the pairs only. The ops are candle-nn's
//! autograd-capable ones (`rms_norm_slow`, `rope_i_slow`, `softmax`,
//! `cross_entropy`): the fused ones have no backward pass.
//!
//! usage: candle_lora MODEL.gguf DATA STEPS [rank=8] [alpha=16] [seq_len=256] [accumulate=1]
//! Prints one JSON line per step and a summary with the tokens/s of the
//! steps after the first (the first includes one-time allocation).

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use std::io::BufRead;
use std::time::Instant;

struct Lora {
    w: Tensor,
    a: Var,
    b: Var,
    scale: f64,
}

impl Lora {
    fn new(w: Tensor, rank: usize, alpha: f64, dev: &Device) -> candle_core::Result<Lora> {
        let (out, inp) = w.dims2()?;
        let bound = 1.0 / (inp as f32).sqrt();
        let a = Var::rand(-bound, bound, (rank, inp), dev)?;
        let b = Var::zeros((out, rank), DType::F32, dev)?;
        Ok(Lora {
            w,
            a,
            b,
            scale: alpha / rank as f64,
        })
    }

    /// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` for `x` of shape (t, in).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let base = x.matmul(&self.w.t()?)?;
        let low = x.matmul(&self.a.as_tensor().t()?)?;
        let delta = (low.matmul(&self.b.as_tensor().t()?)? * self.scale)?;
        base + delta
    }
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    q: Lora,
    k: Lora,
    v: Lora,
    o: Lora,
    gate: Lora,
    up: Lora,
    down: Lora,
}

struct Model {
    embd: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope_base: f32,
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    Ok(ct
        .metadata
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("{key} is missing")))?
        .to_u32()? as usize)
}

fn meta_f32(ct: &gguf_file::Content, key: &str, default: f32) -> f32 {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(default)
}

impl Model {
    fn load(path: &str, rank: usize, alpha: f64, dev: &Device) -> candle_core::Result<Model> {
        let mut f = std::fs::File::open(path)?;
        let ct = gguf_file::Content::read(&mut f)?;
        let arch = ct.metadata["general.architecture"].to_string()?.clone();
        if arch != "llama" {
            candle_core::bail!("{arch}: only llama models");
        }
        let mut get = |name: &str| -> candle_core::Result<Tensor> {
            ct.tensor(&mut f, name, dev)?.dequantize(dev)
        };
        let n_layer = meta_u32(&ct, "llama.block_count")?;
        let heads = meta_u32(&ct, "llama.attention.head_count")?;
        let kv_heads = meta_u32(&ct, "llama.attention.head_count_kv")?;
        let dim = meta_u32(&ct, "llama.embedding_length")?;
        let embd = get("token_embd.weight")?;
        let head = if ct.tensor_infos.contains_key("output.weight") {
            get("output.weight")?
        } else {
            embd.clone()
        };
        let mut layers = Vec::new();
        for i in 0..n_layer {
            let mut lora =
                |n: &str| Lora::new(get(&format!("blk.{i}.{n}.weight"))?, rank, alpha, dev);
            layers.push(Layer {
                q: lora("attn_q")?,
                k: lora("attn_k")?,
                v: lora("attn_v")?,
                o: lora("attn_output")?,
                gate: lora("ffn_gate")?,
                up: lora("ffn_up")?,
                down: lora("ffn_down")?,
                attn_norm: get(&format!("blk.{i}.attn_norm.weight"))?,
                ffn_norm: get(&format!("blk.{i}.ffn_norm.weight"))?,
            });
        }
        Ok(Model {
            embd,
            layers,
            norm: get("output_norm.weight")?,
            head,
            heads,
            kv_heads,
            head_dim: dim / heads,
            eps: meta_f32(&ct, "llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: meta_f32(&ct, "llama.rope.freq_base", 10_000.0),
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = Vec::new();
        for l in &self.layers {
            for p in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                v.push(p.a.clone());
                v.push(p.b.clone());
            }
        }
        v
    }

    /// Mean cross-entropy of predicting `tokens[1..]`.
    fn loss(&self, tokens: &[u32], dev: &Device) -> candle_core::Result<Tensor> {
        let t = tokens.len();
        let (hd, nh, nkv) = (self.head_dim, self.heads, self.kv_heads);
        let ids = Tensor::new(tokens, dev)?;
        let mut x = self.embd.embedding(&ids)?;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / self.rope_base.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), dev)?.reshape((1, hd / 2))?;
        let pos = Tensor::arange(0u32, t as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((t, 1))?;
        let angles = pos.matmul(&inv)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), dev)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let h = candle_nn::ops::rms_norm_slow(&x, &l.attn_norm, self.eps)?;
            let q =
                l.q.forward(&h)?
                    .reshape((1, t, nh, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
            let k =
                l.k.forward(&h)?
                    .reshape((1, t, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
            let v =
                l.v.forward(&h)?
                    .reshape((1, t, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
            let q = candle_nn::rotary_emb::rope_i_slow(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i_slow(&k, &cos, &sin)?;
            // Grouped queries: each K/V head serves nh/nkv query heads.
            let rep = nh / nkv;
            let k = k
                .unsqueeze(2)?
                .expand((1, nkv, rep, t, hd))?
                .reshape((1, nh, t, hd))?;
            let v = v
                .unsqueeze(2)?
                .expand((1, nkv, rep, t, hd))?
                .reshape((1, nh, t, hd))?;
            let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax(&s, D::Minus1)?;
            let o = p.matmul(&v)?.transpose(1, 2)?.reshape((t, nh * hd))?;
            x = (x + l.o.forward(&o)?)?;
            let h = candle_nn::ops::rms_norm_slow(&x, &l.ffn_norm, self.eps)?;
            let m = (l.gate.forward(&h)?.silu()? * l.up.forward(&h)?)?;
            x = (x + l.down.forward(&m)?)?;
        }
        let h = candle_nn::ops::rms_norm_slow(&x, &self.norm, self.eps)?;
        let logits = h.narrow(0, 0, t - 1)?.matmul(&self.head.t()?)?;
        let targets = Tensor::new(&tokens[1..], dev)?;
        candle_nn::loss::cross_entropy(&logits, &targets)
    }
}

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn main() -> candle_core::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: candle_lora MODEL.gguf DATA STEPS [rank=8] [alpha=16] [seq_len=256] [accumulate=1]");
        std::process::exit(2);
    }
    let arg = |i: usize, d: &str| a.get(i).cloned().unwrap_or_else(|| d.to_string());
    let steps: usize = a[3].parse().expect("STEPS");
    let rank: usize = arg(4, "8").parse().expect("rank");
    let alpha: f64 = arg(5, "16").parse().expect("alpha");
    let seq_len: usize = arg(6, "256").parse().expect("seq_len");
    let acc: usize = arg(7, "1").parse().expect("accumulate");
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let model = Model::load(&a[1], rank, alpha, &dev)?;
    let load_s = t0.elapsed().as_secs_f64();
    let file = std::fs::File::open(format!("{}/train.jsonl", a[2]))?;
    let seqs: Vec<Vec<u32>> = std::io::BufReader::new(file)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.expect("read")).expect("json");
            let toks: Vec<u32> = v["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            toks[..toks.len().min(seq_len)].to_vec()
        })
        .filter(|s| s.len() >= 2)
        .collect();
    if seqs.is_empty() {
        candle_core::bail!("no training sequences in {}", a[2]);
    }
    let params = ParamsAdamW {
        lr: 2e-4,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.vars(), params)?;
    let (mut tokens, mut next) = (0usize, 0usize);
    let mut timed = (0usize, 0f64);
    for step in 1..=steps {
        let t = Instant::now();
        let mut total: Option<Tensor> = None;
        let mut n = 0;
        for _ in 0..acc {
            let s = &seqs[next % seqs.len()];
            next += 1;
            n += s.len();
            let l = model.loss(s, &dev)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        let loss = (total.unwrap() / acc as f64)?;
        opt.backward_step(&loss)?;
        let loss = loss.to_scalar::<f32>()?;
        let s = t.elapsed().as_secs_f64();
        tokens += n;
        if step > 1 {
            timed.0 += n;
            timed.1 += s;
        }
        println!(
            "{}",
            serde_json::json!({"step": step, "loss": loss, "tokens": tokens, "seconds": s})
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "summary": true,
            "load_s": load_s,
            "threads": candle_core::utils::get_num_threads(),
            "parameters": model.vars().iter().map(|v| v.elem_count()).sum::<usize>(),
            "tokens_per_s": if timed.1 > 0.0 { timed.0 as f64 / timed.1 } else { f64::NAN },
            "peak_rss_bytes": peak_rss(),
        })
    );
    Ok(())
}
