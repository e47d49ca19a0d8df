//! `kiln bench`: load time, prompt-processing and decode speed of a model
//! on a device, measured the way llama.cpp's benchmarks measure them
//! (random token ids, greedy decoding, the prompt in one batch).

use super::{CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_runtime::model::forward::LogitsFor;
use kiln_runtime::model::sample::argmax;
use kiln_runtime::model::{Model, Session};
use std::process::ExitCode;
use std::time::Instant;

/// What to measure.
pub struct Args {
    pub model: String,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub backend: Option<String>,
    pub kv_type: Option<kiln_plugin_api::DType>,
    pub attention_block: Option<usize>,
    pub prompt_batch: Option<usize>,
    /// Sequences decoded together (1: none).
    pub sequences: usize,
    /// Prompt evaluations; the fastest is reported.
    pub repetitions: usize,
    /// A LoRA adapter file applied at run time.
    pub adapter: Option<std::path::PathBuf>,
}

pub fn run(config: &Config, args: &Args, as_json: bool) -> CliResult {
    let (model_arg, prompt_tokens, decode_tokens) =
        (args.model.as_str(), args.prompt_tokens, args.decode_tokens);
    let kv_type = args.kv_type;
    let path = kiln_runtime::store::resolve(config, model_arg)?;
    let kiln_runtime::backend::Chosen {
        executor: exec,
        label: device,
    } = super::run::executor_for(config, args.backend.as_deref(), Some(&path))?;
    // Load time: mapping, checks, repacking for the backend, and reading
    // the adapter.
    let start = Instant::now();
    let model = Model::load_adapted(&path, args.adapter.as_deref(), &exec.target, exec.device)?;
    let adapter = model.adapter.clone();
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let n_vocab = model.config.n_vocab as u32;
    let ctx = (prompt_tokens.max(16) + decode_tokens + 1).next_power_of_two();
    let ctx = ctx.min(
        model
            .config
            .n_ctx_train
            .max(prompt_tokens.max(16) + decode_tokens + 1),
    );
    let kv_type = super::kv_type_for(config, model_arg, kv_type)?;
    let mut session = Session::with_kv_type(model, exec, Some(ctx), kv_type)?;
    // The flags over config.toml's `[engine]`.
    if args.attention_block == Some(0)
        || args.prompt_batch == Some(0)
        || args.sequences == 0
        || args.repetitions == 0
    {
        return Err(
            "--attention-block, --prompt-batch, --sequences and --repetitions take at least 1"
                .into(),
        );
    }
    if args.sequences > 1 && !session.executor().target.is_builtin() {
        return Err("--sequences decodes on the built-in CPU only: leave out --backend".into());
    }
    session.configure(&kiln_registry::config::EngineConfig {
        attention_block: args.attention_block.or(config.engine.attention_block),
        prompt_batch: args.prompt_batch.or(config.engine.prompt_batch),
        ..config.engine
    });
    let (attention_block, prompt_batch) = (session.attention_block(), session.prompt_batch());
    let mut rng = fastrand::Rng::with_seed(0);
    let mut tokens =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.u32(n_vocab.min(259)..n_vocab)).collect() };

    // Decode: a 16-token prompt, then one token at a time.
    let warm = tokens(16);
    let first_start = Instant::now();
    let mut next = argmax(&session.eval(&warm, LogitsFor::Last)?);
    let first_token_ms = first_start.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 0..decode_tokens {
        next = argmax(&session.eval(&[next], LogitsFor::Last)?);
    }
    let decode_s = t.elapsed().as_secs_f64();
    // Prompt processing: a fresh cache, one prompt, as many times as
    // asked; the fastest counts (the others are slowed by something else).
    let prompt = tokens(prompt_tokens);
    let mut each = Vec::with_capacity(args.repetitions);
    let mut next = 0;
    for _ in 0..args.repetitions {
        session.truncate(0);
        let t = Instant::now();
        next = argmax(&session.eval(&prompt, LogitsFor::Last)?);
        each.push(t.elapsed().as_secs_f64());
    }
    let prompt_s = each.iter().copied().fold(f64::INFINITY, f64::min);
    // Decode again, at the prompt's depth: each step attends to it all.
    let t = Instant::now();
    for _ in 0..decode_tokens {
        next = argmax(&session.eval(&[next], LogitsFor::Last)?);
    }
    let deep_decode_s = t.elapsed().as_secs_f64();
    // Batched decoding: each sequence after its own 16-token prompt,
    // then a step of all of them per forward pass.
    let batch_tps = if args.sequences > 1 {
        let mut seqs = Vec::with_capacity(args.sequences);
        let mut next = Vec::with_capacity(args.sequences);
        for _ in 0..args.sequences {
            let exec = kiln_runtime::backend::exec::Executor::new(
                session.executor().target.clone(),
                session.executor().device,
            );
            let mut s = Session::with_kv_type(session.model.clone(), exec, Some(ctx), kv_type)?;
            next.push(argmax(&s.eval(&tokens(16), LogitsFor::Last)?));
            seqs.push(s);
        }
        let t = Instant::now();
        for _ in 0..decode_tokens {
            let mut refs: Vec<&mut Session> = seqs.iter_mut().collect();
            kiln_runtime::model::session::decode_batch(&mut refs, &next)?;
            for (n, s) in next.iter_mut().zip(&seqs) {
                *n = argmax(s.logits());
            }
        }
        Some((args.sequences * decode_tokens) as f64 / t.elapsed().as_secs_f64().max(1e-9))
    } else {
        None
    };
    let kv = session.kv_cache();
    let kv_type = kiln_runtime::model::forward::KvCache::type_name(kv.dtype);
    let kv_bytes = session.kv_bytes();

    // Peak resident memory, the mapped weights included.
    let peak_rss = kiln_runtime::measure::process_memory(None, "VmHWM");
    let decode_tps = decode_tokens as f64 / decode_s.max(1e-9);
    let prompt_tps = prompt_tokens as f64 / prompt_s.max(1e-9);
    let deep_decode_tps = decode_tokens as f64 / deep_decode_s.max(1e-9);
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "model": path, "adapter": adapter, "device": device,
            "load_ms": load_ms, "first_token_ms": first_token_ms,
            "prompt_tokens": prompt_tokens, "prompt_tokens_per_s": prompt_tps,
            "prompt_tokens_per_s_each": each
                .iter()
                .map(|s| prompt_tokens as f64 / s.max(1e-9))
                .collect::<Vec<_>>(),
            "decode_tokens": decode_tokens, "decode_tokens_per_s": decode_tps,
            "decode_after_prompt_tokens_per_s": deep_decode_tps,
            "sequences": args.sequences,
            "batch_decode_tokens_per_s": batch_tps,
            "kv_type": kv_type, "fused_attention": kv.fused,
            "attention_block": attention_block,
            "prompt_batch": prompt_batch,
            "threads": kiln_runtime::model::cpu_threads(),
            "n_ctx": session.n_ctx(), "kv_bytes": kv_bytes,
            "peak_rss_bytes": peak_rss,
        }));
    } else {
        println!(
            "{}{}: load {load_ms:.0} ms; prompt {prompt_tokens} tokens at {prompt_tps:.2} tok/s; decode {decode_tokens} tokens at {decode_tps:.2} tok/s, after the prompt at {deep_decode_tps:.2} tok/s ({device}); KV cache {kv_type}, {} MiB for {} positions; peak RSS {}",
            path.display(),
            adapter.as_ref().map_or(String::new(), |a| format!(
                " with {} (rank {}, {} pairs)",
                a.path.display(),
                a.rank,
                a.pairs
            )),
            kv_bytes >> 20,
            session.n_ctx(),
            peak_rss.map_or("unknown".to_string(), |b| format!("{} MiB", b >> 20))
        );
        if let Some(tps) = batch_tps {
            println!(
                "{} sequences decoded together: {tps:.2} tok/s in all ({:.2}× one sequence's)",
                args.sequences,
                tps / decode_tps.max(1e-9)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
