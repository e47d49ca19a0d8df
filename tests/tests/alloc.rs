//! No allocation per token on the hot path (issue 21, edge memory): a
//! counting global allocator around real released models on the built-in
//! CPU backend. After the first steps (the decode graph, the work space
//! and the worker threads are made once per session), a decode step and
//! the sampling of a token allocate nothing: what a step needs lives in
//! buffers the session, the executor, the CPU backend and the sampler
//! keep.
//!
//! `KILN_ALLOC_SITES=1` prints where the counted allocations came from
//! (a backtrace per site, most frequent first).
//!
//! The allocator counts every thread while armed (the CPU's workers
//! too), so this binary holds one test: the harness's other threads
//! would otherwise be counted.

use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::model::forward::LogitsFor;
use kiln_runtime::model::sample::{Sampler, SamplingParams, argmax};
use kiln_runtime::model::{Model, Session};
use kiln_tests::{real_model, tiny_model};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
/// `KILN_ALLOC_SITES`, read before counting (reading it allocates).
static RECORD_SITES: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static SITES: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

thread_local! {
    /// Set while this thread records a site (which allocates itself).
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    if !RECORD_SITES.load(Ordering::Relaxed) {
        COUNT.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size, Ordering::Relaxed);
        return;
    }
    // What recording a site allocates is not counted.
    if RECORDING.with(|r| r.replace(true)) {
        return;
    }
    COUNT.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size, Ordering::Relaxed);
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    // The frames' names (not their files), from the allocator's caller.
    let frames: Vec<&str> = trace
        .lines()
        .filter(|l| !l.trim_start().starts_with("at "))
        .skip_while(|l| !l.contains("GlobalAlloc"))
        .skip(1)
        .take(14)
        .collect();
    let mut sites = SITES.lock().unwrap_or_else(|p| p.into_inner());
    *sites
        .get_or_insert_with(HashMap::new)
        .entry(frames.join("\n"))
        .or_insert(0) += 1;
    drop(sites);
    RECORDING.with(|r| r.set(false));
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (count, bytes) while `f` runs.
fn counted<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    COUNT.store(0, Ordering::SeqCst);
    BYTES.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let out = f();
    ARMED.store(false, Ordering::SeqCst);
    (
        out,
        COUNT.load(Ordering::SeqCst),
        BYTES.load(Ordering::SeqCst),
    )
}

/// The recorded sites, most frequent first (empty unless
/// `KILN_ALLOC_SITES` is set).
fn sites() -> String {
    let mut sites = SITES.lock().unwrap_or_else(|p| p.into_inner());
    let mut all: Vec<(String, usize)> = sites.take().unwrap_or_default().into_iter().collect();
    all.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    all.iter()
        .take(20)
        .map(|(s, n)| format!("{n} ×\n{s}\n"))
        .collect()
}

fn session(path: &Path) -> Session {
    let cpu = Backend::builtin_cpu();
    let model = Model::load_for(path, &cpu, 0).unwrap();
    Session::new(model, Executor::new(cpu, 0), Some(512)).unwrap()
}

/// Decode steps after the first few allocate nothing.
fn decode_steps_allocate_nothing(name: &str, path: &Path) {
    let mut s = session(path);
    let n_vocab = s.model.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % n_vocab).collect();
    s.eval(&prompt, LogitsFor::Last).unwrap();
    let mut next = 1;
    for _ in 0..3 {
        next = argmax(s.decode(next).unwrap());
    }
    let (steps, count, bytes) = counted(|| {
        let mut steps = 0;
        for _ in 0..32 {
            let logits = s.decode(next).unwrap();
            assert_eq!(logits.len(), n_vocab as usize);
            next = argmax(logits);
            steps += 1;
        }
        steps
    });
    assert_eq!(
        (count, bytes),
        (0, 0),
        "{name}: {steps} decode steps made {count} allocations ({bytes} bytes)\n{}",
        sites()
    );
}

/// Sampling a token, greedy or through the whole chain (repetition
/// penalty, top-k, top-p, min-p, temperature), allocates nothing after
/// the sampler's first token: its work buffers are kept.
fn sampling_allocates_nothing(name: &str, path: &Path) {
    let mut s = session(path);
    let n_vocab = s.model.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..24).map(|i| (i * 53 + 5) % n_vocab).collect();
    let logits = s.eval(&prompt, LogitsFor::Last).unwrap();
    let chain = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        seed: 7,
        ..SamplingParams::default()
    };
    let all = SamplingParams {
        top_k: 0,
        ..chain.clone()
    };
    for params in [SamplingParams::greedy(), chain, all] {
        let mut sampler = Sampler::new(params.clone());
        let mut history = prompt.clone();
        history.reserve(64);
        history.push(sampler.sample(&logits, &history));
        let (_, count, bytes) = counted(|| {
            for _ in 0..32 {
                let next = sampler.sample(&logits, &history);
                history.push(next);
            }
        });
        assert_eq!(
            (count, bytes),
            (0, 0),
            "{name}: 32 tokens sampled with {params:?} made {count} allocations ({bytes} bytes)\n{}",
            sites()
        );
    }
}

#[test]
fn the_hot_path_allocates_nothing_per_token() {
    RECORD_SITES.store(
        std::env::var_os("KILN_ALLOC_SITES").is_some(),
        Ordering::Relaxed,
    );
    let mut models = vec![(
        "tiny model (F16)".to_string(),
        tiny_model(&["--dtype", "f16"]),
    )];
    for file in [
        "smollm2-135m-instruct-q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        if let Some(path) = real_model(file) {
            models.push((file.to_string(), path));
        }
    }
    for (name, path) in &models {
        decode_steps_allocate_nothing(name, path);
    }
    let (name, path) = models.last().expect("the tiny model at least");
    sampling_allocates_nothing(name, path);
}
