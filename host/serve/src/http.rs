//! The HTTP API (`kiln serve --http ADDR`): OpenAI-compatible completions
//! and chat completions (streamed as server-sent events or not), model
//! list, Prometheus metrics, health. Errors use OpenAI's error shape.
//! Handlers wait on the engine's event channel, never on its lock, so
//! `/metrics` and `/healthz` answer while a generation runs.

use super::dashboard::Dashboard;
use super::engine::{Engine, Event, Events, Finished, Loaded};
use super::metrics::Metrics;
use super::pool::{self, Member, Plan, Pool};
use super::prompt;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use kiln_registry::config::RequestKind;
use kiln_runtime::model::generate::{Request, StopReason};
use kiln_runtime::model::sample::SamplingParams;
use kiln_runtime::tokenizer::EncodeError;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::ServiceExt;

/// Request bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

struct AppState {
    /// The first model's engine (explanations, experiments).
    engine: Engine,
    /// Every model served, routed.
    pool: Pool,
    /// The home of the registry experiments are read from and written to.
    config: Option<kiln_registry::config::Config>,
    ab: std::sync::Mutex<crate::ab::Ab>,
    next_id: AtomicU64,
    /// The last completions served whole (not streamed), for `POST
    /// /v1/explain` by id.
    served: std::sync::Mutex<std::collections::VecDeque<Served>>,
}

/// A completion kept for explaining.
struct Served {
    id: String,
    model: String,
    prompt: String,
    completion: String,
}

/// Completions kept for `/v1/explain`, and the longest prompt kept.
const SERVED_KEPT: usize = 64;
const SERVED_PROMPT_MAX: usize = 256 << 10;

type St = State<Arc<AppState>>;

pub fn router(pool: Pool, dashboard: Arc<Dashboard>) -> Router {
    let state = Arc::new(AppState {
        engine: pool.first(),
        pool,
        config: dashboard.config().cloned(),
        ab: Default::default(),
        next_id: AtomicU64::new(1),
        served: Default::default(),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/explain", post(explain))
        .route("/v1/feedback", post(feedback))
        .route("/v1/experiments", get(experiments))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(crate::dashboard::routes(dashboard))
        .fallback(not_found)
        .with_state(state)
}

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the process ends. `addr` should be a loopback address;
/// the caller warns otherwise. Each connection is served by hyper with a
/// deadline for its request headers, so a client that opens connections
/// and never finishes a request does not hold them forever.
/// `/dashboard` is served too.
pub async fn serve(
    pool: Pool,
    dashboard: Arc<Dashboard>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    serve_router(router(pool, dashboard), listener).await
}

/// `/metrics`, `/healthz` and `/dashboard` alone, beside the language
/// server (`kiln serve --metrics ADDR`).
pub async fn serve_metrics(
    metrics: Arc<Metrics>,
    dashboard: Arc<Dashboard>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<()> {
    let router = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { metrics_text(&m) }),
        )
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .merge(crate::dashboard::routes(dashboard))
        .fallback(not_found)
        .with_state(metrics);
    serve_router(router, listener).await
}

async fn serve_router(router: Router, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, a connection reset before it was
                // accepted: wait a moment and go on serving.
                eprintln!("kiln: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // A connection that fails (reset, timed out) concerns only its
            // client.
            let _ = connection.await;
        });
    }
}

struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: Some(param),
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("not_found"),
        param: None,
        message: "no such endpoint; kiln serves /v1/completions, /v1/chat/completions, /v1/models, /v1/explain, /v1/feedback, /v1/experiments, /metrics, /healthz and /dashboard".into(),
    }
}

async fn healthz(State(s): St) -> Response {
    axum::Json(json!({"status": "ok", "model": s.engine.loaded().id})).into_response()
}

/// `GET /v1/models`: every model of the pool, first the one a request
/// without a route goes to, with its state (`kiln`).
async fn models(State(s): St) -> Response {
    let data: Vec<Value> = (s.pool.status().into_iter())
        .map(
            |m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "kiln", "kiln": m}),
        )
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(s): St) -> Response {
    metrics_text(s.engine.metrics())
}

fn metrics_text(m: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// The fields kiln reads besides `model` (which `route` reads); others
/// (`user`, penalties, …) are ignored.
#[derive(Deserialize)]
struct Common {
    #[serde(default, deserialize_with = "integral")]
    max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stream: Option<bool>,
    stop: Option<Value>,
    #[serde(default, deserialize_with = "integral")]
    seed: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    n: Option<i64>,
    logprobs: Option<Value>,
    echo: Option<bool>,
    #[serde(default, deserialize_with = "integral")]
    best_of: Option<i64>,
}

/// An integer, also written as a float with no fraction (`4.0`), as
/// OpenAI's API accepts.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(v) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(i) = v.as_i64() {
        return Ok(Some(i));
    }
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
        _ => Err(serde::de::Error::custom(format!("{v} is not an integer"))),
    }
}

/// The request's body as a JSON object, read within [`BODY_TIMEOUT`] and
/// [`MAX_BODY_BYTES`].
async fn parse_body(req: axum::extract::Request) -> Result<Value, ApiError> {
    let refused = |status: StatusCode, message: String| ApiError {
        status,
        kind: "invalid_request_error",
        code: None,
        param: None,
        message,
    };
    let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => {
            return Err(refused(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(Err(e)) => {
            let e = e.into_inner();
            return Err(
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    refused(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                    )
                } else {
                    refused(
                        StatusCode::BAD_REQUEST,
                        format!("the request body could not be read: {e}"),
                    )
                },
            );
        }
        Ok(Ok(bytes)) => bytes,
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::bad(format!("the request body is not valid UTF-8: {e}")))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

/// Checks the shared parameters; returns the request (prompt unset), and
/// whether to stream.
fn common(v: &Value, n_ctx: usize, default_max: usize) -> Result<(Request, bool), ApiError> {
    let c = Common::deserialize(v).map_err(|e| ApiError::bad(format!("invalid request: {e}")))?;
    let max = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = match max {
        None => default_max,
        Some(n) if n >= 1 && (n as u64) < n_ctx as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be between 1 and {}, not {n}", n_ctx - 1),
            ));
        }
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, not {temperature}"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], not {top_p}"),
        ));
    }
    if let Some(n) = c.n
        && n != 1
    {
        return Err(ApiError::invalid("n", format!("n must be 1, not {n}")));
    }
    if c.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("best_of", "best_of must be 1"));
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|l| !l.is_null() && l != &json!(false))
    {
        return Err(ApiError::invalid(
            "logprobs",
            "kiln does not return logprobs",
        ));
    }
    if c.echo == Some(true) {
        return Err(ApiError::invalid("echo", "kiln does not echo the prompt"));
    }
    let stop: Vec<String> = match &c.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or an array of up to 4 strings",
            ));
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    let seed = match c.seed {
        Some(s) if s < 0 => {
            return Err(ApiError::invalid("seed", "seed must not be negative"));
        }
        Some(s) => s as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k: 0,
        top_p: top_p as f32,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed,
    };
    sampling.validate().map_err(ApiError::bad)?;
    Ok((
        Request {
            stop,
            ..Request::new(Vec::new(), max_tokens, sampling)
        },
        c.stream.unwrap_or(false),
    ))
}

fn model_not_found(m: &str, pool: &Pool) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: Some("model"),
        message: format!(
            "the model {m:?} does not exist here; kiln serves {} (GET /v1/models)",
            pool.ids().join(", ")
        ),
    }
}

/// `request` with `loaded`'s own stop strings (its template's) added.
fn with_model_stops(mut request: Request, loaded: &Loaded) -> Request {
    (request.stop).extend(loaded.fim.stop_strings().iter().map(|s| s.to_string()));
    request
}

/// The route of a request and its first model that can answer, loaded
/// if it was not (off the async runtime). `Err`: none could (every
/// model failed), with the plan to answer from the offline cache.
async fn route(
    s: &Arc<AppState>,
    kind: kiln_registry::config::RequestKind,
    v: &Value,
) -> Result<Result<(Plan, Arc<Member>, Engine), Plan>, ApiError> {
    if !(v["model"].is_null() || v["model"].is_string()) {
        return Err(ApiError::invalid("model", "model must be a string"));
    }
    let model = v["model"].as_str();
    let plan = s
        .pool
        .plan(&pool::Ask {
            kind,
            model,
            ..Default::default()
        })
        .map_err(|_| model_not_found(model.unwrap_or_default(), &s.pool))?;
    let first = |p: &Pool, mut plan: Plan| match p.next_engine(&mut plan) {
        Some((m, e)) => Ok((plan, m, e)),
        None => Err(plan),
    };
    if s.pool.unloaded_next(&plan).is_none() {
        // Loaded (or failed): no load to wait for off the async threads.
        return Ok(first(&s.pool, plan));
    }
    let p = s.pool.clone();
    tokio::task::spawn_blocking(move || first(&p, plan))
        .await
        .map_err(|e| engine_error(format!("routing failed: {e}")))
}

/// A request's identity whatever model of its route answers it (its body
/// less the fields that do not change the text; a model it names stays
/// part of it), for the offline cache.
fn request_key(path: &str, v: &Value) -> u64 {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["user", "stream", "stream_options"] {
            o.remove(k);
        }
    }
    let mut h = DefaultHasher::new();
    path.hash(&mut h);
    v.to_string().hash(&mut h);
    h.finish()
}

/// No model of the route could answer: the offline cache's answer, or
/// 503 with every failure.
fn unanswered(s: &AppState, plan: &Plan, key: u64) -> Result<Finished, ApiError> {
    s.pool.offline(plan, Some(key)).ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: Some("no_model_available"),
        param: None,
        message: format!(
            "no model of the route ({}) can answer now: {}; see GET /v1/models",
            plan.models().join(" → "),
            plan.failures()
        ),
    })
}

/// An HTTP request's routed job: `build` makes its request for a model
/// of the route other than the first.
fn job(addr: &SocketAddr, streaming: bool, key: u64, build: pool::Build) -> pool::Job {
    pool::Job {
        client: client_key(addr),
        doc: None,
        not_before: None,
        streaming,
        key: Some(key),
        build,
    }
}

fn client_key(addr: &SocketAddr) -> u64 {
    let mut h = DefaultHasher::new();
    addr.hash(&mut h);
    h.finish() | 1 // 0 is the language server's
}

/// What a prompt is made of.
#[derive(Clone)]
enum PromptText {
    /// Text as it is (a completion without a suffix, or a rendered chat,
    /// which carries its own BOS when it wants one).
    Plain { text: String, add_bos: bool },
    /// Prefix and suffix in the model's fill-in-the-middle template, as
    /// the language server makes them ([`prompt::fim_tokens`]).
    Fim { prefix: String, suffix: String },
}

/// The prompt's tokens, refused when they and `max_tokens` do not fit the
/// context. Tokenizing runs off the async runtime, and a prompt far over
/// the context is refused after about a context's worth of work, whatever
/// its length.
async fn encode(
    loaded: &Arc<Loaded>,
    text: PromptText,
    max_tokens: usize,
    n_ctx: usize,
) -> Result<Vec<u32>, ApiError> {
    let l = loaded.clone();
    tokio::task::spawn_blocking(move || encode_now(&l, text, max_tokens, n_ctx))
        .await
        .map_err(|e| engine_error(format!("tokenizing failed: {e}")))?
}

/// [`encode`] on this thread.
fn encode_now(
    loaded: &Loaded,
    text: PromptText,
    max_tokens: usize,
    n_ctx: usize,
) -> Result<Vec<u32>, ApiError> {
    let limit = n_ctx.saturating_sub(max_tokens);
    let encoded = match text {
        PromptText::Plain { text, add_bos } => loaded.tok.encode_within(&text, add_bos, limit),
        PromptText::Fim { prefix, suffix } => {
            prompt::fim_tokens(loaded, "", &prefix, &suffix, None, limit)
        }
    };
    match encoded {
        Ok(prompt) => Ok(prompt),
        Err(EncodeError::Failed(e)) => Err(ApiError::bad(e)),
        Err(EncodeError::TooLong { at_least, .. }) => Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("prompt"),
            message: format!(
                "the prompt has at least {at_least} tokens and max_tokens is {max_tokens}, more than the context of {n_ctx}; shorten the prompt or lower max_tokens"
            ),
        }),
    }
}

fn finish_reason(f: &Finished) -> &'static str {
    match f.generation.stop_reason {
        StopReason::MaxTokens => "length",
        _ => "stop",
    }
}

fn usage(f: &Finished) -> Value {
    let t = &f.generation.timings;
    let prompt = t.prompt_tokens + t.cached_tokens;
    let completion = f.generation.token_ids.len();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": t.cached_tokens},
    })
}

/// An OpenAI response object around one choice.
fn envelope(
    id: &str,
    object: &str,
    created: u64,
    model: &str,
    choice: Value,
    usage: Option<Value>,
) -> Value {
    let mut v = json!({
        "id": id, "object": object, "created": created, "model": model,
        "choices": [choice],
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/explain`: why the served model completes `prompt` as it
/// does ([`kiln_runtime::model::explain`]), computed on the engine thread
/// in turn with completions.
async fn explain(
    State(s): St,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: axum::extract::Request,
) -> Result<Response, ApiError> {
    let v = parse_body(body).await?;
    let loaded = s.engine.loaded();
    if let Some(m) = v["model"].as_str().filter(|m| *m != loaded.id) {
        return Err(ApiError::invalid(
            "model",
            format!(
                "explanations are of the first model, {}, not {m}",
                loaded.id
            ),
        ));
    }
    let (req, _) = common(&v, s.engine.n_ctx(), 16)?;
    // A completion served before, by its id: its prompt and text.
    let by_id = match &v["id"] {
        Value::Null => None,
        Value::String(id) => {
            if !v["prompt"].is_null() || !v["completion"].is_null() {
                return Err(ApiError::invalid(
                    "id",
                    "give id (a completion served before) or prompt, not both",
                ));
            }
            let kept = s.served.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = kept.iter().find(|c| &c.id == id) else {
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    kind: "invalid_request_error",
                    code: Some("completion_not_found"),
                    param: Some("id"),
                    message: format!(
                        "no completion {id:?} is kept: the last {SERVED_KEPT} completions served whole (not streamed) are"
                    ),
                });
            };
            if c.model != loaded.id {
                return Err(ApiError::invalid(
                    "id",
                    format!(
                        "{id} was served by {}; kiln now serves {}",
                        c.model, loaded.id
                    ),
                ));
            }
            Some((c.prompt.clone(), c.completion.clone()))
        }
        _ => {
            return Err(ApiError::invalid(
                "id",
                "id must be a string such as cmpl-1",
            ));
        }
    };
    let prompt = match (&v["prompt"], &by_id) {
        (_, Some((p, _))) => p.clone(),
        (Value::String(p), None) if !p.is_empty() => p.clone(),
        (Value::Null, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt (or the id of a served completion) is required",
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a non-empty string",
            ));
        }
    };
    let completion = match &v["completion"] {
        Value::Null if by_id.is_some() => by_id.map(|(_, c)| c).filter(|c| !c.is_empty()),
        Value::Null => None,
        Value::String(c) if !c.is_empty() => Some(c.clone()),
        _ => {
            return Err(ApiError::invalid(
                "completion",
                "completion must be a non-empty string (or left out: the model's own)",
            ));
        }
    };
    let budget_tokens = kiln_runtime::model::explain::budget(&v["budget_tokens"])
        .map_err(|e| ApiError::invalid("budget_tokens", format!("budget_tokens {e}")))?;
    let attention = match &v["attention"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => {
            return Err(ApiError::invalid(
                "attention",
                "attention must be true or false",
            ));
        }
    };
    let rx = s.engine.explain(
        client_key(&addr),
        kiln_runtime::model::explain::Ask {
            prompt,
            parts: Vec::new(),
            completion,
            max_tokens: req.max_tokens,
            budget_tokens,
            counterfactual: true,
            attention,
        },
    );
    let result = tokio::task::spawn_blocking(move || rx.recv())
        .await
        .map_err(|e| ApiError::bad(format!("the explanation failed: {e}")))?
        .map_err(|_| ApiError::bad("the engine stopped before explaining"))?;
    let e = result.map_err(ApiError::bad)?;
    Ok(
        axum::Json(json!({"object": "explanation", "model": loaded.id, "explanation": e}))
            .into_response(),
    )
}

async fn completions(
    State(s): St,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: axum::extract::Request,
) -> Result<Response, ApiError> {
    let v = parse_body(body).await?;
    let id = format!("cmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let key = request_key("/v1/completions", &v);
    let (plan, member, engine) = match route(&s, RequestKind::Inline, &v).await? {
        Ok(first) => first,
        Err(plan) => {
            let f = unanswered(&s, &plan, key)?;
            return Ok(completion_body(&id, &f, None));
        }
    };
    // An experiment's arm stands in for the first model.
    let (loaded, tag) = if s.pool.is_first(&member) {
        arm_for(&s, &v, &addr, &id).await
    } else {
        (engine.loaded(), None)
    };
    let n_ctx = engine.n_ctx();
    let (mut req, stream) = common(&v, n_ctx, 16)?;
    req.draft = s.engine.draft();
    req.draft_max = s.engine.draft_max();
    let prompt = match &v["prompt"] {
        Value::String(p) => p.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Value::Null => return Err(ApiError::invalid("prompt", "prompt is required")),
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string (or an array of one string)",
            ));
        }
    };
    let text = match v.get("suffix") {
        None | Some(Value::Null) => PromptText::Plain {
            text: prompt,
            add_bos: true,
        },
        Some(Value::String(suffix)) => {
            if !loaded.fim.uses_suffix() {
                return Err(ApiError::invalid(
                    "suffix",
                    format!(
                        "{} has no fill-in-the-middle template, so suffix cannot be used",
                        loaded.id
                    ),
                ));
            }
            PromptText::Fim {
                prefix: prompt,
                suffix: suffix.clone(),
            }
        }
        Some(_) => return Err(ApiError::invalid("suffix", "suffix must be a string")),
    };
    // The prompt as text, for explaining this completion later.
    let as_text = match &text {
        PromptText::Plain { text, .. } => text.clone(),
        PromptText::Fim { prefix, suffix } => prompt::fim_text(&loaded, "", prefix, suffix, None),
    };
    let base = req.clone();
    let rest = text.clone();
    let build: pool::Build = Arc::new(move |l, n_ctx| {
        if matches!(rest, PromptText::Fim { .. }) && !l.fim.uses_suffix() {
            return Err(format!("{} has no fill-in-the-middle template", l.id));
        }
        let mut r = with_model_stops(base.clone(), l);
        r.prompt = encode_now(l, rest.clone(), r.max_tokens, n_ctx).map_err(|e| e.message)?;
        Ok(r)
    });
    req.prompt = encode(&loaded, text, req.max_tokens, n_ctx).await?;
    let req = with_model_stops(req, &loaded);
    let first = (member, engine, loaded.clone());
    let rx = (s.pool).submit_events(plan, first, req, job(&addr, stream, key, build));
    let created = now_s();
    let experiment = tag.as_ref().map(crate::ab::Tag::meta);
    if stream {
        if let Some(t) = tag {
            t.served(None, false);
        }
        let chunk = move |model: &str, text: &str, finish: Option<&str>, usage: Option<Value>| {
            let choice =
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish});
            envelope(&id, "text_completion", created, model, choice, usage)
        };
        return Ok(sse(rx, loaded.id.clone(), chunk));
    }
    let f = match collect(rx).await {
        Ok(f) => f,
        Err(e) => {
            if let Some(t) = tag {
                t.served(None, true);
            }
            return Err(e);
        }
    };
    if let Some(t) = tag {
        t.served(Some(f.total_ms), false);
        let s = s.clone();
        let _ = tokio::task::spawn_blocking(move || flush_outcomes(&s)).await;
    }
    let model = answered_by(&f, &loaded.id);
    if as_text.len() <= SERVED_PROMPT_MAX && model == loaded.id {
        let mut kept = s.served.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == SERVED_KEPT {
            kept.pop_front();
        }
        kept.push_back(Served {
            id: id.clone(),
            model: model.clone(),
            prompt: as_text,
            completion: f.generation.text.clone(),
        });
    }
    Ok(completion_body(&id, &f, experiment))
}

/// The model that gave `f` (`first` unless a route fell back).
fn answered_by(f: &Finished, first: &str) -> String {
    f.route
        .as_ref()
        .map_or_else(|| first.to_string(), |r| r.model.clone())
}

/// A whole `/v1/completions` answer, with its route (`route`: which
/// model answered, which failed first) and experiment.
fn completion_body(id: &str, f: &Finished, experiment: Option<Value>) -> Response {
    let model = answered_by(f, "");
    let choice = json!({"index": 0, "text": f.generation.text, "logprobs": null, "finish_reason": finish_reason(f)});
    let mut body = envelope(
        id,
        "text_completion",
        now_s(),
        &model,
        choice,
        Some(usage(f)),
    );
    if let Some(r) = &f.route {
        body["route"] = json!(r);
    }
    if let Some(e) = experiment.filter(|e| !e.is_null()) {
        body["experiment"] = e;
    }
    axum::Json(body).into_response()
}

/// The model for a completion request and its tag: the arm's version
/// where an experiment runs on the served model and the request names no
/// model; the unit is the request's `user`, else the client's address.
async fn arm_for(
    s: &Arc<AppState>,
    v: &Value,
    addr: &SocketAddr,
    id: &str,
) -> (Arc<Loaded>, Option<crate::ab::Tag>) {
    if s.config.is_none() || !v["model"].is_null() {
        return (s.engine.loaded(), None);
    }
    let unit = v["user"]
        .as_str()
        .map_or_else(|| addr.ip().to_string(), str::to_string);
    let (s2, id) = (s.clone(), id.to_string());
    let chosen = tokio::task::spawn_blocking(move || {
        let config = s2.config.as_ref().expect("checked above");
        let mut ab = s2.ab.lock().unwrap_or_else(|p| p.into_inner());
        ab.choose(
            config,
            &s2.engine,
            None,
            &unit,
            &unit,
            Some(id),
            &mut |_, m| eprintln!("{m}"),
        )
    })
    .await;
    match chosen {
        Ok((l, t)) => (l, Some(t)),
        Err(_) => (s.engine.loaded(), None),
    }
}

fn flush_outcomes(s: &AppState) {
    if let Some(config) = &s.config {
        let mut ab = s.ab.lock().unwrap_or_else(|p| p.into_inner());
        ab.flush(config, &mut |_, m| eprintln!("{m}"));
    }
}

/// `POST /v1/feedback`: `{"id": "cmpl-N", "accepted": true|false,
/// "accepted_length": N}`: whether the user took a completion served
/// here (an experiment's outcome; `kiln:completions_accepted`).
async fn feedback(State(s): St, body: axum::extract::Request) -> Result<Response, ApiError> {
    let v = parse_body(body).await?;
    let Some(id) = v["id"].as_str().map(str::to_string) else {
        return Err(ApiError::invalid(
            "id",
            "id (a completion's, such as cmpl-1) is required",
        ));
    };
    let Some(accepted) = v["accepted"].as_bool() else {
        return Err(ApiError::invalid(
            "accepted",
            "accepted must be true or false",
        ));
    };
    let chars = match &v["accepted_length"] {
        Value::Null => None,
        n => Some(n.as_u64().ok_or_else(|| {
            ApiError::invalid("accepted_length", "accepted_length must be a whole number")
        })?),
    };
    if accepted {
        s.engine.metrics().completions_accepted.inc();
    }
    let s2 = s.clone();
    let in_experiment = tokio::task::spawn_blocking(move || {
        let Some(config) = &s2.config else {
            return false;
        };
        let mut ab = s2.ab.lock().unwrap_or_else(|p| p.into_inner());
        let log = &mut |_: u8, m: &str| eprintln!("{m}");
        if accepted {
            ab.accepted(config, &id, chars, log)
        } else {
            ab.rejected(config, &id, log)
        }
    })
    .await
    .unwrap_or(false);
    Ok(axum::Json(json!({"recorded": true, "experiment": in_experiment})).into_response())
}

/// `GET /v1/experiments`: every experiment with its arms and decision,
/// as `kiln ab status --json`.
async fn experiments(State(s): St) -> Result<Response, ApiError> {
    let Some(config) = s.config.clone() else {
        return Ok(axum::Json(json!({"experiments": []})).into_response());
    };
    let all = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let r = kiln_registry::Registry::open_home(&config).map_err(|e| e.to_string())?;
        let list = r.experiments().map_err(|e| e.to_string())?;
        let status: Vec<_> = list
            .iter()
            .map(|e| r.experiment_status(e))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(json!({"experiments": status}))
    })
    .await
    .map_err(|e| ApiError::bad(e.to_string()))?
    .map_err(ApiError::bad)?;
    Ok(axum::Json(all).into_response())
}

/// Renders the model's chat template for the request's messages
/// ([`crate::chat`]).
fn render_chat(loaded: &Loaded, v: &Value) -> Result<String, ApiError> {
    let Some(template) = &loaded.chat_template else {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} has no chat template (tokenizer.chat_template); use /v1/completions",
                loaded.id
            ),
        ));
    };
    let Some(list) = v["messages"].as_array().filter(|a| !a.is_empty()) else {
        return Err(ApiError::invalid(
            "messages",
            "messages must be a non-empty array",
        ));
    };
    // Content as a string, or OpenAI's array of text parts (joined: chat
    // templates expect a string).
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .filter(|r| ["system", "user", "assistant", "developer", "tool"].contains(r));
        let content = match &m["content"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(parts) => parts
                .iter()
                .map(|p| (p["type"] == "text").then(|| p["text"].as_str()).flatten())
                .collect::<Option<Vec<_>>>()
                .map(|texts| texts.concat()),
            _ => None,
        };
        let (Some(_), Some(content)) = (role, content) else {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages[{i}] must have a role (system, user, assistant, tool) and content: a string or text parts"
                ),
            ));
        };
        let mut m = m.clone();
        m["content"] = Value::String(content);
        messages.push(m);
    }
    let tok = |key: &str| {
        loaded
            .model
            .file
            .get(key)
            .and_then(|v| v.as_u64())
            .and_then(|id| loaded.tok.token_text(id as u32))
            .unwrap_or_default()
            .to_string()
    };
    let (bos, eos) = (
        tok("tokenizer.ggml.bos_token_id"),
        tok("tokenizer.ggml.eos_token_id"),
    );
    let messages = Value::Array(messages);
    let inputs = crate::chat::ChatInputs {
        messages: &messages,
        tools: v.get("tools").filter(|t| t.is_array()),
        bos_token: &bos,
        eos_token: &eos,
        add_generation_prompt: true,
    };
    crate::chat::render(template, &inputs).map_err(|e| match e {
        crate::chat::ChatError::Parse(_) => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: None,
            param: None,
            message: e.to_string(),
        },
        crate::chat::ChatError::Render(_) => ApiError::invalid("messages", e.to_string()),
    })
}

async fn chat_completions(
    State(s): St,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: axum::extract::Request,
) -> Result<Response, ApiError> {
    let v = parse_body(body).await?;
    let id = format!("chatcmpl-{}", s.next_id.fetch_add(1, Ordering::Relaxed));
    let key = request_key("/v1/chat/completions", &v);
    let created = now_s();
    let body = |f: &Finished| {
        let choice = json!({"index": 0, "message": {"role": "assistant", "content": f.generation.text},
                            "logprobs": null, "finish_reason": finish_reason(f)});
        let mut body = envelope(
            &id,
            "chat.completion",
            created,
            &answered_by(f, ""),
            choice,
            Some(usage(f)),
        );
        if let Some(r) = &f.route {
            body["route"] = json!(r);
        }
        axum::Json(body).into_response()
    };
    let (plan, member, engine) = match route(&s, RequestKind::Chat, &v).await? {
        Ok(first) => first,
        Err(plan) => return Ok(body(&unanswered(&s, &plan, key)?)),
    };
    let loaded = engine.loaded();
    let n_ctx = engine.n_ctx();
    let (mut req, stream) = common(&v, n_ctx, 256.min(n_ctx / 2).max(1))?;
    req.draft = s.engine.draft();
    req.draft_max = s.engine.draft_max();
    let text = render_chat(&loaded, &v)?;
    let base = req.clone();
    let messages = v.clone();
    let build: pool::Build = Arc::new(move |l, n_ctx| {
        let text = render_chat(l, &messages).map_err(|e| e.message)?;
        let mut r = with_model_stops(base.clone(), l);
        let plain = PromptText::Plain {
            text,
            add_bos: false,
        };
        r.prompt = encode_now(l, plain, r.max_tokens, n_ctx).map_err(|e| e.message)?;
        Ok(r)
    });
    // The rendered template carries its own BOS when it wants one.
    req.prompt = encode(
        &loaded,
        PromptText::Plain {
            text,
            add_bos: false,
        },
        req.max_tokens,
        n_ctx,
    )
    .await?;
    let req = with_model_stops(req, &loaded);
    let first = (member, engine, loaded.clone());
    let rx = (s.pool).submit_events(plan, first, req, job(&addr, stream, key, build));
    if stream {
        let mut first = true;
        let chunk = move |model: &str, text: &str, finish: Option<&str>, usage: Option<Value>| {
            let delta = if first {
                first = false;
                json!({"role": "assistant", "content": text})
            } else if finish.is_some() && text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            let choice =
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
            envelope(&id, "chat.completion.chunk", created, model, choice, usage)
        };
        return Ok(sse(rx, loaded.id.clone(), chunk));
    }
    let f = collect(rx).await?;
    Ok(body(&f))
}

fn engine_error(e: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "server_error",
        code: None,
        param: None,
        message: e,
    }
}

async fn collect(mut rx: Events) -> Result<Finished, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Text(_) | Event::Model(_)) => {}
            Some(Event::Done(d)) => return d.map_err(engine_error),
            None => return Err(engine_error("the engine stopped".into())),
        }
    }
}

/// Server-sent events: one `data:` line per chunk, then `data: [DONE]`;
/// each chunk names the model answering (`model` until a route says
/// another does). Dropping the stream (the client left) drops the
/// receiver, which cancels the generation at its next token.
fn sse(
    rx: Events,
    model: String,
    chunk: impl FnMut(&str, &str, Option<&str>, Option<Value>) -> Value + Send + 'static,
) -> Response {
    let state = (Some(rx), model, chunk);
    let stream = futures_util::stream::unfold(state, |(rx, mut model, mut chunk)| async move {
        let mut rx = rx?;
        let data = loop {
            match rx.recv().await {
                Some(Event::Model(m)) => model = m,
                Some(Event::Text(t)) => {
                    let data = format!("data: {}\n\n", chunk(&model, &t, None, None));
                    return Some((
                        Ok::<_, std::convert::Infallible>(Bytes::from(data)),
                        (Some(rx), model, chunk),
                    ));
                }
                Some(Event::Done(Ok(f))) => {
                    let mut last = chunk(&model, "", Some(finish_reason(&f)), Some(usage(&f)));
                    if let Some(r) = &f.route {
                        last["route"] = json!(r);
                    }
                    break format!("data: {last}\n\ndata: [DONE]\n\n");
                }
                Some(Event::Done(Err(e))) => {
                    break format!(
                        "data: {}\n\ndata: [DONE]\n\n",
                        json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}})
                    );
                }
                None => break "data: [DONE]\n\n".to_string(),
            }
        };
        Some((Ok(Bytes::from(data)), (None, model, chunk)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}
