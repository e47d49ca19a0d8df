//! The language server: LSP over stdio (JSON-RPC 2.0 with Content-Length
//! framing). The message types come from `lsp-types`; the framing
//! ([`framing`]) and the documents and positions ([`document`]) are kiln's
//! own, so that nothing an editor sends can end the session.
//!
//! One thread reads frames, one (this loop) dispatches; completions run on
//! the engine, which answers them itself when they end (a [`Sink`] per
//! request), so `$/cancelRequest`, `kiln/status` and document changes are
//! handled while a completion is generating, and no thread waits.

pub mod document;
pub mod framing;

use crate::ab;
use crate::context::{self, OpenDoc, Workspace};
use crate::decisions::{DecisionLog, PendingDecision};
use crate::engine::{Engine, Finished, Loaded, Sink};
use crate::fim::FimTemplate;
use crate::metrics::Metrics;
use crate::pool::{self, Pool};
use crate::prompt::{self, Counter};
use crate::start::{ServeSpec, ranker, start_pool};
use crate::{Settings, boundary};
use document::{Document, PositionEncoding};
pub use framing::{Frame, FrameReader, MAX_MESSAGE_BYTES};
use kiln_registry::{Kind, Registry};
use kiln_runtime::model::generate::{Control, Request, StopReason};
use kiln_runtime::model::sample::SamplingParams;
use kiln_runtime::store;
use kiln_sandbox::breaker::Ranker;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, RwLock};

// JSON-RPC and LSP error codes.
const PARSE_ERROR: i32 = -32700;
const INVALID_REQUEST: i32 = -32600;
const METHOD_NOT_FOUND: i32 = -32601;
const INVALID_PARAMS: i32 = -32602;
const SERVER_NOT_INITIALIZED: i32 = -32002;
const REQUEST_FAILED: i32 = -32803;
const REQUEST_CANCELLED: i32 = -32800;

/// Writes framed messages; shared by the threads that answer.
#[derive(Clone)]
pub struct Out(Arc<Mutex<Box<dyn Write + Send>>>);

impl Out {
    pub fn new(w: Box<dyn Write + Send>) -> Out {
        Out(Arc::new(Mutex::new(w)))
    }

    pub fn send(&self, msg: &Value) {
        let body = serde_json::to_vec(msg).expect("JSON values serialise");
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A client that went away cannot be told anything; the read side
        // sees the end of input and ends the session.
        let _ = write!(w, "Content-Length: {}\r\n\r\n", body.len());
        let _ = w.write_all(&body);
        let _ = w.flush();
    }

    fn reply(&self, id: &Value, result: Value) {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}));
    }

    fn error(&self, id: &Value, code: i32, message: &str) {
        self.send(
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
        );
    }

    fn notify(&self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// `window/logMessage` (1 error, 2 warning, 3 info, 4 log).
    pub fn log(&self, level: u8, message: &str) {
        self.notify(
            "window/logMessage",
            json!({"type": level, "message": message}),
        );
    }

    /// `window/showMessage`, which editors put in front of the user (1
    /// error, 2 warning, 3 info); also logged.
    pub fn show(&self, level: u8, message: &str) {
        self.notify(
            "window/showMessage",
            json!({"type": level, "message": message}),
        );
        self.log(level, message);
    }
}

enum Input {
    Frame(Frame),
    ReadError(String),
    Eof,
    Loaded(Result<Pool, String>),
    /// A model of the pool a completion waited for, loaded (or not).
    PoolLoaded(String, Result<(), String>),
    Indexed(Box<(Workspace, crate::context::IndexStats)>),
    /// SIGHUP: read config.toml again.
    Reload,
}

struct Pending {
    control: Arc<Control>,
    /// Cancelled by `$/cancelRequest` (answered RequestCancelled) rather
    /// than by a newer request for the same document (answered empty).
    explicit: Arc<AtomicBool>,
}

struct Server {
    spec: Arc<ServeSpec>,
    out: Out,
    tx: Sender<Input>,
    settings: Settings,
    initialized: bool,
    shutdown: bool,
    encoding: PositionEncoding,
    docs: HashMap<String, Document>,
    /// The first model's engine (the pool's), once loaded.
    engine: Option<Engine>,
    pool: Option<Pool>,
    load_error: Option<String>,
    /// Requests that came while the model was loading (the first, or a
    /// pool's model a completion's route needs).
    deferred: Vec<(Value, String, Value)>,
    /// The pool's models loading on a thread of their own.
    pool_loading: std::collections::HashSet<String>,
    workspace: Arc<RwLock<Workspace>>,
    root: Option<PathBuf>,
    ranker: Arc<Ranker>,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    progress: Option<ProgressState>,
    /// The context block chosen for (document, line): kept while the user
    /// types on that line so the prompt's start stays the same (KV reuse).
    context_memo: Option<ContextMemo>,
    /// The completion shown last, in any document: on its line it is the
    /// next selection's second query.
    shown: Shown,
    /// The last inline completions served, by id, with what their prompts
    /// were made of: `kiln/explain` with an `id` explains one of them.
    served: ServedLog,
    metrics: Arc<Metrics>,
    decisions: DecisionLog,
    /// A/B experiments on the served model, and every inline item's id.
    ab: ab::Ab,
    /// The workspace is being indexed; `Some(true)`: files changed since
    /// that started, so index again when it ends.
    indexing: Option<bool>,
}

/// The completion shown last: (uri, line, text).
type Shown = Arc<Mutex<Option<(String, u32, String)>>>;

/// Inline completions `kiln/explain` can explain by their id.
const SERVED_KEPT: usize = 32;

/// One inline completion shown: its id, the model that served it, what
/// its prompt was made of and its text.
struct ServedItem {
    id: String,
    model: String,
    parts: crate::preview::Parts,
    text: String,
}

/// The last [`SERVED_KEPT`] inline completions shown (answered with an
/// item), oldest first: kept by the reply, so that requests cancelled
/// while the user types never push the shown ones out.
type ServedLog = Arc<Mutex<std::collections::VecDeque<ServedItem>>>;

/// The context block chosen for a (document, line), and the ranking
/// decision behind it.
struct ContextMemo {
    uri: String,
    line: u32,
    /// Chosen with a completion shown on this line as the second query:
    /// kept for the rest of the line.
    second_query: bool,
    /// The context block and its snippets (without the policy's call,
    /// which went to `decision`, and the full ranking).
    packed: context::Packed,
    decision: Option<PendingDecision>,
    /// What the dashboard shows of it: the snippets (path, lines,
    /// tokens, score), its tokens, and who ranked them.
    layout: Value,
}

struct ProgressState {
    create_id: String,
    ready: bool,
    queued: Vec<Value>,
}

fn id_key(id: &Value) -> String {
    id.to_string()
}

/// JSON-RPC ids are strings or integers (and null in a reply to a request
/// that could not be read).
fn valid_id(id: &Value) -> bool {
    id.is_string() || id.is_i64() || id.is_u64() || id.is_null()
}

/// Runs the language server on `input`/`output` until `exit` or the end of
/// input. Returns the process exit code the spec asks for (0 after
/// `shutdown`, 1 otherwise).
pub fn run(
    spec: ServeSpec,
    metrics: Arc<Metrics>,
    input: Box<dyn Read + Send>,
    output: Box<dyn Write + Send>,
) -> i32 {
    let (tx, rx) = channel();
    let reader_tx = tx.clone();
    std::thread::Builder::new()
        .name("kiln-lsp-read".into())
        .spawn(move || {
            let mut r = FrameReader::new(input);
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => {
                        if reader_tx.send(Input::Frame(f)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = reader_tx.send(Input::Eof);
                        return;
                    }
                    Err(e) => {
                        let _ = reader_tx.send(Input::ReadError(e.to_string()));
                        return;
                    }
                }
            }
        })
        .expect("spawn the reader");
    // SIGHUP reads config.toml again, as `kiln/reloadConfig` does.
    let hup_tx = tx.clone();
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) {
        let _ = std::thread::Builder::new()
            .name("kiln-sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if hup_tx.send(Input::Reload).is_err() {
                        return;
                    }
                }
            });
    }
    let out = Out::new(output);
    let config = spec.config.clone();
    let mut server = Server {
        settings: spec.settings.clone(),
        spec: Arc::new(spec),
        out,
        tx,
        initialized: false,
        shutdown: false,
        encoding: PositionEncoding::Utf16,
        docs: HashMap::new(),
        engine: None,
        pool: None,
        load_error: None,
        deferred: Vec::new(),
        pool_loading: Default::default(),
        workspace: Arc::default(),
        root: None,
        ranker: Arc::new(Ranker::new(None, kiln_sandbox::breaker::DEFAULT_THRESHOLD)),
        pending: Arc::default(),
        progress: None,
        context_memo: None,
        shown: Arc::default(),
        served: Arc::default(),
        metrics: metrics.clone(),
        decisions: DecisionLog::start(config, metrics),
        ab: ab::Ab::default(),
        indexing: None,
    };
    server.serve(&rx)
}

impl Server {
    /// Handles the client's messages until it exits; then writes what the
    /// experiments' replies recorded.
    fn serve(&mut self, rx: &Receiver<Input>) -> i32 {
        let code = self.serve_messages(rx);
        self.ab
            .flush(&self.spec.config, &mut |_, m| eprintln!("{m}"));
        code
    }

    fn serve_messages(&mut self, rx: &Receiver<Input>) -> i32 {
        while let Ok(input) = rx.recv() {
            match input {
                Input::Frame(Frame::Json(v)) => {
                    if let Some(code) = self.message(v, false) {
                        return code;
                    }
                }
                Input::Frame(Frame::LoneSurrogates(v)) => {
                    if let Some(code) = self.message(v, true) {
                        return code;
                    }
                }
                Input::Frame(Frame::Malformed(why)) => {
                    self.out.error(&Value::Null, PARSE_ERROR, &why);
                }
                Input::Frame(Frame::TooLarge(n)) => self.out.error(
                    &Value::Null,
                    INVALID_REQUEST,
                    &format!(
                        "the message has {n} bytes, more than the {MAX_MESSAGE_BYTES} kiln accepts; it was skipped"
                    ),
                ),
                Input::ReadError(e) => {
                    eprintln!("kiln: the client's input failed: {e}");
                    return 1;
                }
                Input::Eof => return if self.shutdown { 0 } else { 1 },
                Input::Loaded(result) => self.loaded(result),
                Input::PoolLoaded(model, result) => {
                    self.pool_loading.remove(&model);
                    match result {
                        Ok(()) => self.out.log(3, &format!("kiln: loaded {model}")),
                        Err(e) => self
                            .out
                            .log(1, &format!("kiln: {model} cannot be loaded: {e}")),
                    }
                    // The completions that waited go on (to the next model
                    // of their route if this one failed).
                    for (id, method, params) in std::mem::take(&mut self.deferred) {
                        self.request(id, method, params);
                    }
                }
                Input::Reload => match self.reload_config() {
                    Ok(r) => self.out.log(
                        3,
                        &format!(
                            "kiln: read {} again (SIGHUP): {}",
                            self.spec.config.config_file.display(),
                            r["ranking"]
                        ),
                    ),
                    Err((_, e)) => self.out.log(1, &format!("kiln: {e}")),
                },
                Input::Indexed(indexed) => {
                    let (ws, stats) = *indexed;
                    let msg = format!(
                        "indexed {} files ({} chunks, {} definitions) for context in {:.1} s: {} parsed, {} from the persisted index",
                        ws.files(),
                        ws.chunks(),
                        ws.definitions(),
                        stats.seconds,
                        stats.parsed,
                        stats.reused
                    );
                    *self.workspace.write().unwrap_or_else(|p| p.into_inner()) = ws;
                    self.out.log(4, &msg);
                    if let Some(e) = stats.cache_error {
                        self.out.log(2, &format!("the persisted index was not used: {e}"));
                    }
                    if self.indexing.take() == Some(true) {
                        self.reindex();
                    }
                }
            }
        }
        1
    }

    /// Handles one message; `Some(code)` ends the session. A message with
    /// `lone_surrogates` had them replaced by U+FFFD on the way in.
    fn message(&mut self, v: Value, lone_surrogates: bool) -> Option<i32> {
        let id = v.get("id").cloned();
        let params = v.get("params").cloned().unwrap_or(Value::Null);
        if !v.is_object() || v.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            let id = id.filter(valid_id).unwrap_or(Value::Null);
            self.out.error(
                &id,
                INVALID_REQUEST,
                "not a JSON-RPC 2.0 message (an object with \"jsonrpc\": \"2.0\")",
            );
            return None;
        }
        if let Some(bad) = id.as_ref().filter(|i| !valid_id(i)) {
            self.out.error(
                &Value::Null,
                INVALID_REQUEST,
                &format!("the id {bad} is neither a string nor an integer"),
            );
            return None;
        }
        let method = match v.get("method") {
            None => None,
            Some(Value::String(m)) => Some(m.clone()),
            Some(other) => {
                self.out.error(
                    &id.unwrap_or(Value::Null),
                    INVALID_REQUEST,
                    &format!("the method {other} is not a string"),
                );
                return None;
            }
        };
        if lone_surrogates && let Some(m) = &method {
            const WHY: &str = "it holds a lone UTF-16 surrogate (half of a character) in a string, which is not text";
            match (&id, m.as_str()) {
                (Some(id), _) => {
                    self.out
                        .error(id, INVALID_PARAMS, &format!("{m} was refused: {WHY}"));
                    return None;
                }
                (
                    None,
                    "textDocument/didOpen" | "textDocument/didChange" | "textDocument/didSave",
                ) => {
                    // Applied with U+FFFD in place of each half, then
                    // marked: the editor's text is not kiln's.
                    self.message(v.clone(), false);
                    if let Some(uri) = params["textDocument"]["uri"].as_str() {
                        self.sync_error(uri, format!("{m} was not applied as sent: {WHY}"));
                    }
                    return None;
                }
                (None, _) => {
                    self.out.show(1, &format!("kiln: {m} was ignored: {WHY}"));
                    return None;
                }
            }
        }
        let Some(method) = method else {
            // A response to one of our requests.
            if let (Some(id), Some(p)) = (&id, &mut self.progress)
                && id.as_str() == Some(p.create_id.as_str())
            {
                p.ready = true;
                for m in std::mem::take(&mut p.queued) {
                    self.out.notify("$/progress", m);
                }
            }
            return None;
        };
        match (id, method.as_str()) {
            (_, "exit") => return Some(if self.shutdown { 0 } else { 1 }),
            (Some(id), "initialize") => self.initialize(&id, &params),
            (Some(id), _) if !self.initialized => self.out.error(
                &id,
                SERVER_NOT_INITIALIZED,
                &format!("{method} before initialize"),
            ),
            (None, _) if !self.initialized => {} // notifications are dropped
            (Some(id), "shutdown") => {
                self.shutdown = true;
                for p in self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                {
                    p.control.cancel();
                }
                if let Some(e) = &self.engine {
                    e.shutdown();
                }
                self.out.reply(&id, Value::Null);
            }
            (Some(id), _) if self.shutdown => {
                self.out
                    .error(&id, INVALID_REQUEST, "the server is shutting down")
            }
            (None, "initialized") => self.start_loading(),
            (None, "$/cancelRequest") => {
                if let Some(target) = params.get("id") {
                    let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(p) = pending.get(&id_key(target)) {
                        p.explicit.store(true, Ordering::Release);
                        p.control.cancel();
                    }
                    drop(pending);
                    // A request waiting for the model to load is answered now.
                    if let Some(i) = self.deferred.iter().position(|(id, _, _)| id == target) {
                        let (id, _, _) = self.deferred.remove(i);
                        self.out.error(&id, REQUEST_CANCELLED, "cancelled");
                    }
                }
            }
            (None, "textDocument/didOpen") => {
                let td = &params["textDocument"];
                match (td["uri"].as_str(), td["text"].as_str()) {
                    (Some(uri), Some(text)) => {
                        let mut d = Document::new(text.to_string());
                        d.language = td["languageId"].as_str().map(str::to_string);
                        self.docs.insert(uri.to_string(), d);
                    }
                    _ => self.out.show(
                        1,
                        "kiln: textDocument/didOpen without textDocument.uri and textDocument.text was ignored",
                    ),
                }
            }
            (None, "textDocument/didChange") => self.did_change(&params),
            (None, "textDocument/didClose") => {
                if let Some(uri) = params["textDocument"]["uri"].as_str() {
                    self.docs.remove(uri);
                }
            }
            (None, "textDocument/didSave") => {
                if let (Some(uri), Some(text)) = (
                    params["textDocument"]["uri"].as_str(),
                    params.get("text").and_then(Value::as_str),
                ) && let Some(d) = self.docs.get_mut(uri)
                {
                    let language = d.language.take();
                    *d = Document::new(text.to_string());
                    d.language = language;
                }
                // A saved file changes what other files' completions see.
                self.reindex();
            }
            (None, "workspace/didChangeWatchedFiles") => self.reindex(),
            (None, "workspace/didChangeConfiguration") => {
                if let Some(s) = params.get("settings").and_then(|s| s.get("kiln")) {
                    self.apply_settings(s);
                }
            }
            (None, _) => {} // unknown notifications are ignored (LSP spec)
            (Some(id), m) => self.request(id, m.to_string(), params),
        }
        None
    }

    /// The client's settings over the current ones: a key it leaves out
    /// keeps its value (from `kiln serve`'s flags and `config.toml`, or
    /// the client's earlier settings).
    fn apply_settings(&mut self, v: &Value) {
        let mut merged = serde_json::to_value(&self.settings).unwrap_or_default();
        let given = match (merged.as_object_mut(), v.as_object()) {
            (Some(m), Some(o)) => {
                m.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                merged
            }
            _ => v.clone(),
        };
        let has_draft_model = self.spec.draft_model.is_some();
        match serde_json::from_value::<Settings>(given)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map(|()| s))
            .and_then(|s| {
                if s.draft == kiln_runtime::model::generate::Draft::Model && !has_draft_model {
                    Err(
                        "draft \"model\" needs a draft model: `kiln serve --draft MODEL`; \
                         give none or ngram"
                            .into(),
                    )
                } else {
                    Ok(s)
                }
            }) {
            Ok(s) => {
                if s.fim_template != self.settings.fim_template
                    && let (Some(e), Some(t)) = (&self.engine, &s.fim_template)
                    && let Ok(t) = FimTemplate::parse(t)
                {
                    let l = e.loaded();
                    if let Ok(new) = Loaded::load(
                        l.id.clone(),
                        l.path.clone(),
                        Some(t),
                        e.target(),
                        e.device(),
                    ) {
                        match &self.pool {
                            Some(p) => p.replace_first(new),
                            None => e.replace_model(new),
                        }
                    }
                }
                self.settings = s;
            }
            Err(e) => self.out.log(
                1,
                &format!("kiln: the settings were not applied, the previous ones stay: {e}"),
            ),
        }
    }

    fn initialize(&mut self, id: &Value, params: &Value) {
        if self.initialized {
            self.out
                .error(id, INVALID_REQUEST, "initialize was already called");
            return;
        }
        if let Some(opts) = params.get("initializationOptions")
            && !opts.is_null()
        {
            let before = self.settings.clone();
            self.apply_settings(opts);
            if self.settings.validate().is_err() {
                self.settings = before;
            }
        }
        self.encoding =
            PositionEncoding::negotiate(&params["capabilities"]["general"]["positionEncodings"]);
        if params["capabilities"]["window"]["workDoneProgress"].as_bool() == Some(true) {
            self.progress = Some(ProgressState {
                create_id: "kiln-progress-1".into(),
                ready: false,
                queued: Vec::new(),
            });
        }
        self.root = params["workspaceFolders"]
            .as_array()
            .and_then(|f| f.first())
            .and_then(|f| f["uri"].as_str())
            .or_else(|| params["rootUri"].as_str())
            .and_then(uri_to_path)
            .or_else(|| params["rootPath"].as_str().map(PathBuf::from));
        self.initialized = true;
        self.out.reply(
            id,
            json!({
                "capabilities": {
                    "positionEncoding": self.encoding.name(),
                    "textDocumentSync": {"openClose": true, "change": 2, "save": {"includeText": true}},
                    "completionProvider": {"resolveProvider": false, "triggerCharacters": [".", "(", " "]},
                    "inlineCompletionProvider": true,
                    "executeCommandProvider": {"commands": ["kiln.accepted"]},
                },
                "serverInfo": {"name": "kiln", "version": env!("CARGO_PKG_VERSION")},
            }),
        );
    }

    fn progress(&mut self, value: Value) {
        if let Some(p) = &mut self.progress {
            let msg = json!({"token": "kiln/load", "value": value});
            if p.ready {
                self.out.notify("$/progress", msg);
            } else {
                p.queued.push(msg);
            }
        }
    }

    fn start_loading(&mut self) {
        if let Some(p) = &self.progress {
            self.out.send(&json!({
                "jsonrpc": "2.0", "id": p.create_id, "method": "window/workDoneProgress/create",
                "params": {"token": "kiln/load"},
            }));
        }
        self.progress(
            json!({"kind": "begin", "title": "kiln: loading the model", "percentage": 0}),
        );
        let spec = self.spec.clone();
        let tx = self.tx.clone();
        let metrics = self.metrics.clone();
        let fim = self
            .settings
            .fim_template
            .as_deref()
            .and_then(|t| FimTemplate::parse(t).ok());
        std::thread::spawn(move || {
            let _ = tx.send(Input::Loaded(start_pool(&spec, fim, metrics)));
        });
        let mut logs = Vec::new();
        self.ranker = Arc::new(ranker(&self.spec.config, &mut |m| logs.push(m)));
        for m in logs {
            self.out.log(3, &m);
        }
        self.reindex();
    }

    /// Indexes the workspace in the background (only files changed since
    /// the persisted index was written are parsed); once more after the
    /// current run when asked while one runs.
    fn reindex(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        if !self.settings.workspace_context {
            return;
        }
        if let Some(again) = &mut self.indexing {
            *again = true;
            return;
        }
        self.indexing = Some(false);
        let tx = self.tx.clone();
        let cache = crate::index_cache::path(&self.spec.config);
        std::thread::spawn(move || {
            let _ = tx.send(Input::Indexed(Box::new(Workspace::index_cached(
                &root,
                cache.as_deref(),
            ))));
        });
    }

    fn loaded(&mut self, result: Result<Pool, String>) {
        match result {
            Ok(pool) => {
                let engine = pool.first();
                self.pool = Some(pool);
                let l = engine.loaded();
                let msg = format!(
                    "kiln: serving {} ({}, FIM template {})",
                    l.id,
                    l.path.display(),
                    l.fim.name()
                );
                self.progress(json!({"kind": "end", "message": msg}));
                self.out.log(3, &msg);
                self.engine = Some(engine);
            }
            Err(e) => {
                self.progress(json!({"kind": "end", "message": "failed"}));
                self.out
                    .log(1, &format!("kiln: cannot load the model: {e}"));
                self.load_error = Some(e);
            }
        }
        for (id, method, params) in std::mem::take(&mut self.deferred) {
            self.request(id, method, params);
        }
    }

    fn did_change(&mut self, params: &Value) {
        let Some(uri) = params["textDocument"]["uri"].as_str() else {
            self.out.show(
                1,
                "kiln: textDocument/didChange without textDocument.uri was ignored",
            );
            return;
        };
        let enc = self.encoding;
        let Some(doc) = self.docs.get_mut(uri) else {
            self.out.log(
                2,
                &format!("kiln: didChange for {uri}, which was not opened; ignored"),
            );
            return;
        };
        let was_in_sync = doc.out_of_sync().is_none();
        if let Err(e) = doc.apply_changes(&params["contentChanges"], enc)
            && was_in_sync
        {
            self.announce_out_of_sync(uri, &e);
        }
    }

    /// Marks `uri` as differing from the editor's copy and says so once.
    fn sync_error(&mut self, uri: &str, why: String) {
        if let Some(doc) = self.docs.get_mut(uri)
            && doc.mark_out_of_sync(why.clone())
        {
            self.announce_out_of_sync(uri, &why);
        }
    }

    fn announce_out_of_sync(&self, uri: &str, why: &str) {
        self.out.show(
            1,
            &format!(
                "kiln: an edit of {uri} could not be applied ({why}); kiln's copy differs from the editor's, so completions there wait until the editor sends the whole text again (close and reopen the file)"
            ),
        );
    }

    fn request(&mut self, id: Value, method: String, params: Value) {
        let needs_model = matches!(
            method.as_str(),
            "textDocument/completion"
                | "textDocument/inlineCompletion"
                | "kiln/status"
                | "kiln/context"
                | "kiln/explain"
        );
        if needs_model && self.engine.is_none() {
            if let Some(e) = &self.load_error {
                let e = e.clone();
                self.out
                    .error(&id, REQUEST_FAILED, &format!("no model is loaded: {e}"));
            } else {
                self.deferred.push((id, method, params));
            }
            return;
        }
        let result = match method.as_str() {
            "textDocument/completion" | "textDocument/inlineCompletion" => {
                return self.complete(id, &method, &params);
            }
            "kiln/status" => self.status(),
            "kiln/reloadConfig" => self.reload_config(),
            "kiln/document" => self.document(&params),
            "kiln/context" => self.context_preview(&params),
            "kiln/explain" => return self.explain(id, &params),
            "kiln/models" => {
                let served = self.pool.as_ref().map(Pool::status);
                self.with_registry(|r| {
                    Ok(json!({"models": r.models().map_err(|e| e.to_string())?, "served": served}))
                })
            }
            "kiln/plugins" => self
                .with_registry(|r| Ok(json!({"plugins": r.plugins().map_err(|e| e.to_string())?}))),
            "kiln/backends" => self.backends(),
            "workspace/executeCommand" => self.execute_command(&params),
            "kiln/experiments" => self.with_registry(|r| {
                let all = r.experiments().map_err(|e| e.to_string())?;
                let status = (all.iter())
                    .map(|e| r.experiment_status(e))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                Ok(json!({"experiments": status}))
            }),
            "kiln/abStart" => self.with_registry(|r| {
                let metric = params["metric"].as_str().unwrap_or("acceptance");
                let metric = kiln_registry::experiments::Metric::parse(metric)
                    .ok_or_else(|| format!("metric {metric}: acceptance or latency"))?;
                let text = |k: &str| params[k].as_str().unwrap_or("").to_string();
                let e = r
                    .start_experiment(
                        &text("name"),
                        &text("a"),
                        &text("b"),
                        params["split"].as_f64().unwrap_or(0.5),
                        metric,
                        "kiln serve (language server)",
                    )
                    .map_err(|e| e.to_string())?;
                Ok(json!({"experiment": e}))
            }),
            "kiln/abStop" => self.with_registry(|r| {
                let winner = params["winner"]
                    .as_str()
                    .map(|w| {
                        kiln_registry::experiments::Arm::parse(w)
                            .ok_or(format!("winner {w}: a or b"))
                    })
                    .transpose()?;
                let e = r
                    .stop_experiment(
                        params["name"].as_str().unwrap_or(""),
                        winner,
                        "stopped from the editor (kiln/abStop)",
                        "kiln serve (language server)",
                    )
                    .map_err(|e| e.to_string())?;
                Ok(json!({"experiment": e}))
            }),
            "kiln/activateModel" => self.activate(&params, false),
            "kiln/rollbackModel" => self.activate(&params, true),
            _ => {
                self.out.error(
                    &id,
                    METHOD_NOT_FOUND,
                    &format!("kiln does not implement {method}"),
                );
                return;
            }
        };
        match result {
            Ok(v) => self.out.reply(&id, v),
            Err((code, msg)) => self.out.error(&id, code, &msg),
        }
    }

    fn with_registry(
        &self,
        f: impl FnOnce(&mut kiln_registry::Registry) -> Result<Value, String>,
    ) -> Result<Value, (i32, String)> {
        let mut r =
            Registry::open_home(&self.spec.config).map_err(|e| (REQUEST_FAILED, e.to_string()))?;
        f(&mut r).map_err(|e| (REQUEST_FAILED, e))
    }

    fn status(&self) -> Result<Value, (i32, String)> {
        let engine = self.engine.as_ref().expect("checked by the caller");
        let ws = self.workspace.read().unwrap_or_else(|p| p.into_inner());
        let mut v = serde_json::to_value(engine.status()).expect("status serialises");
        v["workspace"] = json!({
            "root": ws.root,
            "files": ws.files(),
            "chunks": ws.chunks(),
            "definitions": ws.definitions(),
            "memory_bytes": ws.memory_bytes(),
        });
        v["policy"] = self.policy_status();
        v["metrics_address"] = json!(self.spec.metrics_address);
        v["open_documents"] = json!(self.docs.len());
        v["settings"] = serde_json::to_value(&self.settings).expect("settings serialise");
        v["draft_model"] = json!(engine.draft_model());
        if let Some(p) = &self.pool {
            v["models"] = json!(p.status());
            v["pool"] = json!({"budget_bytes": p.budget(), "used_bytes": p.used()});
        }
        Ok(v)
    }

    /// The ranking policy: the one in use, its breaker, the decisions
    /// logged, and the policies the registry holds disabled by a trip
    /// (from this process or an earlier one).
    fn policy_status(&self) -> Value {
        let tripped_in_registry: Vec<Value> = Registry::open_home(&self.spec.config)
            .and_then(|r| r.policies())
            .map(|all| {
                all.into_iter()
                    .filter(|p| {
                        p.kind == "rank"
                            && p.state == "disabled"
                            && p.failures >= i64::from(kiln_sandbox::breaker::DEFAULT_THRESHOLD)
                    })
                    .map(|p| json!({"policy": p.label(), "failures": p.failures}))
                    .collect()
            })
            .unwrap_or_default();
        let r = &self.ranker;
        json!({
            "active": r.policy().map(|p| p.meta.label()),
            "ranker": match (r.policy(), r.is_tripped()) {
                (None, _) => "builtin",
                (Some(_), true) => "builtin (the policy's circuit breaker is open)",
                (Some(_), false) => "policy",
            },
            "params": (r.param_values().into_iter()).map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<String, Value>>(),
            "breaker_open": r.is_tripped(),
            "consecutive_failures": r.consecutive_failures(),
            "last_error": r.last_error(),
            "decisions": self.decisions.status(),
            "disabled_by_breaker": tripped_in_registry,
        })
    }

    /// Reads config.toml again (`kiln/reloadConfig`, SIGHUP): the ranking
    /// policy and its parameters (`[policies]`, and the registry's active
    /// policy) take effect for the next completion; what the running
    /// engine was started with (`[engine]`, `[kv_cache]`, `[completion]`'s
    /// defaults, `[plugins]`) at the next start. A file that cannot be
    /// used is refused and the configuration in use stays.
    fn reload_config(&mut self) -> Result<Value, (i32, String)> {
        let old = &self.spec.config;
        let fresh = kiln_registry::config::Config::with_file(
            old.home.clone(),
            std::env::var_os("KILN_PLUGIN_PATH").as_deref(),
            Some(old.config_file.clone()),
        );
        if let Some(e) = &fresh.config_error {
            return Err((
                REQUEST_FAILED,
                format!("{e}; the configuration in use stays"),
            ));
        }
        // The models and routes first: a route naming no model, or a bad
        // glob, refuses the whole file.
        let unloaded = match &self.pool {
            Some(p) => p.reload(&fresh).map_err(|e| {
                (
                    REQUEST_FAILED,
                    format!("{e}; the configuration in use stays"),
                )
            })?,
            None => Vec::new(),
        };
        let mut spec = (*self.spec).clone();
        spec.config = fresh;
        self.spec = Arc::new(spec);
        let mut logs = Vec::new();
        let (ranker, problems) =
            crate::start::ranker_checked(&self.spec.config, &mut |m| logs.push(m));
        self.ranker = Arc::new(ranker);
        for m in logs.iter().chain(&problems) {
            self.out.log(3, m);
        }
        Ok(json!({
            "config_file": self.spec.config.config_file,
            "ranking": self.policy_status(),
            "problems": problems,
            "applied": ["policies", "models", "routes", "pool"],
            "unloaded": unloaded,
            "models": self.pool.as_ref().map(Pool::status),
            "at_next_start": ["engine", "kv_cache", "completion", "plugins", "store"],
        }))
    }

    /// The prompt a completion at a position would send: the snippets
    /// chosen (tokens, score, why) and the whole prompt, token-exact.
    fn context_preview(&self, params: &Value) -> Result<Value, (i32, String)> {
        self.preview_at(params)
            .map(|p| serde_json::to_value(p).expect("a preview serialises"))
    }

    fn preview_at(&self, params: &Value) -> Result<crate::preview::Preview, (i32, String)> {
        let usage = "kiln/context takes {\"textDocument\": {\"uri\": URI}, \"position\": {\"line\": L, \"character\": C}}";
        let uri =
            (params["textDocument"]["uri"].as_str()).ok_or((INVALID_PARAMS, usage.to_string()))?;
        let pos = document::parse_position(params.get("position"), "position")
            .map_err(|e| (INVALID_PARAMS, format!("{e}; {usage}")))?;
        let doc = self.docs.get(uri).ok_or_else(|| {
            (
                INVALID_PARAMS,
                format!("{uri} is not open (send textDocument/didOpen first)"),
            )
        })?;
        let offset = document::offset(&doc.text, pos, self.encoding, "position")
            .map_err(|e| (INVALID_PARAMS, e.to_string()))?;
        let engine = self.engine.as_ref().expect("checked by the caller");
        let loaded = engine.loaded();
        let others = self.other_documents(uri);
        let open = open_docs(&others);
        let rel = self.relative(uri);
        let second = self.second_query(uri, pos.line);
        let at = crate::preview::At {
            path: &rel,
            text: &doc.text,
            offset,
            last_completion: second.as_deref(),
        };
        let ws = self.workspace.read().unwrap_or_else(|p| p.into_inner());
        let limit = engine
            .n_ctx()
            .saturating_sub(self.settings.max_tokens)
            .max(1);
        crate::preview::preview(
            &loaded,
            &ws,
            &open,
            &at,
            &self.settings,
            &self.ranker,
            limit,
        )
        .map_err(|e| (REQUEST_FAILED, e))
    }

    /// Why a completion comes out as it does: the inline completion
    /// served with the id `id`, or the one at a position (its prompt built
    /// as a completion there would build it). The prompt (each snippet
    /// with why it was chosen), then, computed on the engine without
    /// holding up this loop, how much each snippet, block of the file
    /// before the cursor and line of the most important ones makes the
    /// completion likely, and the completion without the most important
    /// one.
    fn explain(&mut self, id: Value, params: &Value) {
        let budget = match kiln_runtime::model::explain::budget(&params["budgetTokens"]) {
            Ok(b) => b,
            Err(e) => {
                return self
                    .out
                    .error(&id, INVALID_PARAMS, &format!("budgetTokens {e}"));
            }
        };
        let engine = self.engine.clone().expect("checked by the caller");
        let found = if params["id"].is_null() {
            self.preview_at(params)
                .map(|p| (p, params["completion"].as_str().map(str::to_string)))
                .map_err(|(code, msg)| (code, msg.replace("kiln/context", "kiln/explain")))
        } else {
            self.served_preview(&engine, params)
        };
        let (preview, completion) = match found {
            Ok(v) => v,
            Err((code, msg)) => return self.out.error(&id, code, &msg),
        };
        let parts = explain_parts(&preview);
        let prompt = preview.prompt.clone();
        let rx = engine.explain(
            0,
            kiln_runtime::model::explain::Ask {
                prompt,
                parts,
                completion,
                max_tokens: self.settings.max_tokens,
                budget_tokens: budget,
                counterfactual: true,
                attention: params["attention"].as_bool().unwrap_or(false),
            },
        );
        let out = self.out.clone();
        std::thread::spawn(move || match rx.recv() {
            Ok(Ok(e)) => out.reply(&id, json!({"explanation": e, "context": preview})),
            Ok(Err(e)) => out.error(&id, REQUEST_FAILED, &e),
            Err(_) => out.error(&id, REQUEST_FAILED, "the engine stopped before explaining"),
        });
    }

    /// The prompt and text of the inline completion `params.id` shown:
    /// refused when it is not among the last [`SERVED_KEPT`], or was served
    /// by another model than the one loaded now.
    fn served_preview(
        &self,
        engine: &Engine,
        params: &Value,
    ) -> Result<(crate::preview::Preview, Option<String>), (i32, String)> {
        let Some(want) = params["id"].as_str() else {
            return Err((
                INVALID_PARAMS,
                "id must be a string: an inline completion's (its kiln.accepted command's argument)"
                    .into(),
            ));
        };
        if !params["position"].is_null() || !params["completion"].is_null() {
            return Err((
                INVALID_PARAMS,
                "give id (an inline completion served before) or a position, not both".into(),
            ));
        }
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let Some(item) = served.iter().find(|i| i.id == want) else {
            return Err((
                INVALID_PARAMS,
                format!(
                    "no completion {want:?} is kept: the last {SERVED_KEPT} inline completions are"
                ),
            ));
        };
        let loaded = engine.loaded();
        if item.model != loaded.id {
            return Err((
                REQUEST_FAILED,
                format!(
                    "{want} was served by {}; kiln now serves {}",
                    item.model, loaded.id
                ),
            ));
        }
        let preview = crate::preview::assemble(&loaded, item.parts.clone());
        Ok((preview, Some(item.text.clone())))
    }

    /// `workspace/executeCommand`: `kiln.accepted` with `{"completion":
    /// ID, "acceptedLength": N}` (N optional: a partial accept) says the
    /// user accepted that inline item.
    fn execute_command(&mut self, params: &Value) -> Result<Value, (i32, String)> {
        let command = params["command"].as_str().unwrap_or("");
        if command != "kiln.accepted" {
            return Err((
                INVALID_PARAMS,
                format!("kiln has no command {command:?} (it has kiln.accepted)"),
            ));
        }
        let arg = &params["arguments"][0];
        let Some(completion) = arg["completion"].as_str() else {
            return Err((
                INVALID_PARAMS,
                "kiln.accepted takes [{\"completion\": ID, \"acceptedLength\": N}], the arguments of the item's command".into(),
            ));
        };
        let chars = arg["acceptedLength"].as_u64();
        self.metrics.completions_accepted.inc();
        let out = self.out.clone();
        let in_experiment =
            self.ab
                .accepted(&self.spec.config, completion, chars, &mut |level, m| {
                    out.log(level, m)
                });
        Ok(json!({"recorded": true, "experiment": in_experiment}))
    }

    /// kiln's copy of an open document, to compare with the editor's.
    fn document(&self, params: &Value) -> Result<Value, (i32, String)> {
        let uri = params["textDocument"]["uri"].as_str().ok_or((
            INVALID_PARAMS,
            "kiln/document takes {\"textDocument\": {\"uri\": URI}}".to_string(),
        ))?;
        let doc = self
            .docs
            .get(uri)
            .ok_or((INVALID_PARAMS, format!("{uri} is not open")))?;
        Ok(json!({
            "text": doc.text,
            "outOfSync": doc.out_of_sync(),
            "positionEncoding": self.encoding.name(),
        }))
    }

    fn backends(&self) -> Result<Value, (i32, String)> {
        let mut registry =
            Registry::open_home(&self.spec.config).map_err(|e| (REQUEST_FAILED, e.to_string()))?;
        let set = kiln_runtime::backend::BackendSet::load(&registry);
        let (ranked, problems) =
            kiln_runtime::backend::rank_devices(&set, &mut registry, false, |_| {});
        let devices: Vec<Value> = ranked
            .iter()
            .map(|r| {
                let b = set.backends.iter().find(|b| b.name() == r.backend);
                json!({
                    "backend": r.backend,
                    "device": r.device,
                    "name": b.map(|b| b.devices[r.device as usize].name.clone()),
                    "score": r.score,
                })
            })
            .collect();
        let serving = self.engine.as_ref().map(|e| e.status().backend);
        let all_problems = [set.problems.clone(), problems].concat();
        Ok(json!({"devices": devices, "serving": serving, "problems": all_problems}))
    }

    fn activate(&mut self, params: &Value, rollback: bool) -> Result<Value, (i32, String)> {
        let actor = "kiln serve (LSP)";
        let (name, spec) = if rollback {
            let name = params["name"].as_str().ok_or((
                INVALID_PARAMS,
                "kiln/rollbackModel takes {\"name\": NAME}".to_string(),
            ))?;
            (name, name)
        } else {
            let spec = params["model"].as_str().ok_or((
                INVALID_PARAMS,
                "kiln/activateModel takes {\"model\": \"NAME@VERSION\"}".to_string(),
            ))?;
            let (name, _) = spec
                .split_once('@')
                .filter(|(_, v)| v.parse::<u32>().is_ok())
                .ok_or((
                    INVALID_PARAMS,
                    format!("{spec:?} must be NAME@VERSION, e.g. coder@2"),
                ))?;
            (name, spec)
        };
        let mut result = self.with_registry(|r| {
            let t = if rollback {
                r.rollback(Kind::Model, spec, actor)
            } else {
                r.enable(Kind::Model, spec, actor)
            }
            .map_err(|e| e.to_string())?;
            Ok(json!({"name": name, "before": t.before, "after": t.after}))
        })?;
        let name = name.to_string();
        // Serve the newly active version.
        let (id, path) = store::resolve_served(&self.spec.config, Some(&name))
            .map_err(|e| (REQUEST_FAILED, e.to_string()))?;
        let fim = self
            .settings
            .fim_template
            .as_deref()
            .and_then(|t| FimTemplate::parse(t).ok());
        // Without an engine (none started yet), loading only checks the file.
        let (target, device) = self.engine.as_ref().map_or_else(
            || (kiln_runtime::backend::Backend::reference_cpu(), 0),
            |e| (e.target().clone(), e.device()),
        );
        match Loaded::load(id.clone(), path, fim, &target, device) {
            Ok(l) => {
                match (&self.pool, &self.engine) {
                    (Some(p), _) => p.replace_first(l),
                    (None, Some(e)) => e.replace_model(l),
                    (None, None) => {}
                }
                result["serving"] = json!(id);
                self.out.log(3, &format!("kiln: now serving {id}"));
            }
            Err(e) => {
                return Err((
                    REQUEST_FAILED,
                    format!(
                        "the registry now points at {id}, but it cannot be loaded ({e}); the previous model is still served, and `kiln models rollback {name}` undoes the change"
                    ),
                ));
            }
        }
        Ok(result)
    }

    fn complete(&mut self, id: Value, method: &str, params: &Value) {
        let received = std::time::Instant::now();
        let inline = method == "textDocument/inlineCompletion";
        let Some(uri) = params["textDocument"]["uri"].as_str() else {
            return self
                .out
                .error(&id, INVALID_PARAMS, "textDocument.uri is missing");
        };
        let pos = match document::parse_position(params.get("position"), "position") {
            Ok(p) => p,
            Err(e) => return self.out.error(&id, INVALID_PARAMS, &e.to_string()),
        };
        let line = pos.line;
        let Some(doc) = self.docs.get(uri) else {
            return self.out.error(
                &id,
                INVALID_PARAMS,
                &format!("{uri} is not open (send textDocument/didOpen first)"),
            );
        };
        if let Some(why) = doc.out_of_sync() {
            return self.out.error(
                &id,
                REQUEST_FAILED,
                &format!(
                    "kiln's copy of {uri} differs from the editor's since an edit could not be applied ({why}); close and reopen the file"
                ),
            );
        }
        let at = match document::offset(&doc.text, pos, self.encoding, "position") {
            Ok(at) => at,
            Err(e) => return self.out.error(&id, INVALID_PARAMS, &e.to_string()),
        };
        let pool = self.pool.clone().expect("loaded with the engine");
        let rel = self.relative(uri);
        let language = doc.language.clone();
        let mut plan = pool
            .plan(&pool::Ask {
                kind: kiln_registry::config::RequestKind::Inline,
                model: None,
                path: Some(&rel),
                language: language.as_deref(),
            })
            .expect("a route names no model of its own");
        // A model not loaded yet loads on a thread of its own; the request
        // waits for it while the editor's other messages are served.
        if let Some(m) = pool.unloaded_next(&plan) {
            self.deferred.push((id, method.to_string(), params.clone()));
            if self.pool_loading.insert(m.id.clone()) {
                self.out
                    .log(3, &format!("kiln: loading {} for a completion", m.id));
                let (pool, tx) = (pool.clone(), self.tx.clone());
                std::thread::spawn(move || {
                    let result = pool.load(&m);
                    let _ = tx.send(Input::PoolLoaded(m.id.clone(), result));
                });
            }
            return;
        }
        // The route's first usable model.
        let Some((member, engine)) = pool.next_engine(&mut plan) else {
            return self.out.error(
                &id,
                REQUEST_FAILED,
                &format!(
                    "no model of the route ({}) can answer now: {}",
                    plan.models().join(" → "),
                    plan.failures()
                ),
            );
        };
        let (loaded, tag) = if inline && pool.is_first(&member) {
            let unit = (self.settings.ab_unit.clone())
                .or_else(|| self.root.as_ref().map(|r| r.display().to_string()))
                .unwrap_or_else(|| format!("lsp-{}", std::process::id()));
            let fim =
                (self.settings.fim_template.as_deref()).and_then(|t| FimTemplate::parse(t).ok());
            let out = self.out.clone();
            let (l, t) = self.ab.choose(
                &self.spec.config,
                &engine,
                fim,
                &unit,
                uri,
                None,
                &mut |level, m| out.log(level, m),
            );
            (l, Some(t))
        } else {
            (engine.loaded(), None)
        };
        // The prompt's room: the window less the completion's tokens; the
        // budgets as they fit it.
        let limit = engine
            .n_ctx()
            .saturating_sub(self.settings.max_tokens)
            .max(1);
        let fitted = self.settings.within(limit);
        let s = &fitted;
        let counter = Counter::of(&loaded);
        let (prefix, suffix) = crate::preview::cut(&loaded, &doc.text, at, s);
        // The completion shown last on this line, if any: once there is
        // one, the line's context is chosen once more with it as the
        // second query, then kept.
        let second = self.second_query(uri, line);
        let memo = match self.context_memo.take() {
            Some(m) if m.uri == uri && m.line == line && (m.second_query || second.is_none()) => m,
            _ => {
                let others = self.other_documents(uri);
                let open = open_docs(&others);
                let ws = self.workspace.read().unwrap_or_else(|p| p.into_inner());
                let at = context::SelectAt {
                    path: &rel,
                    prefix,
                    suffix,
                    last_completion: second.as_deref(),
                };
                let packed = context::select_with(
                    &ws,
                    &open,
                    &at,
                    &self.ranker,
                    &counter,
                    s.context_tokens,
                    context::Selection::Kiln,
                );
                let layout = json!({
                    "tokens": packed.tokens,
                    "ranked_by": packed.ranked_by,
                    "snippets": packed.snippets.iter().map(|c| json!({
                        "path": c.path,
                        "start_line": c.start_line,
                        "end_line": c.end_line,
                        "tokens": c.tokens,
                        "score": c.score,
                    })).collect::<Vec<_>>(),
                });
                let mut packed = packed;
                let decision =
                    (packed.call.take()).map(|c| self.decisions.log(c, self.ranker.clone()));
                packed.ranking = Vec::new();
                ContextMemo {
                    uri: uri.to_string(),
                    line,
                    second_query: second.is_some(),
                    layout,
                    packed,
                    decision,
                }
            }
        };
        let context_text = memo.packed.text.clone();
        let layout = memo.layout.clone();
        let decision = memo.decision.clone();
        self.context_memo = Some(memo);
        let repo = (self.workspace.read())
            .unwrap_or_else(|p| p.into_inner())
            .repo_name();
        let file = repo.as_deref().map(|r| (r, rel.as_str()));
        let prompt = match prompt::fim_tokens(&loaded, &context_text, prefix, suffix, file, limit) {
            Ok(p) => p,
            Err(e) => return self.out.error(&id, REQUEST_FAILED, &e.to_string()),
        };
        let prompt_tokens = prompt.len();
        *self
            .metrics
            .last_prompt
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(json!({
            "file": rel,
            "prompt_tokens": prompt.len(),
            "limit_tokens": limit,
            "context_tokens": layout["tokens"],
            "context_budget_tokens": s.context_tokens,
            "ranked_by": layout["ranked_by"],
            "snippets": layout["snippets"],
        }));
        let mut sampling = SamplingParams::greedy();
        sampling.temperature = s.temperature;
        // The same completion for a fallback model, in its tokens.
        let build: pool::Build = {
            let (context_text, prefix, suffix) =
                (context_text.clone(), prefix.to_string(), suffix.to_string());
            let (repo, rel) = (repo.clone(), rel.clone());
            let (max_tokens, mode, draft, draft_max) = (s.max_tokens, s.mode, s.draft, s.draft_max);
            let sampling = sampling.clone();
            Arc::new(move |l, n_ctx| {
                let limit = n_ctx.saturating_sub(max_tokens).max(1);
                let file = repo.as_deref().map(|r| (r, rel.as_str()));
                let prompt = prompt::fim_tokens(l, &context_text, &prefix, &suffix, file, limit)
                    .map_err(|e| e.to_string())?;
                Ok(Request {
                    stop: (l.fim.stop_strings().iter())
                        .map(|s| s.to_string())
                        .collect(),
                    boundary: boundary(mode, &prefix, &suffix),
                    draft,
                    draft_max,
                    ..Request::new(prompt, max_tokens, sampling.clone())
                })
            })
        };
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&context_text, prefix, suffix, &rel, s.max_tokens).hash(&mut h);
            format!("{:?}{}", s.mode, s.temperature).hash(&mut h);
            h.finish()
        };
        let request = Request {
            stop: loaded
                .fim
                .stop_strings()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            boundary: boundary(s.mode, prefix, suffix),
            draft: s.draft,
            draft_max: s.draft_max,
            ..Request::new(prompt, s.max_tokens, sampling)
        };
        let served = match (&tag, &self.context_memo) {
            (Some(t), Some(memo)) => Some((
                self.served.clone(),
                ServedItem {
                    id: t.completion.clone(),
                    model: loaded.id.clone(),
                    parts: crate::preview::Parts {
                        path: rel.clone(),
                        repo: repo.clone(),
                        packed: memo.packed.clone(),
                        context_budget: s.context_tokens,
                        prefix: prefix.to_string(),
                        suffix: suffix.to_string(),
                        second_query: second.clone(),
                        prompt_tokens,
                    },
                    text: String::new(),
                },
            )),
            _ => None,
        };
        let explicit = Arc::new(AtomicBool::new(false));
        let id_key = id_key(&id);
        let sink = Reply {
            out: self.out.clone(),
            id,
            inline,
            position: params["position"].clone(),
            explicit: explicit.clone(),
            pending: self.pending.clone(),
            key: id_key.clone(),
            decision,
            tag,
            shown: (self.shown.clone(), uri.to_string(), line),
            served,
        };
        // Held across the submit, so that a job that ends at once finds
        // its entry to remove.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        // Debounce an automatic inline completion (not one the user
        // invoked): a keystroke meanwhile cancels it unstarted.
        let automatic = inline && params["context"]["triggerKind"] != 1;
        let not_before = (automatic && self.settings.debounce_ms > 0)
            .then(|| received + std::time::Duration::from_millis(self.settings.debounce_ms));
        let control = pool.submit(
            plan,
            (member, engine, loaded),
            request,
            pool::Job {
                client: 0,
                doc: Some(uri.to_string()),
                not_before,
                streaming: false,
                key: Some(key),
                build,
            },
            Box::new(sink),
        );
        pending.insert(id_key, Pending { control, explicit });
    }

    /// The open documents other than `uri`, by workspace-relative path.
    /// The completion shown last at `line` of `uri`, if the last one
    /// shown was there.
    fn second_query(&self, uri: &str, line: u32) -> Option<String> {
        let last = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        (last.as_ref())
            .filter(|(u, l, _)| u == uri && *l == line)
            .map(|(_, _, text)| text.clone())
    }

    fn other_documents(&self, uri: &str) -> Vec<(String, &Document)> {
        (self.docs.iter())
            .filter(|(u, _)| u.as_str() != uri)
            .map(|(u, d)| (self.relative(u), d))
            .collect()
    }

    fn relative(&self, uri: &str) -> String {
        let path = uri_to_path(uri).unwrap_or_else(|| PathBuf::from(uri));
        match &self.root {
            Some(r) => path
                .strip_prefix(r)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned(),
            None => path.to_string_lossy().into_owned(),
        }
    }
}

/// The parts of a completion's prompt to explain: each context snippet
/// (its block as the context packer recorded it: the line naming its file,
/// then its text), and the blocks of the text before the cursor but the
/// last (the one being completed).
fn explain_parts(preview: &crate::preview::Preview) -> Vec<kiln_runtime::model::explain::Part> {
    use kiln_runtime::model::explain::{Part, blocks_in};
    let prompt = preview.prompt.as_str();
    let mut parts = Vec::new();
    // Each snippet where the context packer put its block.
    if let Some(at) = preview.context_start {
        for s in &preview.snippets {
            parts.push(Part {
                start: at + s.block.start,
                end: at + s.block.end,
                kind: "snippet".into(),
                label: format!("{}:{}", s.path, s.start_line + 1),
            });
        }
    }
    if let Some(r) = &preview.prefix_range {
        let mut own = blocks_in(prompt, r.start, r.end);
        own.pop();
        parts.extend(own);
    }
    parts
}

/// Open documents as context sources.
fn open_docs<'a>(docs: &'a [(String, &'a Document)]) -> Vec<OpenDoc<'a>> {
    (docs.iter())
        .map(|(p, d)| OpenDoc {
            path: p,
            text: &d.text,
            opened: d.opened,
            edited: d.edited,
            edits: &d.edits,
        })
        .collect()
}

/// Answers a completion request when its job ends, on the engine thread:
/// no thread waits for it.
struct Reply {
    out: Out,
    id: Value,
    inline: bool,
    position: Value,
    /// Cancelled by `$/cancelRequest` (answered RequestCancelled) rather
    /// than by a newer request for the same document (answered empty).
    explicit: Arc<AtomicBool>,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
    key: String,
    decision: Option<PendingDecision>,
    /// Inline items: the completion's id and experiment.
    tag: Option<ab::Tag>,
    /// Where the completion is remembered once shown: (the server's
    /// last shown completion, uri, line).
    shown: (Shown, String, u32),
    /// Inline completions: where one shown is kept for `kiln/explain`,
    /// and what its prompt was made of.
    served: Option<(ServedLog, ServedItem)>,
}

impl Sink for Reply {
    fn text(&mut self, _: &str) -> bool {
        true // LSP answers once, with the whole completion
    }

    fn done(self: Box<Self>, result: Result<Finished, String>) {
        let Reply {
            out,
            id,
            inline,
            position,
            explicit,
            pending,
            key,
            decision,
            tag,
            shown,
            served,
        } = *self;
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let f = match result {
            Err(e) => {
                if let Some(t) = tag {
                    t.served(None, true);
                }
                return out.error(&id, REQUEST_FAILED, &e);
            }
            Ok(f) => f,
        };
        if f.generation.stop_reason == StopReason::Cancelled {
            return if explicit.load(Ordering::Acquire) {
                out.error(&id, REQUEST_CANCELLED, "cancelled")
            } else if inline {
                out.reply(&id, json!({"items": []}))
            } else {
                out.reply(&id, json!({"isIncomplete": true, "items": []}))
            };
        }
        let text = f.generation.text;
        if let Some((log, mut item)) = served.filter(|_| !text.is_empty()) {
            item.text = text.clone();
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() == SERVED_KEPT {
                log.pop_front();
            }
            log.push_back(item);
        }
        if !text.trim().is_empty() {
            let (last, uri, line) = shown;
            *last.lock().unwrap_or_else(|p| p.into_inner()) = Some((uri, line, text.clone()));
        }
        let range = json!({"start": position, "end": position});
        let meta = json!({
            "time_to_first_token_ms": f.time_to_first_token_ms,
            "total_ms": f.total_ms,
            "cached_tokens": f.generation.timings.cached_tokens,
            "prompt_tokens": f.generation.timings.prompt_tokens,
            "completion_cache_hit": f.completion_cache_hit,
            "stop_reason": f.generation.stop_reason,
            "policy_decision": decision.as_ref().and_then(PendingDecision::id),
            "route": f.route,
        });
        if inline {
            let mut meta = meta;
            let items = match &tag {
                _ if text.is_empty() => vec![],
                Some(t) => {
                    meta["completion"] = json!(t.completion);
                    meta["experiment"] = t.meta();
                    vec![json!({"insertText": text, "range": range, "command": t.command()})]
                }
                None => vec![json!({"insertText": text, "range": range})],
            };
            if let Some(t) = tag {
                t.served(Some(f.total_ms), false);
            }
            return out.reply(&id, json!({"items": items, "kiln": meta}));
        }
        let items = if text.is_empty() {
            vec![]
        } else {
            let label: String = text
                .trim()
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect();
            vec![json!({
                "label": if label.is_empty() { text.clone() } else { label },
                "kind": 1,
                "detail": "kiln",
                "insertTextFormat": 1,
                "textEdit": {"range": range, "newText": text},
                "data": meta,
            })]
        };
        out.reply(&id, json!({"isIncomplete": true, "items": items}));
    }
}

/// `file:///a/b%20c` → `/a/b c`.
fn uri_to_path(uri: &str) -> Option<PathBuf> {
    let rest = uri.strip_prefix("file://")?;
    let mut bytes = Vec::with_capacity(rest.len());
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).ok()?, 16)
        {
            bytes.push(v);
            i += 3;
            continue;
        }
        bytes.push(b[i]);
        i += 1;
    }
    Some(PathBuf::from(String::from_utf8(bytes).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_uris_become_paths() {
        assert_eq!(
            uri_to_path("file:///tmp/a%20b.rs"),
            Some(PathBuf::from("/tmp/a b.rs"))
        );
        assert_eq!(
            uri_to_path("file:///%E4%B8%AD.rs"),
            Some(PathBuf::from("/中.rs"))
        );
        assert_eq!(uri_to_path("file:///%ff.rs"), None);
        assert_eq!(uri_to_path("untitled:1"), None);
    }
}
