//! Running policies with wasmtime: one engine configured for determinism
//! and containment, modules compiled once (and cached on disk by sha256 and
//! engine), a fresh instance per call from a pre-instantiated template, and
//! every limit enforced on every call.

use crate::PolicyError;
use crate::abi::{self, OutputError, RankInput, TuneInput};
use crate::limits::{PolicyLimits, STACK_BYTES};
use crate::meta::{PolicyKind, PolicyMeta, inspect};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wasmtime::{Caller, Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(1);
/// Instances that may exist at once (calls in flight).
const POOL_SLOTS: u32 = 16;
/// Bytes of `kiln.log` output kept per call.
const LOG_CAP: usize = 4096;

/// The process's policy engine: deterministic floats (NaN canonicalised),
/// fuel metering, epoch interruption, a bounded stack, no threads. A
/// background thread advances the epoch every millisecond.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut c = Config::new();
        c.consume_fuel(true)
            .epoch_interruption(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(STACK_BYTES);
        // Instances come from a small pool of pre-reserved slots: a call
        // reuses a slot (reset with madvise) instead of mapping fresh
        // memory. 16 slots bound the policy calls in flight at once.
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memory_size(crate::limits::CEILING.memory_bytes as usize)
            .table_elements(crate::limits::CEILING.table_elements as usize);
        c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&c).expect("a valid engine configuration");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("kiln-policy-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                }
            })
            .expect("spawn the epoch thread");
        engine
    })
}

/// Per-call state: the limits and what hit them, and the policy's log.
struct CallState {
    memory_limit: u64,
    table_limit: u64,
    hit_memory: bool,
    hit_table: bool,
    log: String,
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_limit {
            self.hit_memory = true;
            return Err(wasmtime::Error::msg("memory limit"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.table_limit {
            self.hit_table = true;
            return Err(wasmtime::Error::msg("table limit"));
        }
        Ok(true)
    }
}

/// A loaded policy, ready to call. Cheap to share across threads.
pub struct Policy {
    pub meta: PolicyMeta,
    pub sha256: String,
    pub limits: PolicyLimits,
    pre: InstancePre<CallState>,
}

/// One call's result with what it cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome<T> {
    pub value: T,
    pub fuel_used: u64,
    pub elapsed: Duration,
    /// What the policy wrote with `kiln.log`.
    pub log: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where compiled modules are cached, keyed by module hash and engine.
pub struct Sandbox {
    cache_dir: Option<PathBuf>,
}

impl Sandbox {
    /// A sandbox; with `cache_dir`, compiled modules are kept there.
    pub fn new(cache_dir: Option<PathBuf>) -> Sandbox {
        Sandbox { cache_dir }
    }

    /// Inspects, compiles (or loads the cached compilation of) and links a
    /// policy. `limits` overrides what the policy asks for.
    pub fn load(&self, bytes: &[u8], limits: Option<PolicyLimits>) -> Result<Policy, PolicyError> {
        let max = limits.map_or(crate::limits::CEILING.module_bytes, |l| l.module_bytes);
        let meta = inspect(bytes, max)?;
        let limits = match limits {
            Some(l) => l,
            None => PolicyLimits::with(&meta.limits).map_err(PolicyError::Limits)?,
        };
        if bytes.len() as u64 > limits.module_bytes {
            return Err(PolicyError::TooLarge {
                bytes: bytes.len() as u64,
                limit: limits.module_bytes,
            });
        }
        let sha256 = sha256_hex(bytes);
        let module = self.compile(bytes, &sha256)?;
        check_signatures(&module, meta.kind)?;
        let mut linker: Linker<CallState> = Linker::new(engine());
        linker
            .func_wrap(
                abi::HOST_MODULE,
                abi::HOST_LOG,
                |mut caller: Caller<'_, CallState>, ptr: i32, len: i32| {
                    let Some(mem) = caller
                        .get_export(abi::EXPORT_MEMORY)
                        .and_then(|e| e.into_memory())
                    else {
                        return;
                    };
                    let (start, len) = (ptr as u32 as usize, (len as u32 as usize).min(LOG_CAP));
                    let mut buf = vec![0u8; len];
                    if mem.read(&caller, start, &mut buf).is_ok() {
                        let state = caller.data_mut();
                        if state.log.len() < LOG_CAP {
                            state.log.push_str(&String::from_utf8_lossy(&buf));
                            state.log.push('\n');
                        }
                    }
                },
            )
            .map_err(|e| PolicyError::Compile(e.to_string()))?;
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| PolicyError::Compile(e.to_string()))?;
        Ok(Policy {
            meta,
            sha256,
            limits,
            pre,
        })
    }

    fn compile(&self, bytes: &[u8], sha256: &str) -> Result<Module, PolicyError> {
        let compile =
            || Module::new(engine(), bytes).map_err(|e| PolicyError::Compile(format!("{e:#}")));
        let Some(dir) = &self.cache_dir else {
            return compile();
        };
        let path = cache_path(dir, sha256);
        if let Some(m) = load_cached(&path) {
            return Ok(m);
        }
        let module = compile()?;
        // A failure to cache is not a failure to load.
        let _ = store_cached(&path, &module);
        Ok(module)
    }
}

/// `<dir>/<module sha256>-<engine compatibility hash>.cwasm`, with the
/// sha256 of the compiled file beside it in `.sha256`.
fn cache_path(dir: &Path, sha256: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine().precompile_compatibility_hash().hash(&mut h);
    dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
}

fn load_cached(path: &Path) -> Option<Module> {
    let bytes = std::fs::read(path).ok()?;
    let expected = std::fs::read_to_string(path.with_extension("sha256")).ok()?;
    if sha256_hex(&bytes) != expected.trim() {
        // Corrupted or tampered with: recompile and overwrite.
        let _ = std::fs::remove_file(path);
        return None;
    }
    // SAFETY: the file is one this process's engine configuration wrote
    // (its name carries the engine's compatibility hash, and wasmtime
    // checks its own header too) and its bytes match the checksum written
    // with it, so it is the artifact `Module::serialize` produced.
    unsafe { Module::deserialize(engine(), &bytes) }.ok()
}

fn store_cached(path: &Path, module: &Module) -> std::io::Result<()> {
    use std::io::Write;
    let bytes = module.serialize().map_err(std::io::Error::other)?;
    std::fs::create_dir_all(path.parent().expect("a cache file has a directory"))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::write(path.with_extension("sha256"), sha256_hex(&bytes))?;
    std::fs::rename(&tmp, path)
}

fn check_signatures(module: &Module, kind: PolicyKind) -> Result<(), PolicyError> {
    use wasmtime::ValType::{I32, I64};
    let func = |name: &'static str| {
        module
            .get_export(name)
            .and_then(|e| e.func().cloned())
            .ok_or(PolicyError::MissingExport(name))
    };
    let ok =
        |f: &wasmtime::FuncType, params: &[wasmtime::ValType], results: &[wasmtime::ValType]| {
            let p: Vec<_> = f.params().collect();
            let r: Vec<_> = f.results().collect();
            p.len() == params.len()
                && r.len() == results.len()
                && p.iter().zip(params).all(|(a, b)| a.matches(b))
                && r.iter().zip(results).all(|(a, b)| a.matches(b))
        };
    if !ok(&func(abi::EXPORT_ALLOC)?, &[I32], &[I32]) {
        return Err(PolicyError::BadExport {
            name: abi::EXPORT_ALLOC,
            want: "(i32) -> i32",
        });
    }
    if !ok(&func(kind.export())?, &[I32, I32], &[I64]) {
        return Err(PolicyError::BadExport {
            name: kind.export(),
            want: "(i32, i32) -> i64",
        });
    }
    Ok(())
}

impl Policy {
    /// Runs the policy's entry point on raw input bytes; returns its raw
    /// output. Everything a policy can do wrong becomes an error.
    pub fn call_raw(&self, input: &[u8]) -> Result<Outcome<Vec<u8>>, PolicyError> {
        let start = Instant::now();
        let mut store = Store::new(
            engine(),
            CallState {
                memory_limit: self.limits.memory_bytes,
                table_limit: self.limits.table_elements,
                hit_memory: false,
                hit_table: false,
                log: String::new(),
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.set_fuel(self.limits.fuel).expect("fuel is enabled");
        store.set_epoch_deadline(self.limits.deadline_ms.max(1));
        store.epoch_deadline_trap();
        let limits = self.limits;
        let classify = |store: &Store<CallState>, stage: &str, e: wasmtime::Error| -> PolicyError {
            let state = store.data();
            if state.hit_memory {
                return PolicyError::MemoryLimit {
                    bytes: limits.memory_bytes,
                };
            }
            if state.hit_table {
                return PolicyError::TableLimit {
                    elements: limits.table_elements,
                };
            }
            match e.downcast_ref::<Trap>() {
                Some(Trap::OutOfFuel) => PolicyError::OutOfFuel { fuel: limits.fuel },
                Some(Trap::Interrupt) => PolicyError::Timeout {
                    ms: limits.deadline_ms,
                },
                Some(Trap::StackOverflow) => PolicyError::StackOverflow,
                Some(t) => PolicyError::Trap(format!("{stage}: {t}")),
                None => PolicyError::Trap(format!("{stage}: {e:#}")),
            }
        };
        let instance = match self.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(classify(&store, "instantiating", e)),
        };
        let memory = instance
            .get_memory(&mut store, abi::EXPORT_MEMORY)
            .ok_or(PolicyError::MissingExport(abi::EXPORT_MEMORY))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, abi::EXPORT_ALLOC)
            .map_err(|_| PolicyError::BadExport {
                name: abi::EXPORT_ALLOC,
                want: "(i32) -> i32",
            })?;
        let entry = instance
            .get_typed_func::<(i32, i32), i64>(&mut store, self.meta.kind.export())
            .map_err(|_| PolicyError::BadExport {
                name: self.meta.kind.export(),
                want: "(i32, i32) -> i64",
            })?;
        let len = i32::try_from(input.len())
            .map_err(|_| PolicyError::Malformed("input over 2 GiB".into()))?;
        let ptr = match alloc.call(&mut store, len) {
            Ok(p) => p,
            Err(e) => return Err(classify(&store, "in kiln_alloc", e)),
        };
        let mem_size = memory.data_size(&store);
        let in_range = |p: u32, n: usize| {
            (p as usize)
                .checked_add(n)
                .is_some_and(|end| end <= mem_size)
        };
        if ptr == 0 || !in_range(ptr as u32, input.len()) {
            return Err(PolicyError::Malformed(format!(
                "kiln_alloc({len}) returned {ptr:#x}, not a block inside the policy's {mem_size}-byte memory"
            )));
        }
        memory
            .write(&mut store, ptr as u32 as usize, input)
            .expect("range checked above");
        let packed = match entry.call(&mut store, (ptr, len)) {
            Ok(v) => v,
            Err(e) => return Err(classify(&store, "in the entry point", e)),
        };
        let (out_ptr, out_len) = ((packed as u64 >> 32) as u32, packed as u32 as usize);
        if packed == 0 {
            return Err(PolicyError::Malformed(
                "returned no output (0): the policy rejected its input".into(),
            ));
        }
        let mem_size = memory.data_size(&store);
        if !in_range(out_ptr, out_len) {
            return Err(PolicyError::Malformed(format!(
                "output {out_ptr:#x}+{out_len} lies outside the policy's {mem_size}-byte memory"
            )));
        }
        let value = memory.data(&store)[out_ptr as usize..out_ptr as usize + out_len].to_vec();
        let fuel_used = self.limits.fuel - store.get_fuel().unwrap_or(0);
        Ok(Outcome {
            value,
            fuel_used,
            elapsed: start.elapsed(),
            log: std::mem::take(&mut store.data_mut().log),
        })
    }

    fn expect_kind(&self, kind: PolicyKind) -> Result<(), PolicyError> {
        if self.meta.kind == kind {
            Ok(())
        } else {
            Err(PolicyError::WrongKind {
                policy: self.meta.kind.name(),
                asked: kind.name(),
            })
        }
    }

    /// Refuses a policy that is not a ranker.
    pub fn expect_rank(&self) -> Result<(), PolicyError> {
        self.expect_kind(PolicyKind::Rank)
    }

    /// Scores every candidate (in input order).
    pub fn rank(&self, input: &RankInput) -> Result<Outcome<Vec<f32>>, PolicyError> {
        self.expect_kind(PolicyKind::Rank)?;
        let out = self.call_raw(&input.encode())?;
        let scores =
            abi::decode_scores(&out.value, input.candidates.len()).map_err(PolicyError::Output)?;
        Ok(Outcome {
            value: scores,
            fuel_used: out.fuel_used,
            elapsed: out.elapsed,
            log: out.log,
        })
    }

    /// Proposes the next parameters; the bounds are enforced here.
    pub fn tune(&self, input: &TuneInput) -> Result<Outcome<Vec<f64>>, PolicyError> {
        self.expect_kind(PolicyKind::Tune)?;
        input.validate().map_err(PolicyError::BadInput)?;
        let out = self.call_raw(&input.encode())?;
        let values =
            abi::decode_proposal(&out.value, &input.params).map_err(PolicyError::Output)?;
        Ok(Outcome {
            value: values,
            fuel_used: out.fuel_used,
            elapsed: out.elapsed,
            log: out.log,
        })
    }
}

impl From<OutputError> for PolicyError {
    fn from(e: OutputError) -> Self {
        PolicyError::Output(e)
    }
}
