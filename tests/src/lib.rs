//! Support for kiln's integration tests: building the real fixtures (C
//! plugins with the system C compiler, Rust plugins and the `kiln` binary
//! with cargo), writing manifests, and running `kiln` against a throwaway
//! `KILN_HOME`.

pub mod fuzz;
pub mod serve;
pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cargo target directory the tests were built into.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Where fixtures built by the tests go.
pub fn fixture_dir() -> PathBuf {
    let d = target_dir().join("kiln-fixtures");
    std::fs::create_dir_all(&d).expect("create fixture dir");
    d
}

fn cargo_build(args: &[&str]) {
    // One build at a time: cargo serialises on its own lock, but
    // parallel test threads would print interleaved progress.
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet"])
        .args(args)
        .current_dir(repo_root())
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// The `kiln` binary, built (debug) if needed.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        cargo_build(&["-p", "kiln", "--bin", "kiln"]);
        let p = target_dir()
            .join("debug")
            .join(format!("kiln{}", std::env::consts::EXE_SUFFIX));
        assert!(p.exists(), "{} missing after build", p.display());
        p
    })
    .clone()
}

fn dylib_name(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// A workspace cdylib crate, built (debug) if needed; returns the library.
pub fn rust_cdylib(package: &str, lib_stem: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|p| p == package) {
        cargo_build(&["-p", package, "--lib"]);
        built.push(package.to_string());
    }
    let p = target_dir().join("debug").join(dylib_name(lib_stem));
    assert!(p.exists(), "{} missing after build", p.display());
    p
}

pub fn c_compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles `source` into a shared library named `name` with extra flags
/// (e.g. `-DFIXTURE_WRONG_MAJOR`), against the header in `include`.
pub fn compile_c_plugin(name: &str, source: &Path, include: &Path, flags: &[&str]) -> PathBuf {
    let out = fixture_dir().join(dylib_name(name));
    // Tests in parallel compile the same fixture: each writes its own file
    // and renames it into place, so nobody copies a half-written library.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = out.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = Command::new(c_compiler())
        .args([
            "-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Wextra", "-Werror",
        ])
        .arg("-I")
        .arg(include)
        .args(flags)
        .arg(source)
        .arg("-lm")
        .arg("-o")
        .arg(&tmp)
        .output()
        .expect("run the C compiler");
    assert!(
        result.status.success(),
        "compiling {name} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, &out).expect("put the fixture in place");
    out
}

/// The C fixture plugin, compiled with `flags`.
pub fn c_fixture(name: &str, flags: &[&str]) -> PathBuf {
    compile_c_plugin(
        name,
        &repo_root().join("tests/fixtures/c-plugin/plugin.c"),
        &repo_root().join("plugin-api/include"),
        flags,
    )
}

pub fn sha256_file(path: &Path) -> String {
    kiln_runtime::plugin::sha256_hex(&std::fs::read(path).expect("read library"))
}

/// Manifest fields a test may change.
#[derive(Clone, Debug)]
pub struct ManifestSpec {
    pub name: String,
    pub version: String,
    pub abi: String,
    pub cpu_features: Vec<String>,
    /// `None`: the library's real sha256.
    pub sha256: Option<String>,
}

impl ManifestSpec {
    pub fn new(name: &str, version: &str) -> ManifestSpec {
        ManifestSpec {
            name: name.into(),
            version: version.into(),
            abi: "1.2".into(),
            cpu_features: Vec::new(),
            sha256: None,
        }
    }
}

/// Lays out a plugin directory: the library (copied) and its manifest.
pub fn plugin_dir(parent: &Path, library: &Path, spec: &ManifestSpec) -> PathBuf {
    let dir = parent.join(format!("{}-{}", spec.name, spec.version));
    std::fs::create_dir_all(&dir).expect("create plugin dir");
    let lib_name = library.file_name().expect("library file name");
    std::fs::copy(library, dir.join(lib_name)).expect("copy library");
    let sha = spec.sha256.clone().unwrap_or_else(|| sha256_file(library));
    let features: Vec<String> = spec.cpu_features.iter().map(|f| format!("{f:?}")).collect();
    let manifest = format!(
        "name = {:?}\nversion = {:?}\nkind = \"backend\"\nabi = {:?}\nlibrary = {:?}\nsha256 = {sha:?}\ncpu_features = [{}]\n",
        spec.name,
        spec.version,
        spec.abi,
        lib_name.to_string_lossy(),
        features.join(", ")
    );
    std::fs::write(dir.join("kiln-plugin.toml"), manifest).expect("write manifest");
    dir
}

/// A throwaway `KILN_HOME` and a way to run `kiln` in it.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Default for Home {
    fn default() -> Self {
        Home {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Home {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The home directory `kiln` sees (`HOME`): empty, inside this one, so
    /// that no test finds the models of the user running it.
    pub fn user_home(&self) -> std::path::PathBuf {
        self.path().join("user")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kiln_bin());
        c.args(args)
            .env("KILN_HOME", self.path())
            .env("HOME", self.user_home())
            .env_remove("HF_HOME")
            .env_remove("HF_HUB_CACHE")
            .env_remove("OLLAMA_MODELS")
            .env_remove("KILN_PLUGIN_PATH")
            .env_remove("KILN_IDENTITY")
            .env_remove("KILN_PASSPHRASE")
            .env_remove("KILN_LOG");
        c
    }

    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kiln")
    }

    /// Runs kiln, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert!(
            out.status.success(),
            "kiln {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs kiln, asserting a clean failure (exit 1, not a signal); returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.kiln(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "kiln {args:?} should fail cleanly:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).expect("utf-8 stderr")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).expect("valid JSON")
    }

    pub fn registry(&self) -> kiln_registry::Registry {
        kiln_registry::Registry::open(&self.path().join("kiln.db")).expect("open registry")
    }

    /// Everything the registry holds that a change could touch.
    pub fn registry_snapshot(&self) -> String {
        let r = self.registry();
        let plugins = serde_json::to_string(&r.plugins().expect("plugins")).expect("json");
        let audit = serde_json::to_string(&r.audit_log(10_000).expect("audit")).expect("json");
        format!("{plugins}\n{audit}")
    }
}

/// The Python with the oracles: `KILN_PYTHON`, else the venv `.ci/run`
/// makes (`target/python-venv`), else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_PYTHON") {
        return p.into();
    }
    let venv = target_dir().join("python-venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Quantizes `src` to `target` with `kiln quantize` and with llama.cpp's
/// `llama_model_quantize` (`extra`: flags both take, such as
/// `--allow-requantize`) and requires every tensor to match in type,
/// shape and bytes (a mismatch names the tensor and its first differing
/// block). Returns kiln's file, in `home`.
pub fn quantize_like_llama_cpp(home: &Home, src: &Path, target: &str, extra: &[&str]) -> PathBuf {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let ours = home.path().join(format!("kiln-{stem}-{target}.gguf"));
    let theirs = home.path().join(format!("llama-{stem}-{target}.gguf"));
    let mut args = vec![
        "quantize",
        src.to_str().unwrap(),
        ours.to_str().unwrap(),
        "--type",
        target,
    ];
    args.extend(extra);
    home.ok(&args);
    let mut args = vec![src.as_os_str(), theirs.as_os_str(), target.as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    oracle("llama_quantize.py", &args);
    let cmp: serde_json::Value = serde_json::from_str(&oracle(
        "compare_gguf.py",
        &[ours.as_os_str(), theirs.as_os_str()],
    ))
    .unwrap();
    assert_eq!(
        cmp["tensor_differences"],
        serde_json::json!([]),
        "{stem} {target}: {cmp}"
    );
    std::fs::remove_file(theirs).unwrap();
    ours
}

/// Runs `tests/oracle/<script>` with `args`; returns stdout, failing the
/// test with the script's stderr when it fails.
pub fn oracle(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/oracle").join(script))
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} failed with {} (run .ci/run, or pip install gguf numpy llama-cpp-python, or set KILN_PYTHON):\n{}",
        python().display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Whether llama.cpp (llama-cpp-python) is importable. `.ci/run` installs
/// it and sets `KILN_REQUIRE_LLAMA=1`, which turns its absence into a failure.
pub fn llama_cpp_available() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import llama_cpp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var_os("KILN_REQUIRE_LLAMA").is_some() {
        panic!(
            "KILN_REQUIRE_LLAMA is set but {} cannot import llama_cpp",
            python().display()
        );
    }
    if !ok {
        eprintln!(
            "llama_cpp is not installed for {}; skipping the llama.cpp comparison",
            python().display()
        );
    }
    ok
}

/// The tests' usual tiny llama's [`tiny_model`] arguments: 64 wide, 4
/// heads over 2 KV heads, a feed-forward of 128, 300 tokens, f16 weights.
pub const TINY_LLAMA: &[&str] = &[
    "--arch",
    "llama",
    "--dtype",
    "f16",
    "--embd",
    "64",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--ff",
    "128",
    "--vocab",
    "300",
];

/// [`TINY_LLAMA`] with weights in `dtype` (f32, f16 or bf16).
pub fn tiny_llama(dtype: &str) -> PathBuf {
    let mut args = TINY_LLAMA.to_vec();
    args[3] = dtype;
    tiny_model(&args)
}

/// A tiny random-weight model written by llama.cpp's `gguf` package
/// (`tests/oracle/gen_tiny.py`), cached by its arguments.
pub fn tiny_model(args: &[&str]) -> PathBuf {
    let name = format!("tiny{}.gguf", args.join("").replace(['-', ' '], "_"));
    let path = fixture_dir().join(name);
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let tmp = path.with_extension("tmp.gguf");
        let mut all: Vec<&std::ffi::OsStr> = vec![tmp.as_os_str()];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        oracle("gen_tiny.py", &all);
        std::fs::rename(&tmp, &path).expect("rename model");
    }
    path
}

/// The shipped policies, built from source by `plugins/policies/build.sh`
/// (once per test process). `None` (with a note) when the WebAssembly
/// toolchains are missing, unless `KILN_REQUIRE_POLICIES` is set.
pub fn policies_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = target_dir().join("policies");
        let status = Command::new(repo_root().join("plugins/policies/build.sh"))
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            _ if std::env::var_os("KILN_REQUIRE_POLICIES").is_some() => {
                panic!("KILN_REQUIRE_POLICIES is set but plugins/policies/build.sh failed (apt-get install rustc libstd-rust-dev-wasm32 clang-16 lld-16)")
            }
            _ => {
                eprintln!("cannot build the policies (rustc 1.63 wasm32, clang-16); skipping");
                None
            }
        }
    })
    .clone()
}

/// A copy of the GGUF `src` at `dst` with its metadata edited by `edit`
/// (tensors unchanged).
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, kiln_runtime::gguf::Value)>),
) {
    use kiln_runtime::gguf::{GgufFile, GgufWriter, TensorSpec};
    let f = GgufFile::open(src).unwrap();
    let mut meta = f.metadata.clone();
    edit(&mut meta);
    let specs: Vec<TensorSpec> = f
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            ne: t.ne,
            n_dims: t.n_dims,
        })
        .collect();
    let mut w = GgufWriter::create(dst, &meta, &specs).unwrap();
    for t in &f.tensors {
        w.write_tensor(f.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
}

/// A real released model that `tests/fetch_models.sh` (run by
/// `cargo xtask test`) put in `target/models` (or `KILN_MODELS_DIR`):
/// `smollm2-135m-instruct-q4_1.gguf`, `gemma-3-270m-q4_k_m.gguf`. `None`
/// (with a note) when it is missing, unless `KILN_REQUIRE_MODELS` is set.
pub fn real_model(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("models"));
    let path = dir.join(file);
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("KILN_REQUIRE_MODELS").is_some() {
        panic!(
            "KILN_REQUIRE_MODELS is set but {} is missing (run tests/fetch_models.sh)",
            path.display()
        );
    }
    eprintln!(
        "{} is missing; skipping (run tests/fetch_models.sh)",
        path.display()
    );
    None
}

/// llama.cpp (llama-cpp-python, `oracle/llama_logits.py`) on `tokens`:
/// the logits of every position (row by row) and `n_greedy` greedy
/// tokens after them. `dir` holds the logits file.
pub fn llama_logits(
    model: &Path,
    tokens: &[u32],
    n_greedy: usize,
    dir: &Path,
) -> (Vec<f32>, Vec<u32>) {
    llama_logits_with(model, tokens, n_greedy, dir, false)
}

/// [`llama_logits`], with llama.cpp's flash-attention path where
/// `flash_attn` (the same model, its attention sums in another order).
pub fn llama_logits_with(
    model: &Path,
    tokens: &[u32],
    n_greedy: usize,
    dir: &Path,
    flash_attn: bool,
) -> (Vec<f32>, Vec<u32>) {
    llama_logits_lora(model, None, tokens, n_greedy, dir, flash_attn)
}

/// [`llama_logits_with`], with a LoRA adapter applied where `lora` names
/// one.
pub fn llama_logits_lora(
    model: &Path,
    lora: Option<&Path>,
    tokens: &[u32],
    n_greedy: usize,
    dir: &Path,
    flash_attn: bool,
) -> (Vec<f32>, Vec<u32>) {
    let out = dir.join("llama-logits.bin");
    let ids = tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let n_greedy = n_greedy.to_string();
    let mut args = vec![
        model.as_os_str(),
        out.as_os_str(),
        std::ffi::OsStr::new(&ids),
        std::ffi::OsStr::new(&n_greedy),
    ];
    if flash_attn {
        args.push(std::ffi::OsStr::new("--flash-attn"));
    }
    let lora_arg = lora.map(|p| format!("--lora={}", p.display()));
    if let Some(a) = &lora_arg {
        args.push(std::ffi::OsStr::new(a));
    }
    let report: serde_json::Value = serde_json::from_str(&oracle("llama_logits.py", &args))
        .expect("llama_logits.py prints JSON");
    let logits = std::fs::read(out)
        .expect("llama_logits.py writes the logits")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let greedy = report["greedy"]
        .as_array()
        .expect("a greedy list")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (logits, greedy)
}

/// The standard deviation of `v`: the scale logits are compared on.
pub fn spread(v: &[f32]) -> f64 {
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// [`relative_error`] of each row of `n` logits (positions), the largest.
pub fn largest_row_error(ours: &[f32], theirs: &[f32], n: usize) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    ours.chunks(n)
        .zip(theirs.chunks(n))
        .map(|(a, b)| relative_error(a, b))
        .fold(0.0, f64::max)
}

/// Largest |a − b| over two rows of logits, relative to the spread of `theirs`.
pub fn relative_error(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let max = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    max / spread(theirs)
}

/// Greedy tokens after `prompt` on `exec` (a session of 128 positions),
/// and the bytes its executor moved to and from the device in each of the
/// `steps` decode steps.
pub fn greedy_with_transfers(
    model: &Path,
    exec: kiln_runtime::backend::exec::Executor,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<(u64, u64)>) {
    greedy_run(model, None, exec, prompt, steps, false)
}

/// The built-in CPU's greedy tokens with attention unfused: the graph a
/// device without the fused attention op runs (the Vulkan backend), so a
/// comparison with its tokens compares the same arithmetic.
pub fn greedy_unfused(model: &Path, prompt: &[u32], steps: usize) -> Vec<u32> {
    let exec = kiln_runtime::backend::exec::Executor::new(
        kiln_runtime::backend::Backend::builtin_cpu(),
        0,
    );
    greedy_run(model, None, exec, prompt, steps, true).0
}

/// [`greedy_with_transfers`] (`unfused`: attention as
/// [`greedy_unfused`] runs it) of the model with the LoRA adapter at
/// `adapter` applied at run time (`Model::load_adapted` for `exec`'s
/// device).
pub fn greedy_adapted(
    model: &Path,
    adapter: &Path,
    exec: kiln_runtime::backend::exec::Executor,
    prompt: &[u32],
    steps: usize,
    unfused: bool,
) -> (Vec<u32>, Vec<(u64, u64)>) {
    greedy_run(model, Some(adapter), exec, prompt, steps, unfused)
}

fn greedy_run(
    model: &Path,
    adapter: Option<&Path>,
    exec: kiln_runtime::backend::exec::Executor,
    prompt: &[u32],
    steps: usize,
    unfused: bool,
) -> (Vec<u32>, Vec<(u64, u64)>) {
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::sample::argmax;
    use kiln_runtime::model::{Model, Session};
    use std::sync::atomic::Ordering;
    let target = exec.target.clone();
    let moved = || {
        (
            target.stats.bytes_to_device.load(Ordering::Relaxed),
            target.stats.bytes_from_device.load(Ordering::Relaxed),
        )
    };
    let loaded = match adapter {
        None => Model::load(model),
        Some(a) => Model::load_adapted(model, Some(a), &target, exec.device),
    };
    let mut s = Session::new(loaded.unwrap(), exec, Some(128)).unwrap();
    if unfused {
        s.set_unfused_attention().unwrap();
    }
    let mut next = argmax(&s.eval(prompt, LogitsFor::Last).unwrap());
    let (mut tokens, mut per_step) = (vec![next], Vec::new());
    for _ in 0..steps {
        let before = moved();
        next = argmax(&s.eval(&[next], LogitsFor::Last).unwrap());
        let after = moved();
        per_step.push((after.0 - before.0, after.1 - before.1));
        tokens.push(next);
    }
    (tokens, per_step)
}

/// The transfer budget of decode on a device, from
/// [`greedy_with_transfers`]'s steps: after the first step (which sends its
/// inputs whole: the prompt's were another shape), a step sends its token
/// id and position (and a window row: a 64-byte chunk each at most) and
/// receives one row of `n_vocab` logits. The weights and the KV cache stay
/// on the device.
pub fn assert_decode_transfers(model: &Path, moved: &[(u64, u64)], n_vocab: u64) {
    for (i, &(up, down)) in moved.iter().enumerate().skip(1) {
        assert!(
            up <= 3 * 64,
            "{}: step {i} sent {up} bytes ({moved:?})",
            model.display()
        );
        assert_eq!(
            down,
            4 * n_vocab,
            "{}: step {i} received {down} bytes",
            model.display()
        );
    }
}

/// A long prompt of code-like lines (a function's body, left open, with
/// no numbers in it) with `needles` (name, value, depth) placed as
/// `const NAME: u32 = VALUE;` lines at the given fractions of its
/// length; asked back as `    const NAME: u32 =`.
pub fn needle_haystack(lines: usize, needles: &[(&str, u32, f64)]) -> String {
    let mut rng = fastrand::Rng::with_seed(7);
    let words = [
        "count", "total", "index", "buffer", "offset", "limit", "width", "height", "depth",
        "weight", "score", "cursor", "length", "window", "budget", "margin",
    ];
    let mut out = Vec::new();
    for i in 0..lines {
        let (a, b) = (
            words[rng.usize(..words.len())],
            words[rng.usize(..words.len())],
        );
        let c = words[rng.usize(..words.len())];
        // No numbers: the needles' values are the only ones.
        out.push(match i % 4 {
            0 => format!("    let {a} = {b} * {c} + {a};"),
            1 => format!("    if {a} > {b} {{ {a} -= {c}; }}"),
            2 => format!("    // update the {a} from the {b}"),
            _ => format!("    {a}.push({b}.min({c}));"),
        });
    }
    for (name, value, depth) in needles {
        let at = ((lines as f64) * depth) as usize;
        out.insert(at, format!("    const {name}: u32 = {value};"));
    }
    // Left open: the question continues the function.
    format!("fn process() {{\n{}\n", out.join("\n"))
}

/// Asks `session` (holding a [`needle_haystack`] prompt of `prompt_len`
/// tokens, which it keeps) for needle `name` as a completion: six greedy
/// tokens after `    const NAME: u32 =`. Returns their text and the
/// seconds the five decode steps after the first token took.
pub fn ask_needle(
    session: &mut kiln_runtime::model::Session,
    tok: &kiln_runtime::tokenizer::Tokenizer,
    prompt_len: usize,
    name: &str,
) -> (String, f64) {
    use kiln_runtime::model::forward::LogitsFor;
    use kiln_runtime::model::sample::argmax;
    session.truncate(prompt_len);
    let ask = tok
        .encode(&format!("    const {name}: u32 ="), false)
        .unwrap();
    let mut next = argmax(&session.eval(&ask, LogitsFor::Last).unwrap());
    let mut got = vec![next];
    let t = std::time::Instant::now();
    for _ in 1..6 {
        next = argmax(&session.eval(&[next], LogitsFor::Last).unwrap());
        got.push(next);
    }
    (tok.decode(&got), t.elapsed().as_secs_f64())
}

/// The sources of `name` at the version Cargo.lock pins, as cargo
/// extracted them (after checking the checksum Cargo.lock lists).
pub fn locked_crate_sources(name: &str) -> PathBuf {
    let root = repo_root();
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let at = lock
        .find(&format!("name = \"{name}\"\n"))
        .unwrap_or_else(|| panic!("{name} is not in Cargo.lock"));
    let version = lock[at..]
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let src = cargo_home.join("registry/src");
    std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .flatten()
        .map(|index| index.path().join(format!("{name}-{version}")))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| panic!("{name}-{version} not under {}", src.display()))
}
