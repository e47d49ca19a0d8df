//! Plugins run in a supervised worker process.
//!
//! A native library can segfault, abort, hang or eat the machine's
//! memory; in the host's process that would take every completion with
//! it. A plugin loaded with [`Isolation::Process`] is opened by a worker
//! (`kiln plugin-worker`, the same binary) and the host drives it through
//! a [`Worker`]: every ABI call becomes one message on a Unix socket, and
//! the bytes of tensors cross through a shared memory arena (a memfd
//! both processes map), except small writes (a decode step's token and
//! mask rows), which travel in their message and are not waited for. The
//! worker calls the plugin through the same negotiated table a host
//! in-process would, and synchronises after every graph, so that a decode
//! step costs two round trips: the graph, and its logits.
//!
//! The host side is the supervisor:
//! - a call that gets no answer within [`Limits::call_timeout`] (the
//!   watchdog), or a worker whose resident memory passes
//!   [`Limits::memory_limit`], is killed;
//! - a worker that died (any signal, any exit) turns the call into a
//!   device error, so the executor does what it does for a lost device:
//!   the CPU finishes the request from the tokens the session kept;
//! - [`Worker::revive`] starts a new worker after a backoff (1 s, doubled
//!   per crash, at most a minute), and after [`QUARANTINE_AFTER`] crashes
//!   within [`QUARANTINE_WINDOW`] the plugin is quarantined: no more
//!   restarts, and the owner's crash hook records it (the registry).
//!
//! Buffers are named by ids the worker hands out, tagged with the
//! worker's generation: an id from a dead worker is refused by the next
//! one instead of reaching the plugin as a dangling pointer.

use kiln_plugin_api::abi::{KILN_MAX_DIMS, KILN_MAX_SRC, KILN_OP_PARAM_COUNT, KilnOp, KilnTensor};
use kiln_plugin_api::host::{BackendHandle, RawBuffer};
use kiln_plugin_api::{BackendError, DType, DeviceInfo, DeviceKind, ErrorCode};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of the shared arena: the largest piece of tensor data one call
/// moves (larger writes and reads go in pieces of this size).
pub const ARENA_BYTES: usize = 16 << 20;

/// Crashes within [`QUARANTINE_WINDOW`] that quarantine a plugin.
pub const QUARANTINE_AFTER: usize = 3;
pub const QUARANTINE_WINDOW: Duration = Duration::from_secs(600);

/// The version of the host–worker messages: the host's hello carries it,
/// and a worker of another version (a kiln upgraded on disk while an
/// older one runs) refuses to start instead of misreading them.
const PROTOCOL: u32 = 1;

/// The fd numbers the worker finds its socket and arena at.
const SOCKET_FD: i32 = 3;
const ARENA_FD: i32 = 4;

/// Where a plugin's code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// In a supervised worker process (the default for plugins).
    Process,
    /// In kiln's own process: fastest, and a crash in the plugin is a crash
    /// of kiln. For plugins the user trusts.
    InProcess,
}

/// What a worker may use before the host kills it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest one call may take (the watchdog).
    pub call_timeout: Duration,
    /// Resident memory the worker may hold, in bytes.
    pub memory_limit: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            call_timeout: Duration::from_secs(60),
            memory_limit: default_memory_limit(),
        }
    }
}

/// Half of the machine's memory (4 GiB when it cannot be read).
pub fn default_memory_limit() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    total.map_or(4 << 30, |t| t / 2)
}

/// One death of a worker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Crash {
    /// The plugin's registered name.
    pub plugin: String,
    /// The call it died in (`kiln_backend_init`, `graph_compute`, …).
    pub during: String,
    /// How it died: `killed by signal 11 (SIGSEGV)`, `hung: no answer to
    /// graph_compute in 60 s`, `used 2.1 GiB, over its 2.0 GiB limit`, …
    pub cause: String,
    /// Crashes within the quarantine window, this one included.
    pub recent: usize,
    /// Whether this crash quarantined the plugin.
    pub quarantined: bool,
}

/// Told of every crash (the registry records it; `kiln serve` counts it).
pub type CrashHook = Arc<dyn Fn(&Crash) + Send + Sync>;

/// The kiln executable that runs workers: `KILN_PLUGIN_WORKER`, this
/// program when it is kiln, or a `kiln` beside it or one directory up (a
/// test or a program embedding the runtime, built in a cargo target
/// directory).
pub fn worker_exe() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_PLUGIN_WORKER").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's path to start a plugin worker: {e}"))?;
    if exe.file_stem().is_some_and(|s| s == "kiln") {
        return Ok(exe);
    }
    let beside = exe.parent().into_iter().flat_map(|d| [Some(d), d.parent()]);
    for dir in beside.flatten() {
        let k = dir.join("kiln");
        if k.is_file() {
            return Ok(k);
        }
    }
    Err(format!(
        "{} is not kiln and no kiln binary is beside it to run plugin workers; set \
         KILN_PLUGIN_WORKER to a kiln binary or run the plugin in-process",
        exe.display()
    ))
}

// ---- the wire format --------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Call {
    Hello = 0,
    DeviceMemory,
    WeightLayout,
    Alloc,
    Free,
    Write,
    Read,
    Copy,
    Supports,
    Compute,
    WriteInline,
}

impl Call {
    const ALL: [Call; 11] = [
        Call::Hello,
        Call::DeviceMemory,
        Call::WeightLayout,
        Call::Alloc,
        Call::Free,
        Call::Write,
        Call::Read,
        Call::Copy,
        Call::Supports,
        Call::Compute,
        Call::WriteInline,
    ];

    fn name(self) -> &'static str {
        match self {
            Call::Hello => "kiln_backend_init",
            Call::DeviceMemory => "device_memory",
            Call::WeightLayout => "weight_layout",
            Call::Alloc => "buffer_alloc",
            Call::Free => "buffer_free",
            Call::Write => "buffer_write",
            Call::Read => "buffer_read",
            Call::Copy => "buffer_copy",
            Call::Supports => "supports_op",
            Call::Compute => "graph_compute",
            Call::WriteInline => "buffer_write",
        }
    }
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn tensor(&mut self, t: &KilnTensor) -> &mut Self {
        self.u64(t.buffer as usize as u64)
            .u64(t.offset)
            .u32(t.dtype)
            .u32(t.n_dims);
        for &n in &t.ne {
            self.i64(n);
        }
        for &n in &t.nb {
            self.u64(n);
        }
        self
    }
    fn op(&mut self, op: &KilnOp) -> &mut Self {
        self.u32(op.kind).u32(op.n_src);
        for &s in &op.src {
            self.u32(s);
        }
        self.u32(op.dst).u32(op.flags);
        for &p in &op.params {
            self.i32(p);
        }
        self
    }
    fn device(&mut self, d: &DeviceInfo) -> &mut Self {
        self.u32(d.kind.raw())
            .str(&d.name)
            .u64(d.total_memory)
            .u64(d.free_memory)
            .u64(d.capabilities)
            .u64(d.max_buffer_size)
            .u32(d.buffer_alignment);
        self.0.extend_from_slice(&d.uuid);
        self
    }
}

struct Dec<'a> {
    b: &'a [u8],
}

type Wire<T> = Result<T, String>;

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Wire<&'a [u8]> {
        if self.b.len() < n {
            return Err("a message ended early".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Wire<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Wire<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn i32(&mut self) -> Wire<i32> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Wire<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn i64(&mut self) -> Wire<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Wire<String> {
        let n = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn tensor(&mut self) -> Wire<KilnTensor> {
        let buffer = self.u64()? as usize as kiln_plugin_api::abi::KilnBuffer;
        let (offset, dtype, n_dims) = (self.u64()?, self.u32()?, self.u32()?);
        let mut ne = [0i64; KILN_MAX_DIMS];
        for n in &mut ne {
            *n = self.i64()?;
        }
        let mut nb = [0u64; KILN_MAX_DIMS];
        for n in &mut nb {
            *n = self.u64()?;
        }
        Ok(KilnTensor {
            buffer,
            offset,
            dtype,
            n_dims,
            ne,
            nb,
        })
    }
    fn op(&mut self) -> Wire<KilnOp> {
        let (kind, n_src) = (self.u32()?, self.u32()?);
        let mut src = [0u32; KILN_MAX_SRC];
        for s in &mut src {
            *s = self.u32()?;
        }
        let (dst, flags) = (self.u32()?, self.u32()?);
        let mut params = [0i32; KILN_OP_PARAM_COUNT];
        for p in &mut params {
            *p = self.i32()?;
        }
        Ok(KilnOp {
            kind,
            n_src,
            src,
            dst,
            flags,
            params,
        })
    }
    fn device(&mut self) -> Wire<DeviceInfo> {
        let kind = DeviceKind::from_raw(self.u32()?).ok_or("an unknown device kind")?;
        Ok(DeviceInfo {
            kind,
            name: self.str()?,
            total_memory: self.u64()?,
            free_memory: self.u64()?,
            capabilities: self.u64()?,
            max_buffer_size: self.u64()?,
            buffer_alignment: self.u32()?,
            uuid: self.take(16)?.try_into().expect("16"),
        })
    }
}

/// A reply: the warnings the plugin logged since the last one (for `kiln
/// doctor`: they were printed to the shared stderr already), then OK and
/// its payload, or the plugin's error.
fn encode_reply(r: Result<Enc, BackendError>) -> Vec<u8> {
    let mut out = Enc::default();
    let warnings = super::take_plugin_warnings();
    out.u32(warnings.len() as u32);
    for w in &warnings {
        out.str(w);
    }
    match r {
        Ok(body) => {
            out.i32(0);
            out.0.extend_from_slice(&body.0);
        }
        Err(e) => {
            out.i32(e.code.status())
                .i64(e.op_index.map_or(-1, i64::from))
                .str(&e.message);
        }
    }
    out.0
}

fn decode_reply(bytes: &[u8]) -> Result<Dec<'_>, BackendError> {
    let mut d = Dec { b: bytes };
    let bad = |e: String| BackendError::new(ErrorCode::Internal, format!("plugin worker: {e}"));
    for _ in 0..d.u32().map_err(bad)? {
        super::keep_plugin_warning(d.str().map_err(bad)?);
    }
    let status = d.i32().map_err(bad)?;
    if status == 0 {
        return Ok(d);
    }
    let op = d.i64().map_err(bad)?;
    let message = d.str().map_err(bad)?;
    Err(BackendError {
        code: ErrorCode::from_status(status),
        message,
        op_index: u32::try_from(op).ok(),
    })
}

fn send_frame(fd: i32, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    let mut sent = 0;
    while sent < frame.len() {
        // SAFETY: the bytes are ours and live for the call; MSG_NOSIGNAL
        // turns a closed peer into EPIPE instead of a SIGPIPE that would
        // kill kiln (which keeps SIGPIPE's default for pipes).
        let n = unsafe {
            libc::send(
                fd,
                frame[sent..].as_ptr().cast(),
                frame.len() - sent,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGTRAP => "SIGTRAP",
        _ => "a signal",
    }
}

// ---- the host's side ---------------------------------------------------

/// A live worker: its process, socket and the mapped arena.
struct Link {
    child: Child,
    socket: UnixStream,
    arena: memmap2::MmapMut,
    /// Calls sent whose answers are not read yet (posted writes).
    posted: usize,
    /// Bytes read past the last answer.
    inbox: Vec<u8>,
}

/// Posted calls in a row before the host reads their answers.
const MAX_POSTED: usize = 32;

/// Writes of at most this many bytes travel in their message, posted;
/// larger ones go through the arena and are waited for.
const POSTED_WRITE_BYTES: usize = 64 << 10;

impl Drop for Link {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the first worker said about the plugin.
#[derive(Clone, Debug)]
pub struct Hello {
    pub name: String,
    pub version: String,
    pub abi_minor: u16,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Default)]
struct Health {
    crashes: VecDeque<Instant>,
    next_try: Option<Instant>,
    quarantined: bool,
}

/// A plugin in a worker process, as the host calls it.
pub struct Worker {
    plugin: String,
    exe: PathBuf,
    library: PathBuf,
    limits: Limits,
    link: Mutex<Option<Link>>,
    health: Mutex<Health>,
    hello: Hello,
    /// Bumped by every start: buffers are only good with the worker that
    /// made them.
    generation: AtomicU64,
    pub restarts: AtomicU64,
    pub crashes: AtomicU64,
    on_crash: Option<CrashHook>,
    /// When the worker's memory was last looked at after a call.
    memory_checked: Mutex<Instant>,
}

/// How often the worker's memory is looked at between calls (while a call
/// runs it is looked at every 50 ms).
const MEMORY_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start a plugin worker: {0}")]
    Spawn(String),
    #[error("the plugin's worker died during {during}: {cause}")]
    Died { during: String, cause: String },
    #[error("the plugin refused to start in its worker: {0}")]
    Refused(String),
}

impl Worker {
    /// Starts a worker for `library` (which passed preflight) and
    /// negotiates with the plugin there.
    pub fn start(
        plugin: &str,
        library: &Path,
        limits: Limits,
        on_crash: Option<CrashHook>,
    ) -> Result<Worker, StartError> {
        let exe = worker_exe().map_err(StartError::Spawn)?;
        let mut w = Worker {
            plugin: plugin.to_string(),
            exe,
            library: library.to_path_buf(),
            limits,
            link: Mutex::new(None),
            health: Mutex::default(),
            hello: Hello {
                name: String::new(),
                version: String::new(),
                abi_minor: 0,
                devices: Vec::new(),
            },
            generation: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            crashes: AtomicU64::new(0),
            on_crash,
            memory_checked: Mutex::new(Instant::now()),
        };
        let (link, hello) = w.spawn(1).inspect_err(|e| {
            if let StartError::Died { during, cause } = e {
                w.record_crash(during, cause);
            }
        })?;
        w.hello = hello;
        w.generation.store(1, Ordering::SeqCst);
        *w.link.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(link);
        Ok(w)
    }

    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The worker's generation (1 for the first, +1 per restart).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn is_quarantined(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .quarantined
    }

    /// Whether a worker process runs (none between a crash and the
    /// restart).
    pub fn is_running(&self) -> bool {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The process id of the live worker, if one runs.
    pub fn pid(&self) -> Option<u32> {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        link.as_ref().map(|l| l.child.id())
    }

    fn spawn(&self, generation: u64) -> Result<(Link, Hello), StartError> {
        let spawn_err = |what: &str, e: std::io::Error| StartError::Spawn(format!("{what}: {e}"));
        let (host_end, worker_end) = UnixStream::pair().map_err(|e| spawn_err("socketpair", e))?;
        let file = arena_file().map_err(|e| spawn_err("creating the shared arena", e))?;
        file.set_len(ARENA_BYTES as u64)
            .map_err(|e| spawn_err("sizing the arena", e))?;
        // SAFETY: the memfd is ours; the worker writes it only while we
        // wait for its answer, never while we read or write it.
        let arena =
            unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(|e| spawn_err("mmap", e))?;
        let (sock_fd, arena_fd) = (worker_end.as_raw_fd(), file.as_raw_fd());
        let mut cmd = Command::new(&self.exe);
        cmd.arg("plugin-worker")
            .arg(&self.library)
            .arg(generation.to_string())
            .stdin(Stdio::null())
            // What a plugin prints goes to kiln's stderr: kiln's stdout may
            // be the language server's channel.
            .stdout(Stdio::from(std::io::stderr()));
        // SAFETY: only async-signal-safe calls between fork and exec:
        // put the socket and the arena at the fds the worker expects
        // (dup2 clears close-on-exec). (Not PR_SET_PDEATHSIG: it fires
        // when the *thread* that started the worker ends, which in kiln
        // is often a short-lived one; the worker watches for kiln's end
        // itself, see `worker_main`.)
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // Move the arena out of the way first if it sits on 3.
                let mut arena_fd = arena_fd;
                if arena_fd == SOCKET_FD {
                    arena_fd = libc::dup(arena_fd);
                }
                if libc::dup2(sock_fd, SOCKET_FD) < 0 || libc::dup2(arena_fd, ARENA_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in [SOCKET_FD, ARENA_FD] {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| spawn_err(&format!("running {}", self.exe.display()), e))?;
        drop(worker_end);
        drop(file);
        host_end
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| spawn_err("socket timeout", e))?;
        let mut link = Link {
            child,
            socket: host_end,
            arena,
            posted: 0,
            inbox: Vec::new(),
        };
        let hello = Enc::default().u32(PROTOCOL).0.clone();
        let reply = match self.exchange(&mut link, Call::Hello, &hello, true) {
            Ok(r) => r.unwrap_or_default(),
            Err(cause) => {
                return Err(StartError::Died {
                    during: Call::Hello.name().into(),
                    cause,
                });
            }
        };
        let hello = (|| -> Result<Hello, String> {
            let mut d = decode_reply(&reply).map_err(|e| e.message)?;
            let (name, version) = (d.str()?, d.str()?);
            let abi_minor = d.u32()? as u16;
            let n = d.u32()?;
            let devices = (0..n).map(|_| d.device()).collect::<Wire<Vec<_>>>()?;
            Ok(Hello {
                name,
                version,
                abi_minor,
                devices,
            })
        })()
        .map_err(StartError::Refused)?;
        Ok((link, hello))
    }

    /// Sends one request. A posted one (`wait` false: a small write) is
    /// not waited for, up to [`MAX_POSTED`] in a row; otherwise the
    /// answers of the posted calls before it are read first (under the
    /// watchdog), and a posted call that failed condemns the worker (the
    /// host went on as if it had succeeded), then its own answer.
    /// `Err` is the worker's death, described; the worker is reaped.
    fn exchange(
        &self,
        link: &mut Link,
        call: Call,
        body: &[u8],
        wait: bool,
    ) -> Result<Option<Vec<u8>>, String> {
        let mut payload = Vec::with_capacity(1 + body.len());
        payload.push(call as u8);
        payload.extend_from_slice(body);
        let started = Instant::now();
        let fd = link.socket.as_raw_fd();
        let outcome = (|| -> Result<Option<Vec<u8>>, String> {
            send_frame(fd, &payload).map_err(|_| String::new())?;
            link.posted += 1;
            if !wait && link.posted < MAX_POSTED {
                return Ok(None);
            }
            let own = if wait { link.posted - 1 } else { link.posted };
            for _ in 0..own {
                let reply = self.receive(link, call, started)?;
                link.posted -= 1;
                if let Err(e) = decode_reply(&reply) {
                    let _ = link.child.kill();
                    return Err(format!(
                        "a buffer_write the host did not wait for failed ({e}); killed, \
                         since the device no longer holds what the host believes"
                    ));
                }
            }
            if !wait {
                return Ok(None);
            }
            let reply = self.receive(link, call, started)?;
            link.posted -= 1;
            Ok(Some(reply))
        })()
        .and_then(|reply| {
            // A call that returns quickly is never waited on long enough
            // to be looked at: look now and then after one.
            let mut last = self
                .memory_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.elapsed() >= MEMORY_CHECK_EVERY {
                *last = Instant::now();
                if let Some(why) = self.over_memory(link) {
                    return Err(why);
                }
            }
            Ok(reply)
        });
        outcome.map_err(|why| {
            let status = link.child.wait();
            if !why.is_empty() {
                return why;
            }
            match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (s.signal(), s.code()) {
                        (Some(sig), _) => format!("killed by signal {sig} ({})", signal_name(sig)),
                        (None, Some(code)) => format!("exited with status {code}"),
                        _ => "ended".into(),
                    }
                }
                Err(e) => format!("lost (cannot reap it: {e})"),
            }
        })
    }

    /// The next answer, under the watchdog (the call began at `started`)
    /// and the memory limit. `Err("")`: the worker is gone.
    fn receive(&self, link: &mut Link, call: Call, started: Instant) -> Result<Vec<u8>, String> {
        let mut chunk = [0u8; 64 << 10];
        loop {
            if link.inbox.len() >= 4 {
                let n = u32::from_le_bytes(link.inbox[..4].try_into().expect("4")) as usize;
                if link.inbox.len() >= 4 + n {
                    let frame = link.inbox[4..4 + n].to_vec();
                    link.inbox.drain(..4 + n);
                    return Ok(frame);
                }
            }
            match link.socket.read(&mut chunk) {
                Ok(0) => return Err(String::new()),
                Ok(n) => link.inbox.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    if started.elapsed() > self.limits.call_timeout {
                        let _ = link.child.kill();
                        return Err(format!(
                            "hung: no answer to {} in {:.1} s (the watchdog killed it)",
                            call.name(),
                            self.limits.call_timeout.as_secs_f64()
                        ));
                    }
                    if let Some(why) = self.over_memory(link) {
                        return Err(why);
                    }
                }
                Err(_) => return Err(String::new()),
            }
        }
    }

    /// Kills the worker when it holds more memory than its limit, and
    /// says so.
    fn over_memory(&self, link: &mut Link) -> Option<String> {
        let rss = resident_bytes(link.child.id())?;
        if rss <= self.limits.memory_limit {
            return None;
        }
        let _ = link.child.kill();
        Some(format!(
            "used {} of memory, over its {} limit (killed)",
            crate::measure::human_bytes(rss),
            crate::measure::human_bytes(self.limits.memory_limit)
        ))
    }

    fn record_crash(&self, during: &str, cause: &str) {
        self.crashes.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let crash = {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            h.crashes.push_back(now);
            while h
                .crashes
                .front()
                .is_some_and(|&t| now.duration_since(t) > QUARANTINE_WINDOW)
            {
                h.crashes.pop_front();
            }
            let recent = h.crashes.len();
            let newly = !h.quarantined && recent >= QUARANTINE_AFTER;
            h.quarantined |= newly;
            let backoff = Duration::from_secs(1 << (recent.saturating_sub(1)).min(6))
                .min(Duration::from_secs(60));
            h.next_try = Some(now + backoff);
            Crash {
                plugin: self.plugin.clone(),
                during: during.to_string(),
                cause: cause.to_string(),
                recent,
                quarantined: newly,
            }
        };
        eprintln!(
            "kiln: plugin {}'s worker died during {}: {}{}",
            crash.plugin,
            crash.during,
            crash.cause,
            if crash.quarantined {
                format!(
                    "; quarantined after {} crashes (`kiln plugins release {}` to try it again)",
                    crash.recent, crash.plugin
                )
            } else {
                "; the CPU takes over and the worker restarts".into()
            }
        );
        if let Some(hook) = &self.on_crash {
            hook(&crash);
        }
    }

    /// Starts a new worker if the last one died, its backoff has passed
    /// and the plugin is not quarantined. Returns whether one runs now.
    pub fn revive(&self) -> bool {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if link.is_some() {
            return true;
        }
        {
            let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if h.quarantined || h.next_try.is_some_and(|t| Instant::now() < t) {
                return false;
            }
        }
        let generation = self.generation() + 1;
        match self.spawn(generation) {
            Ok((l, hello)) if hello.devices.len() == self.hello.devices.len() => {
                self.generation.store(generation, Ordering::SeqCst);
                self.restarts.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "kiln: plugin {}'s worker restarted (generation {generation})",
                    self.plugin
                );
                *link = Some(l);
                true
            }
            Ok((mut l, _)) => {
                let _ = l.child.kill();
                let _ = l.child.wait();
                self.record_crash(
                    Call::Hello.name(),
                    "came back with a different set of devices",
                );
                false
            }
            Err(StartError::Died { during, cause }) => {
                self.record_crash(&during, &cause);
                false
            }
            Err(e) => {
                self.record_crash(Call::Hello.name(), &e.to_string());
                false
            }
        }
    }

    /// Kills the worker because what it computed cannot be trusted
    /// (`why`), counted as a crash: it restarts after the backoff, or is
    /// quarantined, like one that died.
    pub fn condemn(&self, during: &str, why: &str) {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
        if link.is_some() {
            drop(link);
            self.record_crash(during, why);
        }
    }

    /// One call: `fill` may put bytes in the arena first, `read` takes the
    /// answer (and the arena) after.
    fn call<T>(
        &self,
        call: Call,
        body: &[u8],
        fill: impl FnOnce(&mut [u8]),
        read: impl FnOnce(Dec<'_>, &[u8]) -> Wire<T>,
    ) -> Result<T, BackendError> {
        let mut guard = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let Some(link) = guard.as_mut() else {
            return Err(self.down());
        };
        fill(&mut link.arena);
        match self.exchange(link, call, body, true) {
            Ok(reply) => {
                let reply = reply.unwrap_or_default();
                let d = decode_reply(&reply)?;
                read(d, &link.arena).map_err(|e| {
                    BackendError::new(ErrorCode::Internal, format!("plugin worker: {e}"))
                })
            }
            Err(cause) => Err(self.died(guard, call, &cause)),
        }
    }

    /// The worker died during `call` (`cause`): forgets it, records the
    /// crash, and says so as a device error.
    fn died(
        &self,
        mut guard: std::sync::MutexGuard<'_, Option<Link>>,
        call: Call,
        cause: &str,
    ) -> BackendError {
        *guard = None;
        drop(guard);
        self.record_crash(call.name(), cause);
        BackendError::new(
            ErrorCode::Device,
            format!(
                "plugin {}'s worker process died during {}: {cause}",
                self.plugin,
                call.name()
            ),
        )
    }

    /// A call whose answer is read later (see [`Self::exchange`]).
    fn post(&self, call: Call, body: &[u8]) -> Result<(), BackendError> {
        let mut guard = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let Some(link) = guard.as_mut() else {
            return Err(self.down());
        };
        match self.exchange(link, call, body, false) {
            Ok(_) => Ok(()),
            Err(cause) => Err(self.died(guard, call, &cause)),
        }
    }

    fn down(&self) -> BackendError {
        let why = if self.is_quarantined() {
            "quarantined after repeated crashes"
        } else {
            "restarting after a crash"
        };
        BackendError::new(
            ErrorCode::Device,
            format!(
                "plugin {}'s worker process is not running ({why})",
                self.plugin
            ),
        )
    }

    pub fn device_memory(&self, device: u32) -> Option<Result<(u64, u64), BackendError>> {
        let r = self.call(
            Call::DeviceMemory,
            &Enc::default().u32(device).0,
            |_| {},
            |mut d, _| Ok((d.u8()?, d.u64()?, d.u64()?)),
        );
        match r {
            Ok((0, _, _)) => None,
            Ok((_, free, total)) => Some(Ok((free, total))),
            Err(e) => Some(Err(e)),
        }
    }

    pub fn weight_layout(&self, device: u32, dtype: DType) -> DType {
        self.call(
            Call::WeightLayout,
            &Enc::default().u32(device).u32(dtype.raw()).0,
            |_| {},
            |mut d, _| d.u32(),
        )
        .ok()
        .and_then(DType::from_raw)
        .unwrap_or(dtype)
    }

    pub fn buffer_alloc(&self, device: u32, size: u64) -> Result<RawBuffer, BackendError> {
        let id = self.call(
            Call::Alloc,
            &Enc::default().u32(device).u64(size).0,
            |_| {},
            |mut d, _| d.u64(),
        )?;
        Ok(RawBuffer(id as usize as kiln_plugin_api::abi::KilnBuffer))
    }

    pub fn buffer_free(&self, buffer: RawBuffer) -> Result<(), BackendError> {
        self.call(
            Call::Free,
            &Enc::default().u64(buffer.0 as usize as u64).0,
            |_| {},
            |_, _| Ok(()),
        )
    }

    pub fn buffer_write(
        &self,
        buffer: RawBuffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        if data.len() <= POSTED_WRITE_BYTES {
            let mut body = Enc::default();
            body.u64(buffer.0 as usize as u64)
                .u64(offset)
                .u64(data.len() as u64);
            body.0.extend_from_slice(data);
            return self.post(Call::WriteInline, &body.0);
        }
        for (i, piece) in data.chunks(ARENA_BYTES).enumerate() {
            let at = offset + (i * ARENA_BYTES) as u64;
            self.call(
                Call::Write,
                &Enc::default()
                    .u64(buffer.0 as usize as u64)
                    .u64(at)
                    .u64(piece.len() as u64)
                    .0,
                |arena| arena[..piece.len()].copy_from_slice(piece),
                |_, _| Ok(()),
            )?;
        }
        Ok(())
    }

    pub fn buffer_read(
        &self,
        buffer: RawBuffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        for (i, piece) in out.chunks_mut(ARENA_BYTES).enumerate() {
            let at = offset + (i * ARENA_BYTES) as u64;
            let n = piece.len();
            self.call(
                Call::Read,
                &Enc::default()
                    .u64(buffer.0 as usize as u64)
                    .u64(at)
                    .u64(n as u64)
                    .0,
                |_| {},
                |_, arena| {
                    piece.copy_from_slice(&arena[..n]);
                    Ok(())
                },
            )?;
        }
        Ok(())
    }

    pub fn buffer_copy(
        &self,
        src: RawBuffer,
        src_offset: u64,
        dst: RawBuffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        self.call(
            Call::Copy,
            &Enc::default()
                .u64(src.0 as usize as u64)
                .u64(src_offset)
                .u64(dst.0 as usize as u64)
                .u64(dst_offset)
                .u64(size)
                .0,
            |_| {},
            |_, _| Ok(()),
        )
    }

    pub fn supports_op(
        &self,
        device: u32,
        op: &KilnOp,
        tensors: &[KilnTensor],
    ) -> Result<bool, BackendError> {
        let mut e = Enc::default();
        e.u32(device).op(op).u32(tensors.len() as u32);
        for t in tensors {
            e.tensor(t);
        }
        self.call(Call::Supports, &e.0, |_| {}, |mut d, _| Ok(d.u32()? != 0))
    }

    /// `threads`: as `KilnGraph.threads` (0: the plugin's choice).
    pub fn graph_compute_threads(
        &self,
        device: u32,
        tensors: &[KilnTensor],
        ops: &[KilnOp],
        threads: u32,
    ) -> Result<(), BackendError> {
        let mut graph = Enc::default();
        graph.u32(tensors.len() as u32).u32(ops.len() as u32);
        for t in tensors {
            graph.tensor(t);
        }
        for op in ops {
            graph.op(op);
        }
        if graph.0.len() > ARENA_BYTES {
            return Err(BackendError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "a graph of {} ops does not fit the plugin worker's {} arena",
                    ops.len(),
                    crate::measure::human_bytes(ARENA_BYTES as u64)
                ),
            ));
        }
        self.call(
            Call::Compute,
            &Enc::default()
                .u32(device)
                .u64(graph.0.len() as u64)
                .u32(threads)
                .0,
            |arena| arena[..graph.0.len()].copy_from_slice(&graph.0),
            |_, _| Ok(()),
        )
    }

    /// The worker synchronises after every graph (its answer to
    /// `graph_compute` comes once the device is done), so this asks
    /// nothing of it: a message saved per graph.
    pub fn synchronize(&self, _device: u32) -> Result<(), BackendError> {
        if self.is_running() {
            Ok(())
        } else {
            Err(self.down())
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut link) = self
            .link
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // Closing the socket ends a healthy worker; one that does not
            // end promptly is killed (by the link's drop).
            let _ = link.socket.shutdown(std::net::Shutdown::Both);
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = link.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The shared arena's file: a memfd on Linux (memory only), elsewhere a
/// temporary file unlinked at once (only the two processes' descriptors
/// name it). Close-on-exec: the worker gets its own copy at fd 4.
fn arena_file() -> std::io::Result<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"kiln-plugin-arena".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let path = std::env::temp_dir().join(format!(
            "kiln-plugin-arena-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        Ok(file)
    }
}

/// A process's resident memory, from `/proc` (`None` elsewhere: no limit
/// is enforced there).
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

// ---- the worker's side -------------------------------------------------

/// The worker process: `kiln plugin-worker LIBRARY GENERATION`, started by
/// [`Worker`] with its socket at fd 3 and the arena at fd 4. Opens the
/// library, negotiates, answers calls until the host closes the socket.
/// Returns the exit code.
pub fn worker_main(library: &Path, generation: u64) -> i32 {
    // The worker ends with kiln: an idle worker sees its socket close, and
    // one stuck in a plugin's call is ended by this thread once kiln is
    // gone (the worker is handed to another parent).
    // SAFETY: getppid has no preconditions.
    let host = unsafe { libc::getppid() };
    std::thread::Builder::new()
        .name("kiln-worker-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                // SAFETY: as above.
                if unsafe { libc::getppid() } != host {
                    // SAFETY: `_exit` has no preconditions; it ends the
                    // process at once, the plugin's threads with it.
                    unsafe { libc::_exit(0) };
                }
            }
        })
        .ok();
    // SAFETY: the host put a socket and a memfd at these fds (see
    // `Worker::spawn`); nothing else in this process owns them.
    let (mut socket, arena_file) = unsafe {
        (
            UnixStream::from_raw_fd(SOCKET_FD),
            std::fs::File::from_raw_fd(ARENA_FD),
        )
    };
    // SAFETY: the host writes the arena only while this process is not
    // handling a call, and reads it only after this process answered.
    let mut arena = match unsafe { memmap2::MmapMut::map_mut(&arena_file) } {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kiln plugin-worker: cannot map the arena: {e}");
            return 2;
        }
    };
    let fd = socket.as_raw_fd();
    let read_frame = |socket: &mut UnixStream| -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        socket.read_exact(&mut len).ok()?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        socket.read_exact(&mut buf).ok()?;
        Some(buf)
    };
    // The hello comes first.
    let Some(first) = read_frame(&mut socket) else {
        return 0;
    };
    if first.first() != Some(&(Call::Hello as u8)) {
        eprintln!("kiln plugin-worker: the host did not start with a hello");
        return 2;
    }
    let theirs = Dec { b: &first[1..] }.u32().unwrap_or(0);
    if theirs != PROTOCOL {
        let _ = send_frame(
            fd,
            &encode_reply(Err(BackendError::new(
                ErrorCode::AbiMismatch,
                format!(
                    "this kiln's plugin worker speaks protocol {PROTOCOL}, the running kiln {theirs}: \
                     restart kiln (it was upgraded while running)"
                ),
            ))),
        );
        return 1;
    }
    // SAFETY: the host ran preflight on this library (hash, ABI, CPU
    // features, ELF sanity) before starting this worker, which exists so
    // that what the library does here cannot hurt the host.
    let handle = unsafe { kiln_plugin_api::host::open_library(library) }
        .and_then(|entry| unsafe { BackendHandle::negotiate(entry, super::host_services()) });
    let handle = match handle {
        Ok(h) => h,
        Err(e) => {
            let _ = send_frame(
                fd,
                &encode_reply(Err(BackendError::new(ErrorCode::Internal, e.to_string()))),
            );
            return 1;
        }
    };
    let hello = (|| -> Result<Enc, BackendError> {
        let n = handle.device_count()?;
        let mut e = Enc::default();
        e.str(handle.name())
            .str(handle.version())
            .u32(u32::from(handle.abi_minor()))
            .u32(n);
        for d in 0..n {
            e.device(&handle.device_info(d)?);
        }
        Ok(e)
    })();
    if send_frame(fd, &encode_reply(hello)).is_err() {
        return 0;
    }
    let mut buffers: HashMap<u64, RawBuffer> = HashMap::new();
    let mut next_id: u64 = 1;
    while let Some(msg) = read_frame(&mut socket) {
        let reply = serve_call(
            &handle,
            &msg,
            &mut arena,
            &mut buffers,
            &mut next_id,
            generation,
        );
        if send_frame(fd, &encode_reply(reply)).is_err() {
            break;
        }
    }
    // The host is gone or done: free what the plugin still holds.
    for (_, b) in buffers.drain() {
        let _ = handle.buffer_free(b);
    }
    0
}

fn serve_call(
    handle: &BackendHandle,
    msg: &[u8],
    arena: &mut [u8],
    buffers: &mut HashMap<u64, RawBuffer>,
    next_id: &mut u64,
    generation: u64,
) -> Result<Enc, BackendError> {
    let bad = |e: String| BackendError::invalid(format!("plugin worker: {e}"));
    let mut d = Dec { b: msg };
    let call = d.u8().map_err(bad)?;
    let call = *Call::ALL
        .get(call as usize)
        .ok_or_else(|| bad(format!("unknown call {call}")))?;
    let buffer = |id: u64| {
        buffers.get(&id).copied().ok_or_else(|| {
            BackendError::invalid(format!(
                "buffer {id:#x} is not one of this worker's (from a worker that died?)"
            ))
        })
    };
    let in_arena = |len: u64| {
        usize::try_from(len)
            .ok()
            .filter(|&n| n <= arena.len())
            .ok_or_else(|| bad(format!("{len} bytes do not fit the arena")))
    };
    let mut out = Enc::default();
    match call {
        Call::Hello => return Err(bad("a second hello".into())),
        Call::DeviceMemory => match handle.device_memory(d.u32().map_err(bad)?) {
            None => {
                out.u8(0).u64(0).u64(0);
            }
            Some(r) => {
                let (free, total) = r?;
                out.u8(1).u64(free).u64(total);
            }
        },
        Call::WeightLayout => {
            let (device, dtype) = (d.u32().map_err(bad)?, d.u32().map_err(bad)?);
            let dtype = DType::from_raw(dtype).ok_or_else(|| bad(format!("type {dtype}")))?;
            out.u32(handle.weight_layout(device, dtype).raw());
        }
        Call::Alloc => {
            let (device, size) = (d.u32().map_err(bad)?, d.u64().map_err(bad)?);
            let b = handle.buffer_alloc(device, size)?;
            let id = (generation << 40) | *next_id;
            *next_id += 1;
            buffers.insert(id, b);
            out.u64(id);
        }
        Call::Free => {
            let id = d.u64().map_err(bad)?;
            let b = buffer(id)?;
            buffers.remove(&id);
            handle.buffer_free(b)?;
        }
        Call::Write => {
            let (id, offset, len) = (
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
            );
            let n = in_arena(len)?;
            handle.buffer_write(buffer(id)?, offset, &arena[..n])?;
        }
        Call::Read => {
            let (id, offset, len) = (
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
            );
            let n = in_arena(len)?;
            let b = buffer(id)?;
            handle.buffer_read(b, offset, &mut arena[..n])?;
        }
        Call::Copy => {
            let (src, so, dst, dof, size) = (
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
            );
            handle.buffer_copy(buffer(src)?, so, buffer(dst)?, dof, size)?;
        }
        Call::Supports => {
            let device = d.u32().map_err(bad)?;
            let op = d.op().map_err(bad)?;
            let n = d.u32().map_err(bad)?;
            let tensors = (0..n)
                .map(|_| d.tensor().map_err(bad))
                .collect::<Result<Vec<_>, _>>()?;
            out.u32(u32::from(handle.supports_op(device, &op, &tensors)?));
        }
        Call::Compute => {
            let (device, len) = (d.u32().map_err(bad)?, d.u64().map_err(bad)?);
            let threads = d.u32().map_err(bad)?;
            let n = in_arena(len)?;
            let mut g = Dec { b: &arena[..n] };
            let (nt, no) = (g.u32().map_err(bad)?, g.u32().map_err(bad)?);
            let mut tensors = Vec::with_capacity(nt as usize);
            for _ in 0..nt {
                let mut t = g.tensor().map_err(bad)?;
                if !t.buffer.is_null() {
                    t.buffer = buffer(t.buffer as usize as u64)?.0;
                }
                tensors.push(t);
            }
            let ops = (0..no)
                .map(|_| g.op().map_err(bad))
                .collect::<Result<Vec<_>, _>>()?;
            handle.graph_compute_threads(device, &tensors, &ops, threads)?;
            handle.synchronize(device)?;
        }
        Call::WriteInline => {
            let (id, offset, len) = (
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
                d.u64().map_err(bad)?,
            );
            let data = d.take(len as usize).map_err(bad)?;
            handle.buffer_write(buffer(id)?, offset, data)?;
        }
    }
    Ok(out)
}
