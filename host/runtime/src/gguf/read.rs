//! The GGUF reader. The file is memory-mapped; metadata is parsed into
//! owned values, tensor data stays in the map and is handed out as slices.

use super::*;
use kiln_plugin_api::DType;
use memmap2::{Mmap, MmapMut, MmapOptions};
use std::path::Path;

/// One tensor's description and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Extents, innermost first (ggml order); unused dimensions are 1.
    pub ne: [u64; MAX_DIMS],
    pub n_dims: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// The file's bytes: mapped from disk (read-only), read into anonymous
/// memory on huge pages (to be rewritten; the file never changes), or
/// owned (tests, small files).
enum Storage {
    Mapped(Mmap),
    Copied(MmapMut),
    Owned(Vec<u8>),
    /// The start of a file, up to the end of its tensor infos at least:
    /// [`GgufFile::open_header`]'s, whose tensor data is not read.
    Header(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Copied(m) => m,
            Storage::Owned(v) | Storage::Header(v) => v,
        }
    }
}

/// Reads `file` from its start into `buf`, in a few parallel slices
/// (reading from the page cache is a copy, one core's memory bandwidth).
fn read_in_parallel(file: &std::fs::File, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let parts = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4);
    let chunk = buf.len().div_ceil(parts).max(1);
    std::thread::scope(|s| {
        let jobs: Vec<_> = buf
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, part)| s.spawn(move || file.read_exact_at(part, (i * chunk) as u64)))
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("a read thread panicked"))
    })
}

/// A decryption error as an error about the GGUF file at `path` (its
/// detail alone where it is about that file, not a key file).
pub(crate) fn crypt_error(path: &Path, e: crate::crypt::CryptError) -> GgufError {
    GgufError {
        path: path.to_path_buf(),
        offset: None,
        what: if e.path() == path {
            e.detail()
        } else {
            e.to_string()
        },
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Storage,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts.
    pub data_offset: u64,
    /// The file's length (more than `map` holds for a header alone).
    len: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Set where a read needed bytes past the end of `bytes`: where that
    /// read would have ended (at least).
    short: &'a std::cell::Cell<Option<u64>>,
}

impl<'a> Cursor<'a> {
    fn err(&self, at: usize, what: impl Into<String>) -> GgufError {
        GgufError {
            path: self.path.to_path_buf(),
            offset: Some(at as u64),
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let remaining = self.bytes.len() - self.pos;
        if n > remaining {
            self.short.set(Some(self.pos as u64 + n as u64));
            return Err(self.err(
                self.pos,
                format!("truncated: {what} needs {n} bytes, only {remaining} remain"),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_item` bytes: refused
    /// when the rest of the file could not hold them, so a hostile count
    /// never turns into a huge allocation.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > remaining {
            let need = n.saturating_mul(min_item as u64);
            self.short.set(Some((self.pos as u64).saturating_add(need)));
            return Err(self.err(
                at,
                format!("{what} is {n}, more than the {remaining} remaining bytes can hold"),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len_at = self.pos;
        let len = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            let _ = len_at;
            self.err(
                at + e.utf8_error().valid_up_to(),
                format!("{what} is not valid UTF-8"),
            )
        })
    }

    fn value(&mut self, ty: ValueType, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>("a u8 value")?[0]),
            ValueType::I8 => Value::I8(self.array::<1>("an i8 value")?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("a u16 value")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("an i16 value")?)),
            ValueType::U32 => Value::U32(self.u32("a u32 value")?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("an i32 value")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("an f32 value")?)),
            ValueType::U64 => Value::U64(self.u64("a u64 value")?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("an i64 value")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("an f64 value")?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>("a bool value")?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(self.err(at, format!("bool value {b} is neither 0 nor 1"))),
                }
            }
            ValueType::String => Value::String(self.string("a string value")?),
            ValueType::Array => {
                if depth >= 8 {
                    return Err(self.err(self.pos, "arrays nested more than 8 deep"));
                }
                let at = self.pos;
                let raw = self.u32("an array's element type")?;
                let elem = ValueType::from_raw(raw)
                    .ok_or_else(|| self.err(at, format!("unknown array element type {raw}")))?;
                let min = elem.fixed_size().unwrap_or(8);
                let n = self.count("an array's length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }

    /// Steps over a value of type `ty` as [`Cursor::value`] reads it,
    /// building nothing (strings are not checked as UTF-8).
    fn skip_value(&mut self, ty: ValueType, depth: u32) -> Result<(), GgufError> {
        match (ty, ty.fixed_size()) {
            (_, Some(size)) => self.take(size, "a value").map(drop),
            (ValueType::String, None) => {
                let n = self.count("a string's length", 1)?;
                self.take(n, "a string").map(drop)
            }
            _ if depth >= 8 => Err(self.err(self.pos, "arrays nested more than 8 deep")),
            _ => {
                let at = self.pos;
                let raw = self.u32("an array's element type")?;
                let elem = ValueType::from_raw(raw)
                    .ok_or_else(|| self.err(at, format!("unknown array element type {raw}")))?;
                let n = self.count("an array's length", elem.fixed_size().unwrap_or(8))?;
                match elem.fixed_size() {
                    // `count` checked that the bytes left hold them.
                    Some(size) => self.take(n * size, "an array").map(drop),
                    None => (0..n).try_for_each(|_| self.skip_value(elem, depth + 1)),
                }
            }
        }
    }
}

/// Bytes past the end of `bytes`, the first of a GGUF file of `file_len`
/// bytes, that its header, metadata and tensor infos need (at least): the
/// parse's own reads, stepping over values ([`Cursor::skip_value`])
/// instead of building them, so finding that a prefix is too short costs
/// little (a parse that runs out costs as much as one that does not).
/// `None` where they fit, or where the start is not well formed (the
/// parse names what is wrong).
pub(super) fn header_needs(bytes: &[u8], file_len: u64) -> Option<u64> {
    let short = std::cell::Cell::new(None);
    let mut c = Cursor {
        bytes,
        pos: 0,
        path: Path::new(""),
        short: &short,
    };
    let mut walk = || -> Result<(), GgufError> {
        c.take(8, "the magic number and the version")?;
        let n_tensors = c.count("the tensor count", 32)?;
        let n_kv = c.count("the metadata count", 13)?;
        for _ in 0..n_kv {
            c.skip_value(ValueType::String, 0)?;
            let ty = c.u32("a metadata value type")?;
            let ty = ValueType::from_raw(ty).ok_or_else(|| c.err(c.pos, "unknown value type"))?;
            c.skip_value(ty, 0)?;
        }
        for _ in 0..n_tensors {
            c.skip_value(ValueType::String, 0)?;
            let n_dims = c.u32("a tensor's dimension count")? as usize;
            if n_dims > MAX_DIMS {
                return Err(c.err(c.pos, "too many dimensions"));
            }
            c.take(8 * n_dims + 4 + 8, "a tensor info")?;
        }
        Ok(())
    };
    walk().err()?;
    short.get().filter(|&end| end <= file_len)
}

fn dtype_from_ggml(raw: u32) -> Option<DType> {
    // kiln's own layouts (Q4_0X16, Q5_0X16) exist only in memory, never
    // in a file.
    DType::from_raw(raw).filter(|t| DType::WEIGHTS.contains(t) || *t == DType::I32)
}

/// What kiln loads, for error messages: "F32, F16, …".
fn supported_types() -> String {
    DType::WEIGHTS
        .iter()
        .map(|t| t.name().to_uppercase())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names of ggml types kiln does not load, for error messages.
fn ggml_type_name(raw: u32) -> String {
    let name = match raw {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        29 => "IQ1_M",
        24 => "I8",
        25 => "I16",
        27 => "I64",
        28 => "F64",
        34 | 35 => "a ternary (TQ) type",
        39 => "MXFP4",
        _ => "unknown",
    };
    format!("ggml type {raw} ({name})")
}

impl GgufFile {
    /// Opens and parses `path`. The data stays mapped; an encrypted
    /// (age) file is decrypted into anonymous memory with the keys of the
    /// environment ([`crate::crypt::Keys::from_process_env`]).
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        if crate::crypt::is_encrypted(path).unwrap_or(false) {
            let plain = crate::crypt::Keys::from_process_env()
                .and_then(|keys| crate::crypt::decrypt_into_memory(path, &keys))
                .map_err(|e| crypt_error(path, e))?;
            let len = plain.len() as u64;
            return GgufFile::parse(path, Storage::Copied(plain), len);
        }
        let file = std::fs::File::open(path).map_err(|e| GgufError {
            path: path.to_path_buf(),
            offset: None,
            what: format!("cannot open: {e}"),
        })?;
        // SAFETY: the map is read-only and private to this process. A
        // concurrent truncation of the file by another process could fault
        // on access; model files are not written in place (kiln writes them
        // to a temp file and renames).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| GgufError {
            path: path.to_path_buf(),
            offset: None,
            what: format!("cannot map: {e}"),
        })?;
        let len = map.len() as u64;
        GgufFile::parse(path, Storage::Mapped(map), len)
    }

    /// [`GgufFile::open`] for the header, metadata and tensor infos alone
    /// (a model's configuration, its budget, its graphs' shapes): an
    /// encrypted file has only the chunks that hold them decrypted, not
    /// its weights; a plain file is mapped as by `open` (which reads
    /// nothing yet). The tensor data of an encrypted file opened so is not
    /// there: [`GgufFile::tensor_data`] and [`GgufFile::bytes`] must not be
    /// used on it ([`GgufFile::has_data`] says).
    pub fn open_header(path: &Path) -> Result<GgufFile, GgufError> {
        if !crate::crypt::is_encrypted(path).unwrap_or(false) {
            return GgufFile::open(path);
        }
        let keys = crate::crypt::Keys::from_process_env().map_err(|e| crypt_error(path, e))?;
        let sealed = crate::crypt::Sealed::open(path, &keys).map_err(|e| crypt_error(path, e))?;
        GgufFile::header_of_sealed(path, &sealed)
    }

    /// [`GgufFile::open_header`] for the age file `sealed` (at `path`),
    /// opened once for every read of a longer start.
    pub(crate) fn header_of_sealed(
        path: &Path,
        sealed: &crate::crypt::Sealed<'_>,
    ) -> Result<GgufFile, GgufError> {
        // Metadata is mostly the vocabulary: a few MiB for 256k tokens.
        let mut want = 1u64 << 20;
        loop {
            let (head, len) = sealed.prefix(want).map_err(|e| crypt_error(path, e))?;
            let whole = head.len() as u64 == len;
            if let (Some(end), false) = (header_needs(&head, len), whole) {
                want = end.max(want * 2);
                continue;
            }
            match GgufFile::parse_start(path, Storage::Header(head), len) {
                Err((_, true)) if !whole => want *= 2,
                done => return done.map_err(|(e, _)| e),
            }
        }
    }

    /// Parses bytes already in memory; `name` stands in for the path in errors.
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let len = bytes.len() as u64;
        GgufFile::parse(name, Storage::Owned(bytes), len)
    }

    /// Parses the GGUF file of `file_len` bytes whose first bytes (all of
    /// them but for a [`Storage::Header`]) are `map`.
    fn parse(path: &Path, map: Storage, file_len: u64) -> Result<GgufFile, GgufError> {
        GgufFile::parse_start(path, map, file_len).map_err(|(e, _)| e)
    }

    /// [`GgufFile::parse`], and with an error whether it came from reading
    /// past the end of `map` (which more of the file might have mended).
    fn parse_start(
        path: &Path,
        map: Storage,
        file_len: u64,
    ) -> Result<GgufFile, (GgufError, bool)> {
        let short = std::cell::Cell::new(None);
        GgufFile::parse_in(path, map, file_len, &short).map_err(|e| (e, short.get().is_some()))
    }

    fn parse_in(
        path: &Path,
        map: Storage,
        file_len: u64,
        short: &std::cell::Cell<Option<u64>>,
    ) -> Result<GgufFile, GgufError> {
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path,
            short,
        };
        let magic = c
            .array::<4>("the magic number")
            .map_err(|_| c.err(0, "not a GGUF file: shorter than the 4-byte magic number"))?;
        if map.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----") {
            return Err(c.err(
                0,
                "an ASCII-armored age file: kiln reads binary age files; write it without `age -a` (or `age -d` it first)",
            ));
        }
        if &magic != MAGIC {
            return Err(c.err(
                0,
                format!("not a GGUF file: magic is {magic:02x?}, expected \"GGUF\""),
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(
                4,
                format!("GGUF version {version} is not supported (kiln reads 2 and 3)"),
            ));
        }
        // Each tensor info takes at least 8+4+8+4+8 bytes; each kv 8+4+1.
        let n_tensors = c.count("the tensor count", 32)?;
        let n_kv = c.count("the metadata count", 13)?;
        let mut metadata = Vec::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let at = c.pos;
            let raw = c.u32("a metadata value type")?;
            let ty = ValueType::from_raw(raw)
                .ok_or_else(|| c.err(at, format!("metadata {key:?}: unknown value type {raw}")))?;
            let value = c.value(ty, 0).map_err(|mut e| {
                e.what = format!("metadata {key:?}: {}", e.what);
                e
            })?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(c.err(
                        24,
                        format!("general.alignment {v:?} must be a power of two"),
                    ));
                }
            },
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let at = c.pos;
            let name = c.string("a tensor name")?;
            let dims_at = c.pos;
            let n_dims = c.u32("a tensor's dimension count")?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(c.err(
                    dims_at,
                    format!("tensor {name:?}: {n_dims} dimensions (1 to 4 allowed)"),
                ));
            }
            let mut ne = [1u64; MAX_DIMS];
            for d in ne.iter_mut().take(n_dims as usize) {
                *d = c.u64("a tensor extent")?;
            }
            let type_at = c.pos;
            let raw_type = c.u32("a tensor type")?;
            let dtype = dtype_from_ggml(raw_type).ok_or_else(|| {
                c.err(
                    type_at,
                    format!(
                        "tensor {name:?} has {}, which kiln cannot load; kiln loads {}: use a file of one of those types (for example the model's Q4_K_M or Q8_0 release), or quantize the F16 model with `kiln quantize`",
                        ggml_type_name(raw_type),
                        supported_types()
                    ),
                )
            })?;
            let offset = c.u64("a tensor offset")?;
            if ne.contains(&0) {
                return Err(c.err(
                    dims_at,
                    format!("tensor {name:?} has an empty dimension {ne:?}"),
                ));
            }
            if ne[0] % dtype.block_len() as u64 != 0 {
                return Err(c.err(
                    dims_at,
                    format!(
                        "tensor {name:?}: {} rows need a multiple of {} elements, got {}",
                        dtype,
                        dtype.block_len(),
                        ne[0]
                    ),
                ));
            }
            let size = (ne[0] / dtype.block_len() as u64)
                .checked_mul(dtype.block_bytes() as u64)
                .and_then(|row| ne[1..].iter().try_fold(row, |acc, &n| acc.checked_mul(n)))
                .ok_or_else(|| c.err(dims_at, format!("tensor {name:?}: size overflows")))?;
            if offset % alignment != 0 {
                return Err(c.err(
                    at,
                    format!("tensor {name:?}: offset {offset} is not aligned to {alignment}"),
                ));
            }
            infos.push(TensorInfo {
                name,
                dtype,
                ne,
                n_dims,
                offset,
                size,
            });
        }
        let data_offset = align_up(c.pos as u64, alignment)
            .ok_or_else(|| c.err(c.pos, "data offset overflows"))?;
        for t in &infos {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.size));
            if end.is_none_or(|e| e > file_len) {
                return Err(GgufError {
                    path: path.to_path_buf(),
                    offset: Some(data_offset.saturating_add(t.offset)),
                    what: format!(
                        "truncated: tensor {:?} needs {} bytes here but the file ends at byte {file_len}",
                        t.name, t.size
                    ),
                });
            }
        }
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = infos.iter().find(|t| !names.insert(t.name.as_str())) {
            return Err(GgufError {
                path: path.to_path_buf(),
                offset: None,
                what: format!("tensor {:?} appears twice", dup.name),
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            alignment,
            metadata,
            tensors: infos,
            data_offset,
            len: file_len,
        })
    }

    /// Gives a file opened by [`GgufFile::open_header`] its whole
    /// plaintext, `plain` (decrypted by [`crate::crypt::decrypt_into_memory`]),
    /// without parsing it again: refused where it is not the same file
    /// (another length, or other header bytes: the file was replaced in
    /// between).
    pub fn attach(&mut self, plain: memmap2::MmapMut) -> Result<(), GgufError> {
        let Storage::Header(head) = &self.map else {
            return Err(self.error("already holds its data"));
        };
        if plain.len() as u64 != self.len || !plain.starts_with(head) {
            return Err(self.error(format!(
                "changed while loading ({} bytes when its header was read, {} now); load it again",
                self.len,
                plain.len()
            )));
        }
        self.map = Storage::Copied(plain);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of all the tensors' data.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.size).sum()
    }

    /// Whether the tensors' data can be read: not for an encrypted file
    /// opened by [`GgufFile::open_header`].
    pub fn has_data(&self) -> bool {
        !matches!(self.map, Storage::Header(_))
    }

    /// The bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        assert!(
            self.has_data(),
            "{}: opened for its header only",
            self.path.display()
        );
        let start = (self.data_offset + t.offset) as usize;
        &self.map[start..start + t.size as usize]
    }

    /// Replaces the map with the file's bytes read into anonymous memory
    /// on transparent huge pages, writable, so that tensors can be
    /// rewritten in place ([`GgufFile::tensor_data_mut`]); the parsed
    /// metadata stays. One copy in memory, as a mapped file is once paged
    /// in; the file is never written. Huge pages because decode reads
    /// every weight once a token: 2 MiB pages read about 10 % faster than
    /// the 4 KiB ones a mapped file (or a copy-on-write map of it) mostly
    /// gets, and the copy costs less than a page fault per 4 KiB. Does
    /// nothing for a file already in memory.
    pub fn copy_into_memory(&mut self) -> Result<(), GgufError> {
        let Storage::Mapped(mapped) = &self.map else {
            return Ok(());
        };
        let len = mapped.len();
        let err = |what: String| GgufError {
            path: self.path.clone(),
            offset: None,
            what,
        };
        let file = std::fs::File::open(&self.path).map_err(|e| err(format!("cannot open: {e}")))?;
        let now = file
            .metadata()
            .map_err(|e| err(format!("cannot read its size: {e}")))?
            .len();
        if now != len as u64 {
            return Err(err(format!(
                "changed while loading ({len} bytes when opened, {now} now); load it again"
            )));
        }
        let mut copy = MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|e| err(format!("cannot allocate {len} bytes for it: {e}")))?;
        // A hint: without transparent huge pages the copy still works.
        let _ = copy.advise(memmap2::Advice::HugePage);
        read_in_parallel(&file, &mut copy[..len]).map_err(|e| err(format!("cannot read: {e}")))?;
        self.map = Storage::Copied(copy);
        Ok(())
    }

    /// Adds tensors after the file's own, each given as its info (the
    /// offset is set here) and bytes: a LoRA adapter's matrices beside the
    /// model's weights, in the one memory the graphs read. The file is
    /// read into anonymous memory with room for them; the file itself is
    /// never written.
    pub fn append_tensors(&mut self, extra: Vec<(TensorInfo, Vec<u8>)>) -> Result<(), GgufError> {
        if !self.has_data() {
            return Err(self.error("opened for its header only"));
        }
        let old = self.map.len() as u64;
        let align = |n: u64| super::align_up(n, self.alignment).expect("small offsets");
        let mut end = align(old.max(self.data_offset));
        let mut placed = Vec::with_capacity(extra.len());
        for (mut info, bytes) in extra {
            assert_eq!(
                info.size,
                bytes.len() as u64,
                "{}: size of its bytes",
                info.name
            );
            if self.tensor(&info.name).is_some() {
                return Err(self.error(format!("tensor {:?} is there already", info.name)));
            }
            info.offset = end - self.data_offset;
            end = align(end + info.size);
            placed.push((info, bytes));
        }
        let err = |what: String| self.error(what);
        let len = end as usize;
        let mut map = MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|e| err(format!("cannot allocate {len} bytes for it: {e}")))?;
        // Not on huge pages: here a third of loads waited about 110 ms for
        // the kernel to compact memory for them, for no decode speed
        // measurable above the noise.
        match &self.map {
            // Read from the file, in parallel: faster than faulting the
            // map in page by page.
            Storage::Mapped(_) => {
                let file = std::fs::File::open(&self.path)
                    .map_err(|e| err(format!("cannot open: {e}")))?;
                let now = file
                    .metadata()
                    .map_err(|e| err(format!("cannot read its size: {e}")))?;
                if now.len() != old {
                    return Err(err(format!(
                        "changed while loading ({old} bytes when opened, {} now); load it again",
                        now.len()
                    )));
                }
                read_in_parallel(&file, &mut map[..old as usize])
                    .map_err(|e| err(format!("cannot read: {e}")))?;
            }
            _ => map[..old as usize].copy_from_slice(&self.map),
        }
        for (info, bytes) in placed {
            let at = (self.data_offset + info.offset) as usize;
            map[at..at + bytes.len()].copy_from_slice(&bytes);
            self.tensors.push(info);
        }
        self.map = Storage::Copied(map);
        self.len = end;
        Ok(())
    }

    /// Bytes of the file held in anonymous memory by
    /// [`GgufFile::copy_into_memory`]; 0 while it is mapped.
    pub fn copied_bytes(&self) -> u64 {
        match &self.map {
            Storage::Copied(_) => self.map.len() as u64,
            Storage::Mapped(_) | Storage::Owned(_) | Storage::Header(_) => 0,
        }
    }

    /// The bytes of tensor `i`, writable: once the file is
    /// [copied into memory](GgufFile::copy_into_memory) or read from bytes,
    /// `None` for a read-only map.
    pub fn tensor_data_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let t = &self.tensors[i];
        let start = (self.data_offset + t.offset) as usize;
        let end = start + t.size as usize;
        match &mut self.map {
            Storage::Mapped(_) | Storage::Header(_) => None,
            Storage::Copied(m) => Some(&mut m[start..end]),
            Storage::Owned(v) => Some(&mut v[start..end]),
        }
    }

    /// Reads the mapped file's pages in now (`MADV_POPULATE_READ`, or a
    /// read-ahead hint on kernels before 5.14), as llama.cpp's
    /// `MAP_POPULATE` does, so that the first evaluation does not stop at
    /// every page. A hint: failures are ignored.
    pub fn prefault(&self) {
        let advise = |a| match &self.map {
            Storage::Mapped(m) => m.advise(a),
            Storage::Copied(_) | Storage::Owned(_) | Storage::Header(_) => Ok(()),
        };
        if advise(memmap2::Advice::PopulateRead).is_err() {
            let _ = advise(memmap2::Advice::WillNeed);
        }
    }

    /// Locks the file's bytes (mapped or copied) in memory (`mlock`): the
    /// weights are never paged out, however little they are used. Held
    /// until the file is dropped. Returns the bytes locked.
    pub fn lock_in_memory(&self) -> std::io::Result<u64> {
        match &self.map {
            Storage::Mapped(m) => m.lock()?,
            Storage::Copied(m) => m.lock()?,
            Storage::Owned(_) | Storage::Header(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the file was read from bytes, not mapped",
                ));
            }
        }
        Ok(self.map.len() as u64)
    }

    /// The whole mapping, for zero-copy use of tensor data.
    pub fn bytes(&self) -> &[u8] {
        assert!(
            self.has_data(),
            "{}: opened for its header only",
            self.path.display()
        );
        &self.map
    }

    /// An error about this file, for callers that interpret its contents.
    pub fn error(&self, what: impl Into<String>) -> GgufError {
        GgufError {
            path: self.path.clone(),
            offset: None,
            what: what.into(),
        }
    }
}
