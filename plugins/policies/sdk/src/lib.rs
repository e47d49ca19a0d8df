//! kiln's policy SDK: write a ranking or tuning policy in Rust and compile
//! it to WebAssembly (`wasm32-unknown-unknown`, with `std`; it builds with
//! rustc 1.63 and later, no dependencies).
//!
//! ```ignore
//! use kiln_policy::{RankInput, export_ranker};
//! fn rank(input: &RankInput, scores: &mut Vec<f32>) {
//!     for c in input.candidates() { scores.push(c.bm25()); }
//! }
//! export_ranker!(rank, b"{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"bm25-only\",\"version\":\"1.0.0\"}");
//! ```
//!
//! The byte layouts are in `sandbox/ABI.md`. Readers here honour the
//! record sizes the host writes in the header, so a policy built for an
//! older minor version reads the fields it knows and skips the rest.

pub mod formula;

/// The policy ABI version this SDK writes in a policy's metadata.
pub const ABI_MAJOR: u16 = 1;
pub const ABI_MINOR: u16 = 4;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_bits(u32_at(b, at))
}

fn f64_at(b: &[u8], at: usize) -> f64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    f64::from_le_bytes(a)
}

/// A ranking request: the cursor and the candidate snippets.
pub struct RankInput<'a> {
    bytes: &'a [u8],
}

/// Where the completion is requested.
pub struct Cursor<'a> {
    input: &'a RankInput<'a>,
    at: usize,
}

/// One candidate snippet with the features the host computed.
pub struct Candidate<'a> {
    input: &'a RankInput<'a>,
    at: usize,
}

impl<'a> RankInput<'a> {
    /// Wraps the bytes the host passed; `None` if they are not a ranking input.
    pub fn parse(bytes: &'a [u8]) -> Option<RankInput<'a>> {
        if bytes.len() < 32 || &bytes[0..4] != b"KRNK" || u16_at(bytes, 4) != ABI_MAJOR {
            return None;
        }
        Some(RankInput { bytes })
    }

    pub fn abi_minor(&self) -> u16 {
        u16_at(self.bytes, 6)
    }

    pub fn len(&self) -> usize {
        u32_at(self.bytes, 24) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cursor(&'a self) -> Cursor<'a> {
        Cursor { input: self, at: u32_at(self.bytes, 12) as usize }
    }

    pub fn candidate(&'a self, i: usize) -> Candidate<'a> {
        let base = u32_at(self.bytes, 16) as usize;
        let size = u32_at(self.bytes, 20) as usize;
        Candidate { input: self, at: base + i * size }
    }

    pub fn candidates(&'a self) -> impl Iterator<Item = Candidate<'a>> + 'a {
        (0..self.len()).map(move |i| self.candidate(i))
    }

    /// ABI 1.4: how many parameter values the host sent (the policy's
    /// declared `params`, in order); 0 from an older host.
    pub fn param_count(&self) -> usize {
        if u32_at(self.bytes, 8) >= 40 {
            u32_at(self.bytes, 36) as usize
        } else {
            0
        }
    }

    /// ABI 1.4: the value of the `i`-th parameter the policy declares
    /// (the user's from `config.toml`, else the declared default); `default`
    /// when the host sent none.
    pub fn param(&self, i: usize, default: f64) -> f64 {
        if i < self.param_count() {
            f64_at(self.bytes, u32_at(self.bytes, 32) as usize + 8 * i)
        } else {
            default
        }
    }

    /// ABI 1.4: every parameter value the host sent, in declaration order.
    pub fn params(&self) -> Vec<f64> {
        (0..self.param_count()).map(|i| self.param(i, 0.0)).collect()
    }

    fn str_at(&self, at: usize) -> &'a str {
        let strings = u32_at(self.bytes, 28) as usize;
        let (off, len) = (u32_at(self.bytes, at) as usize, u32_at(self.bytes, at + 4) as usize);
        let s = &self.bytes[strings + off..strings + off + len];
        // The host writes UTF-8; fall back to empty rather than trap.
        std::str::from_utf8(s).unwrap_or("")
    }
}

impl<'a> Cursor<'a> {
    pub fn language(&self) -> &'a str {
        self.input.str_at(self.at)
    }
    pub fn path(&self) -> &'a str {
        self.input.str_at(self.at + 8)
    }
    pub fn prefix(&self) -> &'a str {
        self.input.str_at(self.at + 16)
    }
    pub fn suffix(&self) -> &'a str {
        self.input.str_at(self.at + 24)
    }
    pub fn line(&self) -> u32 {
        u32_at(self.input.bytes, self.at + 32)
    }
}

impl<'a> Candidate<'a> {
    pub fn id(&self) -> u32 {
        u32_at(self.input.bytes, self.at)
    }
    pub fn token_count(&self) -> u32 {
        u32_at(self.input.bytes, self.at + 4)
    }
    pub fn bm25(&self) -> f32 {
        f32_at(self.input.bytes, self.at + 8)
    }
    pub fn jaccard(&self) -> f32 {
        f32_at(self.input.bytes, self.at + 12)
    }
    /// Seconds since the file was last edited; negative when unknown.
    pub fn edit_recency_s(&self) -> f32 {
        f32_at(self.input.bytes, self.at + 16)
    }
    /// Seconds since the file was last opened or viewed; negative when unknown.
    pub fn open_recency_s(&self) -> f32 {
        f32_at(self.input.bytes, self.at + 20)
    }
    /// Lines between the snippet and the cursor; negative for another file.
    pub fn line_distance(&self) -> i32 {
        u32_at(self.input.bytes, self.at + 24) as i32
    }
    /// `formula::SAME_FILE | IMPORT_RELATED | OPEN_IN_EDITOR` bits.
    pub fn flags(&self) -> u32 {
        u32_at(self.input.bytes, self.at + 28)
    }
    pub fn path(&self) -> &'a str {
        self.input.str_at(self.at + 32)
    }
    pub fn text(&self) -> &'a str {
        self.input.str_at(self.at + 40)
    }
    /// ABI 1.1: share of the identifiers near the cursor that the snippet
    /// defines; 0 from a 1.0 host.
    pub fn symbol_overlap(&self) -> f32 {
        if self.size() >= 52 {
            f32_at(self.input.bytes, self.at + 48)
        } else {
            0.0
        }
    }
    /// ABI 1.2: how near the cursor the nearest name the snippet defines
    /// is used (1 on the cursor's line, 1/2 sixteen lines away); 0 when it
    /// defines none, and from an older host.
    pub fn definition(&self) -> f32 {
        if self.size() >= 60 {
            f32_at(self.input.bytes, self.at + 56)
        } else {
            0.0
        }
    }
    /// ABI 1.2: `RESOLUTION_LINES`, `RESOLUTION_SIGNATURE` or
    /// `RESOLUTION_BODY`; lines from an older host.
    pub fn resolution(&self) -> u32 {
        if self.size() >= 64 {
            u32_at(self.input.bytes, self.at + 60)
        } else {
            RESOLUTION_LINES
        }
    }
    /// ABI 1.2: folders between its file's and the cursor's; negative when
    /// unknown (and from an older host).
    pub fn path_distance(&self) -> i32 {
        if self.size() >= 68 {
            u32_at(self.input.bytes, self.at + 64) as i32
        } else {
            -1
        }
    }
    /// ABI 1.3: 1 when the cursor's file imports the snippet's file, 2
    /// when a file it imports does; 0 neither, unknown, or an older host.
    pub fn import_hops(&self) -> u32 {
        if self.size() >= 72 && u16_at(self.input.bytes, 6) >= 3 {
            u32_at(self.input.bytes, self.at + 68)
        } else {
            0
        }
    }
    fn size(&self) -> usize {
        u32_at(self.input.bytes, 20) as usize
    }
}

/// A candidate's `resolution` (ABI 1.2).
pub const RESOLUTION_LINES: u32 = 0;
pub const RESOLUTION_SIGNATURE: u32 = 1;
pub const RESOLUTION_BODY: u32 = 2;
/// ABI 1.3: lines of another open document edited lately.
pub const RESOLUTION_EDIT: u32 = 3;

/// The parameter kinds of a tuning space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamKind {
    Float,
    Int,
    LogFloat,
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub kind: ParamKind,
    pub lo: f64,
    pub hi: f64,
}

/// A past trial: its parameter values and its metric (lower is better).
#[derive(Clone, Debug)]
pub struct Trial {
    pub metric: f64,
    pub values: Vec<f64>,
}

/// A tuning request: the space, the history, and a seed for any randomness.
pub struct TuneInput {
    pub params: Vec<Param>,
    pub trials: Vec<Trial>,
    pub seed: u64,
}

impl TuneInput {
    pub fn parse(b: &[u8]) -> Option<TuneInput> {
        if b.len() < 32 || &b[0..4] != b"KTUN" || u16_at(b, 4) != ABI_MAJOR {
            return None;
        }
        let header = u32_at(b, 8) as usize;
        let (n_params, n_trials, psize) = (u32_at(b, 12) as usize, u32_at(b, 16) as usize, u32_at(b, 20) as usize);
        let seed = u64::from(u32_at(b, 24)) | (u64::from(u32_at(b, 28)) << 32);
        let mut params = Vec::with_capacity(n_params);
        for i in 0..n_params {
            let at = header + i * psize;
            let kind = match u32_at(b, at) {
                1 => ParamKind::Int,
                2 => ParamKind::LogFloat,
                _ => ParamKind::Float,
            };
            params.push(Param { kind, lo: f64_at(b, at + 8), hi: f64_at(b, at + 16) });
        }
        let mut at = header + n_params * psize;
        let mut trials = Vec::with_capacity(n_trials);
        for _ in 0..n_trials {
            let metric = f64_at(b, at);
            let values = (0..n_params).map(|j| f64_at(b, at + 8 + 8 * j)).collect();
            trials.push(Trial { metric, values });
            at += 8 + 8 * n_params;
        }
        Some(TuneInput { params, trials, seed })
    }
}

/// A small deterministic generator (SplitMix64) for policies that sample:
/// seed it from the input so a decision replays exactly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.f64().max(1e-12);
        let v = self.f64();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Hands the host a buffer: returns (pointer << 32) | length, leaking it
/// (the instance is discarded after the call).
pub fn leak_output(bytes: Vec<u8>) -> i64 {
    let len = bytes.len() as i64;
    let ptr = bytes.as_ptr() as usize as i64;
    std::mem::forget(bytes);
    (ptr << 32) | len
}

/// The guest allocator the host calls to place the input.
pub fn alloc(size: i32) -> i32 {
    let mut v: Vec<u8> = Vec::with_capacity(size.max(0) as usize);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p as usize as i32
}

/// # Safety
/// `ptr`/`len` are the input the host wrote into memory from `alloc`.
pub unsafe fn input<'a>(ptr: i32, len: i32) -> &'a [u8] {
    std::slice::from_raw_parts(ptr as usize as *const u8, len.max(0) as usize)
}

/// Declares the metadata custom section and exports `kiln_alloc` and
/// `kiln_rank`, calling `$f(&RankInput, &mut Vec<f32>)`.
#[macro_export]
macro_rules! export_ranker {
    ($f:path, $meta:expr) => {
        #[link_section = "kiln_policy"]
        #[used]
        static KILN_POLICY_META: [u8; $meta.len()] = *$meta;

        #[no_mangle]
        pub extern "C" fn kiln_alloc(size: i32) -> i32 {
            $crate::alloc(size)
        }

        #[no_mangle]
        pub unsafe extern "C" fn kiln_rank(ptr: i32, len: i32) -> i64 {
            let bytes = $crate::input(ptr, len);
            let input = match $crate::RankInput::parse(bytes) {
                Some(i) => i,
                None => return 0,
            };
            let mut scores: Vec<f32> = Vec::with_capacity(input.len());
            $f(&input, &mut scores);
            let mut out = Vec::with_capacity(4 + 4 * scores.len());
            out.extend_from_slice(&(scores.len() as u32).to_le_bytes());
            for s in &scores {
                out.extend_from_slice(&s.to_le_bytes());
            }
            $crate::leak_output(out)
        }
    };
}

/// Declares the metadata custom section and exports `kiln_alloc` and
/// `kiln_tune`, calling `$f(&TuneInput) -> Vec<f64>`.
#[macro_export]
macro_rules! export_tuner {
    ($f:path, $meta:expr) => {
        #[link_section = "kiln_policy"]
        #[used]
        static KILN_POLICY_META: [u8; $meta.len()] = *$meta;

        #[no_mangle]
        pub extern "C" fn kiln_alloc(size: i32) -> i32 {
            $crate::alloc(size)
        }

        #[no_mangle]
        pub unsafe extern "C" fn kiln_tune(ptr: i32, len: i32) -> i64 {
            let bytes = $crate::input(ptr, len);
            let input = match $crate::TuneInput::parse(bytes) {
                Some(i) => i,
                None => return 0,
            };
            let values: Vec<f64> = $f(&input);
            let mut out = Vec::with_capacity(8 * values.len());
            for v in &values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            $crate::leak_output(out)
        }
    };
}
