//! Generation: prompt in, tokens out, streamed as text, with stop strings
//! and timings. The session's cache is reused for the prompt's longest
//! cached prefix.
//!
//! Greedy requests can decode speculatively: tokens guessed from the
//! text so far ([`Draft::Ngram`]) or by a smaller model of the same
//! vocabulary ([`Draft::Model`], [`generate_with_draft`]) are verified in
//! one batch with the sampled token, and each guess the model agrees with
//! saves a decode step. A batch's logits are the bits of the same tokens one at a time
//! (the session's contract), so the tokens are exactly plain greedy
//! decoding's.

use super::forward::LogitsFor;
use super::sample::{Sampler, SamplingParams};
use super::{ModelError, Session};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Where a code completion ends on its own (see [`Boundary`]).
    pub boundary: Boundary,
    /// Cancellation and progress, shared with whoever may cancel.
    pub control: Option<Arc<Control>>,
    /// Speculative decoding (greedy requests only; others ignore it).
    pub draft: Draft,
    /// Tokens guessed at most per verifying batch ([`DRAFT_MAX`] by
    /// default).
    pub draft_max: usize,
}

/// How a greedy request guesses tokens ahead, for one batch to verify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Draft {
    /// One token per decode step.
    #[default]
    None,
    /// Prompt lookup: the tokens that followed the latest earlier
    /// occurrence of the text's last [`NGRAM_MAX`] tokens (or fewer, down
    /// to [`NGRAM_MIN`]), up to [`DRAFT_MAX`] of them: code repeats
    /// itself, and an edit's completion often repeats the prompt.
    Ngram,
    /// A draft model's greedy tokens (a smaller model of the same
    /// vocabulary, its own session given to [`generate_with_draft`]).
    Model,
}

impl std::str::FromStr for Draft {
    type Err = String;
    fn from_str(s: &str) -> Result<Draft, String> {
        match s {
            "none" => Ok(Draft::None),
            "ngram" => Ok(Draft::Ngram),
            _ => Err(format!("unknown draft `{s}`: none or ngram")),
        }
    }
}

/// The longest and shortest n-grams [`Draft::Ngram`] looks up.
pub const NGRAM_MAX: usize = 4;
pub const NGRAM_MIN: usize = 2;
/// Tokens guessed at most per verifying batch, by default.
pub const DRAFT_MAX: usize = 8;
/// The most a request may ask for.
pub const DRAFT_MAX_LIMIT: usize = kiln_registry::config::MAX_DRAFT_TOKENS;

/// Up to `max` tokens that followed the latest earlier occurrence of the
/// last `n` tokens of `history`, for the longest `n` from [`NGRAM_MAX`]
/// down to [`NGRAM_MIN`] that occurs earlier; empty when none does.
pub fn lookup_draft(history: &[u32], max: usize) -> Vec<u32> {
    for n in (NGRAM_MIN..=NGRAM_MAX).rev() {
        if history.len() <= n {
            continue;
        }
        let tail = &history[history.len() - n..];
        if let Some(start) = (0..history.len() - n)
            .rev()
            .find(|&i| &history[i..i + n] == tail)
        {
            let from = start + n;
            return history[from..(from + max).min(history.len())].to_vec();
        }
    }
    Vec::new()
}

/// Checked before every token: once cancelled, generation ends with
/// [`StopReason::Cancelled`] after at most the token in flight.
#[derive(Debug, Default)]
pub struct Control {
    cancelled: AtomicBool,
    generated: AtomicUsize,
    generated_at_cancel: AtomicUsize,
    /// A more urgent job waits: a pausable generation stops at its next
    /// token and hands back where it stands ([`generate_resumable`]).
    pause: AtomicBool,
    /// Controls cancelled with this one ([`Control::child`]).
    children: std::sync::Mutex<Vec<std::sync::Weak<Control>>>,
}

impl Control {
    pub fn cancel(&self) {
        if !self.cancelled.swap(true, Ordering::AcqRel) {
            self.generated_at_cancel
                .store(self.generated.load(Ordering::Acquire), Ordering::Release);
        }
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for c in children.iter().filter_map(std::sync::Weak::upgrade) {
            c.cancel();
        }
    }

    /// Asks a pausable generation to stop at its next token, resumable.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::Release);
    }

    /// Whether a pause was asked for (the request stays).
    pub fn pause_asked(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Whether a pause was asked for (and clears the request).
    pub fn take_pause(&self) -> bool {
        self.pause.swap(false, Ordering::AcqRel)
    }

    /// A control of its own (cancelling it leaves this one alone) that is
    /// cancelled when this one is: one attempt of a request that may be
    /// tried on another model.
    pub fn child(&self) -> std::sync::Arc<Control> {
        let c = std::sync::Arc::new(Control::default());
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            drop(children);
            c.cancel();
        } else {
            children.retain(|w| w.strong_count() > 0);
            children.push(std::sync::Arc::downgrade(&c));
        }
        c
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Tokens sampled so far.
    pub fn generated(&self) -> usize {
        self.generated.load(Ordering::Acquire)
    }

    /// Tokens sampled after [`Control::cancel`] was called (0 if it was not).
    pub fn generated_after_cancel(&self) -> usize {
        if !self.is_cancelled() {
            return 0;
        }
        self.generated()
            .saturating_sub(self.generated_at_cancel.load(Ordering::Acquire))
    }
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Request {
        Request {
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            boundary: Boundary::None,
            control: None,
            draft: Draft::None,
            draft_max: DRAFT_MAX,
        }
    }
}

/// Where a code completion stops by itself, besides stop strings and the
/// end-of-generation token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boundary {
    /// Only stop strings, end of generation and `max_tokens`.
    #[default]
    None,
    /// The end of the line, once the line has some text.
    Line,
    /// A balanced block: stops before a bracket that closes more than the
    /// completion opened, or at a blank line outside any bracket.
    Block,
}

impl Boundary {
    /// Where `text` (the completion so far) must be cut, if anywhere.
    pub fn cut(self, text: &str) -> Option<usize> {
        match self {
            Boundary::None => None,
            Boundary::Line => {
                let start = text.find(|c: char| !c.is_whitespace())?;
                text[start..].find('\n').map(|i| start + i)
            }
            Boundary::Block => {
                let mut depth = 0i32;
                let mut seen_text = false;
                let mut prev_newline = false;
                for (i, c) in text.char_indices() {
                    match c {
                        '(' | '[' | '{' => depth += 1,
                        ')' | ']' | '}' => {
                            depth -= 1;
                            if depth < 0 {
                                // Cut at the start of that line when the
                                // closer is alone on it (the suffix has it).
                                let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
                                return Some(if text[line_start..i].trim().is_empty() {
                                    line_start.saturating_sub(1)
                                } else {
                                    i
                                });
                            }
                        }
                        _ => {}
                    }
                    if c == '\n' {
                        if prev_newline && seen_text && depth == 0 {
                            return Some(i - 1);
                        }
                        prev_newline = true;
                    } else if !c.is_whitespace() {
                        seen_text = true;
                        prev_newline = false;
                    }
                }
                None
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxTokens,
    EndOfGeneration,
    StopString,
    /// The completion reached its [`Boundary`].
    Boundary,
    Cancelled,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Prompt tokens evaluated (after the cached prefix).
    pub prompt_tokens: usize,
    /// Prompt tokens found in the cache.
    pub cached_tokens: usize,
    /// Of those, tokens copied back from the session's prefix tree.
    pub restored_tokens: usize,
    pub time_to_first_token_ms: f64,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// Speculative decoding: tokens guessed, and how many of them the
    /// model agreed with (each a decode step saved).
    pub draft_tokens: usize,
    pub draft_accepted: usize,
    /// Verifying batches that carried guesses.
    pub draft_batches: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// Runs `req`. `on_text` receives text as it becomes final (never a part of
/// a stop string); returning `false` cancels.
pub fn generate(
    session: &mut Session,
    tok: &Tokenizer,
    req: &Request,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Generation, ModelError> {
    generate_with_draft(session, None, tok, req, on_text)
}

/// Whether `draft` can guess tokens for `target`: the same vocabulary,
/// token for token. The message names the first difference.
pub fn same_vocabulary(target: &Tokenizer, draft: &Tokenizer) -> Result<(), String> {
    if target.n_vocab() != draft.n_vocab() {
        return Err(format!(
            "the draft model has {} tokens in its vocabulary, the model {}: a draft model must \
             share the model's vocabulary (a smaller model of the same family, or a smaller \
             quantization of the same model)",
            draft.n_vocab(),
            target.n_vocab()
        ));
    }
    match (0..target.n_vocab() as u32).find(|&id| target.token_text(id) != draft.token_text(id)) {
        Some(id) => Err(format!(
            "token {id} is {:?} in the model's vocabulary and {:?} in the draft model's: a draft \
             model must share the model's vocabulary",
            target.token_text(id).unwrap_or(""),
            draft.token_text(id).unwrap_or("")
        )),
        None => Ok(()),
    }
}

/// Up to `max` greedy tokens of the draft model after `history`: its
/// session is first brought to `history` (what it holds beyond their
/// common prefix is dropped), so a wrong guess costs it nothing later.
fn model_draft(draft: &mut Session, history: &[u32], max: usize) -> Result<Vec<u32>, ModelError> {
    if max == 0 || history.is_empty() || history.len() + max > draft.n_ctx() {
        return Ok(Vec::new());
    }
    // At least the last token is evaluated again, for its logits.
    let keep = draft.common_prefix(history).min(history.len() - 1);
    draft.truncate(keep);
    let mut logits = draft.eval(&history[keep..], LogitsFor::Last)?;
    let mut out = Vec::with_capacity(max);
    loop {
        let next = super::sample::argmax(&logits);
        out.push(next);
        if out.len() == max {
            return Ok(out);
        }
        logits = draft.eval(&[next], LogitsFor::Last)?;
    }
}

/// [`generate`], with `drafter` (a session of a draft model of the same
/// vocabulary) guessing for a [`Draft::Model`] request.
pub fn generate_with_draft(
    session: &mut Session,
    drafter: Option<&mut Session>,
    tok: &Tokenizer,
    req: &Request,
    on_text: impl FnMut(&str) -> bool,
) -> Result<Generation, ModelError> {
    match generate_resumable(session, drafter, tok, req, None, false, on_text)? {
        Outcome::Done(g) => Ok(g),
        Outcome::Paused(_) => unreachable!("not pausable"),
    }
}

/// Where a paused generation stands: its tokens and text so far, how much
/// of the text was sent, and its sampler's and decoder's state.
pub struct Paused {
    token_ids: Vec<u32>,
    text: String,
    sent: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    timings: Timings,
}

impl Paused {
    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.token_ids.len()
    }
}

/// How a pausable generation ended.
pub enum Outcome {
    Done(Generation),
    /// A pause was asked for ([`Control::request_pause`]): give it back to
    /// [`generate_resumable`] (on any session of the same model) to go on
    /// where it stopped.
    Paused(Paused),
}

/// [`generate_with_draft`], which (when `pausable`) stops when its
/// control asks for a pause and goes on from `resume`: the session's
/// cache is then brought to the prompt and the tokens generated so far
/// (kept by the prefix cache, where the session held them), and the text
/// continues from where it was sent; with greedy sampling the tokens are
/// those an unpaused run gives, up to the rounding of evaluating them
/// again in a batch.
pub fn generate_resumable(
    session: &mut Session,
    mut drafter: Option<&mut Session>,
    tok: &Tokenizer,
    req: &Request,
    resume: Option<Paused>,
    pausable: bool,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Outcome, ModelError> {
    if req.draft == Draft::Model && drafter.is_none() {
        return Err(ModelError::Invalid(
            "speculative decoding with a draft model was asked for, and no draft model is loaded"
                .into(),
        ));
    }
    let (mut g, mut logits) = match Generating::start(session, req, resume)? {
        Started::Ready(g, logits) => (g, logits),
        Started::Done(done) => return Ok(Outcome::Done(done)),
    };
    // Guessed tokens in the cache past the last sampled one, each with the
    // logits after it; only greedy sampling can verify them by equality.
    let drafting = req.draft != Draft::None && req.sampling.temperature == 0.0;
    let mut pending: VecDeque<(u32, Vec<f32>)> = VecDeque::new();
    // Guesses per batch now, and in the last verifying batch: a batch
    // whose guesses all failed halves the next one's (a wrong guess costs
    // the batch's extra rows), one whose guesses all held doubles it, up
    // to `draft_max` (fresh code, where text rarely repeats, then costs
    // about one extra row a step, not `draft_max`).
    let most = req.draft_max.min(DRAFT_MAX_LIMIT);
    let mut draft_len = most;
    let mut guessed = 0;
    loop {
        let next = match g.sample_next(&logits, tok, req, pausable, &mut on_text) {
            Sampled::Token(next) => next,
            Sampled::Stop => break,
            Sampled::Pause => {
                // Guesses past the last token leave the cache.
                session.truncate(session.n_past() - pending.len());
                return Ok(Outcome::Paused(g.pause()));
            }
        };
        if pending.front().is_some_and(|(d, _)| *d == next) {
            // The guess was right: its logits are the next step's.
            let (_, row) = pending.pop_front().expect("checked");
            g.timings.draft_accepted += 1;
            logits = row;
            continue;
        }
        // A wrong guess and those after it leave the cache.
        session.truncate(session.n_past() - pending.len());
        if guessed > 0 {
            draft_len = match guessed - pending.len() {
                0 => (draft_len / 2).max(1),
                held if held == guessed => (draft_len * 2).min(most),
                _ => draft_len,
            };
            guessed = 0;
        }
        pending.clear();
        let room = (req.max_tokens - g.out_ids.len() - 1)
            .min(session.n_ctx().saturating_sub(session.n_past() + 1))
            .min(draft_len);
        let draft = match (&mut drafter, req.draft) {
            _ if !drafting || room == 0 => Vec::new(),
            (Some(d), Draft::Model) => model_draft(d, &g.history, room)?,
            _ => lookup_draft(&g.history, room),
        };
        if draft.is_empty() {
            // Into the row kept from step to step.
            let row = session.decode(next)?;
            logits.clear();
            logits.extend_from_slice(row);
            continue;
        }
        let batch: Vec<u32> = std::iter::once(next).chain(draft.iter().copied()).collect();
        let rows = session.eval(&batch, LogitsFor::All)?;
        let mut rows = rows.chunks_exact(rows.len() / batch.len());
        logits = rows.next().expect("a row per token").to_vec();
        pending.extend(draft.iter().copied().zip(rows.map(<[f32]>::to_vec)));
        g.timings.draft_tokens += draft.len();
        g.timings.draft_batches += 1;
        guessed = draft.len();
    }
    Ok(Outcome::Done(g.finish(&mut on_text)))
}

/// A request joining a batch ([`generate_batch`]): its tag (how the host
/// names it back), the index of the session it runs on, the request, and
/// where it stood if it was paused.
pub struct Joining {
    pub tag: u64,
    pub session: usize,
    pub request: Request,
    pub resume: Option<Paused>,
}

/// Whoever runs a batch: gives it requests and takes their text and ends.
pub trait BatchHost {
    /// More requests to join, on the sessions listed (free: none of the
    /// batch's requests runs on them); called between steps, so that a
    /// request arriving while others decode joins them at the next one.
    fn join(&mut self, free: &[usize]) -> Vec<Joining>;
    /// Request `tag`'s text as it becomes final; `false` cancels it.
    fn text(&mut self, tag: u64, text: &str) -> bool;
    /// Request `tag` ended (or paused, or failed) on `session`.
    fn done(&mut self, tag: u64, result: Result<Outcome, ModelError>, session: &mut Session);
}

/// Several requests of one model generated together, each on a session of
/// its own among `sessions` (of one model on the built-in CPU): a
/// request's prompt is evaluated when it joins, then one forward pass a
/// step decodes a token for every request under way
/// ([`super::session::decode_batch`]: the weights read once for all of
/// them). Requests join (`host.join`) between steps while sessions are
/// free, and each ends on its own (its stop, a cancel); the batch ends
/// when none runs and none joins. When `pause` asks for a pause, every
/// request under way stops at its next token and is handed back as
/// [`Outcome::Paused`] (as when any request's own control asks).
/// Speculative decoding is not run here (a token a
/// step); the tokens are those [`generate_resumable`] gives each request
/// alone, a batch's logits being the bits of each sequence's own step.
pub fn generate_batch(
    sessions: &mut [&mut Session],
    tok: &Tokenizer,
    first: Vec<Joining>,
    pause: Option<&Control>,
    host: &mut impl BatchHost,
) {
    let mut live: Vec<Live> = Vec::with_capacity(sessions.len());
    // Kept from step to step: a step allocates nothing of its own.
    let mut next = Vec::with_capacity(sessions.len());
    let mut free = Vec::with_capacity(sessions.len());
    admit(&mut live, sessions, host, first);
    loop {
        // A pause asked of the batch, or of any request in it, pauses all.
        let asked = (live.iter()).fold(pause.is_some_and(Control::take_pause), |a, l| {
            l.request.control.as_ref().is_some_and(|c| c.take_pause()) | a
        });
        if asked {
            for l in live.drain(..) {
                host.done(l.tag, Ok(Outcome::Paused(l.g.pause())), sessions[l.session]);
            }
            return;
        }
        next.clear();
        let mut k = 0;
        while k < live.len() {
            let l = &mut live[k];
            let tag = l.tag;
            let mut say = |text: &str| host.text(tag, text);
            match l.g.sample_next(&l.logits, tok, &l.request, false, &mut say) {
                Sampled::Token(t) => {
                    next.push(t);
                    k += 1;
                }
                Sampled::Stop | Sampled::Pause => {
                    let l = live.remove(k);
                    let g = l.g.finish(&mut |text: &str| host.text(tag, text));
                    host.done(tag, Ok(Outcome::Done(g)), sessions[l.session]);
                }
            }
        }
        if !live.is_empty() {
            let stepped = if let [l] = &mut live[..] {
                sessions[l.session].decode(next[0]).map(|row| {
                    l.logits.clear();
                    l.logits.extend_from_slice(row);
                })
            } else {
                let mut stepping: Vec<&mut Session> = (sessions.iter_mut().enumerate())
                    .filter(|(i, _)| live.iter().any(|l| l.session == *i))
                    .map(|(_, s)| &mut **s)
                    .collect();
                let stepped = super::session::decode_batch(&mut stepping, &next);
                drop(stepping);
                stepped.map(|()| {
                    for l in live.iter_mut() {
                        l.logits.clear();
                        l.logits.extend_from_slice(sessions[l.session].logits());
                    }
                })
            };
            if let Err(e) = stepped {
                // A failed step fails every request in it.
                let why = e.to_string();
                for l in live.drain(..) {
                    host.done(
                        l.tag,
                        Err(ModelError::Invalid(why.clone())),
                        sessions[l.session],
                    );
                }
            }
        }
        free.clear();
        free.extend((0..sessions.len()).filter(|i| !live.iter().any(|l| l.session == *i)));
        let joining = if free.is_empty() {
            Vec::new()
        } else {
            host.join(&free)
        };
        if live.is_empty() && joining.is_empty() {
            return;
        }
        admit(&mut live, sessions, host, joining);
    }
}

/// A request under way in [`generate_batch`].
struct Live {
    tag: u64,
    session: usize,
    request: Request,
    g: Box<Generating>,
    logits: Vec<f32>,
}

/// Starts the `joining` requests of a batch (their prompts evaluated),
/// kept in `live` in the order of their sessions (as the batch's rows);
/// one that ends already (cancelled, failed) goes to `host` as ended.
fn admit(
    live: &mut Vec<Live>,
    sessions: &mut [&mut Session],
    host: &mut impl BatchHost,
    joining: Vec<Joining>,
) {
    for j in joining {
        let session = &mut *sessions[j.session];
        match Generating::start(session, &j.request, j.resume) {
            Ok(Started::Ready(g, logits)) => live.push(Live {
                tag: j.tag,
                session: j.session,
                request: j.request,
                g,
                logits,
            }),
            Ok(Started::Done(done)) => host.done(j.tag, Ok(Outcome::Done(done)), session),
            Err(e) => host.done(j.tag, Err(e), session),
        }
    }
    live.sort_by_key(|l| l.session);
}

/// How a generation's prompt evaluation ended.
enum Started {
    /// Ready to sample, with the logits after the prompt.
    Ready(Box<Generating>, Vec<f32>),
    /// Cancelled during the prompt.
    Done(Generation),
}

/// What [`Generating::sample_next`] did.
enum Sampled {
    /// Sampled this token, to evaluate for the next step's logits.
    Token(u32),
    /// The generation ended (its reason is set).
    Stop,
    /// A pause was asked for; nothing was sampled.
    Pause,
}

/// A generation under way, a token at a time: the history (prompt and
/// tokens so far), the text and how much of it was sent, the sampler and
/// the decoder.
struct Generating {
    history: Vec<u32>,
    out_ids: Vec<u32>,
    text: String,
    sent: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    timings: Timings,
    /// Bytes of text held back: they may still begin a stop string.
    hold: usize,
    decode_start: Instant,
    reason: StopReason,
}

impl Generating {
    /// Evaluates `req`'s prompt (and what a paused run generated after
    /// it) on `session`, reusing the cached prefix.
    fn start(
        session: &mut Session,
        req: &Request,
        resume: Option<Paused>,
    ) -> Result<Started, ModelError> {
        req.sampling.validate().map_err(ModelError::Invalid)?;
        if req.prompt.is_empty() {
            return Err(ModelError::Invalid("the prompt is empty".into()));
        }
        let start = Instant::now();
        // The prompt, and what a paused generation produced after it.
        let mut history = req.prompt.clone();
        if let Some(r) = &resume {
            history.extend_from_slice(&r.token_ids);
        }
        // Reuse the cached prefix (the live cache's, or a longer one kept in
        // the session's prefix tree); always evaluate at least the last token
        // to get fresh logits.
        let restored_before = session.prefix_restored_tokens;
        let cached = session.reuse_prefix(&history);
        let restored_tokens = (session.prefix_restored_tokens - restored_before) as usize;
        let cancelled = || req.control.as_ref().is_some_and(|c| c.is_cancelled());
        // A job cancelled during its prompt stops between batches.
        let logits = session.eval_until(&history[cached..], LogitsFor::Last, &cancelled)?;
        let prompt_s = start.elapsed().as_secs_f64();
        let mut timings = Timings {
            prompt_tokens: history.len() - cached,
            cached_tokens: cached,
            restored_tokens,
            time_to_first_token_ms: prompt_s * 1e3,
            prompt_tokens_per_s: (history.len() - cached) as f64 / prompt_s.max(1e-9),
            ..Timings::default()
        };
        let (sampler, mut out_ids, text, sent, decoder) = match resume {
            None => (
                Sampler::new(req.sampling.clone()),
                Vec::new(),
                String::new(),
                0,
                StreamDecoder::default(),
            ),
            Some(r) => {
                // The first run's prompt and first token count; this one's
                // evaluation adds to them.
                timings.prompt_tokens += r.timings.prompt_tokens;
                timings.cached_tokens = r.timings.cached_tokens;
                timings.restored_tokens += r.timings.restored_tokens;
                timings.time_to_first_token_ms = r.timings.time_to_first_token_ms;
                timings.prompt_tokens_per_s = r.timings.prompt_tokens_per_s;
                timings.draft_tokens = r.timings.draft_tokens;
                timings.draft_accepted = r.timings.draft_accepted;
                timings.draft_batches = r.timings.draft_batches;
                (r.sampler, r.token_ids, r.text, r.sent, r.decoder)
            }
        };
        let Some(logits) = logits else {
            timings.prompt_tokens = session.n_past().saturating_sub(cached);
            return Ok(Started::Done(Generation {
                token_ids: out_ids,
                text: text[..sent].to_string(),
                stop_reason: StopReason::Cancelled,
                timings,
            }));
        };
        let hold = req
            .stop
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        // Room for the whole generation: a token's push allocates nothing.
        history.reserve(req.max_tokens.saturating_sub(out_ids.len()));
        out_ids.reserve(req.max_tokens.saturating_sub(out_ids.len()));
        let g = Generating {
            history,
            out_ids,
            text,
            sent,
            sampler,
            decoder,
            timings,
            hold,
            decode_start: Instant::now(),
            reason: StopReason::MaxTokens,
        };
        Ok(Started::Ready(Box::new(g), logits))
    }

    /// Samples the next token from `logits` and sends the text that
    /// became final; or says the generation ended (its reason set), or
    /// (when `pausable`) that a pause was asked for.
    fn sample_next(
        &mut self,
        logits: &[f32],
        tok: &Tokenizer,
        req: &Request,
        pausable: bool,
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Sampled {
        if self.out_ids.len() >= req.max_tokens {
            self.reason = StopReason::MaxTokens;
            return Sampled::Stop;
        }
        if req.control.as_ref().is_some_and(|c| c.is_cancelled()) {
            self.reason = StopReason::Cancelled;
            return Sampled::Stop;
        }
        if pausable && req.control.as_ref().is_some_and(|c| c.take_pause()) {
            return Sampled::Pause;
        }
        let next = self.sampler.sample(logits, &self.history);
        if tok.is_end_of_generation(next) {
            self.reason = StopReason::EndOfGeneration;
            return Sampled::Stop;
        }
        self.out_ids.push(next);
        self.history.push(next);
        if let Some(c) = &req.control {
            c.generated.fetch_add(1, Ordering::AcqRel);
        }
        let text = &mut self.text;
        text.push_str(&self.decoder.push(tok, next));
        if let Some(at) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            self.reason = StopReason::StopString;
            return Sampled::Stop;
        }
        if let Some(at) = req.boundary.cut(text) {
            text.truncate(at.max(self.sent));
            self.reason = StopReason::Boundary;
            return Sampled::Stop;
        }
        // Send what can no longer become part of a stop string.
        let mut ready = text.len().saturating_sub(self.hold);
        if req.boundary != Boundary::None {
            // Trailing whitespace may still be cut at a boundary.
            ready = ready.min(text.trim_end().len());
        }
        while !text.is_char_boundary(ready) {
            ready -= 1;
        }
        if ready > self.sent {
            let sent = std::mem::replace(&mut self.sent, ready);
            if !on_text(&text[sent..ready]) {
                self.reason = StopReason::Cancelled;
                return Sampled::Stop;
            }
        }
        if self.out_ids.len() == req.max_tokens {
            self.reason = StopReason::MaxTokens;
            return Sampled::Stop;
        }
        Sampled::Token(next)
    }

    /// Where it stands, to go on later.
    fn pause(self: Box<Self>) -> Paused {
        let mut g = *self;
        g.timings.decode_tokens_per_s = 0.0;
        Paused {
            token_ids: g.out_ids,
            text: g.text,
            sent: g.sent,
            sampler: g.sampler,
            decoder: g.decoder,
            timings: g.timings,
        }
    }

    /// Sends the text held back (unless cancelled) and the generation.
    fn finish(self: Box<Self>, on_text: &mut impl FnMut(&str) -> bool) -> Generation {
        let mut g = *self;
        g.send_rest(on_text);
        let decode_s = g.decode_start.elapsed().as_secs_f64();
        let n = g.out_ids.len();
        g.timings.decode_tokens = n;
        g.timings.decode_tokens_per_s = n.saturating_sub(1) as f64 / decode_s.max(1e-9);
        Generation {
            token_ids: g.out_ids,
            text: g.text,
            stop_reason: g.reason,
            timings: g.timings,
        }
    }

    fn send_rest(&mut self, on_text: &mut impl FnMut(&str) -> bool) {
        if self.sent < self.text.len() && self.reason != StopReason::Cancelled {
            on_text(&self.text[self.sent..]);
        }
    }
}

/// The log-probability (in f64) of token `id` under one row of logits.
pub fn log_prob(row: &[f32], id: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let log_sum = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row[id as usize] as f64 - log_sum
}

/// Perplexity of `tokens` under the model: exp of the mean negative
/// log-likelihood of each token given the ones before it. Starts from an
/// empty cache.
pub fn perplexity(session: &mut Session, tokens: &[u32]) -> Result<f64, ModelError> {
    if tokens.len() < 2 {
        return Err(ModelError::Invalid(
            "perplexity needs at least 2 tokens".into(),
        ));
    }
    session.truncate(0);
    let n_vocab = session.model.config.n_vocab;
    let logits = session.eval(&tokens[..tokens.len() - 1], LogitsFor::All)?;
    let mut nll = 0.0f64;
    for (row, &next) in logits.chunks_exact(n_vocab).zip(&tokens[1..]) {
        nll -= log_prob(row, next);
    }
    Ok((nll / (tokens.len() - 1) as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::{Boundary, lookup_draft};

    #[test]
    fn drafts_follow_the_latest_longest_earlier_ngram() {
        // The tail "8 9" occurred at 1 and at 6: the later one's
        // successors, up to `max` (and to the end of the history).
        let h = [7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 5, 0, 8, 9];
        assert_eq!(lookup_draft(&h, 2), [3, 4]);
        assert_eq!(lookup_draft(&h, 8), [3, 4, 5, 0, 8, 9]);
        // A longer match wins over a later shorter one: "1 2 3" at 0
        // rather than "2 3" at 5.
        let h = [1, 2, 3, 40, 9, 2, 3, 50, 1, 2, 3];
        assert_eq!(lookup_draft(&h, 3), [40, 9, 2]);
        // Too short a tail, or no earlier occurrence: nothing.
        assert!(lookup_draft(&[5], 4).is_empty());
        assert!(lookup_draft(&[1, 2, 3, 4], 4).is_empty());
        // A match reaching the end drafts what there is (a repeated run).
        assert_eq!(lookup_draft(&[6, 6, 6], 4), [6]);
    }

    #[test]
    fn boundaries_cut_lines_and_blocks() {
        assert_eq!(Boundary::None.cut("a\nb"), None);
        assert_eq!(Boundary::Line.cut("x + 1;\nfoo"), Some(6));
        assert_eq!(
            Boundary::Line.cut("\n    y\n"),
            Some(6),
            "leading newlines are kept"
        );
        assert_eq!(Boundary::Line.cut("abc"), None);
        // A block ends before a bracket it did not open …
        let t = "if x {\n        y();\n    }\n}";
        assert_eq!(
            &t[..Boundary::Block.cut(t).unwrap()],
            "if x {\n        y();\n    }"
        );
        // … or at a blank line outside brackets.
        let t = "a = 1\nb = 2\n\nc = 3";
        assert_eq!(&t[..Boundary::Block.cut(t).unwrap()], "a = 1\nb = 2");
        assert_eq!(
            Boundary::Block.cut("f(\n\n  x"),
            None,
            "blank lines inside brackets stay"
        );
        assert_eq!(Boundary::Block.cut("x)"), Some(1));
    }
}
