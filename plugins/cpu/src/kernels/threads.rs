//! A persistent pool of worker threads for the kernels: spawned once,
//! woken per op, never a thread spawn per op. The calling thread works
//! too, so `threads() == 2` means one worker.
//!
//! The count is `KILN_THREADS`, else one per physical (and, on hybrid
//! and big.LITTLE CPUs, fast) core the process may use
//! ([`super::topology`]); [`set_threads`] changes it (before or between
//! ops).
//!
//! A graph may instead run on a pool of its calling thread's own
//! ([`with_threads`], ABI 1.3's `KilnGraph.threads`): each of the models
//! a host runs side by side on its share of the cores, rather than one
//! of them on its caller alone (the shared pool serves one dispatch at a
//! time). That pool is kept for the thread's next graph; its workers end
//! with the thread.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Below this many multiply-adds an op runs on the calling thread alone:
/// waking the pool costs more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// How long a worker keeps looking for the next job, and the dispatcher
/// for the workers' end, before sleeping: decoding runs a few hundred ops
/// per token, tens of microseconds apart, and a sleep and wake-up through
/// the kernel costs about as much as a small op.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

type Task = dyn Fn(Range<usize>) + Sync;

/// One dispatch: the workers copy it under the lock, and take chunks
/// from [`Shared::next`]. Nothing is allocated per dispatch (decoding
/// makes a few hundred a token).
#[derive(Clone, Copy)]
struct Job {
    /// Lifetime erased: the dispatcher waits for every worker to finish
    /// before the closure it points to goes out of scope.
    task: *const Task,
    len: usize,
    chunk: usize,
}

// SAFETY: `task` is `Sync` and outlives the job (see `Job::task`).
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

#[derive(Default)]
struct State {
    generation: u64,
    job: Option<Job>,
    running: usize,
    panicked: bool,
    /// Worker threads spawned so far.
    spawned: usize,
    /// Workers taking part in the current job: indices below this.
    active: usize,
    /// Workers asleep on `Shared::wake`, and whether the dispatcher is
    /// asleep on `Shared::done`: a notify is a system call, made only
    /// when someone sleeps (most jobs start and end while all spin).
    sleepers: usize,
    dispatcher_sleeps: bool,
    /// The pool was dropped: its workers end.
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    /// `State::generation` and `State::running`, readable without the lock
    /// (for spinning; the lock-protected fields decide).
    generation: AtomicU64,
    running: AtomicUsize,
    /// The start of the current job's next chunk: reset by the
    /// dispatcher before it publishes a job, and touched by nobody else
    /// until every worker of the last one is done.
    next: AtomicUsize,
}

/// Spins until `ready` or [`SPIN`] has passed.
fn spin_until(ready: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    let mut i = 0u32;
    while !ready() {
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if i.is_multiple_of(64) && start.elapsed() > SPIN {
            return;
        }
    }
}

struct Pool {
    /// Its workers' name: `kiln-cpu-N` (the shared pool), `kiln-own-N`.
    name: &'static str,
    shared: Arc<Shared>,
    /// One dispatch at a time; a second concurrent caller runs inline.
    dispatch: Mutex<()>,
    threads: AtomicUsize,
}

impl Pool {
    fn new(name: &'static str, threads: usize) -> Pool {
        Pool {
            name,
            shared: Arc::default(),
            dispatch: Mutex::new(()),
            threads: AtomicUsize::new(threads.max(1)),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.shutdown = true;
        // A spinning worker sees a new generation, then the flag.
        st.generation += 1;
        self.shared
            .generation
            .store(st.generation, Ordering::Release);
        drop(st);
        self.shared.wake.notify_all();
    }
}

/// The process's shared pool.
fn shared_pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("KILN_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .unwrap_or_else(super::topology::default_threads);
        Pool::new("kiln-cpu", n)
    })
}

thread_local! {
    /// The calling thread's own pool ([`with_threads`]), kept between
    /// graphs.
    static OWN: std::cell::RefCell<Option<Arc<Pool>>> = const { std::cell::RefCell::new(None) };
    /// Whether the ops running on this thread now use [`OWN`].
    static USE_OWN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` with the pool the ops on the calling thread use now.
fn with_pool<R>(f: impl FnOnce(&Pool) -> R) -> R {
    let own = if USE_OWN.get() {
        OWN.with(|o| o.borrow().clone())
    } else {
        None
    };
    match own {
        Some(p) => f(&p),
        None => f(shared_pool()),
    }
}

/// Runs `f`, whose ops use `n` threads (the caller included) of a pool of
/// the calling thread's own, kept for its next call; `n == 0`: the
/// shared pool.
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    if n == 0 {
        return f();
    }
    OWN.with(|o| {
        let mut o = o.borrow_mut();
        if o.as_ref()
            .is_none_or(|p| p.threads.load(Ordering::Relaxed) != n)
        {
            *o = Some(Arc::new(Pool::new("kiln-own", n)));
        }
    });
    /// Puts the flag back, however `f` ends.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            USE_OWN.set(self.0);
        }
    }
    let _restore = Restore(USE_OWN.replace(true));
    f()
}

/// Threads an op on the calling thread may use (the caller included).
pub fn threads() -> usize {
    with_pool(|p| p.threads.load(Ordering::Relaxed))
}

/// Sets the shared pool's thread count (at least 1). Workers are spawned
/// as needed and kept; extra ones idle.
pub fn set_threads(n: usize) {
    shared_pool().threads.store(n.max(1), Ordering::Relaxed);
}

fn run_chunks(job: &Job, next: &AtomicUsize) {
    loop {
        let start = next.fetch_add(job.chunk, Ordering::Relaxed);
        if start >= job.len {
            break;
        }
        // SAFETY: the dispatcher keeps the task alive until all workers
        // report done (`Job::task`).
        let task = unsafe { &*job.task };
        task(start..(start + job.chunk).min(job.len));
    }
}

fn worker(shared: Arc<Shared>, index: usize) {
    let mut seen = 0u64;
    loop {
        spin_until(|| shared.generation.load(Ordering::Acquire) != seen);
        let job = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.shutdown {
                    return;
                }
                if st.generation != seen {
                    seen = st.generation;
                    if index < st.active
                        && let Some(job) = st.job
                    {
                        break job;
                    }
                }
                st.sleepers += 1;
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                st.sleepers -= 1;
            }
        };
        let ok = catch_unwind(AssertUnwindSafe(|| run_chunks(&job, &shared.next))).is_ok();
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.panicked |= !ok;
        st.running -= 1;
        shared.running.store(st.running, Ordering::Release);
        if st.running == 0 && st.dispatcher_sleeps {
            shared.done.notify_all();
        }
    }
}

/// Calls `task` over disjoint chunks covering `0..len`, on up to
/// [`threads`] threads, and returns when all are done. `work` (roughly the
/// multiply-adds) decides whether waking the pool pays.
pub fn parallel_for(len: usize, work: usize, task: &(dyn Fn(Range<usize>) + Sync + '_)) {
    with_pool(|pool| dispatch(pool, len, work, task));
}

fn dispatch(pool: &Pool, len: usize, work: usize, task: &(dyn Fn(Range<usize>) + Sync + '_)) {
    let n = pool.threads.load(Ordering::Relaxed).min(len);
    if n <= 1 || work < MIN_PARALLEL_WORK {
        task(0..len);
        return;
    }
    // Poisoned by an op whose task panicked (the panic went on to that
    // op's caller): the pool itself is sound, and taking the poisoned
    // lock keeps it in use; refusing it would run every later op alone.
    let _guard = match pool.dispatch.try_lock() {
        Ok(guard) => guard,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            task(0..len);
            return;
        }
    };
    let shared = &pool.shared;
    let job = {
        // SAFETY: only the lifetime is erased; see `Job::task`.
        let task: *const Task = unsafe {
            std::mem::transmute::<&(dyn Fn(Range<usize>) + Sync + '_), &'static Task>(task)
        };
        Job {
            task,
            len,
            chunk: len.div_ceil(n * 4).max(1),
        }
    };
    shared.next.store(0, Ordering::Relaxed);
    let sleepers = {
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.spawned < n - 1 {
            let (s, i) = (shared.clone(), st.spawned);
            std::thread::Builder::new()
                .name(format!("{}-{i}", pool.name))
                .spawn(move || worker(s, i))
                .expect("spawn a CPU worker thread");
            st.spawned += 1;
        }
        st.active = n - 1;
        st.generation += 1;
        st.job = Some(job);
        st.running = n - 1;
        st.panicked = false;
        shared.running.store(st.running, Ordering::Release);
        shared.generation.store(st.generation, Ordering::Release);
        st.sleepers
    };
    // After the lock is released, so that a spinning worker that sees the
    // new generation does not then wait for the lock; a worker counted
    // asleep is already waiting (it registered under the lock) and gets
    // the notify.
    if sleepers > 0 {
        shared.wake.notify_all();
    }
    let mine = catch_unwind(AssertUnwindSafe(|| run_chunks(&job, &shared.next)));
    spin_until(|| shared.running.load(Ordering::Acquire) == 0);
    let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    while st.running > 0 {
        st.dispatcher_sleeps = true;
        st = shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.dispatcher_sleeps = false;
    st.job = None;
    let panicked = st.panicked;
    drop(st);
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    assert!(!panicked, "a CPU worker thread panicked in a kernel");
}
