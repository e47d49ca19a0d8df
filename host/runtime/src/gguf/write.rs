//! The GGUF writer: header, metadata and tensor infos first, then tensor
//! data streamed one tensor at a time, into a temporary file that is fsynced
//! and renamed into place only when every tensor has been written. An
//! interrupted write leaves no file at the destination.

use super::*;
use kiln_plugin_api::DType;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// A tensor to be written: its name, type and extents (innermost first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub ne: [u64; MAX_DIMS],
    pub n_dims: u32,
}

impl TensorSpec {
    /// A tensor of extents `ne` (innermost first, as GGUF lists them).
    pub fn new(name: impl Into<String>, dtype: DType, ne: &[usize]) -> TensorSpec {
        assert!(ne.len() <= MAX_DIMS, "at most {MAX_DIMS} dimensions");
        let mut full = [1u64; MAX_DIMS];
        for (f, &n) in full.iter_mut().zip(ne) {
            *f = n as u64;
        }
        TensorSpec {
            name: name.into(),
            dtype,
            ne: full,
            n_dims: ne.len() as u32,
        }
    }

    pub fn size(&self) -> u64 {
        let row = self
            .dtype
            .row_bytes(self.ne[0] as usize)
            .expect("extents are whole blocks") as u64;
        row * self.ne[1] * self.ne[2] * self.ne[3]
    }
}

/// A llama-architecture model's shape, as GGUF records it: the models
/// kiln makes itself (the demo's, kiln-code's initial one) are written
/// from it.
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    pub ctx: u32,
    pub embd: usize,
    pub layers: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

impl LlamaShape {
    /// The `llama.*` keys (RoPE base 10000, RMSNorm ε 1e-5), the
    /// vocabulary's size last.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let u = |k: &str, v: usize| (k.to_string(), Value::U32(v as u32));
        vec![
            ("llama.context_length".to_string(), Value::U32(self.ctx)),
            u("llama.embedding_length", self.embd),
            u("llama.block_count", self.layers),
            u("llama.feed_forward_length", self.ff),
            u("llama.attention.head_count", self.heads),
            u("llama.attention.head_count_kv", self.kv_heads),
            u("llama.rope.dimension_count", self.embd / self.heads),
            ("llama.rope.freq_base".into(), Value::F32(10000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            u("llama.vocab_size", self.vocab),
        ]
    }

    /// Every tensor's name and extents (innermost first): the token
    /// embedding, each block's norms and projections, the output norm,
    /// and unless `tied` (the embedding read back as the head) the output.
    pub fn tensors(&self, tied: bool) -> Vec<(String, Vec<usize>)> {
        let (e, ff) = (self.embd, self.ff);
        let kv = self.kv_heads * e / self.heads;
        let mut t = vec![("token_embd.weight".to_string(), vec![e, self.vocab])];
        for l in 0..self.layers {
            let b = |n: &str| format!("blk.{l}.{n}");
            t.push((b("attn_norm.weight"), vec![e]));
            t.push((b("attn_q.weight"), vec![e, e]));
            t.push((b("attn_k.weight"), vec![e, kv]));
            t.push((b("attn_v.weight"), vec![e, kv]));
            t.push((b("attn_output.weight"), vec![e, e]));
            t.push((b("ffn_norm.weight"), vec![e]));
            t.push((b("ffn_gate.weight"), vec![e, ff]));
            t.push((b("ffn_up.weight"), vec![e, ff]));
            t.push((b("ffn_down.weight"), vec![ff, e]));
        }
        t.push(("output_norm.weight".into(), vec![e]));
        if !tied {
            t.push(("output.weight".into(), vec![e, self.vocab]));
        }
        t
    }
}

pub struct GgufWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
    alignment: u64,
    sizes: Vec<u64>,
    next: usize,
    finished: bool,
}

fn put_string(out: &mut impl Write, s: &str) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn put_value(out: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => out.write_all(&[*x]),
        Value::I8(x) => out.write_all(&x.to_le_bytes()),
        Value::U16(x) => out.write_all(&x.to_le_bytes()),
        Value::I16(x) => out.write_all(&x.to_le_bytes()),
        Value::U32(x) => out.write_all(&x.to_le_bytes()),
        Value::I32(x) => out.write_all(&x.to_le_bytes()),
        Value::F32(x) => out.write_all(&x.to_le_bytes()),
        Value::Bool(x) => out.write_all(&[u8::from(*x)]),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.write_all(&x.to_le_bytes()),
        Value::I64(x) => out.write_all(&x.to_le_bytes()),
        Value::F64(x) => out.write_all(&x.to_le_bytes()),
        Value::Array(ty, items) => {
            out.write_all(&(*ty as u32).to_le_bytes())?;
            out.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                if item.value_type() != *ty {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("array of {ty:?} holds a {:?}", item.value_type()),
                    ));
                }
                put_value(out, item)?;
            }
            Ok(())
        }
    }
}

fn pad(out: &mut impl Write, pos: u64, alignment: u64) -> io::Result<u64> {
    let padded = align_up(pos, alignment).expect("file positions fit in u64");
    out.write_all(&vec![0u8; (padded - pos) as usize])?;
    Ok(padded)
}

impl GgufWriter {
    /// Starts `dest` (written as `dest` + `.tmp-<pid>` until finished) with
    /// this metadata and these tensors; their data follows through
    /// [`GgufWriter::write_tensor`], in the same order.
    pub fn create(
        dest: &Path,
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
    ) -> io::Result<GgufWriter> {
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        let file_name = dest.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")
        })?;
        let tmp = dest.with_file_name(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let sizes: Vec<u64> = tensors.iter().map(TensorSpec::size).collect();
        let mut header = Vec::new();
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_string(&mut header, k)?;
            header.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut header, v)?;
        }
        let mut offset = 0u64;
        for (t, size) in tensors.iter().zip(&sizes) {
            put_string(&mut header, &t.name)?;
            header.extend_from_slice(&t.n_dims.to_le_bytes());
            for d in &t.ne[..t.n_dims as usize] {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.dtype.raw().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + size, alignment).expect("sizes fit in u64");
        }
        let mut writer = GgufWriter {
            out: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
            tmp,
            dest: dest.to_path_buf(),
            alignment,
            sizes,
            next: 0,
            finished: false,
        };
        // From here on, dropping `writer` on an error removes the temp file.
        writer.out.write_all(&header)?;
        pad(&mut writer.out, header.len() as u64, alignment)?;
        Ok(writer)
    }

    /// Writes the next tensor's data; it must be exactly that tensor's size.
    pub fn write_tensor(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(&size) = self.sizes.get(self.next) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more tensors written than declared",
            ));
        };
        if data.len() as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor {} is {size} bytes, got {}", self.next, data.len()),
            ));
        }
        self.out.write_all(data)?;
        pad(&mut self.out, size, self.alignment)?;
        self.next += 1;
        Ok(())
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn finish(mut self) -> io::Result<()> {
        if self.next != self.sizes.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} of {} tensors written", self.next, self.sizes.len()),
            ));
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
