//! Encryption at rest, in the age format (`age-encryption.org/v1`, the
//! `age` tool's): files are encrypted to X25519 recipients or an scrypt
//! passphrase in 64 KiB authenticated chunks, so they can be read from any
//! offset and a changed byte is found in the chunk that holds it.
//!
//! Keys, looked for in this order ([`Keys::from_env`]):
//! - `KILN_IDENTITY`: an identity file (`age-keygen`'s output, one or more
//!   `AGE-SECRET-KEY-1…` lines);
//! - `$KILN_HOME/identity.txt`, which `kiln store encrypt` creates (mode
//!   0600) when there is none;
//! - `KILN_PASSPHRASE`: a passphrase (scrypt).
//!
//! An encrypted model is decrypted straight into anonymous memory that is
//! excluded from core dumps (`MADV_DONTDUMP`), in parallel slices, never
//! into a file; swap is the system's to encrypt. Its payload is opened
//! with aws-lc's ChaCha20-Poly1305 after kiln reads the header (age-core's
//! stanza parser, the identities' own unwrapping, the header's MAC);
//! anything the header does not allow there (or an error) goes through the
//! `age` crate's reader, whose errors say what is wrong.

use age::secrecy::{ExposeSecret, SecretString};
use kiln_registry::config::Config;
use memmap2::{MmapMut, MmapOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every age file (the binary, not the armored, form).
pub const MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// The identity file kiln creates and uses by default.
pub fn identity_path(config: &Config) -> PathBuf {
    config.home.join("identity.txt")
}

/// Why an encrypted file could not be read or written; each names the
/// file and what to do.
#[derive(Debug)]
pub enum CryptError {
    /// No key kiln has opens it.
    NoKey { path: PathBuf, why: String },
    /// Truncated, or a byte changed: the authentication failed.
    Damaged { path: PathBuf, what: String },
    /// A key or identity file that cannot be used.
    Key { path: PathBuf, what: String },
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CryptError {
    pub fn path(&self) -> &Path {
        match self {
            CryptError::NoKey { path, .. }
            | CryptError::Damaged { path, .. }
            | CryptError::Key { path, .. }
            | CryptError::Io { path, .. } => path,
        }
    }

    /// The message without the path.
    pub fn detail(&self) -> String {
        match self {
            CryptError::NoKey { why, .. } => format!(
                "encrypted (age) for a key kiln does not have ({why}); set KILN_IDENTITY to the identity file it was encrypted to, or KILN_PASSPHRASE to its passphrase"
            ),
            CryptError::Damaged { what, .. } => format!(
                "the encrypted file is damaged ({what}); nothing of it was used. Restore it, or add or pull the model again (`kiln models verify` checks the whole store)"
            ),
            CryptError::Key { what, .. } => what.clone(),
            CryptError::Io { source, .. } => source.to_string(),
        }
    }
}

impl std::fmt::Display for CryptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path().display(), self.detail())
    }
}

impl std::error::Error for CryptError {}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CryptError + '_ {
    move |source| CryptError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `path` starts as an age file does.
pub fn is_encrypted(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; MAGIC.len()];
    let mut f = std::fs::File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(head == MAGIC)
}

/// The keys this process can decrypt with, and where they came from.
#[derive(Default)]
pub struct Keys {
    identities: Vec<Box<dyn age::Identity + Send + Sync>>,
    /// X25519 recipients of the identities, to encrypt to.
    recipients: Vec<age::x25519::Recipient>,
    passphrase: Option<SecretString>,
    /// Where the keys came from (`KILN_IDENTITY=…`, a file, `KILN_PASSPHRASE`),
    /// for messages.
    pub sources: Vec<String>,
    /// The identity file read, if any.
    pub identity_file: Option<PathBuf>,
}

impl Keys {
    /// The keys from `KILN_IDENTITY` (else `$KILN_HOME/identity.txt` when it
    /// exists) and `KILN_PASSPHRASE`. A named identity file that cannot be
    /// read is an error; none at all gives empty keys.
    pub fn from_env(config: &Config) -> Result<Keys, CryptError> {
        let mut keys = Keys::default();
        match std::env::var_os("KILN_IDENTITY").filter(|v| !v.is_empty()) {
            Some(p) => keys.add_identity_file(Path::new(&p))?,
            None => {
                let p = identity_path(config);
                if p.exists() {
                    keys.add_identity_file(&p)?;
                }
            }
        }
        if let Ok(p) = std::env::var("KILN_PASSPHRASE")
            && !p.is_empty()
        {
            keys.identities
                .push(Box::new(age::scrypt::Identity::new(SecretString::from(
                    p.clone(),
                ))));
            keys.passphrase = Some(SecretString::from(p));
            keys.sources.push("KILN_PASSPHRASE".into());
        }
        Ok(keys)
    }

    /// The keys of `KILN_HOME`'s environment ([`Config::from_env`]).
    pub fn from_process_env() -> Result<Keys, CryptError> {
        let config = Config::from_env().map_err(|what| CryptError::Key {
            path: PathBuf::from("KILN_HOME"),
            what,
        })?;
        Keys::from_env(&config)
    }

    /// Reads the X25519 identities of an age identity file.
    pub fn add_identity_file(&mut self, path: &Path) -> Result<(), CryptError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let bad = |what: String| CryptError::Key {
            path: path.to_path_buf(),
            what,
        };
        let mut found = 0;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id: age::x25519::Identity = line.parse().map_err(|e| {
                bad(format!(
                    "not an age identity file: a line is neither a comment nor an AGE-SECRET-KEY-1… key ({e})"
                ))
            })?;
            self.recipients.push(id.to_public());
            self.identities.push(Box::new(id));
            found += 1;
        }
        if found == 0 {
            return Err(bad("holds no AGE-SECRET-KEY-1… key".into()));
        }
        self.sources.push(path.display().to_string());
        self.identity_file.get_or_insert_with(|| path.to_path_buf());
        Ok(())
    }

    /// Keys made from one generated X25519 identity (tests, and the first
    /// `kiln store encrypt`).
    pub fn generate() -> (Keys, String) {
        let id = age::x25519::Identity::generate();
        let text = format!(
            "# created by kiln\n# public key: {}\n{}\n",
            id.to_public(),
            id.to_string().expose_secret()
        );
        let keys = Keys {
            recipients: vec![id.to_public()],
            identities: vec![Box::new(id)],
            passphrase: None,
            sources: vec!["generated".into()],
            identity_file: None,
        };
        (keys, text)
    }

    pub fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }

    /// Whether there is a key to encrypt to.
    pub fn can_encrypt(&self) -> bool {
        !self.recipients.is_empty() || self.passphrase.is_some()
    }

    /// The public keys files are encrypted to (`age1…`).
    pub fn public_keys(&self) -> Vec<String> {
        self.recipients.iter().map(|r| r.to_string()).collect()
    }

    fn identities(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity)
    }

    fn encryptor(&self, path: &Path) -> Result<age::Encryptor, CryptError> {
        let no_key = || {
            CryptError::Key {
            path: path.to_path_buf(),
            what: "no key to encrypt to: create one with `kiln store encrypt`, or set KILN_IDENTITY or KILN_PASSPHRASE".into(),
        }
        };
        if !self.recipients.is_empty() {
            let r = self.recipients.iter().map(|r| r as &dyn age::Recipient);
            age::Encryptor::with_recipients(r).map_err(|e| CryptError::Key {
                path: path.to_path_buf(),
                what: e.to_string(),
            })
        } else if let Some(p) = &self.passphrase {
            Ok(age::Encryptor::with_user_passphrase(p.clone()))
        } else {
            Err(no_key())
        }
    }
}

/// Creates `$KILN_HOME/identity.txt` (mode 0600) unless it exists; true
/// when it was created.
pub fn ensure_identity(config: &Config) -> Result<bool, CryptError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = identity_path(config);
    if path.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(&config.home).map_err(io(&config.home))?;
    let (_, text) = Keys::generate();
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        // Never replaces a key another process made meanwhile.
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Encrypts `from` into a new file `to` (fsynced) for `keys`;
/// `progress(bytes)` after each chunk read. On error `to` is removed.
pub fn encrypt_file(
    from: &mut dyn Read,
    to: &Path,
    keys: &Keys,
    mut progress: impl FnMut(u64),
) -> Result<(), CryptError> {
    let enc = keys.encryptor(to)?;
    let done = (|| -> std::io::Result<()> {
        let out = std::fs::File::create_new(to)?;
        let mut w = enc.wrap_output(std::io::BufWriter::with_capacity(1 << 20, out))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n])?;
            total += n as u64;
            progress(total);
        }
        let out = w.finish()?.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()
    })();
    if let Err(e) = done {
        let _ = std::fs::remove_file(to);
        return Err(io(to)(e));
    }
    Ok(())
}

/// `bytes` as an age file in memory (a logged decision's input or output).
pub fn encrypt_bytes(bytes: &[u8], keys: &Keys) -> Result<Vec<u8>, CryptError> {
    let here = Path::new("(in memory)");
    let enc = keys.encryptor(here)?;
    let mut out = Vec::with_capacity(bytes.len() + 256);
    let written = (|| -> std::io::Result<()> {
        let mut w = enc.wrap_output(&mut out)?;
        w.write_all(bytes)?;
        w.finish().map(|_| ())
    })();
    written.map_err(io(here))?;
    Ok(out)
}

/// The plaintext of an age file held in memory.
pub fn decrypt_bytes(bytes: &[u8], keys: &Keys) -> Result<Vec<u8>, CryptError> {
    let here = Path::new("(in memory)");
    let dec = age::Decryptor::new(bytes).map_err(|e| refused(here, e))?;
    let mut r = dec
        .decrypt(keys.identities())
        .map_err(|e| refused(here, e).with_sources(keys))?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(|e| damaged_io(here, e))?;
    Ok(out)
}

/// A reader of the plaintext of the age file at `path`.
pub fn open_reader(
    path: &Path,
    keys: &Keys,
) -> Result<age::stream::StreamReader<BufReader<std::fs::File>>, CryptError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let dec = age::Decryptor::new_buffered(BufReader::new(file)).map_err(|e| refused(path, e))?;
    if dec.is_scrypt() && keys.passphrase.is_none()
        || !dec.is_scrypt() && keys.recipients.is_empty()
    {
        let why = if dec.is_scrypt() {
            "it was encrypted with a passphrase and KILN_PASSPHRASE is not set".to_string()
        } else if keys.sources.is_empty() {
            "no identity file: neither KILN_IDENTITY nor $KILN_HOME/identity.txt".to_string()
        } else {
            format!("tried {}", keys.sources.join(", "))
        };
        return Err(CryptError::NoKey {
            path: path.to_path_buf(),
            why,
        });
    }
    dec.decrypt(keys.identities())
        .map_err(|e| refused(path, e).with_sources(keys))
}

impl CryptError {
    fn with_sources(self, keys: &Keys) -> CryptError {
        match self {
            CryptError::NoKey { path, .. } => CryptError::NoKey {
                path,
                why: format!("none of {} matches", keys.sources.join(", ")),
            },
            e => e,
        }
    }
}

fn refused(path: &Path, e: age::DecryptError) -> CryptError {
    use age::DecryptError as D;
    let path = path.to_path_buf();
    match e {
        D::NoMatchingKeys | D::DecryptionFailed | D::KeyDecryptionFailed => CryptError::NoKey {
            path,
            why: e.to_string(),
        },
        D::ExcessiveWork { required, target } => CryptError::Key {
            path,
            what: format!(
                "its passphrase needs scrypt work factor {required}, over the {target} this machine does in about a second; re-encrypt it with a lower one"
            ),
        },
        D::Io(source) => damaged_io(&path, source),
        D::InvalidHeader | D::InvalidMac | D::UnknownFormat => CryptError::Damaged {
            path,
            what: format!("its header: {e}"),
        },
        _ => CryptError::Key {
            path,
            what: e.to_string(),
        },
    }
}

/// An I/O error reading an age file's plaintext: a truncated file or a
/// failed authentication is [`CryptError::Damaged`].
pub(crate) fn damaged_io(path: &Path, e: std::io::Error) -> CryptError {
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            CryptError::Damaged {
                path: path.to_path_buf(),
                what: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "it is truncated".into()
                } else {
                    format!("a chunk fails its authentication: {e}")
                },
            }
        }
        _ => io(path)(e),
    }
}

/// An age file opened with its keys: its header read and its file key
/// unwrapped once (with a passphrase, that is a second of scrypt), for
/// reading its plaintext in parts ([`Sealed::prefix`]) and whole
/// ([`Sealed::decrypt`]).
pub struct Sealed<'k> {
    path: std::path::PathBuf,
    file: std::fs::File,
    len: u64,
    keys: &'k Keys,
    /// `None`: a header kiln does not read itself; the `age` crate's
    /// reader does it (and names what is wrong).
    payload: Option<payload::Payload>,
}

impl<'k> Sealed<'k> {
    pub fn open(path: &Path, keys: &'k Keys) -> Result<Sealed<'k>, CryptError> {
        let file = std::fs::File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let payload = payload::open(&file, len, keys);
        Ok(Sealed {
            path: path.to_path_buf(),
            file,
            len,
            keys,
            payload,
        })
    }

    /// Decrypts the whole file into anonymous memory excluded from core
    /// dumps, in parallel runs of chunks. The whole file is authenticated
    /// before it is returned: on any error nothing of it is kept.
    pub fn decrypt(&self) -> Result<MmapMut, CryptError> {
        match &self.payload {
            Some(p) => payload::decrypt(&self.path, &self.file, self.len, p),
            None => decrypt_with_age(&self.path, self.keys),
        }
    }

    /// The first `want` bytes of the plaintext (all of it where it is
    /// shorter), and the plaintext's whole length: only the chunks that
    /// hold those bytes are read and decrypted, each authenticated, and
    /// the last one, which vouches for the length. For reading a model's
    /// header and metadata without decrypting its weights.
    pub fn prefix(&self, want: u64) -> Result<(Vec<u8>, u64), CryptError> {
        let path = &self.path;
        if let Some(p) = &self.payload {
            return payload::prefix(path, &self.file, self.len, p, want);
        }
        let mut r = open_reader(path, self.keys)?;
        let plain = r.seek(SeekFrom::End(0)).map_err(|e| damaged_io(path, e))?;
        let mut out = vec![0u8; want.min(plain) as usize];
        r.seek(SeekFrom::Start(0))
            .and_then(|_| r.read_exact(&mut out))
            .map_err(|e| damaged_io(path, e))?;
        Ok((out, plain))
    }
}

/// [`Sealed::decrypt`] of the age file at `path`.
pub fn decrypt_into_memory(path: &Path, keys: &Keys) -> Result<MmapMut, CryptError> {
    Sealed::open(path, keys)?.decrypt()
}

/// [`Sealed::prefix`] of the age file at `path`.
pub fn decrypt_prefix(path: &Path, keys: &Keys, want: u64) -> Result<(Vec<u8>, u64), CryptError> {
    Sealed::open(path, keys)?.prefix(want)
}

/// Anonymous memory for `len` bytes of plaintext, left out of core dumps.
fn plain_memory(path: &Path, len: u64) -> Result<MmapMut, CryptError> {
    let map = MmapOptions::new()
        .len((len as usize).max(1))
        .map_anon()
        .map_err(|e| CryptError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("cannot allocate {len} bytes: {e}")),
        })?;
    map.advise(memmap2::Advice::DontDump)
        .map_err(|e| CryptError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(e.kind(), format!("cannot keep it out of core dumps: {e}")),
        })?;
    // Not on huge pages: they made a 94 MiB model's load take twice as
    // long, at random (4 loads in 25 on a 2-core VM, with no compaction
    // stall counted: the 2 MiB blocks a guest has free are the ones it
    // reports to the host, which faults them in again on first touch;
    // where memory is short, the kernel would compact for them too).
    // The median load was 11% shorter with them.
    Ok(map)
}

/// [`decrypt_into_memory`] through the `age` crate's reader, a few 64
/// KiB-aligned slices in parallel (each thread opens the file for itself).
fn decrypt_with_age(path: &Path, keys: &Keys) -> Result<MmapMut, CryptError> {
    const CHUNK: u64 = 64 << 10;
    let mut first = open_reader(path, keys)?;
    let len = first
        .seek(SeekFrom::End(0))
        .map_err(|e| damaged_io(path, e))?;
    let mut map = plain_memory(path, len)?;
    // A passphrase costs a second of scrypt (and its memory) per reader.
    let threads = if keys.recipients.is_empty() || len < 8 << 20 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    };
    let per = (len.div_ceil(threads as u64)).div_ceil(CHUNK) * CHUNK;
    let buf = &mut map[..len as usize];
    std::thread::scope(|s| {
        let mut first = Some(first.by_ref());
        let jobs: Vec<_> = buf
            .chunks_mut(per.max(1) as usize)
            .enumerate()
            .map(|(i, part)| {
                let reader = first.take();
                s.spawn(move || -> Result<(), CryptError> {
                    let start = i as u64 * per;
                    let mut own;
                    let r: &mut dyn ReadSeek = match reader {
                        Some(r) => r,
                        None => {
                            own = open_reader(path, keys)?;
                            &mut own
                        }
                    };
                    r.seek(SeekFrom::Start(start))
                        .and_then(|_| r.read_exact(part))
                        .map_err(|e| damaged_io(path, e))
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().expect("a decryption thread panicked"))
    })?;
    Ok(map)
}

/// age's payload read by kiln: after the header, a 16-byte nonce, then
/// ChaCha20-Poly1305 chunks of 64 KiB of plaintext, each with its 16-byte
/// tag, under a key derived from the file key and the nonce; the nonce of
/// chunk `i` is `i` in 11 big-endian bytes and a last-chunk flag.
mod payload {
    use super::{CryptError, Keys, plain_memory};
    use age::secrecy::ExposeSecret;
    use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use base64::Engine;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    const CHUNK: usize = 64 << 10;
    const TAG: usize = 16;
    const SEALED: usize = CHUNK + TAG;
    /// Chunks read at once by each thread (about 1 MiB).
    const RUN: usize = 16;

    pub struct Payload {
        /// Where the first chunk starts.
        start: u64,
        key: LessSafeKey,
    }

    fn hkdf(salt: &[u8], info: &[u8], ikm: &[u8]) -> [u8; 32] {
        use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
        let mut out = [0u8; 32];
        Salt::new(HKDF_SHA256, salt)
            .extract(ikm)
            .expand(&[info], HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("HKDF-SHA256 gives 32 bytes");
        out
    }

    /// Reads the header of the age file `file` (`len` bytes), unwraps its
    /// file key with `keys` and checks the header's MAC. `None` where any
    /// of that fails or the header is not one kiln reads itself (longer
    /// than 64 KiB, a passphrase beside other recipients).
    pub fn open(file: &File, len: u64, keys: &Keys) -> Option<Payload> {
        use age_core::format::{Stanza, read::age_stanza};
        let mut head = vec![0u8; len.min(64 << 10) as usize];
        file.read_exact_at(&mut head, 0).ok()?;
        let mut rest = head.strip_prefix(super::MAGIC)?;
        let mut stanzas = Vec::new();
        while let Ok((r, s)) = age_stanza(rest) {
            stanzas.push(Stanza::from(s));
            rest = r;
        }
        // The MAC covers the header up to and including "---".
        let signed = head.len() - rest.len() + 3;
        let rest = rest.strip_prefix(b"--- ")?;
        let (mac, rest) = rest.split_at_checked(43)?;
        let rest = rest.strip_prefix(b"\n")?;
        let nonce = rest.get(..16)?;
        let start = (head.len() - rest.len() + 16) as u64;
        let scrypt = stanzas.iter().any(|s| s.tag == "scrypt");
        if stanzas.is_empty() || scrypt && stanzas.len() != 1 {
            return None;
        }
        let file_key = keys
            .identities()
            .find_map(|i| i.unwrap_stanzas(&stanzas)?.ok())?;
        let file_key = file_key.expose_secret();
        let mac = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(mac)
            .ok()?;
        let mac_key = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &hkdf(&[], b"header", file_key),
        );
        aws_lc_rs::hmac::verify(&mac_key, &head[..signed], &mac).ok()?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &hkdf(nonce, b"payload", file_key)).ok()?;
        Some(Payload {
            start,
            key: LessSafeKey::new(key),
        })
    }

    fn nonce(i: usize, last: bool) -> Nonce {
        let mut n = [0u8; 12];
        n[..11].copy_from_slice(&(i as u128).to_be_bytes()[5..]);
        n[11] = last as u8;
        Nonce::assume_unique_for_key(n)
    }

    fn damaged(path: &Path, what: String) -> CryptError {
        CryptError::Damaged {
            path: path.to_path_buf(),
            what,
        }
    }

    /// Opens chunk `i` (`sealed`: its ciphertext and tag) into `plain`.
    fn open_chunk(p: &Payload, i: usize, last: bool, sealed: &[u8], plain: &mut [u8]) -> bool {
        let (ct, tag) = sealed.split_at(sealed.len() - TAG);
        p.key
            .open_separate_gather(nonce(i, last), Aad::empty(), ct, tag, plain)
            .is_ok()
    }

    /// The chunks of a payload of `sealed` bytes: their count, the last
    /// one's sealed length and the plaintext's length; `None` where the
    /// file cannot end where it does (cut inside a chunk's tag).
    fn layout(sealed: usize) -> Option<(usize, usize, usize)> {
        let n = sealed.div_ceil(SEALED).max(1);
        let last = sealed - (n - 1) * SEALED;
        // Only a payload of nothing ends in a chunk of nothing.
        if last < TAG || n > 1 && last == TAG {
            return None;
        }
        Some((n, last, sealed - n * TAG))
    }

    /// Why the last of `n` chunks (`last` sealed bytes) failed its
    /// authentication: a last chunk that opens as a middle one means the
    /// file was cut at a chunk's end.
    fn last_failed(path: &Path, file: &File, p: &Payload, n: usize, last: usize) -> CryptError {
        let i = n - 1;
        let mut sealed_last = vec![0u8; last];
        let mut scratch = vec![0u8; last - TAG];
        let cut = last == SEALED
            && file
                .read_exact_at(&mut sealed_last, p.start + (i * SEALED) as u64)
                .is_ok()
            && open_chunk(p, i, false, &sealed_last, &mut scratch);
        damaged(
            path,
            if cut {
                format!("it is truncated: it ends after chunk {n}, which is not the last")
            } else {
                format!(
                    "its last chunk ({n} of {n}) fails its authentication: the file was truncated or changed"
                )
            },
        )
    }

    /// The first `want` bytes of the payload's plaintext (fewer where it
    /// is shorter), chunk by chunk on this thread, and the plaintext's
    /// length, which the last chunk's authentication vouches for (a file
    /// cut short is refused here, not found short of its tensors).
    pub fn prefix(
        path: &Path,
        file: &File,
        len: u64,
        p: &Payload,
        want: u64,
    ) -> Result<(Vec<u8>, u64), CryptError> {
        let sealed = (len - p.start.min(len)) as usize;
        let (n, last, plain) =
            layout(sealed).ok_or_else(|| damaged(path, "it is truncated".into()))?;
        let mut out = vec![0u8; (want as usize).min(plain)];
        let mut ct = vec![0u8; SEALED];
        let mut chunk = vec![0u8; CHUNK];
        if out.len() <= (n - 1) * CHUNK {
            // The last chunk is not among those read below.
            let at = p.start + ((n - 1) * SEALED) as u64;
            file.read_exact_at(&mut ct[..last], at)
                .map_err(|e| super::damaged_io(path, e))?;
            if !open_chunk(p, n - 1, true, &ct[..last], &mut chunk[..last - TAG]) {
                return Err(last_failed(path, file, p, n, last));
            }
        }
        for (i, dst) in out.chunks_mut(CHUNK).enumerate() {
            let bytes = SEALED.min(sealed - i * SEALED);
            file.read_exact_at(&mut ct[..bytes], p.start + (i * SEALED) as u64)
                .map_err(|e| super::damaged_io(path, e))?;
            let plain_here = &mut chunk[..bytes - TAG];
            if !open_chunk(p, i, i + 1 == n, &ct[..bytes], plain_here) {
                return Err(damaged(
                    path,
                    format!(
                        "chunk {} of {n} fails its authentication: the file was changed",
                        i + 1
                    ),
                ));
            }
            dst.copy_from_slice(&plain_here[..dst.len()]);
        }
        Ok((out, plain as u64))
    }

    /// Decrypts the payload of the age file `file` (`len` bytes) into
    /// anonymous memory, runs of chunks on every core.
    pub fn decrypt(
        path: &Path,
        file: &File,
        len: u64,
        p: &Payload,
    ) -> Result<memmap2::MmapMut, CryptError> {
        let sealed = (len - p.start.min(len)) as usize;
        let (n, last, plain) =
            layout(sealed).ok_or_else(|| damaged(path, "it is truncated".into()))?;
        let mut map = plain_memory(path, plain as u64)?;
        let threads = if plain < 8 << 20 {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |t| t.get().min(16))
        };
        let per = n.div_ceil(threads);
        let out = &mut map[..plain];
        // The sealed chunks where the page cache has them: mapped, not
        // copied (a copy cost a fifth of the decryption). As with a plain
        // model's mapping, a file cut short while it is read would fault.
        // SAFETY: the map is read only while this function runs, and
        // kiln never writes the file; `len` is its length now.
        let mapped = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }
            .map_err(|e| super::damaged_io(path, e))?;
        let ciphertext = &mapped[p.start as usize..];
        // Each thread: chunks `first..` into `out`, `RUN` at a time; the
        // first chunk that fails, if any.
        let work = |first: usize, out: &mut [u8]| -> Result<(), (usize, Option<std::io::Error>)> {
            for (r, run) in out.chunks_mut(RUN * CHUNK).enumerate() {
                let i0 = first + r * RUN;
                let bytes = (run.len().div_ceil(CHUNK) * SEALED).min(sealed - i0 * SEALED);
                let ct = &ciphertext[i0 * SEALED..][..bytes];
                for (k, (sealed, plain)) in ct.chunks(SEALED).zip(run.chunks_mut(CHUNK)).enumerate()
                {
                    let i = i0 + k;
                    if !open_chunk(p, i, i + 1 == n, sealed, plain) {
                        return Err((i, None));
                    }
                }
            }
            Ok(())
        };
        let failed = std::thread::scope(|s| {
            let jobs: Vec<_> = out
                .chunks_mut(per * CHUNK)
                .enumerate()
                .map(|(t, part)| s.spawn(move || work(t * per, part)))
                .collect();
            jobs.into_iter()
                .filter_map(|j| j.join().expect("a decryption thread panicked").err())
                .min_by_key(|(i, _)| *i)
        });
        match failed {
            None => Ok(map),
            Some((_, Some(e))) => Err(super::damaged_io(path, e)),
            Some((i, None)) if i + 1 == n => Err(last_failed(path, file, p, n, last)),
            Some((i, None)) => Err(damaged(
                path,
                format!(
                    "chunk {} of {n} fails its authentication: the file was changed",
                    i + 1
                ),
            )),
        }
    }
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(7);
        (0..len).map(|_| rng.u8(..)).collect()
    }

    fn encrypted(dir: &Path, keys: &Keys, plain: &[u8]) -> PathBuf {
        let p = dir.join("f.age");
        encrypt_file(&mut &plain[..], &p, keys, |_| {}).unwrap();
        p
    }

    #[test]
    fn round_trip_in_parallel_slices_of_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = Keys::generate();
        for len in [0, 1, 65536, 65537, 16 * 65536, (9 << 20) + 12345, 10 << 20] {
            let plain = sample(len);
            let p = encrypted(dir.path(), &keys, &plain);
            assert!(is_encrypted(&p).unwrap());
            // kiln's own reading of the payload, and the age crate's.
            let file = std::fs::File::open(&p).unwrap();
            let size = file.metadata().unwrap().len();
            assert!(payload::open(&file, size, &keys).is_some(), "length {len}");
            let map = decrypt_into_memory(&p, &keys).unwrap();
            assert_eq!(&map[..len], &plain[..], "length {len}");
            let map = decrypt_with_age(&p, &keys).unwrap();
            assert_eq!(&map[..len], &plain[..], "length {len}");
            std::fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn a_file_cut_at_a_chunks_end_is_called_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = Keys::generate();
        let plain = sample(5 * 65536 + 100);
        let p = encrypted(dir.path(), &keys, &plain);
        let bytes = std::fs::read(&p).unwrap();
        // Without the last chunk (100 bytes and a tag), the file ends
        // after the fifth, which was sealed as a middle chunk.
        std::fs::write(&p, &bytes[..bytes.len() - 116]).unwrap();
        let e = decrypt_into_memory(&p, &keys).unwrap_err();
        assert!(e.to_string().contains("ends after chunk 5"), "{e}");
        // A header changed: the MAC fails, and the age crate says so.
        let mut changed = bytes.clone();
        let at = bytes.windows(4).position(|w| w == b"--- ").unwrap() - 2;
        changed[at] ^= 0x01;
        std::fs::write(&p, &changed).unwrap();
        let e = decrypt_into_memory(&p, &keys).unwrap_err();
        assert!(
            matches!(e, CryptError::Damaged { .. } | CryptError::NoKey { .. }),
            "{e}"
        );
    }

    #[test]
    fn the_decrypted_copy_is_left_out_of_core_dumps() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = Keys::generate();
        let p = encrypted(dir.path(), &keys, &sample(1 << 20));
        let map = decrypt_into_memory(&p, &keys).unwrap();
        let start = format!("{:x}-", map.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let region = smaps
            .split_inclusive("VmFlags:")
            .zip(smaps.split("VmFlags:").skip(1))
            .find(|(head, _)| head.lines().any(|l| l.starts_with(&start)))
            .map(|(_, flags)| flags.lines().next().unwrap().to_string())
            .expect("the map is in /proc/self/smaps");
        assert!(region.split_whitespace().any(|f| f == "dd"), "{region}");
    }

    #[test]
    fn wrong_key_truncation_and_a_flipped_byte_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = Keys::generate();
        let plain = sample(200_000);
        let p = encrypted(dir.path(), &keys, &plain);
        let (other, _) = Keys::generate();
        let e = decrypt_into_memory(&p, &other).unwrap_err();
        assert!(matches!(e, CryptError::NoKey { .. }), "{e}");
        assert!(e.to_string().contains("KILN_IDENTITY"), "{e}");

        let bytes = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.age");
        std::fs::write(&cut, &bytes[..bytes.len() - 70_000]).unwrap();
        let e = decrypt_into_memory(&cut, &keys).unwrap_err();
        assert!(matches!(e, CryptError::Damaged { .. }), "{e}");

        for at in [bytes.len() / 2, bytes.len() - 5] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            let f = dir.path().join("flipped.age");
            std::fs::write(&f, &flipped).unwrap();
            let e = decrypt_into_memory(&f, &keys).unwrap_err();
            assert!(matches!(e, CryptError::Damaged { .. }), "byte {at}: {e}");
        }
    }

    #[test]
    fn a_prefix_is_decrypted_and_authenticated_without_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = Keys::generate();
        let plain = sample(5 * 65536 + 100);
        let p = encrypted(dir.path(), &keys, &plain);
        for want in [0, 1, 65535, 65536, 65537, 3 * 65536 + 7, 1 << 30] {
            let (head, len) = decrypt_prefix(&p, &keys, want).unwrap();
            assert_eq!(len, plain.len() as u64);
            assert_eq!(head, &plain[..(want as usize).min(plain.len())], "{want}");
        }
        let (other, _) = Keys::generate();
        let e = decrypt_prefix(&p, &other, 10).unwrap_err();
        assert!(matches!(e, CryptError::NoKey { .. }), "{e}");

        // A changed fourth chunk: the prefix before it still reads (it was
        // never decrypted), the whole file and a prefix reaching it do not.
        let bytes = std::fs::read(&p).unwrap();
        let mut flipped = bytes.clone();
        flipped[bytes_of_header(&p) + 3 * (65536 + 16) + 100] ^= 1;
        let f = dir.path().join("flipped.age");
        std::fs::write(&f, &flipped).unwrap();
        assert_eq!(decrypt_prefix(&f, &keys, 65536).unwrap().0, &plain[..65536]);
        assert!(decrypt_into_memory(&f, &keys).is_err());
        let e = decrypt_prefix(&f, &keys, 1 << 30).unwrap_err();
        assert!(matches!(e, CryptError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains("chunk 4 of 6"), "{e}");
        // The last chunk vouches for the length: a changed or cut one is
        // refused for any prefix.
        let mut flipped = bytes.clone();
        flipped[bytes.len() - 30] ^= 1;
        std::fs::write(&f, &flipped).unwrap();
        let e = decrypt_prefix(&f, &keys, 1).unwrap_err();
        assert!(e.to_string().contains("last chunk (6 of 6)"), "{e}");
        std::fs::write(&f, &bytes[..bytes_of_header(&p) + 3 * (65536 + 16)]).unwrap();
        let e = decrypt_prefix(&f, &keys, 1).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        // A changed first chunk is refused for any prefix.
        let mut flipped = bytes;
        flipped[bytes_of_header(&p) + 40] ^= 1;
        std::fs::write(&f, &flipped).unwrap();
        let e = decrypt_prefix(&f, &keys, 1).unwrap_err();
        assert!(matches!(e, CryptError::Damaged { .. }), "{e}");
    }

    /// Where the payload's first chunk starts in the age file at `p`.
    fn bytes_of_header(p: &Path) -> usize {
        let bytes = std::fs::read(p).unwrap();
        let end = bytes.windows(4).position(|w| w == b"--- ").unwrap();
        end + bytes[end..].iter().position(|&b| b == b'\n').unwrap() + 1 + 16
    }

    #[test]
    fn a_passphrase_works_without_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Keys::default();
        let pass = SecretString::from("correct horse".to_string());
        keys.identities
            .push(Box::new(age::scrypt::Identity::new(pass.clone())));
        keys.passphrase = Some(pass);
        let plain = sample(100_000);
        let p = encrypted(dir.path(), &keys, &plain);
        assert_eq!(&decrypt_into_memory(&p, &keys).unwrap()[..], &plain[..]);
    }
}
