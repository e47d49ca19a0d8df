//! `kiln demo`: the default model (generated: random weights until kiln
//! ships a trained one) and a scripted editing session driven through a
//! real `kiln serve` child process over LSP, as an IDE would. The same
//! driver replays long typing sessions for the latency bench.

use super::lsp::{Frame, FrameReader};
use kiln_plugin_api::DType;
use kiln_runtime::gguf::{GgufWriter, LlamaShape, TensorSpec};
use kiln_runtime::gguf::{Value, ValueType};
use serde::Serialize;
use serde_json::{Value as Json, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Bumped when the generated model changes, so an old file is not reused.
pub const DEMO_MODEL_NAME: &str = "kiln-demo-random-v1";

/// Shape of the demo model: small enough to answer in milliseconds on two
/// cores, shaped like a llama.
const EMBD: usize = 256;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FF: usize = 768;
const CTX: u32 = 4096;

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const WORDS: &[&str] = &[
    "def", "return", "self", "import", "from", "class", "for", "in", "if", "else", "elif", "while",
    "None", "True", "False", "and", "or", "not", "fn", "let", "mut", "pub", "struct", "impl",
    "use", "match", "const", "static", "async", "await", "print", "len", "range", "value",
    "result", "data", "index", "items", "name", "path", "config", "error", "point", "area",
    "width", "height", "radius", "total", "count", "list", "dict", "str", "int", "float",
];

/// The vocabulary: SentencePiece-style, with byte fallback, every printable
/// ASCII character alone and after a word boundary, code words, and the
/// Qwen-style FIM and chat tokens.
fn vocabulary() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    const NORMAL: i32 = 1;
    const UNKNOWN: i32 = 2;
    const CONTROL: i32 = 3;
    const BYTE: i32 = 6;
    let mut toks = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    for special in [
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ] {
        toks.push(special.into());
        types.push(CONTROL);
    }
    for b in 0..256 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(BYTE);
    }
    let mut pieces: Vec<String> = Vec::new();
    for c in (0x21u8..0x7f).map(char::from) {
        pieces.push(c.to_string());
        pieces.push(format!("\u{2581}{c}"));
    }
    pieces.push("\u{2581}".into());
    pieces.push("\u{2581}\u{2581}".into());
    pieces.push("\u{2581}\u{2581}\u{2581}\u{2581}".into());
    for w in WORDS {
        pieces.push(w.to_string());
        pieces.push(format!("\u{2581}{w}"));
    }
    let mut scores = vec![0.0; toks.len()];
    for (i, p) in pieces.into_iter().enumerate() {
        if toks.contains(&p) {
            continue;
        }
        toks.push(p);
        types.push(NORMAL);
        scores.push(-(i as f32));
    }
    (toks, scores, types)
}

/// Writes the demo model (random weights, F16) to `path`.
pub fn write_demo_model(path: &Path) -> std::io::Result<()> {
    let (toks, scores, types) = vocabulary();
    let vocab = toks.len();
    let s = |k: &str, v: &str| (k.to_string(), Value::String(v.to_string()));
    let u = |k: &str, v: u32| (k.to_string(), Value::U32(v));
    let mut metadata = vec![
        s("general.architecture", "llama"),
        s("general.name", DEMO_MODEL_NAME),
        s(
            "general.description",
            "kiln's demo model: random weights, so its completions are noise",
        ),
        u("general.file_type", 1),
    ];
    let shape = LlamaShape {
        ctx: CTX,
        embd: EMBD,
        layers: LAYERS,
        ff: FF,
        heads: HEADS,
        kv_heads: KV_HEADS,
        vocab,
    };
    metadata.extend(shape.metadata());
    metadata.extend([
        s("tokenizer.ggml.model", "llama"),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                ValueType::String,
                toks.into_iter().map(Value::String).collect(),
            ),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
        ),
        u("tokenizer.ggml.bos_token_id", 1),
        u("tokenizer.ggml.eos_token_id", 2),
        u("tokenizer.ggml.unknown_token_id", 0),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        s("tokenizer.chat_template", CHATML),
    ]);
    let specs: Vec<TensorSpec> = shape
        .tensors(false)
        .iter()
        .map(|(name, ne)| {
            let dtype = if ne.len() == 1 {
                DType::F32
            } else {
                DType::F16
            };
            TensorSpec::new(name.as_str(), dtype, ne)
        })
        .collect();
    let mut w = GgufWriter::create(path, &metadata, &specs)?;
    let mut rng = fastrand::Rng::with_seed(0x6b696c6e);
    // Box-Muller normal samples.
    let mut normal = move || {
        let (a, b) = (rng.f64().max(1e-12), rng.f64());
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
    };
    for spec in &specs {
        let n: u64 = spec.ne.iter().product();
        let bytes: Vec<u8> = if spec.n_dims == 1 {
            (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect()
        } else {
            (0..n)
                .flat_map(|_| half::f16::from_f32(normal() * 0.05).to_le_bytes())
                .collect()
        };
        w.write_tensor(&bytes)?;
    }
    w.finish()
}

/// The demo model's path under `KILN_HOME`, written on first use.
pub fn ensure_demo_model(home: &Path, log: &mut dyn FnMut(&str)) -> std::io::Result<PathBuf> {
    let dir = home.join("demo");
    let path = dir.join(format!("{DEMO_MODEL_NAME}.gguf"));
    if !path.is_file() {
        std::fs::create_dir_all(&dir)?;
        log(&format!(
            "generating the demo model (random weights) at {}",
            path.display()
        ));
        write_demo_model(&path)?;
    }
    Ok(path)
}

/// The scripted session: a small Python project; the session types the
/// second half of `main.py` character by character.
pub const DEMO_FILES: &[(&str, &str)] = &[
    (
        "geometry.py",
        "import math\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def distance(self, other):\n        return math.hypot(self.x - other.x, self.y - other.y)\n\n\ndef circle_area(radius):\n    return math.pi * radius * radius\n\n\ndef rectangle_area(width, height):\n    return width * height\n",
    ),
    (".gitignore", "build/\n"),
    (
        "build/generated.py",
        "# ignored by .gitignore: never used as context\ndef generated():\n    pass\n",
    ),
];

pub const DEMO_TYPED_FILE: &str = "main.py";
pub const DEMO_TYPED_START: &str = "from geometry import Point, circle_area, rectangle_area\n\n\n";
pub const DEMO_TYPED_TEXT: &str = "def total_area(shapes):\n    total = 0\n    for shape in shapes:\n        if shape.kind == \"circle\":\n            total += circle_area(shape.radius)\n        else:\n            total += rectangle_area(shape.width, shape.height)\n    return total\n\n\ndef farthest(points, origin):\n    best = None\n    for p in points:\n        d = p.distance(origin)\n        if best is None or d > best[0]:\n            best = (d, p)\n    return best\n";

/// One keystroke's request as the client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Keystroke {
    pub line: u32,
    pub character: u32,
    pub completion: String,
    pub client_ms: f64,
    pub time_to_first_token_ms: f64,
    pub cached_tokens: u64,
    pub prompt_tokens: u64,
    pub completion_cache_hit: bool,
    /// Why the completion ended (`max_tokens`: cut by the limit).
    pub stop_reason: String,
    /// The user waited for this completion (each one when the replay
    /// waits; at a steady pace, the one at the end of a word).
    pub waited: bool,
}

/// Milliseconds a paced replay pauses after a word (a space, a line
/// break), where the user looks for a suggestion.
pub const PAUSE_MS: u64 = 500;

/// One scripted keystroke: the change it makes, the cursor after it, and
/// whether it ends a word.
struct Typed {
    change: Json,
    line: u32,
    character: u32,
    word_end: bool,
}

/// The first `keystrokes` keystrokes of [`DEMO_TYPED_TEXT`] (again after
/// a blank line when it runs out) typed into `uri`.
fn script(uri: &str, keystrokes: usize) -> Vec<Typed> {
    let mut text = DEMO_TYPED_START.to_string();
    let chars: Vec<char> = DEMO_TYPED_TEXT.chars().collect();
    let mut out = Vec::new();
    for k in 0..keystrokes {
        let ch = chars[k % chars.len()];
        if k > 0 && k % chars.len() == 0 {
            text.push_str("\n\n");
        }
        let line = text.matches('\n').count() as u32;
        let character = text.rsplit('\n').next().unwrap_or("").chars().count() as u32;
        let change = json!({"textDocument": {"uri": uri, "version": k + 2},
            "contentChanges": [{"range": {"start": {"line": line, "character": character}, "end": {"line": line, "character": character}}, "text": ch.to_string()}]});
        text.push(ch);
        out.push(Typed {
            change,
            line: text.matches('\n').count() as u32,
            character: text.rsplit('\n').next().unwrap_or("").chars().count() as u32,
            // The user stops at the end, as after a word.
            word_end: ch == ' ' || ch == '\n' || k + 1 == keystrokes,
        });
    }
    out
}

fn inline_request(uri: &str, t: &Typed) -> Json {
    json!({"textDocument": {"uri": uri}, "position": {"line": t.line, "character": t.character},
           "context": {"triggerKind": 2}})
}

/// The keystroke `t` as the client saw its answer `r` after `client_ms`.
fn keystroke(t: &Typed, r: &Json, client_ms: f64, waited: bool) -> Result<Keystroke, String> {
    if let Some(e) = r.get("error") {
        return Err(format!("inlineCompletion failed: {e}"));
    }
    let res = &r["result"];
    let meta = &res["kiln"];
    Ok(Keystroke {
        line: t.line,
        character: t.character,
        completion: res["items"][0]["insertText"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        client_ms,
        time_to_first_token_ms: meta["time_to_first_token_ms"].as_f64().unwrap_or(0.0),
        cached_tokens: meta["cached_tokens"].as_u64().unwrap_or(0),
        prompt_tokens: meta["prompt_tokens"].as_u64().unwrap_or(0),
        completion_cache_hit: meta["completion_cache_hit"].as_bool().unwrap_or(false),
        stop_reason: meta["stop_reason"].as_str().unwrap_or("").to_string(),
        waited,
    })
}

/// Each keystroke, then its completion awaited before the next.
fn type_and_wait(
    c: &mut Client,
    uri: &str,
    typed: &[Typed],
    on_key: &mut dyn FnMut(&Keystroke),
) -> Result<Vec<Keystroke>, String> {
    let io = |e: std::io::Error| format!("talking to kiln serve: {e}");
    let mut keys = Vec::new();
    for t in typed {
        c.notify("textDocument/didChange", t.change.clone())
            .map_err(io)?;
        let t0 = Instant::now();
        let r = c
            .request("textDocument/inlineCompletion", inline_request(uri, t))
            .map_err(io)?;
        let key = keystroke(t, &r, t0.elapsed().as_secs_f64() * 1e3, true)?;
        on_key(&key);
        keys.push(key);
    }
    Ok(keys)
}

/// Keystrokes at a steady pace (`typing_ms` apart, [`PAUSE_MS`] after a
/// word), each with its inline completion request, sent by a thread of
/// their own while this one reads the answers, as an editor does: a
/// request the next keystroke makes stale is cancelled by the server.
fn type_at_pace(
    c: &mut Client,
    uri: &str,
    typed: &[Typed],
    typing_ms: u64,
    on_key: &mut dyn FnMut(&Keystroke),
) -> Result<Vec<Keystroke>, String> {
    let io = |e: std::io::Error| format!("talking to kiln serve: {e}");
    let first = c.reserve_ids(typed.len() as i64);
    let writer = c.writer();
    let messages: Vec<(Json, Json, bool)> = (typed.iter().enumerate())
        .map(|(i, t)| {
            let request = json!({"jsonrpc": "2.0", "id": first + i as i64,
                "method": "textDocument/inlineCompletion", "params": inline_request(uri, t)});
            let change = json!({"jsonrpc": "2.0", "method": "textDocument/didChange",
                "params": t.change});
            (change, request, t.word_end)
        })
        .collect();
    let sent = Arc::new(Mutex::new(vec![None::<Instant>; typed.len()]));
    let sent_by = sent.clone();
    let typist = std::thread::spawn(move || -> std::io::Result<()> {
        let mut at = Instant::now();
        for (i, (change, request, word_end)) in messages.iter().enumerate() {
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            writer.send(change)?;
            let now = Instant::now();
            sent_by.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(now);
            writer.send(request)?;
            let gap = if *word_end { PAUSE_MS } else { typing_ms };
            at = now + std::time::Duration::from_millis(gap);
        }
        Ok(())
    });
    let mut answers: Vec<Option<(Json, Instant)>> = vec![None; typed.len()];
    let mut left = typed.len();
    while left > 0 {
        let v = c.next_response().map_err(io)?;
        let Some(i) = v["id"]
            .as_i64()
            .and_then(|id| usize::try_from(id - first).ok())
            .filter(|&i| i < typed.len())
        else {
            continue;
        };
        if answers[i].is_none() {
            left -= 1;
        }
        answers[i] = Some((v, Instant::now()));
    }
    typist
        .join()
        .map_err(|_| "the typing thread panicked".to_string())?
        .map_err(io)?;
    let sent = sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut keys = Vec::new();
    for ((t, answer), sent) in typed.iter().zip(answers).zip(sent) {
        let (r, at) = answer.expect("every request answered");
        let sent = sent.expect("every request sent before its answer");
        let ms = at.saturating_duration_since(sent).as_secs_f64() * 1e3;
        let key = keystroke(t, &r, ms, t.word_end)?;
        on_key(&key);
        keys.push(key);
    }
    Ok(keys)
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    pub model: String,
    pub backend: String,
    pub requests: usize,
    /// Milliseconds between keystrokes (a pause of [`PAUSE_MS`] after a
    /// word); 0: each keystroke waited for its completion.
    pub typing_ms: u64,
    /// The requests the latencies are of (those the user waited for).
    pub waited_requests: usize,
    /// Of those answered with a completion, the share the token limit
    /// cut (what a smaller `maxTokens` costs).
    pub truncated_share: f64,
    pub e2e_ms_p50: f64,
    pub e2e_ms_p99: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    /// Share of prompt tokens whose KV was reused.
    pub prefix_cache_hit_rate: f64,
    /// Share of requests answered from the completion cache.
    pub completion_cache_hit_rate: f64,
    /// Resident memory of the server beyond its weights (RssAnon less a
    /// model file read into memory to repack its weights).
    pub server_anonymous_memory_mib: Option<f64>,
    pub server_file_backed_memory_mib: Option<f64>,
    /// A model file read into memory to repack its weights for the
    /// backend (anonymous memory in place of the file's pages).
    pub server_copied_weights_mib: f64,
    pub status: Json,
    pub keystrokes: Vec<Keystroke>,
}

/// Writes framed messages to a language server (shared by a [`Client`]
/// and the threads it hands out [`Client::writer`]s to).
#[derive(Clone)]
pub struct Writer(Arc<Mutex<ChildStdin>>);

impl Writer {
    pub fn send(&self, msg: &Json) -> std::io::Result<()> {
        let body = serde_json::to_vec(msg)?;
        let mut frame = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        frame.extend_from_slice(&body);
        self.send_raw(&frame)
    }

    pub fn send_raw(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(bytes)?;
        w.flush()
    }
}

/// A language-server client over a child's pipes.
pub struct Client {
    child: Child,
    stdin: Writer,
    stdout: FrameReader<ChildStdout>,
    next_id: i64,
    /// Notifications seen while waiting for responses.
    pub notifications: Vec<Json>,
}

impl Client {
    pub fn spawn(mut cmd: Command) -> std::io::Result<Client> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = Writer(Arc::new(Mutex::new(child.stdin.take().expect("piped"))));
        let stdout = FrameReader::new(child.stdout.take().expect("piped"));
        Ok(Client {
            child,
            stdin,
            stdout,
            next_id: 1,
            notifications: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, msg: &Json) -> std::io::Result<()> {
        self.stdin.send(msg)
    }

    /// Writes `bytes` as they are (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stdin.send_raw(bytes)
    }

    /// A handle that writes to the server from another thread, while
    /// this one reads.
    pub fn writer(&self) -> Writer {
        self.stdin.clone()
    }

    /// The id the next request gets; ids up to `id` are the caller's
    /// (a [`Writer`]'s requests).
    pub fn reserve_ids(&mut self, count: i64) -> i64 {
        let first = self.next_id;
        self.next_id += count;
        first
    }

    /// Closes the server's input without `shutdown`; returns its exit status.
    pub fn hang_up(self) -> std::io::Result<std::process::ExitStatus> {
        let Client {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        child.wait()
    }

    pub fn notify(&mut self, method: &str, params: Json) -> std::io::Result<()> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
    }

    /// Sends a request; returns its id.
    pub fn request_async(&mut self, method: &str, params: Json) -> std::io::Result<i64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        Ok(id)
    }

    /// The next message from the server.
    pub fn read(&mut self) -> std::io::Result<Json> {
        match self.stdout.next_frame()? {
            Some(Frame::Json(v)) => Ok(v),
            Some(f) => Err(std::io::Error::other(format!(
                "bad frame from the server: {f:?}"
            ))),
            None => Err(std::io::Error::other("the server closed its output")),
        }
    }

    /// The next response, answering server requests (progress creation)
    /// and keeping notifications on the way.
    pub fn next_response(&mut self) -> std::io::Result<Json> {
        loop {
            let v = self.read()?;
            if v.get("method").is_some() {
                if let Some(req_id) = v.get("id") {
                    let req_id = req_id.clone();
                    self.send(&json!({"jsonrpc": "2.0", "id": req_id, "result": null}))?;
                } else {
                    self.notifications.push(v);
                }
                continue;
            }
            return Ok(v);
        }
    }

    /// Waits for the response to `id` (responses to others are dropped).
    pub fn wait(&mut self, id: i64) -> std::io::Result<Json> {
        loop {
            let v = self.next_response()?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    }

    pub fn request(&mut self, method: &str, params: Json) -> std::io::Result<Json> {
        let id = self.request_async(method, params)?;
        self.wait(id)
    }

    /// `shutdown` + `exit`; returns the server's exit status.
    pub fn close(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.request("shutdown", Json::Null)?;
        self.notify("exit", Json::Null)?;
        self.child.wait()
    }
}

fn proc_status_mib(pid: u32, key: &str) -> Option<f64> {
    kiln_runtime::measure::process_memory(Some(pid), key).map(|b| b as f64 / 1048576.0)
}

/// Writes the demo project into `dir`, starts `serve` (a `kiln serve`
/// command), types `keystrokes` characters of the script (cycling through
/// it), requesting an inline completion after each, and reports.
pub fn typing_session(
    serve: Command,
    dir: &Path,
    keystrokes: usize,
    typing_ms: u64,
    mut on_key: impl FnMut(&Keystroke),
) -> Result<SessionReport, String> {
    let io = |e: std::io::Error| format!("talking to kiln serve: {e}");
    for (name, text) in DEMO_FILES {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&p, text).map_err(io)?;
    }
    let typed_path = dir.join(DEMO_TYPED_FILE);
    std::fs::write(&typed_path, DEMO_TYPED_START).map_err(io)?;
    let uri = format!("file://{}", typed_path.display());
    let mut c = Client::spawn(serve).map_err(|e| format!("cannot start kiln serve: {e}"))?;
    let init = c
        .request(
            "initialize",
            json!({
                "processId": std::process::id(),
                "rootUri": format!("file://{}", dir.display()),
                "capabilities": {"window": {"workDoneProgress": true}},
            }),
        )
        .map_err(io)?;
    if init.get("error").is_some() {
        return Err(format!("initialize failed: {}", init["error"]));
    }
    c.notify("initialized", json!({})).map_err(io)?;
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": DEMO_TYPED_START}}),
    )
    .map_err(io)?;
    let geometry = dir.join("geometry.py");
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": format!("file://{}", geometry.display()), "languageId": "python", "version": 1, "text": DEMO_FILES[0].1}}),
    )
    .map_err(io)?;
    let typed = script(&uri, keystrokes);
    let keys = if typing_ms == 0 {
        type_and_wait(&mut c, &uri, &typed, &mut on_key)?
    } else {
        type_at_pace(&mut c, &uri, &typed, typing_ms, &mut on_key)?
    };
    let status = c.request("kiln/status", Json::Null).map_err(io)?["result"].clone();
    let pid = c.pid();
    let copied = status["copied_weight_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
    let anon = proc_status_mib(pid, "RssAnon").map(|a| (a - copied).max(0.0));
    let file = proc_status_mib(pid, "RssFile");
    let code = c.close().map_err(io)?;
    if !code.success() {
        return Err(format!("kiln serve exited with {code} after shutdown"));
    }
    // What the user waited for: every request when each is awaited; at a
    // steady pace, those at the ends of words, where the user pauses.
    let waited: Vec<&Keystroke> = keys.iter().filter(|k| k.waited).collect();
    let e2e: Vec<f64> = waited.iter().map(|k| k.client_ms).collect();
    let ttft: Vec<f64> = waited.iter().map(|k| k.time_to_first_token_ms).collect();
    let cached: u64 = keys.iter().map(|k| k.cached_tokens).sum();
    let all: u64 = keys.iter().map(|k| k.cached_tokens + k.prompt_tokens).sum();
    let hits = keys.iter().filter(|k| k.completion_cache_hit).count();
    Ok(SessionReport {
        model: status["model"].as_str().unwrap_or("").to_string(),
        backend: status["backend"].as_str().unwrap_or("").to_string(),
        requests: keys.len(),
        typing_ms,
        waited_requests: waited.len(),
        truncated_share: {
            let answered: Vec<&&Keystroke> =
                waited.iter().filter(|k| !k.completion.is_empty()).collect();
            let cut = answered
                .iter()
                .filter(|k| k.stop_reason == "max_tokens")
                .count();
            cut as f64 / answered.len().max(1) as f64
        },
        e2e_ms_p50: kiln_runtime::measure::percentile(&e2e, 50.0),
        e2e_ms_p99: kiln_runtime::measure::percentile(&e2e, 99.0),
        ttft_ms_p50: kiln_runtime::measure::percentile(&ttft, 50.0),
        ttft_ms_p99: kiln_runtime::measure::percentile(&ttft, 99.0),
        prefix_cache_hit_rate: cached as f64 / all.max(1) as f64,
        completion_cache_hit_rate: hits as f64 / keys.len().max(1) as f64,
        server_anonymous_memory_mib: anon,
        server_file_backed_memory_mib: file,
        server_copied_weights_mib: copied,
        status,
        keystrokes: keys,
    })
}
