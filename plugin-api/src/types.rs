//! Safe Rust names for the ABI's numbered constants: data types, op kinds,
//! device kinds and status codes, with conversions from the raw numbers.

use crate::abi::*;
use core::fmt;

/// Element types of tensors. Numbered as ggml numbers them.
#[allow(non_camel_case_types)] // the field names them Q4_0, Q4_K: keep them recognisable
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DType {
    F32 = KILN_DTYPE_F32,
    F16 = KILN_DTYPE_F16,
    Q4_0 = KILN_DTYPE_Q4_0,
    Q4_1 = KILN_DTYPE_Q4_1,
    Q5_0 = KILN_DTYPE_Q5_0,
    Q5_1 = KILN_DTYPE_Q5_1,
    Q8_0 = KILN_DTYPE_Q8_0,
    Q2_K = KILN_DTYPE_Q2_K,
    Q3_K = KILN_DTYPE_Q3_K,
    Q4_K = KILN_DTYPE_Q4_K,
    Q5_K = KILN_DTYPE_Q5_K,
    Q6_K = KILN_DTYPE_Q6_K,
    IQ4_NL = KILN_DTYPE_IQ4_NL,
    IQ4_XS = KILN_DTYPE_IQ4_XS,
    I32 = KILN_DTYPE_I32,
    BF16 = KILN_DTYPE_BF16,
    /// Q5_0 with every 16 blocks of a row interleaved lane-wise: kiln's own
    /// layout, repacked at load time ([`crate::interleave`]).
    Q5_0X16 = KILN_DTYPE_Q5_0_X16,
    /// Q4_0 with every 16 blocks of a row interleaved lane-wise, as
    /// [`DType::Q5_0X16`] without the fifth bits.
    Q4_0X16 = KILN_DTYPE_Q4_0_X16,
}

impl DType {
    pub const ALL: [DType; 18] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_0X16,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q5_0X16,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_NL,
        DType::IQ4_XS,
        DType::I32,
    ];

    /// The weight types a model file may hold and a matmul may be asked
    /// for (the conformance suite has a case for each; a backend claims
    /// the ones it runs).
    pub const WEIGHTS: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::IQ4_NL,
        DType::IQ4_XS,
    ];

    pub const fn from_raw(raw: u32) -> Option<DType> {
        Some(match raw {
            KILN_DTYPE_F32 => DType::F32,
            KILN_DTYPE_F16 => DType::F16,
            KILN_DTYPE_Q4_0 => DType::Q4_0,
            KILN_DTYPE_Q4_1 => DType::Q4_1,
            KILN_DTYPE_Q5_0 => DType::Q5_0,
            KILN_DTYPE_Q5_1 => DType::Q5_1,
            KILN_DTYPE_Q8_0 => DType::Q8_0,
            KILN_DTYPE_Q2_K => DType::Q2_K,
            KILN_DTYPE_Q3_K => DType::Q3_K,
            KILN_DTYPE_Q4_K => DType::Q4_K,
            KILN_DTYPE_Q5_K => DType::Q5_K,
            KILN_DTYPE_Q6_K => DType::Q6_K,
            KILN_DTYPE_IQ4_NL => DType::IQ4_NL,
            KILN_DTYPE_IQ4_XS => DType::IQ4_XS,
            KILN_DTYPE_I32 => DType::I32,
            KILN_DTYPE_BF16 => DType::BF16,
            KILN_DTYPE_Q5_0_X16 => DType::Q5_0X16,
            KILN_DTYPE_Q4_0_X16 => DType::Q4_0X16,
            _ => return None,
        })
    }

    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Elements per block (1 for plain types).
    pub const fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I32 => 1,
            DType::Q4_0
            | DType::Q4_0X16
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q5_0X16
            | DType::Q8_0
            | DType::IQ4_NL => 32,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                256
            }
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 | DType::Q4_0X16 | DType::IQ4_NL => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 | DType::Q5_0X16 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_XS => 136,
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole
    /// number of blocks.
    pub const fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        Some(n / self.block_len() * self.block_bytes())
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q5_0X16 => "q5_0x16",
            DType::Q4_0X16 => "q4_0x16",
            DType::Q8_0 => "q8_0",
            DType::Q2_K => "q2_k",
            DType::Q3_K => "q3_k",
            DType::Q4_K => "q4_k",
            DType::Q5_K => "q5_k",
            DType::Q6_K => "q6_k",
            DType::IQ4_NL => "iq4_nl",
            DType::IQ4_XS => "iq4_xs",
            DType::I32 => "i32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Operation kinds. Semantics are documented in `kiln_backend.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum OpKind {
    MulMat = KILN_OP_MUL_MAT,
    Add = KILN_OP_ADD,
    Mul = KILN_OP_MUL,
    Scale = KILN_OP_SCALE,
    RmsNorm = KILN_OP_RMS_NORM,
    Rope = KILN_OP_ROPE,
    SoftMax = KILN_OP_SOFT_MAX,
    Silu = KILN_OP_SILU,
    Gelu = KILN_OP_GELU,
    GetRows = KILN_OP_GET_ROWS,
    Cpy = KILN_OP_CPY,
    Norm = KILN_OP_NORM,
    Attention = KILN_OP_ATTENTION,
}

impl OpKind {
    pub const ALL: [OpKind; 13] = [
        OpKind::MulMat,
        OpKind::Add,
        OpKind::Mul,
        OpKind::Scale,
        OpKind::RmsNorm,
        OpKind::Rope,
        OpKind::SoftMax,
        OpKind::Silu,
        OpKind::Gelu,
        OpKind::GetRows,
        OpKind::Cpy,
        OpKind::Norm,
        OpKind::Attention,
    ];

    pub const fn from_raw(raw: u32) -> Option<OpKind> {
        Some(match raw {
            KILN_OP_MUL_MAT => OpKind::MulMat,
            KILN_OP_ADD => OpKind::Add,
            KILN_OP_MUL => OpKind::Mul,
            KILN_OP_SCALE => OpKind::Scale,
            KILN_OP_RMS_NORM => OpKind::RmsNorm,
            KILN_OP_ROPE => OpKind::Rope,
            KILN_OP_SOFT_MAX => OpKind::SoftMax,
            KILN_OP_SILU => OpKind::Silu,
            KILN_OP_GELU => OpKind::Gelu,
            KILN_OP_GET_ROWS => OpKind::GetRows,
            KILN_OP_CPY => OpKind::Cpy,
            KILN_OP_NORM => OpKind::Norm,
            KILN_OP_ATTENTION => OpKind::Attention,
            _ => return None,
        })
    }

    pub const fn raw(self) -> u32 {
        self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            OpKind::MulMat => "mul_mat",
            OpKind::Add => "add",
            OpKind::Mul => "mul",
            OpKind::Scale => "scale",
            OpKind::RmsNorm => "rms_norm",
            OpKind::Rope => "rope",
            OpKind::SoftMax => "soft_max",
            OpKind::Silu => "silu",
            OpKind::Gelu => "gelu",
            OpKind::GetRows => "get_rows",
            OpKind::Cpy => "cpy",
            OpKind::Norm => "norm",
            OpKind::Attention => "attention",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
}

impl DeviceKind {
    pub const fn from_raw(raw: u32) -> Option<DeviceKind> {
        Some(match raw {
            KILN_DEVICE_CPU => DeviceKind::Cpu,
            KILN_DEVICE_GPU => DeviceKind::Gpu,
            KILN_DEVICE_INTEGRATED_GPU => DeviceKind::IntegratedGpu,
            KILN_DEVICE_ACCELERATOR => DeviceKind::Accelerator,
            _ => return None,
        })
    }

    pub const fn raw(self) -> u32 {
        match self {
            DeviceKind::Cpu => KILN_DEVICE_CPU,
            DeviceKind::Gpu => KILN_DEVICE_GPU,
            DeviceKind::IntegratedGpu => KILN_DEVICE_INTEGRATED_GPU,
            DeviceKind::Accelerator => KILN_DEVICE_ACCELERATOR,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "integrated-gpu",
            DeviceKind::Accelerator => "accelerator",
        }
    }
}

/// The error half of the status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Unsupported,
    InvalidArgument,
    OutOfMemory,
    Device,
    AbiMismatch,
    Panic,
    Internal,
    /// A code this version does not know (a newer plugin's).
    Other(i32),
}

impl ErrorCode {
    pub const fn from_status(status: i32) -> ErrorCode {
        match status {
            KILN_STATUS_UNSUPPORTED => ErrorCode::Unsupported,
            KILN_STATUS_INVALID_ARGUMENT => ErrorCode::InvalidArgument,
            KILN_STATUS_OUT_OF_MEMORY => ErrorCode::OutOfMemory,
            KILN_STATUS_DEVICE_ERROR => ErrorCode::Device,
            KILN_STATUS_ABI_MISMATCH => ErrorCode::AbiMismatch,
            KILN_STATUS_PANIC => ErrorCode::Panic,
            KILN_STATUS_INTERNAL => ErrorCode::Internal,
            other => ErrorCode::Other(other),
        }
    }

    pub const fn status(self) -> i32 {
        match self {
            ErrorCode::Unsupported => KILN_STATUS_UNSUPPORTED,
            ErrorCode::InvalidArgument => KILN_STATUS_INVALID_ARGUMENT,
            ErrorCode::OutOfMemory => KILN_STATUS_OUT_OF_MEMORY,
            ErrorCode::Device => KILN_STATUS_DEVICE_ERROR,
            ErrorCode::AbiMismatch => KILN_STATUS_ABI_MISMATCH,
            ErrorCode::Panic => KILN_STATUS_PANIC,
            ErrorCode::Internal => KILN_STATUS_INTERNAL,
            // A zero here would read as success; never let it.
            ErrorCode::Other(0) => KILN_STATUS_INTERNAL,
            ErrorCode::Other(code) => code,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::OutOfMemory => "out of memory",
            ErrorCode::Device => "device error",
            ErrorCode::AbiMismatch => "ABI mismatch",
            ErrorCode::Panic => "panic",
            ErrorCode::Internal => "internal error",
            ErrorCode::Other(_) => "unknown error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(code) => write!(f, "error code {code}"),
            _ => f.write_str(self.name()),
        }
    }
}

/// An error as it crosses the ABI: a code, a message and, for graph
/// execution, the index of the op that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    pub code: ErrorCode,
    pub message: String,
    pub op_index: Option<u32>,
}

impl BackendError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        BackendError {
            code,
            message: message.into(),
            op_index: None,
        }
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn at_op(mut self, index: u32) -> Self {
        self.op_index = Some(index);
        self
    }

    /// Writes this error into a raw `KilnError`, truncating the message at a
    /// character boundary.
    pub fn write_to(&self, out: &mut KilnError) {
        out.code = self.code.status();
        out.op_index = self.op_index.map_or(-1, |i| i as i32);
        write_c_string(&mut out.message, &self.message);
    }

    /// Reads a raw `KilnError` that a callee filled after returning `status`.
    pub fn from_raw(status: i32, raw: &KilnError) -> Self {
        let message = read_c_string(&raw.message);
        BackendError {
            code: ErrorCode::from_status(status),
            message: if message.is_empty() {
                "(the plugin gave no message)".to_string()
            } else {
                message
            },
            op_index: u32::try_from(raw.op_index).ok(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(i) = self.op_index {
            write!(f, " (op {i})")?;
        }
        Ok(())
    }
}

impl std::error::Error for BackendError {}

/// Copies `s` into a fixed C char buffer, NUL-terminated, cut at a UTF-8
/// character boundary when it does not fit.
pub fn write_c_string(out: &mut [core::ffi::c_char], s: &str) {
    if out.is_empty() {
        return;
    }
    let mut end = s.len().min(out.len() - 1);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    for (dst, src) in out.iter_mut().zip(&s.as_bytes()[..end]) {
        *dst = *src as core::ffi::c_char;
    }
    out[end] = 0;
}

/// Reads a fixed C char buffer up to its first NUL (or its end), replacing
/// invalid UTF-8.
pub fn read_c_string(buf: &[core::ffi::c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Stores an f32 op parameter in a raw params word.
pub const fn f32_param(v: f32) -> i32 {
    v.to_bits() as i32
}

/// Reads an f32 op parameter from a raw params word.
pub const fn param_f32(word: i32) -> f32 {
    f32::from_bits(word as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_round_trips_through_raw() {
        for t in DType::ALL {
            assert_eq!(DType::from_raw(t.raw()), Some(t));
        }
        assert_eq!(DType::from_raw(9), None, "Q8_1 is no weight type");
    }

    #[test]
    fn every_dtype_in_the_c_header_is_a_dtype_here() {
        let header = include_str!("../include/kiln_backend.h");
        let mut seen = Vec::new();
        for line in header.lines() {
            let Some(rest) = line.strip_prefix("#define KILN_DTYPE_") else {
                continue;
            };
            let (name, value) = rest.split_once(' ').unwrap();
            let t = DType::from_raw(value.trim().parse().unwrap())
                .unwrap_or_else(|| panic!("KILN_DTYPE_{name} has no DType"));
            assert_eq!(t.name(), name.to_lowercase().replace("_x16", "x16"));
            seen.push(t);
        }
        assert_eq!(seen.len(), DType::ALL.len(), "{seen:?}");
    }

    #[test]
    fn op_round_trips_through_raw() {
        for op in OpKind::ALL {
            assert_eq!(OpKind::from_raw(op.raw()), Some(op));
        }
        assert_eq!(OpKind::from_raw(0), None);
    }

    #[test]
    fn c_string_truncates_on_char_boundary() {
        let mut buf = [1 as core::ffi::c_char; 6];
        write_c_string(&mut buf, "ab\u{e9}\u{e9}z");
        // "ab" + "é" is 4 bytes; the second "é" would need bytes 4..6, past the NUL slot.
        assert_eq!(read_c_string(&buf), "ab\u{e9}");
        write_c_string(&mut buf, "");
        assert_eq!(read_c_string(&buf), "");
    }

    #[test]
    fn error_codes_never_map_to_ok() {
        assert_ne!(ErrorCode::Other(0).status(), KILN_STATUS_OK);
        assert_eq!(ErrorCode::from_status(KILN_STATUS_PANIC), ErrorCode::Panic);
    }

    #[test]
    fn row_bytes_needs_whole_blocks() {
        assert_eq!(DType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(DType::Q4_0.row_bytes(65), None);
        assert_eq!(DType::Q6_K.row_bytes(512), Some(420));
        assert_eq!(DType::F16.row_bytes(3), Some(6));
    }
}
