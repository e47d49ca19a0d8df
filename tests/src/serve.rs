//! Driving `kiln serve` as a client: the generated demo model, a
//! language-server session over stdio, and an HTTP server on loopback.

use crate::Home;
use kiln_serve::demo::{Client, write_demo_model};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The generated demo model, written once per test process.
pub fn demo_model() -> PathBuf {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.gguf");
        write_demo_model(&p).unwrap();
        (dir, p)
    })
    .1
    .clone()
}

/// Kills the `kiln` process `pid` after `limit`, so that a server that
/// stops answering fails its test instead of hanging it.
/// A home where `coder@1` is SmolLM2 as released and `coder@2` (active)
/// the demo model; `None` without the released model.
pub fn two_versions() -> Option<Home> {
    let smol = crate::real_model("smollm2-135m-instruct-q4_1.gguf")?;
    let home = Home::default();
    home.ok(&["models", "add", smol.to_str().unwrap(), "--name", "coder"]);
    let demo = demo_model();
    home.ok(&["models", "add", demo.to_str().unwrap(), "--name", "coder"]);
    Some(home)
}

pub fn watchdog(pid: u32, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("kiln") {
            eprintln!("watchdog: kiln (pid {pid}) ran past {limit:?}; killing it");
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
}

pub fn serve(home: &Home, extra: &[&str]) -> Client {
    serve_model(home, &demo_model(), extra)
}

/// `kiln serve --model MODEL EXTRA…` as a language server on stdio.
pub fn serve_model(home: &Home, model: &Path, extra: &[&str]) -> Client {
    let mut args = vec!["serve", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut cmd = home.command(&args);
    cmd.env("KILN_THREADS", "1");
    Client::spawn(cmd).expect("spawn kiln serve")
}

pub fn initialize(c: &mut Client, root: &Path, options: Value) -> Value {
    let r = c
        .request(
            "initialize",
            json!({"processId": null, "rootUri": format!("file://{}", root.display()),
                   "capabilities": {"window": {"workDoneProgress": true}},
                   "initializationOptions": options}),
        )
        .unwrap();
    c.notify("initialized", json!({})).unwrap();
    r
}

pub fn open(c: &mut Client, uri: &str, text: &str) {
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}}),
    )
    .unwrap();
}

pub fn at(uri: &str, line: u32, character: u32) -> Value {
    json!({"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})
}

pub fn error_code(r: &Value) -> i64 {
    r["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {r}"))
}

pub fn status(c: &mut Client) -> Value {
    let r = c.request("kiln/status", Value::Null).unwrap();
    r["result"].clone()
}

pub struct HttpServer {
    pub child: Child,
    pub addr: String,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_server(home: &Home) -> HttpServer {
    http_server_with(home, &demo_model(), &[])
}

/// `kiln serve --model MODEL --http 127.0.0.1:0 EXTRA…`, once it listens.
pub fn http_server_with(home: &Home, model: &Path, extra: &[&str]) -> HttpServer {
    http_server_env(home, model, extra, &[])
}

/// [`http_server_with`], with `env` set for the server alone.
pub fn http_server_env(
    home: &Home,
    model: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> HttpServer {
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    http_server_args(home, &args, env)
}

/// `kiln serve ARGS… --http 127.0.0.1:0` with `env` set for it, once it
/// listens; what it says on stderr after that is copied to the test's.
pub fn http_server_args(home: &Home, args: &[&str], env: &[(&str, &str)]) -> HttpServer {
    let args = [&["serve"], args, &["--http", "127.0.0.1:0"]].concat();
    let mut child = home
        .command(&args)
        .env("KILN_THREADS", "1")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "kiln serve --http ended"
        );
        if let Some(at) = line.find("http://") {
            break line[at + 7..].trim().to_string();
        }
    };
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        eprint!("{rest}");
    });
    HttpServer { child, addr }
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

pub fn post(addr: &str, path: &str, v: &Value) -> (u16, Value) {
    let (code, body) = http(addr, "POST", path, v.to_string().as_bytes());
    (
        code,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Greedy completions (`max_tokens` 6) of `prompts` from the `demo` model
/// of a running HTTP server, then its `/metrics` text.
pub fn completions_then_metrics(srv: &HttpServer, prompts: &[&str]) -> (Vec<String>, String) {
    let texts = prompts
        .iter()
        .map(|p| {
            let (code, v) = post(
                &srv.addr,
                "/v1/completions",
                &json!({"model": "demo", "prompt": p, "max_tokens": 6, "temperature": 0}),
            );
            assert_eq!(code, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let (_, metrics) = http(&srv.addr, "GET", "/metrics", b"");
    (texts, metrics)
}

/// The value of the sample `key` (name and labels, as printed) in a
/// Prometheus text, failing the test when it is missing.
pub fn metric(metrics: &str, key: &str) -> u64 {
    let prefix = format!("{key} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("{key} missing:\n{metrics}"))
}
