//! GGUF, llama.cpp's model file format: a reader over a memory map and a
//! streaming writer.
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count
//! (u64), metadata count (u64); the metadata key/value pairs; the tensor
//! infos (name, dims, type, offset); padding to `general.alignment`
//! (default 32); the tensor data, each tensor at an aligned offset.
//!
//! The reader never panics and never reads out of bounds on any input: every
//! length is checked against the bytes that remain before anything is
//! allocated, and every error names the file, the byte offset and what was
//! wrong there.

mod read;
mod write;

pub(crate) use read::crypt_error;
pub use read::{GgufFile, TensorInfo};
pub use write::{GgufWriter, LlamaShape, TensorSpec};

use std::fmt;
use std::path::PathBuf;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const MAX_DIMS: usize = 4;

/// A metadata value. Arrays keep their element type so that an empty array
/// round-trips.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_raw(raw: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match raw {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of a fixed-size value; `None` for strings and arrays.
    fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer value that fits in a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

/// What went wrong, where.
#[derive(Debug, thiserror::Error)]
pub struct GgufError {
    pub path: PathBuf,
    /// Byte offset in the file, when the problem is at a place.
    pub offset: Option<u64>,
    pub what: String,
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{}: at byte {o}: {}", self.path.display(), self.what),
            None => write!(f, "{}: {}", self.path.display(), self.what),
        }
    }
}

/// Round `n` up to a multiple of `align` (a power of two or any non-zero value).
pub fn align_up(n: u64, align: u64) -> Option<u64> {
    n.checked_add(align - 1).map(|v| v / align * align)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plugin_api::DType;
    use proptest::prelude::*;
    use std::path::Path;

    fn sample_metadata() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("u8".into(), Value::U8(7)),
            ("i8".into(), Value::I8(-7)),
            ("u16".into(), Value::U16(65535)),
            ("i16".into(), Value::I16(-300)),
            ("u32".into(), Value::U32(1 << 31)),
            ("i32".into(), Value::I32(-5)),
            ("f32".into(), Value::F32(0.25)),
            ("bool".into(), Value::Bool(true)),
            ("u64".into(), Value::U64(u64::MAX)),
            ("i64".into(), Value::I64(i64::MIN)),
            ("f64".into(), Value::F64(-1e300)),
            ("unicode ✓".into(), Value::String("ünïcødé 🦀".into())),
            (
                "tokens".into(),
                Value::Array(
                    ValueType::String,
                    vec![Value::String("a".into()), Value::String("".into())],
                ),
            ),
            ("empty".into(), Value::Array(ValueType::F32, vec![])),
            (
                "nested".into(),
                Value::Array(
                    ValueType::Array,
                    vec![Value::Array(
                        ValueType::I32,
                        vec![Value::I32(1), Value::I32(2)],
                    )],
                ),
            ),
        ]
    }

    fn sample_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
        let spec = |name: &str, dtype, ne: [u64; 4], n_dims| TensorSpec {
            name: name.into(),
            dtype,
            ne,
            n_dims,
        };
        let fill = |t: &TensorSpec, seed: u8| {
            (0..t.size())
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect()
        };
        let specs = vec![
            spec("a.weight", DType::F32, [3, 1, 1, 1], 1),
            spec("b.weight", DType::Q4_0, [64, 3, 1, 1], 2),
            spec("c.weight", DType::Q6_K, [256, 2, 1, 1], 2),
            spec("d.weight", DType::F16, [5, 2, 3, 1], 3),
        ];
        specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let d = fill(&s, i as u8);
                (s, d)
            })
            .collect()
    }

    fn write_sample(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("sample.gguf");
        let tensors = sample_tensors();
        let specs: Vec<TensorSpec> = tensors.iter().map(|t| t.0.clone()).collect();
        let mut w = GgufWriter::create(&path, &sample_metadata(), &specs).unwrap();
        for (_, data) in &tensors {
            w.write_tensor(data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    #[test]
    fn round_trips_every_value_type_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, sample_metadata());
        for (spec, data) in sample_tensors() {
            let t = f.tensor(&spec.name).unwrap();
            assert_eq!(
                (t.dtype, t.ne, t.n_dims),
                (spec.dtype, spec.ne, spec.n_dims)
            );
            assert_eq!(t.offset % DEFAULT_ALIGNMENT, 0);
            assert_eq!(f.tensor_data(t), &data[..]);
        }
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("sample.gguf")]);
    }

    #[test]
    fn the_header_of_an_encrypted_file_is_read_without_its_weights() {
        let dir = tempfile::tempdir().unwrap();
        // Metadata of about 2 MiB: more than the first read of a header.
        let mut metadata = sample_metadata();
        let vocab = (0..100_000)
            .map(|i| Value::String(format!("token{i:08}")))
            .collect();
        metadata.push(("vocab".into(), Value::Array(ValueType::String, vocab)));
        let mut specs = vec![];
        let mut data = vec![];
        for (s, d) in sample_tensors() {
            specs.push(s);
            data.push(d);
        }
        specs.push(TensorSpec::new("big.weight", DType::F32, &[65536, 64]));
        data.push(vec![0x5a; 65536 * 64 * 4]);
        let path = dir.path().join("m.gguf");
        let mut w = GgufWriter::create(&path, &metadata, &specs).unwrap();
        for d in &data {
            w.write_tensor(d).unwrap();
        }
        w.finish().unwrap();
        let (keys, _) = crate::crypt::Keys::generate();
        let sealed = dir.path().join("m.gguf.age");
        let mut plain = std::fs::File::open(&path).unwrap();
        crate::crypt::encrypt_file(&mut plain, &sealed, &keys, |_| {}).unwrap();

        let whole = GgufFile::open(&path).unwrap();
        let head = GgufFile::header_of_sealed(
            &sealed,
            &crate::crypt::Sealed::open(&sealed, &keys).unwrap(),
        )
        .unwrap();
        assert!(!head.has_data() && whole.has_data());
        assert_eq!(head.metadata, whole.metadata);
        assert_eq!(head.tensors, whole.tensors);
        assert_eq!(head.data_offset, whole.data_offset);
        // Weights changed past the header: the header still reads (the
        // weights were not decrypted), a whole load refuses the file.
        let mut bytes = std::fs::read(&sealed).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(&sealed, &bytes).unwrap();
        let head = GgufFile::header_of_sealed(
            &sealed,
            &crate::crypt::Sealed::open(&sealed, &keys).unwrap(),
        )
        .unwrap();
        assert_eq!(head.tensors, whole.tensors);
        assert!(crate::crypt::decrypt_into_memory(&sealed, &keys).is_err());
        // A header that is wrong is refused as by `open`.
        let (other, _) = crate::crypt::Keys::generate();
        assert!(
            crate::crypt::Sealed::open(&sealed, &other)
                .map_err(|e| e.to_string())
                .and_then(|s| GgufFile::header_of_sealed(&sealed, &s).map_err(|e| e.to_string()))
                .is_err()
        );
        let bad = dir.path().join("bad.age");
        let mut text = &b"not a gguf file at all"[..];
        crate::crypt::encrypt_file(&mut text, &bad, &keys, |_| {}).unwrap();
        let Err(e) =
            GgufFile::header_of_sealed(&bad, &crate::crypt::Sealed::open(&bad, &keys).unwrap())
        else {
            panic!("not a GGUF file, read");
        };
        assert!(e.to_string().contains("not a GGUF file"), "{e}");
    }

    #[test]
    fn a_copy_in_memory_holds_the_files_bytes_and_refuses_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_sample(dir.path());
        let mut f = GgufFile::open(&path).unwrap();
        assert_eq!(f.copied_bytes(), 0);
        assert!(f.tensor_data_mut(0).is_none(), "a mapped file is read-only");
        f.copy_into_memory().unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(f.copied_bytes(), on_disk.len() as u64);
        assert_eq!(f.bytes(), &on_disk[..]);
        f.tensor_data_mut(0).unwrap().fill(0xAB);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            on_disk,
            "the file was written"
        );

        let mut g = GgufFile::open(&path).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &[0; 7]).unwrap();
        let err = g.copy_into_memory().unwrap_err().to_string();
        assert!(err.contains("changed while loading"), "{err}");
        assert_eq!(g.copied_bytes(), 0);
    }

    #[test]
    fn an_unfinished_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        let tensors = sample_tensors();
        let specs: Vec<TensorSpec> = tensors.iter().map(|t| t.0.clone()).collect();
        let mut w = GgufWriter::create(&path, &sample_metadata(), &specs).unwrap();
        w.write_tensor(&tensors[0].1).unwrap();
        assert!(w.write_tensor(&[1, 2, 3]).is_err());
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn errors_name_file_offset_and_problem() {
        let name = Path::new("model.gguf");
        let err = GgufFile::from_bytes(name, b"GGML\x03\0\0\0".to_vec())
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "model.gguf: at byte 0: not a GGUF file: magic is [47, 47, 4d, 4c], expected \"GGUF\""
        );
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(write_sample(dir.path())).unwrap();
        let err = GgufFile::from_bytes(name, bytes[..bytes.len() - 10].to_vec())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("truncated: tensor \"d.weight\""),
            "{err}"
        );
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
        let err = GgufFile::from_bytes(name, huge).err().unwrap();
        assert!(
            err.to_string()
                .contains("at byte 16: the metadata count is 18446744073709551615"),
            "{err}"
        );
    }

    #[test]
    fn a_headers_length_is_found_from_its_lengths_alone() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(write_sample(dir.path())).unwrap();
        let len = bytes.len() as u64;
        let full = GgufFile::from_bytes(Path::new("t.gguf"), bytes.clone()).unwrap();
        let data = full.data_offset as usize;
        // Every prefix that ends inside the header asks for more, never
        // for bytes past the data's start; the first that does not is
        // the whole header: the last tensor info's end.
        let mut first_whole = None;
        for cut in 0..=data {
            match read::header_needs(&bytes[..cut], len) {
                Some(end) => {
                    assert!(
                        first_whole.is_none(),
                        "cut {cut} asks for more after a whole header"
                    );
                    assert!(end > cut as u64 && end <= data as u64, "cut {cut}: {end}");
                }
                None => {
                    first_whole.get_or_insert(cut);
                }
            }
        }
        let end = first_whole.unwrap();
        assert!(end > 24 && end <= data && data - end < DEFAULT_ALIGNMENT as usize);
        // A length past the file's end is malformed, not short: the parse
        // names it (the same prefix of the good file asks for more).
        let mut bad = bytes.clone();
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read::header_needs(&bytes[..end - 1], len).is_some());
        assert_eq!(read::header_needs(&bad[..end - 1], len), None);
    }

    proptest! {
        // KILN_FUZZ_CASES raises the count for a longer local fuzzing run.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn truncations_never_panic_and_always_fail(cut in 0usize..10_000) {
            let dir = tempfile::tempdir().unwrap();
            let bytes = std::fs::read(write_sample(dir.path())).unwrap();
            let full = GgufFile::from_bytes(Path::new("t.gguf"), bytes.clone()).unwrap();
            // Cutting only the padding after the last tensor loses nothing.
            let data_end = full.tensors.iter().map(|t| full.data_offset + t.offset + t.size).max().unwrap();
            let cut = cut % data_end as usize;
            prop_assert!(GgufFile::from_bytes(Path::new("t.gguf"), bytes[..cut].to_vec()).is_err());
        }

        #[test]
        fn mutations_never_panic(edits in proptest::collection::vec((0usize..100_000, any::<u8>()), 1..8)) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = std::fs::read(write_sample(dir.path())).unwrap();
            for (at, b) in edits {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let len = bytes.len() as u64;
            for cut in [0, 100, 1000, bytes.len()] {
                if let Some(end) = read::header_needs(&bytes[..cut.min(bytes.len())], len) {
                    prop_assert!(end > cut as u64 && end <= len);
                }
            }
            // Either parses (a harmless edit) or fails cleanly; a parse
            // that succeeds must hand out in-bounds tensor data.
            if let Ok(f) = GgufFile::from_bytes(Path::new("m.gguf"), bytes) {
                for t in &f.tensors {
                    prop_assert_eq!(f.tensor_data(t).len() as u64, t.size);
                }
            }
        }
    }
}
