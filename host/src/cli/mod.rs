//! The command line. Every command prints a table for people or, with
//! `--json`, one JSON object whose shape is documented in `docs/cli.md`
//! and versioned by its `schema_version` field. Errors go to stderr as
//! `kiln: error: …`; the exit code is 0 on success, 1 on error (and, for
//! `kiln doctor`, when it found problems), 2 on bad usage.

mod ab;
mod adapters;
mod backends;
mod bench;
mod context;
mod ctxbench;
mod demo;
mod doctor;
mod explain;
mod finetune;
mod lifecycle;
mod models;
mod plugins;
mod policy;
mod pull;
mod quantize;
mod run;
mod serve;
mod store;
mod top;
mod tune;

use clap::{Parser, Subcommand};
use kiln_registry::config::Config;
use kiln_registry::{Kind, Registry};
use kiln_runtime::measure::human_bytes;
use lifecycle::Action::{Disable, Enable, Rollback};
use lifecycle::change;
use std::io::IsTerminal;
use std::process::ExitCode;

/// The version of every `--json` document's shape.
pub const JSON_SCHEMA_VERSION: u32 = 1;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A local model-optimization host for code completion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Try kiln: serve the active model (or, with none registered, a
    /// generated random-weight one) and drive a scripted editing session
    /// through the language server, printing completions, latencies and
    /// cache hit rates.
    Demo {
        /// A GGUF file or registered model instead of the active one.
        #[arg(long)]
        model: Option<String>,
        /// Characters to type (one completion request each).
        #[arg(long, default_value_t = 80)]
        keystrokes: usize,
        /// Tokens per completion (default: `kiln serve`'s, from
        /// config.toml's `[completion] max_tokens`, else 64).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Type at this pace (milliseconds between keystrokes, 500 after a
        /// word) without waiting for completions, as a user does: the
        /// latencies are of the completions at the ends of words. 0: each
        /// keystroke waits for its completion.
        #[arg(long, default_value_t = 0)]
        typing_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Serve completions to an IDE: a language server on stdio, or an
    /// OpenAI-compatible HTTP API with --http.
    Serve {
        /// A GGUF file or registered model (default: the active model).
        /// Given again, more models: each served by its id (`/v1/models`),
        /// and behind the first, in order, as its fallbacks when
        /// config.toml's `[[routes]]` do not say otherwise.
        #[arg(long)]
        model: Vec<String>,
        /// Serve HTTP on this address (e.g. 127.0.0.1:8080) instead of LSP on stdio.
        #[arg(long)]
        http: Option<String>,
        /// With the language server: also serve `/metrics` (Prometheus) and
        /// `/healthz` over HTTP on this address (e.g. 127.0.0.1:9100).
        #[arg(long)]
        metrics: Option<String>,
        /// Allow --http or --metrics on an address other than loopback.
        #[arg(long)]
        allow_remote: bool,
        /// Seconds between the live dashboard's snapshots (1-60), served at
        /// /dashboard with --http or --metrics.
        #[arg(long, default_value_t = 2)]
        dashboard_interval: u64,
        #[arg(long)]
        backend: Option<String>,
        /// KV cache size in tokens (default: the model's, at most 4096).
        #[arg(long)]
        ctx: Option<usize>,
        /// Memory the served models may take together (weights, KV caches,
        /// work space): MiB, or a size such as 6G or 512M (default:
        /// config.toml's `[pool] max_memory_mb`, else what is available
        /// at the start). Idle models are unloaded for room; a model that
        /// cannot fit is refused.
        #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
        max_memory: Option<u64>,
        /// KV cache type: f16, q8_0 or q4_0 (default: config.toml's
        /// `[kv_cache]` for the model, else f16).
        #[arg(long, value_parser = parse_kv_type)]
        kv_type: Option<kiln_plugin_api::DType>,
        /// codellama, qwen, deepseek, starcoder or none (default: from the model).
        #[arg(long)]
        fim_template: Option<String>,
        /// Tokens per completion (default: config.toml's `[completion]
        /// max_tokens`, else 64).
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Token budgets of the prompt: text before the cursor, after it,
        /// other files (default: config.toml's `[completion]`
        /// prefix_tokens, suffix_tokens, context_tokens, else 1024, 256
        /// and 512).
        #[arg(long)]
        prefix_tokens: Option<usize>,
        #[arg(long)]
        suffix_tokens: Option<usize>,
        #[arg(long)]
        context_tokens: Option<usize>,
        /// auto, line, block or none.
        #[arg(long, default_value = "auto")]
        mode: String,
        /// Speculative decoding of greedy completions: `ngram` guesses
        /// tokens from the prompt, a MODEL (a GGUF file or registered name
        /// of the same vocabulary) guesses them greedily; either way they
        /// are verified in one batch (the same tokens, fewer steps); or
        /// `none` (default: config.toml's `[completion] draft`, else none)
        #[arg(long)]
        draft: Option<String>,
        /// Tokens `--draft ngram` guesses at most per verifying batch
        /// (1-64; default: config.toml's `[completion] draft_max`, else 8).
        #[arg(long)]
        draft_max: Option<usize>,
        /// Milliseconds an automatic inline completion waits before it
        /// starts, a keystroke meanwhile cancelling it unstarted (0-2000;
        /// default: config.toml's `[completion] debounce_ms`, else 0).
        #[arg(long)]
        debounce_ms: Option<u64>,
        /// A LoRA adapter to serve on the model: a file (`kiln finetune
        /// train`'s, or llama.cpp's) or a registered adapter (NAME[@VERSION]),
        /// applied at run time to the model as stored (no merged copy).
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
    },
    /// The live numbers of a running `kiln serve` (its dashboard) in the
    /// terminal.
    Top {
        /// The server's HTTP address (HOST:PORT of --http or --metrics);
        /// default: the newest running `kiln serve` of this KILN_HOME.
        #[arg(long)]
        address: Option<String>,
        /// One line per snapshot instead of the full-screen view (also
        /// when the output is not a terminal).
        #[arg(long)]
        plain: bool,
        /// Stop after this many snapshots.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Explain a completion: how much each part of the prompt (blocks,
    /// then the lines of the most important ones) made it likely, and
    /// what the model writes without the part that mattered most; with
    /// --attention, also the attention the model paid to each prompt token.
    Explain(explain::ExplainArgs),
    /// Check this machine, kiln's directories, registry and plugins.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// List compute devices with their measured scores and the one kiln uses.
    Backends {
        #[arg(long)]
        json: bool,
        /// Measure every device again instead of using cached scores.
        #[arg(long)]
        remeasure: bool,
    },
    /// Manage backend plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Find the settings that make a model fastest on this machine
    /// (threads, KV cache type, attention block), measured; apply one
    /// to config.toml, roll it back.
    #[command(subcommand)]
    Tune(TuneCommand),
    /// Generate text from a prompt with a model (a GGUF file or a registered name).
    Run {
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0.05)]
        min_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repeat_penalty: f32,
        /// Default: a new seed each run.
        #[arg(long)]
        seed: Option<u64>,
        /// Stop when this text appears (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// A backend by name (`kiln backends`); default: the best device.
        #[arg(long)]
        backend: Option<String>,
        /// KV cache size in tokens (default: the model's, at most 4096).
        #[arg(long)]
        ctx: Option<usize>,
        /// KV cache type: f16, q8_0 or q4_0 (default: config.toml's
        /// `[kv_cache]` for the model, else f16).
        #[arg(long, value_parser = parse_kv_type)]
        kv_type: Option<kiln_plugin_api::DType>,
        /// Speculative decoding of greedy runs (`--temperature 0`): `ngram`
        /// guesses tokens from the text so far, a MODEL (a GGUF file or
        /// registered name: a smaller model of the same vocabulary) guesses
        /// them greedily; either way they are verified in one batch (the
        /// same tokens, fewer steps); or `none`
        #[arg(long, default_value = "none")]
        draft: String,
        /// Tokens `--draft` guesses at most per verifying batch (1-64).
        #[arg(long, default_value_t = kiln_runtime::model::generate::DRAFT_MAX)]
        draft_max: usize,
        /// A LoRA adapter to run the model with (as `kiln serve --adapter`).
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show what a completion at a position would send: the context
    /// snippets chosen from the workspace (tokens, score, why) and the whole
    /// prompt with its exact token count.
    Context {
        /// The project directory (indexed as `kiln serve` indexes it).
        #[arg(long)]
        workspace: std::path::PathBuf,
        /// The file the cursor is in, absolute or relative to the workspace.
        #[arg(long)]
        file: std::path::PathBuf,
        /// The cursor, 0-based as in LSP.
        #[arg(long)]
        line: u32,
        /// 0-based, in UTF-16 code units as in LSP (--utf8: in bytes).
        #[arg(long)]
        character: u32,
        #[arg(long)]
        utf8: bool,
        /// Tokens the context snippets may take.
        #[arg(long, default_value_t = 512)]
        budget: usize,
        /// Token budgets of the text before and after the cursor.
        #[arg(long, default_value_t = 1024)]
        prefix_tokens: usize,
        #[arg(long, default_value_t = 256)]
        suffix_tokens: usize,
        /// A GGUF file or registered model, for its tokenizer and template
        /// (default: the active model).
        #[arg(long)]
        model: Option<String>,
        /// codellama, qwen, deepseek, starcoder or none (default: from the model).
        #[arg(long)]
        fim_template: Option<String>,
        /// KV cache size in tokens, which bounds the prompt (default: the
        /// model's, at most 4096).
        #[arg(long)]
        ctx: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Measure context selection: cut cross-file completion holes from a
    /// repository and score selectors on them.
    #[command(subcommand)]
    Ctxbench(CtxbenchCommand),
    /// Fine-tune a model on your own code: prepare data, train, evaluate
    /// and merge LoRA adapters.
    #[command(subcommand)]
    Finetune(FinetuneCommand),
    /// LoRA adapters as versions in the registry (add, list, enable,
    /// disable, rollback); `kiln serve --adapter NAME` serves the active one.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// Measure load time, prompt and decode speed of a model (random tokens).
    Bench {
        model: String,
        #[arg(long, default_value_t = 256)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        #[arg(long)]
        backend: Option<String>,
        /// KV cache type: f16, q8_0 or q4_0 (default: config.toml's
        /// `[kv_cache]` for the model, else f16).
        #[arg(long, value_parser = parse_kv_type)]
        kv_type: Option<kiln_plugin_api::DType>,
        /// Queries per attention block in the prompt's graph (default:
        /// config.toml's `[engine] attention_block`, else 64).
        #[arg(long)]
        attention_block: Option<usize>,
        /// Tokens of the prompt evaluated per graph (default: config.toml's
        /// `[engine] prompt_batch`, else 256).
        #[arg(long)]
        prompt_batch: Option<usize>,
        /// Also decode this many sequences together, one forward pass a
        /// step (batched decoding, as `kiln serve` does for concurrent
        /// requests), and report their tokens per second together.
        #[arg(long, default_value_t = 1)]
        sequences: usize,
        /// Times the prompt is evaluated (each on a fresh cache, the same
        /// tokens); the fastest is reported, all of them in the JSON.
        #[arg(long, default_value_t = 1)]
        repetitions: usize,
        /// A LoRA adapter to measure the model with (as `kiln run
        /// --adapter`: a file or NAME[@VERSION]).
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Download a GGUF model from the Hugging Face Hub (hf:ORG/REPO,
    /// hf:ORG/REPO:FILE-or-QUANT, hf:ORG/REPO@REVISION:…) or a URL into the model store: resumable,
    /// checked against the hub's sha256, registered and active.
    Pull {
        /// hf:ORG/REPO[@REVISION][:FILE-or-QUANT], or an https:// URL of a
        /// .gguf file. REVISION: a branch, tag or commit (default main).
        spec: String,
        /// The registry name (default: the file's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The model store: add, import, list, activate, roll back, verify.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Encryption at rest of the model store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// A/B experiments between two versions of a model, decided by what
    /// the editor accepts (or by latency).
    #[command(subcommand)]
    Ab(AbCommand),
    /// Convert a Hugging Face checkpoint directory (llama, qwen2) to GGUF.
    Convert {
        dir: std::path::PathBuf,
        output: std::path::PathBuf,
        /// auto (keep each matrix's type), f32, f16 or bf16.
        #[arg(long, default_value = "auto")]
        outtype: String,
    },
    /// WebAssembly policies: ranking and tuning.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Quantize a GGUF model the way llama.cpp does (same bytes).
    Quantize {
        input: std::path::PathBuf,
        output: std::path::PathBuf,
        /// A type (q4_0, q4_1, q5_0, q5_1, q8_0, f16, bf16) or one of
        /// llama.cpp's presets (q2_k, q3_k_s, q3_k_m, q3_k_l,
        /// q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k).
        #[arg(long = "type")]
        qtype: String,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print per-tensor RMSE and cosine similarity against the source.
        #[arg(long)]
        validate: bool,
        /// Quantize tensors that are already quantized (they lose
        /// precision twice; llama.cpp's --allow-requantize).
        #[arg(long)]
        allow_requantize: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Encrypt every model blob in the store (age format) and store the
    /// models added from now on encrypted (`[store] encrypt_at_rest`). The
    /// key: KILN_IDENTITY (an age identity file), else
    /// $KILN_HOME/identity.txt (created, mode 0600, when missing), else the
    /// passphrase in KILN_PASSPHRASE.
    Encrypt {
        #[arg(long)]
        json: bool,
    },
    /// Decrypt every model blob in the store and store new ones in plain.
    Decrypt {
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every model blob (encrypted ones decrypted in memory) and
    /// report those damaged or missing; with --repair, download again
    /// each one `kiln pull` fetched and put it back once it hashes right
    /// (audited). Exits 1 while any stays damaged.
    Scrub {
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove the model and adapter stores' files that no version uses:
    /// blobs left by adds that failed or were killed before they were
    /// recorded, and copies of adds whose process is gone (audited).
    Gc {
        /// List them without removing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AbCommand {
    /// Start an experiment: `kiln serve` gives each unit (a workspace, an
    /// HTTP client) version A or B, sticky, and records the outcomes.
    Start {
        name: String,
        /// The control, MODEL@VERSION.
        #[arg(long)]
        a: String,
        /// The treatment, another version of the same model.
        #[arg(long)]
        b: String,
        /// The share of units given B.
        #[arg(long, default_value_t = 0.5)]
        split: f64,
        /// acceptance (of inline completions) or latency.
        #[arg(long, default_value = "acceptance")]
        metric: String,
        #[arg(long)]
        json: bool,
    },
    /// Each experiment's arms, outcomes, interval and decision.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop an experiment (optionally naming the winner).
    Stop {
        name: String,
        #[arg(long)]
        winner: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AdaptersCommand {
    /// Copy a LoRA adapter (kiln's or llama.cpp's GGUF) into the store as a
    /// new version of NAME, active.
    Add {
        file: std::path::PathBuf,
        /// Default: the file's name.
        #[arg(long)]
        name: Option<String>,
        /// Check that the adapter fits this model (a GGUF file or
        /// registered model) and record which it was checked against.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every registered adapter version.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make NAME@VERSION the active version of NAME.
    #[command(alias = "activate")]
    Enable { adapter: String },
    /// Stop using NAME[@VERSION] (default: the active version).
    Disable { adapter: String },
    /// Re-activate the version of NAME that was active before.
    Rollback { name: String },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Copy a GGUF model into the store (hash-verified) as a new version.
    Add {
        file: std::path::PathBuf,
        /// Default: the model's general.name, or the file name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Find GGUF models in the Hugging Face cache, Ollama and LM Studio
    /// and register them without copying (hard links where possible).
    Import {
        /// Only these sources: hf, ollama, lmstudio (default: all).
        #[arg(long = "from", value_delimiter = ',')]
        from: Vec<String>,
        /// Only list what would be imported, and what is skipped.
        #[arg(long)]
        list: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every registered model version.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make NAME@VERSION the active version of NAME.
    #[command(alias = "enable")]
    Activate { model: String },
    /// Stop using NAME[@VERSION] (default: the active version).
    Disable { model: String },
    /// Re-activate the version of NAME that was active before.
    Rollback { name: String },
    /// Re-hash every blob in the store; report missing or corrupt ones,
    /// and files no version uses (left by adds that failed or were killed).
    Verify {
        #[arg(long)]
        json: bool,
        /// Delete the files no version uses.
        #[arg(long)]
        remove_orphans: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check, gate and install a policy module; it becomes the active policy of its kind.
    Add {
        file: std::path::PathBuf,
        /// A directory of recorded cases (*.json) the gate runs besides its own.
        #[arg(long)]
        cases: Option<std::path::PathBuf>,
        /// Latency ceiling: the p99 of a call, instantiation included.
        #[arg(long, default_value_t = kiln_runtime::policy::DEFAULT_MAX_P99_MS)]
        max_p99_ms: f64,
        /// Fuel per call (default 200M; ceiling 2G); overrides the module's metadata.
        #[arg(long)]
        fuel: Option<u64>,
        /// Wall-clock deadline per call in ms (default 100; ceiling 2000).
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Linear memory cap in MiB (default 64; ceiling 512).
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Installed policies.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Make NAME[@VERSION] the active policy of its kind (resets the breaker).
    Enable { policy: String },
    /// Stop using NAME[@VERSION].
    Disable { policy: String },
    /// Re-activate the previously active version of NAME.
    Rollback { name: String },
    /// Run a policy (file or installed name) over cases: latency, fuel, agreement.
    Test {
        policy: String,
        /// A directory of recorded cases (*.json: input, expected top ids).
        #[arg(long)]
        cases: Option<std::path::PathBuf>,
        /// Latency ceiling: the p99 of a call, instantiation included.
        #[arg(long, default_value_t = kiln_runtime::policy::DEFAULT_MAX_P99_MS)]
        max_p99_ms: f64,
        /// A ranking policy: also score it on ctxbench's cross-file holes
        /// of REPO (default: this directory) against the built-in ranker.
        #[arg(long, value_name = "REPO", num_args = 0..=1, default_missing_value = ".")]
        ctxbench: Option<std::path::PathBuf>,
        /// ctxbench: token budgets of the context.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
        budgets: Vec<usize>,
        #[command(flatten)]
        holes: HoleCut,
        #[arg(long)]
        json: bool,
    },
    /// Scaffold a ranking policy project (Rust or C) that builds with
    /// its build.sh and passes `kiln policy test` as generated.
    New {
        name: String,
        #[arg(long, default_value = "rust")]
        lang: String,
        /// Where (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run a policy once on a JSON input; the decision is logged for replay.
    Run {
        policy: String,
        #[arg(long)]
        input: std::path::PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-run a logged decision and check the output is bit-identical.
    Replay {
        decision: i64,
        #[arg(long)]
        json: bool,
    },
    /// The newest logged decisions (from `kiln policy run` and from
    /// serving), newest first.
    Log {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TuneCommand {
    /// Search: each trial is whole `kiln bench` processes (time to first
    /// token of a prompt, decode speed, peak memory), recorded as it runs;
    /// the best is measured again against the default, side by side.
    Run(Box<tune::RunArgs>),
    /// Continue a search that was stopped (trials cut short run again).
    Resume {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// The searches, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A search's trials, its Pareto front (time to first token against
    /// peak memory) and its verdict.
    Show {
        run: i64,
        #[arg(long)]
        json: bool,
    },
    /// Write a trial's setting into config.toml (`[engine]`, the model's
    /// `[kv_cache.models]` entry), recorded as a change.
    Apply { trial: i64 },
    /// Undo the last change kiln made to config.toml.
    Rollback,
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// Installed plugin versions, and plugins found but not installed.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Check, test and install a plugin: a directory with kiln-plugin.toml,
    /// the manifest itself, or the name of a discovered plugin.
    Add {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Make NAME (its newest version) or NAME@VERSION the active version.
    Enable { plugin: String },
    /// Stop using NAME's active version, or NAME@VERSION.
    Disable { plugin: String },
    /// Re-activate the version that was active before the current one.
    Rollback { name: String },
    /// Load NAME again after its worker process crashed repeatedly and it
    /// was quarantined.
    Release { name: String },
    /// Run NAME in kiln's own process (you trust it not to crash): writes
    /// `[plugins.isolation] NAME = "in-process"` to config.toml, recorded
    /// (`kiln tune rollback` undoes the last change).
    Trust { name: String },
    /// Run NAME in a supervised worker process again (the default).
    Isolate { name: String },
    /// The audit log of plugin changes, oldest first.
    Log {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

/// How ctxbench's holes are cut and counted, where a command cuts them
/// itself (`kiln ctxbench run`, `kiln policy test --ctxbench`).
#[derive(clap::Args)]
struct HoleCut {
    /// Cross-file holes to cut.
    #[arg(long, default_value_t = 200)]
    cut: usize,
    /// The seed of the cut.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The model whose tokenizer counts tokens (default: the active model).
    #[arg(long)]
    model: Option<String>,
}

#[derive(Subcommand)]
enum FinetuneCommand {
    /// Score the base model against an adapter on the held-out files of
    /// DATA: likelihood per token, and greedy completions at the held-out
    /// holes (exact match, edit similarity), with bootstrap intervals.
    Eval {
        data: std::path::PathBuf,
        /// The base model (default: the active model).
        #[arg(long)]
        model: Option<String>,
        /// An adapter to compare with the base: a LoRA GGUF file (kiln's or
        /// llama.cpp's) or a registered adapter (NAME, NAME@VERSION). The
        /// result is recorded in the registry with the version holding the
        /// adapter's bytes, where one does.
        #[arg(long)]
        adapter: Option<std::path::PathBuf>,
        /// Held-out holes to complete (0: likelihood only).
        #[arg(long, default_value_t = 100)]
        holes: usize,
        /// Tokens per completion at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// The bootstrap's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Write the base model with an adapter merged into it: each adapted
    /// projection as W + alpha/r·B·A in --type (f16 by default), the rest
    /// as it was.
    Merge {
        /// The base model (default: the active model).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        adapter: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or a K-quant type.
        #[arg(long, default_value = "f16")]
        r#type: String,
        #[arg(long)]
        json: bool,
    },
    /// Train a LoRA adapter on data `kiln finetune prepare` wrote; the
    /// adapter is written in llama.cpp's format, with a checkpoint beside
    /// it (Ctrl-C stops at the next step and saves; --resume continues).
    Train(finetune::TrainArgs),
    /// Turn the code in DIR into training sequences for a model: files
    /// filtered (binary, generated, vendored, minified), deduplicated,
    /// secrets redacted, split into train and eval by file, examples in
    /// the model's fill-in-the-middle format at syntactic spans, packed.
    Prepare {
        dir: std::path::PathBuf,
        /// The model the data is for (its tokenizer and prompt format):
        /// a GGUF file or registered model (default: the active model).
        #[arg(long)]
        model: Option<String>,
        /// The data directory to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Tokens per training sequence at most.
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        /// The share of files held out for evaluation.
        #[arg(long, default_value_t = 0.1)]
        eval_fraction: f64,
        /// Fill-in-the-middle holes to cut in the held-out files.
        #[arg(long, default_value_t = 200)]
        eval_holes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CtxbenchCommand {
    /// Cut holes from REPO into a JSONL file (each with its file's sha256).
    Cut {
        repo: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
        /// Cross-file holes to cut (in-file and external ones up to as many).
        #[arg(long, default_value_t = 200)]
        holes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// Score no context, BM25 first-fit, Jaccard windows and kiln's
    /// selector at each budget on REPO's cross-file holes.
    Run {
        repo: std::path::PathBuf,
        /// Holes cut before (default: cut now with --cut and --seed).
        #[arg(long)]
        holes: Option<std::path::PathBuf>,
        #[command(flatten)]
        cut: HoleCut,
        /// Context token budgets, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,8192,32768")]
        budgets: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Run a real model on REPO's cross-file holes with each selector's
    /// context and with the oracle's (exactly the needed definitions):
    /// ΔNLL of the true completion against no context, exact match and
    /// edit similarity of the greedy completion, share of the oracle's
    /// gain, with bootstrap intervals.
    Model {
        repo: std::path::PathBuf,
        /// Holes cut before (with `kiln ctxbench cut`).
        #[arg(long)]
        holes: std::path::PathBuf,
        /// The model to run (default: the active model).
        #[arg(long)]
        model: Option<String>,
        /// Context token budget.
        #[arg(long, default_value_t = 1024)]
        budget: usize,
        /// Tokens of the text before the cursor the prompts keep.
        #[arg(long, default_value_t = kiln_serve::ctxbench::MODEL_PREFIX_TOKENS)]
        prefix_tokens: usize,
        /// Tokens of the text after the hole's line the prompts keep.
        #[arg(long, default_value_t = kiln_serve::ctxbench::MODEL_SUFFIX_TOKENS)]
        suffix_tokens: usize,
        /// Only these, comma-separated: none, bm25_first_fit,
        /// jaccard_windows, kiln, kiln_second_query, oracle (default: all).
        #[arg(long, value_delimiter = ',')]
        selectors: Option<Vec<String>>,
        /// Also score the likelihood of this many tokens of the
        /// repository's own files (the first 512 of each; 0: none).
        #[arg(long, default_value_t = 0)]
        nll_tokens: usize,
        /// Cross-file holes to score (the first of the set).
        #[arg(long, default_value_t = 40)]
        count: usize,
        /// Tokens of each greedy completion at most.
        #[arg(long, default_value_t = 24)]
        max_tokens: usize,
        /// The bootstrap's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

/// An error for the user: what failed and what to do.
pub struct CliError(pub String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

pub type CliResult = Result<ExitCode, CliError>;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(CliError(message)) => {
            eprintln!("kiln: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> CliResult {
    let config = Config::from_env()?;
    // `[engine] threads` (what `kiln tune apply` writes), unless the
    // environment says otherwise; before any backend starts its threads.
    if let Some(n) = config.engine.threads
        && std::env::var_os("KILN_THREADS").is_none()
    {
        // SAFETY: no other thread runs yet: nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("KILN_THREADS", n.to_string()) };
    }
    match command {
        Command::Pull { spec, name, json } => pull::run(&config, &spec, name.as_deref(), json),
        Command::Demo {
            model,
            keystrokes,
            max_tokens,
            typing_ms,
            json,
        } => demo::run(
            &config,
            model.as_deref(),
            keystrokes,
            max_tokens,
            typing_ms,
            json,
        ),
        Command::Serve {
            model,
            http,
            metrics,
            allow_remote,
            dashboard_interval,
            backend,
            ctx,
            max_memory,
            kv_type,
            fim_template,
            max_tokens,
            prefix_tokens,
            suffix_tokens,
            context_tokens,
            mode,
            draft,
            draft_max,
            debounce_ms,
            adapter,
        } => {
            // Its defaults come from config.toml's `[completion]`.
            config.require_valid().map_err(CliError)?;
            let mut model = model.into_iter();
            let (first, more_models) = (model.next(), model.collect());
            let model = first;
            let adapter = adapter
                .map(|a| adapters::resolve(&config, &a))
                .transpose()?;
            let mode: kiln_serve::Mode =
                serde_json::from_value(serde_json::json!(mode)).map_err(|_| {
                    CliError(format!("--mode {mode:?}: choose auto, line, block or none"))
                })?;
            // `--draft none|ngram|MODEL`, else config.toml's (none|ngram).
            let (draft, draft_model) = match draft.as_deref() {
                Some(d @ ("none" | "ngram")) => (d.parse().map_err(CliError)?, None),
                Some(m) => (
                    kiln_runtime::model::generate::Draft::Model,
                    Some(m.to_string()),
                ),
                None => (
                    config
                        .completion
                        .draft
                        .as_deref()
                        .map_or(Ok(Default::default()), str::parse)
                        .map_err(CliError)?,
                    None,
                ),
            };
            let c = &config.completion;
            let d = kiln_serve::Settings::default();
            let settings = kiln_serve::Settings {
                max_tokens: max_tokens.or(c.max_tokens).unwrap_or(d.max_tokens),
                prefix_tokens: prefix_tokens.or(c.prefix_tokens).unwrap_or(d.prefix_tokens),
                suffix_tokens: suffix_tokens.or(c.suffix_tokens).unwrap_or(d.suffix_tokens),
                context_tokens: context_tokens
                    .or(c.context_tokens)
                    .unwrap_or(d.context_tokens),
                mode,
                fim_template,
                draft,
                draft_max: draft_max.or(c.draft_max).unwrap_or(d.draft_max),
                debounce_ms: debounce_ms
                    .or(c.debounce_ms.map(|v| v as u64))
                    .unwrap_or(d.debounce_ms),
                ..d
            };
            settings.validate().map_err(CliError)?;
            serve::run(
                kiln_serve::start::ServeSpec {
                    config,
                    model,
                    more_models,
                    backend,
                    n_ctx: ctx,
                    kv_type,
                    settings,
                    draft_model,
                    metrics_address: None,
                    max_memory_mb: max_memory,
                    adapter,
                },
                serve::Listen {
                    http: http.as_deref(),
                    metrics: metrics.as_deref(),
                    allow_remote,
                    dashboard_interval,
                },
            )
        }
        Command::Top {
            address,
            plain,
            count,
        } => top::top(&config, address.as_deref(), plain, count),
        Command::Explain(args) => explain::explain(&config, args),
        Command::Doctor { json } => doctor::doctor(&config, json),
        Command::Backends { json, remeasure } => backends::backends(&config, json, remeasure),
        Command::Tune(t) => match t {
            TuneCommand::Run(args) => tune::run(&config, &args),
            TuneCommand::Resume { run, json } => tune::resume(&config, run, json),
            TuneCommand::List { json } => tune::list(&config, json),
            TuneCommand::Show { run, json } => tune::show(&config, run, json),
            TuneCommand::Apply { trial } => tune::apply(&config, trial),
            TuneCommand::Rollback => tune::rollback(&config),
        },
        Command::Plugins(p) => match p {
            PluginsCommand::List { json } => plugins::list(&config, json),
            PluginsCommand::Add { path, json } => plugins::add(&config, &path, json),
            PluginsCommand::Enable { plugin } => change(&config, Kind::Plugin, Enable, &plugin),
            PluginsCommand::Disable { plugin } => change(&config, Kind::Plugin, Disable, &plugin),
            PluginsCommand::Rollback { name } => change(&config, Kind::Plugin, Rollback, &name),
            PluginsCommand::Release { name } => plugins::release(&config, &name),
            PluginsCommand::Trust { name } => plugins::trust(&config, &name, true),
            PluginsCommand::Isolate { name } => plugins::trust(&config, &name, false),
            PluginsCommand::Log { limit, json } => plugins::log(&config, limit, json),
        },
        Command::Run {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
            backend,
            ctx,
            kv_type,
            draft,
            draft_max,
            adapter,
            json,
        } => run::run(
            &config,
            run::RunArgs {
                model,
                adapter: adapter
                    .map(|a| adapters::resolve(&config, &a).map(|(file, _)| file))
                    .transpose()?,
                prompt,
                max_tokens,
                sampling: kiln_runtime::model::sample::SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty,
                    repeat_last_n: 64,
                    seed: seed.unwrap_or_else(|| {
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64)
                    }),
                },
                stop,
                backend,
                ctx,
                kv_type,
                draft,
                draft_max,
                json,
            },
        ),
        Command::Context {
            workspace,
            file,
            line,
            character,
            utf8,
            budget,
            prefix_tokens,
            suffix_tokens,
            model,
            fim_template,
            ctx,
            json,
        } => context::run(
            &config,
            context::ContextArgs {
                workspace,
                file,
                line,
                character,
                utf8,
                model,
                fim_template: fim_template.clone(),
                ctx,
                settings: kiln_serve::Settings {
                    prefix_tokens,
                    suffix_tokens,
                    context_tokens: budget,
                    fim_template,
                    ..kiln_serve::Settings::default()
                },
                json,
            },
        ),
        Command::Finetune(FinetuneCommand::Eval {
            data,
            model,
            adapter,
            holes,
            max_tokens,
            seed,
            json,
        }) => finetune::eval(
            &config,
            &data,
            model.as_deref(),
            adapter.as_deref(),
            &kiln_finetune::train::eval::Options {
                holes,
                max_tokens,
                seed,
            },
            json,
        ),
        Command::Finetune(FinetuneCommand::Merge {
            model,
            adapter,
            out,
            r#type,
            json,
        }) => finetune::merge(&config, model.as_deref(), &adapter, &out, &r#type, json),
        Command::Finetune(FinetuneCommand::Train(args)) => finetune::train(&config, &args),
        Command::Finetune(FinetuneCommand::Prepare {
            dir,
            model,
            out,
            seq_len,
            eval_fraction,
            eval_holes,
            seed,
            json,
        }) => finetune::prepare(
            &config,
            &dir,
            model.as_deref(),
            &out,
            &kiln_finetune::prepare::Options {
                seq_len,
                eval_fraction,
                seed,
                eval_holes,
            },
            json,
        ),
        Command::Ctxbench(CtxbenchCommand::Cut {
            repo,
            out,
            holes,
            seed,
            json,
        }) => ctxbench::cut(&repo, &out, holes, seed, json),
        Command::Ctxbench(CtxbenchCommand::Run {
            repo,
            holes,
            cut,
            budgets,
            json,
        }) => ctxbench::run(
            &config,
            ctxbench::RunArgs {
                repo: &repo,
                holes: holes.as_deref(),
                cut: cut.cut,
                seed: cut.seed,
                model: cut.model.as_deref(),
                budgets: &budgets,
                json,
            },
        ),
        Command::Ctxbench(CtxbenchCommand::Model {
            repo,
            holes,
            model,
            budget,
            prefix_tokens,
            suffix_tokens,
            selectors,
            nll_tokens,
            count,
            max_tokens,
            seed,
            json,
        }) => ctxbench::model(
            &config,
            ctxbench::ModelArgs {
                repo: &repo,
                holes: &holes,
                model: model.as_deref(),
                budget,
                prefix_tokens,
                suffix_tokens,
                selectors,
                nll_tokens,
                count,
                max_tokens,
                seed,
                json,
            },
        ),
        Command::Bench {
            model,
            prompt_tokens,
            decode_tokens,
            backend,
            kv_type,
            attention_block,
            prompt_batch,
            sequences,
            repetitions,
            adapter,
            json,
        } => bench::run(
            &config,
            &bench::Args {
                model,
                prompt_tokens,
                decode_tokens,
                backend,
                kv_type,
                attention_block,
                prompt_batch,
                sequences,
                repetitions,
                adapter: adapter
                    .map(|a| adapters::resolve(&config, &a).map(|(file, _)| file))
                    .transpose()?,
            },
            json,
        ),
        Command::Convert {
            dir,
            output,
            outtype,
        } => {
            let t = kiln_runtime::convert::OutType::parse(&outtype).ok_or_else(|| {
                CliError(format!(
                    "unknown --outtype {outtype:?}; choose auto, f32, f16 or bf16"
                ))
            })?;
            let progress = Progress::new("converting");
            let n = kiln_runtime::convert::convert(&dir, &output, t, |d, total| {
                progress.update(d, total)
            })?;
            println!("wrote {} ({n} tensors)", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Adapters(a) => match a {
            AdaptersCommand::Add {
                file,
                name,
                model,
                json,
            } => adapters::add(&config, &file, name.as_deref(), model.as_deref(), json),
            AdaptersCommand::List { json } => adapters::list(&config, json),
            AdaptersCommand::Enable { adapter } => change(&config, Kind::Adapter, Enable, &adapter),
            AdaptersCommand::Disable { adapter } => {
                change(&config, Kind::Adapter, Disable, &adapter)
            }
            AdaptersCommand::Rollback { name } => change(&config, Kind::Adapter, Rollback, &name),
        },
        Command::Models(m) => match m {
            ModelsCommand::Add { file, name, json } => {
                models::add(&config, &file, name.as_deref(), json)
            }
            ModelsCommand::List { json } => models::list(&config, json),
            ModelsCommand::Import { from, list, json } => {
                models::import(&config, &from, list, json)
            }
            ModelsCommand::Activate { model } => change(&config, Kind::Model, Enable, &model),
            ModelsCommand::Disable { model } => change(&config, Kind::Model, Disable, &model),
            ModelsCommand::Rollback { name } => change(&config, Kind::Model, Rollback, &name),
            ModelsCommand::Verify {
                json,
                remove_orphans,
            } => models::verify(&config, json, remove_orphans),
        },
        Command::Ab(c) => match c {
            AbCommand::Start {
                name,
                a,
                b,
                split,
                metric,
                json,
            } => ab::start(&config, &name, &a, &b, split, &metric, json),
            AbCommand::Status { name, json } => ab::status(&config, name.as_deref(), json),
            AbCommand::Stop { name, winner, json } => {
                ab::stop(&config, &name, winner.as_deref(), json)
            }
        },
        Command::Store(c) => match c {
            StoreCommand::Encrypt { json } => store::reseal(&config, true, json),
            StoreCommand::Decrypt { json } => store::reseal(&config, false, json),
            StoreCommand::Scrub { repair, json } => store::scrub(&config, repair, json),
            StoreCommand::Gc { dry_run, json } => store::gc(&config, dry_run, json),
        },
        Command::Policy(p) => match p {
            PolicyCommand::Add {
                file,
                cases,
                max_p99_ms,
                fuel,
                deadline_ms,
                memory_mib,
                json,
            } => policy::add(
                &config,
                policy::AddArgs {
                    file: &file,
                    cases: cases.as_deref(),
                    max_p99_ms,
                    overrides: kiln_sandbox::limits::LimitOverrides {
                        fuel,
                        deadline_ms,
                        memory_mib,
                        table_elements: None,
                    },
                    json,
                },
            ),
            PolicyCommand::List { json } => policy::list(&config, json),
            PolicyCommand::Enable { policy: p } => change(&config, Kind::Policy, Enable, &p),
            PolicyCommand::Disable { policy: p } => change(&config, Kind::Policy, Disable, &p),
            PolicyCommand::Rollback { name } => change(&config, Kind::Policy, Rollback, &name),
            PolicyCommand::Test {
                policy: p,
                cases,
                max_p99_ms,
                ctxbench,
                budgets,
                holes,
                json,
            } => policy::test(
                &config,
                &p,
                cases.as_deref(),
                max_p99_ms,
                ctxbench.as_deref().map(|repo| policy::Ctxbench {
                    repo,
                    budgets: &budgets,
                    cut: holes.cut,
                    seed: holes.seed,
                    model: holes.model.as_deref(),
                }),
                json,
            ),
            PolicyCommand::Run {
                policy: p,
                input,
                json,
            } => policy::run(&config, &p, &input, json),
            PolicyCommand::Replay { decision, json } => policy::replay(&config, decision, json),
            PolicyCommand::New {
                name,
                lang,
                dir,
                json,
            } => policy::new(&name, &lang, dir.as_deref(), json),
            PolicyCommand::Log { limit, json } => policy::log(&config, limit, json),
        },
        Command::Quantize {
            input,
            output,
            qtype,
            threads,
            validate,
            allow_requantize,
            json,
        } => quantize::run(
            &input,
            &output,
            &qtype,
            threads,
            validate,
            allow_requantize,
            json,
        ),
    }
}

/// Opens the registry after checking the config file.
fn open_registry(config: &Config) -> Result<Registry, CliError> {
    Ok(Registry::open_home(config)?)
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialise")
    );
}

/// Progress on stderr: a line rewritten in place on a terminal, a single
/// final line otherwise.
struct Progress {
    tty: bool,
    label: String,
}

impl Progress {
    fn new(label: &str) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            label: label.to_string(),
        }
    }

    /// Bytes done of a total, with the item being worked on.
    fn bytes(&self, done: u64, total: u64, item: &str) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if self.tty {
            eprint!(
                "\r\x1b[2K{}: {pct:5.1}% of {} {item}",
                self.label,
                human_bytes(total)
            );
            if done == total {
                eprintln!();
            }
        } else if done == total {
            eprintln!("{}: done, {}", self.label, human_bytes(total));
        }
    }

    fn update(&self, done: usize, total: usize) {
        if self.tty {
            eprint!("\r{}: {done}/{total}", self.label);
            if done == total {
                eprintln!();
            }
        } else if done == total {
            eprintln!("{}: {done}/{total}", self.label);
        }
    }
}

/// Formats rows as a left-aligned table with a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

/// `--kv-type`'s parser.
/// A size in MiB: a number of MiB, or one with a unit (`K`, `M`, `G`,
/// `T`, optionally followed by `iB` or `B`; all binary), at least 1 MiB.
fn parse_mib(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let bad =
        || format!("{text:?} is not a size: give MiB (6144) or a number with a unit (6G, 512M)");
    let n: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 1.0,
        "K" | "KB" | "KIB" => 1.0 / 1024.0,
        "G" | "GB" | "GIB" => 1024.0,
        "T" | "TB" | "TIB" => 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let mib = (n * scale).floor();
    if !mib.is_finite() || mib < 1.0 {
        return Err(format!("{text:?} is less than 1 MiB"));
    }
    Ok(mib as u64)
}

fn parse_kv_type(name: &str) -> Result<kiln_plugin_api::DType, String> {
    kiln_runtime::model::forward::KvCache::parse_type(name)
}

/// The KV cache type for `model` (a name, name@version or path):
/// `forced`, else `config.toml`'s (which must then be valid).
pub fn kv_type_for(
    config: &Config,
    model: &str,
    forced: Option<kiln_plugin_api::DType>,
) -> Result<kiln_plugin_api::DType, CliError> {
    if let Some(t) = forced {
        return Ok(t);
    }
    config.require_valid().map_err(CliError)?;
    // A file is known by its stem, as `kiln serve --model FILE` knows it.
    let path = std::path::Path::new(model);
    let label = match path.file_stem() {
        Some(stem) if path.is_file() => stem.to_string_lossy().into_owned(),
        _ => model.to_string(),
    };
    Ok(
        kiln_runtime::model::forward::KvCache::parse_type(config.kv_cache.for_model(&label).name())
            .expect("config.toml's names are kiln's"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1");
    }

    #[test]
    fn bytes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn sizes_read_as_mib() {
        for (text, mib) in [
            ("6144", 6144),
            ("6G", 6144),
            ("1.5GiB", 1536),
            ("512M", 512),
            ("512 MB", 512),
            ("2048K", 2),
            ("1T", 1 << 20),
        ] {
            assert_eq!(parse_mib(text), Ok(mib), "{text}");
        }
        for bad in ["", "G", "12X", "512B", "-1G"] {
            assert!(parse_mib(bad).unwrap_err().contains("not a size"), "{bad}");
        }
        assert!(parse_mib("0.5M").unwrap_err().contains("less than 1 MiB"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
