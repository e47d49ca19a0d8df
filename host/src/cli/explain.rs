//! `kiln explain`: why a model completes a prompt as it does.

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_runtime::model::explain::{self, Ask};
use kiln_runtime::model::{Model, session::Session};
use kiln_runtime::store;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// A GGUF file or registered model.
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// The completion to explain (default: the model's greedy one).
    #[arg(long)]
    pub completion: Option<String>,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Tokens to evaluate at most for the attribution.
    #[arg(long, default_value_t = 8192)]
    pub budget_tokens: usize,
    /// Record the attention map: per layer and head, the attention the
    /// completion's queries paid to each prompt token (in full with
    /// --json).
    #[arg(long)]
    pub attention: bool,
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn explain(config: &Config, args: ExplainArgs) -> CliResult {
    let path = store::resolve(config, &args.model)?;
    let chosen = super::run::executor(config, args.backend.as_deref())?;
    let exec = chosen.executor;
    let model = Model::load_for(&path, &exec.target, exec.device)?;
    let tok = model.tokenizer()?;
    let mut session = Session::new(model, exec, None)?;
    let e = explain::explain(
        &mut session,
        &tok,
        &Ask {
            prompt: args.prompt,
            completion: args.completion,
            max_tokens: args.max_tokens,
            parts: Vec::new(),
            budget_tokens: args.budget_tokens,
            counterfactual: true,
            attention: args.attention,
        },
    )
    .map_err(|e| CliError(e.to_string()))?;
    if args.json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "explanation": e}));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "completion: {:?} ({} tokens, log-probability {:.2})",
        e.completion, e.completion_tokens, e.logprob
    );
    println!("what made it likely (log-probability lost without each part, most first):");
    for a in e.parts.iter().chain(&e.lines).chain(&e.spans) {
        println!(
            "  {:>+8.3}  {:<5} {}..{}  {}",
            a.importance, a.part.kind, a.part.start, a.part.end, a.part.label
        );
    }
    if let Some(c) = &e.counterfactual {
        println!(
            "without the most important part ({:?}): {:?}",
            c.removed.label, c.completion
        );
    }
    if let Some(m) = &e.attention {
        // The first token is where most heads park attention they do not
        // need (an attention sink): it is left out of the ranking.
        let mean = m.mean();
        let mut order: Vec<usize> = (1..mean.len()).collect();
        order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]).then(a.cmp(&b)));
        println!(
            "most attended prompt tokens ({} layers x {} heads, mean; the first token, {:.3}, left out):",
            m.layers,
            m.heads,
            mean.first().copied().unwrap_or(0.0)
        );
        for &i in order.iter().take(8) {
            println!("  {:>7.4}  token {i:<5} {:?}", mean[i], m.tokens[i]);
        }
    }
    println!(
        "{} of {} tokens of budget evaluated{}",
        e.evaluated_tokens,
        e.budget_tokens,
        if e.skipped_parts > 0 {
            format!(
                "; {} part(s) not measured (raise --budget-tokens)",
                e.skipped_parts
            )
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
