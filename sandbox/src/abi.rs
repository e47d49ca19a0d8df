//! The policy ABI's data: what the host passes in (ranking and tuning
//! requests) and what a policy returns, as the compact little-endian
//! layouts `ABI.md` specifies. The host writes the newest layout it knows;
//! record sizes in the header let an older policy skip fields it does not
//! know.

use serde::{Deserialize, Serialize};

pub const ABI_MAJOR: u16 = 1;
pub const ABI_MINOR: u16 = 4;

/// The custom section that declares a policy's ABI, kind, name and version.
pub const META_SECTION: &str = "kiln_policy";
pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ALLOC: &str = "kiln_alloc";
pub const EXPORT_RANK: &str = "kiln_rank";
pub const EXPORT_TUNE: &str = "kiln_tune";
/// The one import a policy may have: `kiln.log(ptr, len)`.
pub const HOST_MODULE: &str = "kiln";
pub const HOST_LOG: &str = "log";

/// The ranking input's header: 32 bytes up to 1.3; 1.4 appended the
/// offset and count of the parameter values.
pub const RANK_HEADER: usize = 40;
pub const CURSOR_RECORD: usize = 40;
/// Candidate record sizes: 1.0; 1.1 appended `symbol_overlap`; 1.2
/// appended `definition`, `resolution` and `path_distance`; 1.3 put
/// `import_hops` in the record's last (reserved) word.
pub const CANDIDATE_RECORD_1_0: usize = 48;
pub const CANDIDATE_RECORD_1_1: usize = 56;
pub const CANDIDATE_RECORD: usize = 72;
pub const TUNE_HEADER: usize = 32;
pub const PARAM_RECORD: usize = 24;

pub const SAME_FILE: u32 = 1;
pub const IMPORT_RELATED: u32 = 2;
pub const OPEN_IN_EDITOR: u32 = 4;

/// `resolution` of a candidate (1.2): a chunk of lines found by its words,
/// a definition's signature (with its docs), or a definition's body.
pub const RESOLUTION_LINES: u32 = 0;
pub const RESOLUTION_SIGNATURE: u32 = 1;
pub const RESOLUTION_BODY: u32 = 2;
/// 1.3: lines of another open document the editor changed lately, with a
/// few around them (the edit ring).
pub const RESOLUTION_EDIT: u32 = 3;

fn minus_one() -> f32 {
    -1.0
}

fn minus_one_i() -> i32 {
    -1
}

/// Where the completion is requested.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub suffix: String,
    #[serde(default)]
    pub line: u32,
    #[serde(default)]
    pub column: u32,
}

/// A snippet that could go into the prompt, with the host's features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub id: u32,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub token_count: u32,
    #[serde(default)]
    pub bm25: f32,
    /// Jaccard similarity of sliding windows between snippet and cursor context.
    #[serde(default)]
    pub jaccard: f32,
    /// Seconds since its file was edited; negative: unknown.
    #[serde(default = "minus_one")]
    pub edit_recency_s: f32,
    /// Seconds since its file was opened or viewed; negative: unknown.
    #[serde(default = "minus_one")]
    pub open_recency_s: f32,
    /// Lines from the cursor in the same file; negative: another file.
    #[serde(default = "minus_one_i")]
    pub line_distance: i32,
    #[serde(default)]
    pub same_file: bool,
    #[serde(default)]
    pub import_related: bool,
    #[serde(default)]
    pub open_in_editor: bool,
    /// ABI 1.1: share of the identifiers near the cursor the snippet defines.
    #[serde(default)]
    pub symbol_overlap: f32,
    /// ABI 1.2: how near the cursor the nearest name the snippet defines
    /// is used (1 on the cursor's line, 1/2 sixteen lines away, plus a
    /// little for each further use); 0 when it defines none of them.
    #[serde(default)]
    pub definition: f32,
    /// ABI 1.2: `RESOLUTION_LINES`, `_SIGNATURE` or `_BODY`.
    #[serde(default)]
    pub resolution: u32,
    /// ABI 1.2: folders between its file's and the cursor's (up, then
    /// down); 0 in the same folder; negative: unknown.
    #[serde(default = "minus_one_i")]
    pub path_distance: i32,
    /// ABI 1.3: 1 when the cursor's file imports the snippet's file, 2
    /// when a file it imports does; 0 neither (or unknown).
    #[serde(default)]
    pub import_hops: u32,
}

impl Candidate {
    pub fn flags(&self) -> u32 {
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        bit(self.same_file, SAME_FILE)
            | bit(self.import_related, IMPORT_RELATED)
            | bit(self.open_in_editor, OPEN_IN_EDITOR)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankInput {
    pub cursor: Cursor,
    pub candidates: Vec<Candidate>,
}

struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    /// Appends `s`, returning its (offset, length) reference.
    fn add(&mut self, s: &str) -> [u32; 2] {
        let off = self.bytes.len() as u32;
        self.bytes.extend_from_slice(s.as_bytes());
        [off, s.len() as u32]
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, r: [u32; 2]) {
    put_u32(out, r[0]);
    put_u32(out, r[1]);
}

impl RankInput {
    /// The binary layout of ABI 1.4, with no parameter values.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(&[])
    }

    /// The binary layout of ABI 1.4, with `params` (the values of the
    /// parameters the policy declares, in its order) after the header.
    pub fn encode_with(&self, params: &[f64]) -> Vec<u8> {
        let n = self.candidates.len();
        let params_at = RANK_HEADER;
        let cursor_at = params_at + 8 * params.len();
        let candidates_at = cursor_at + CURSOR_RECORD;
        let strings_at = candidates_at + n * CANDIDATE_RECORD;
        let mut strings = Strings { bytes: Vec::new() };
        let mut out = Vec::with_capacity(strings_at + 64 * n);
        out.extend_from_slice(b"KRNK");
        out.extend_from_slice(&ABI_MAJOR.to_le_bytes());
        out.extend_from_slice(&ABI_MINOR.to_le_bytes());
        for v in [
            RANK_HEADER as u32,
            cursor_at as u32,
            candidates_at as u32,
            CANDIDATE_RECORD as u32,
            n as u32,
            strings_at as u32,
            params_at as u32,
            params.len() as u32,
        ] {
            put_u32(&mut out, v);
        }
        for v in params {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let c = &self.cursor;
        for s in [&c.language, &c.path, &c.prefix, &c.suffix] {
            let r = strings.add(s);
            put_str(&mut out, r);
        }
        put_u32(&mut out, c.line);
        put_u32(&mut out, c.column);
        for cand in &self.candidates {
            put_u32(&mut out, cand.id);
            put_u32(&mut out, cand.token_count);
            for f in [
                cand.bm25,
                cand.jaccard,
                cand.edit_recency_s,
                cand.open_recency_s,
            ] {
                out.extend_from_slice(&f.to_le_bytes());
            }
            out.extend_from_slice(&cand.line_distance.to_le_bytes());
            put_u32(&mut out, cand.flags());
            let (p, t) = (strings.add(&cand.path), strings.add(&cand.text));
            put_str(&mut out, p);
            put_str(&mut out, t);
            out.extend_from_slice(&cand.symbol_overlap.to_le_bytes());
            put_u32(&mut out, 0);
            out.extend_from_slice(&cand.definition.to_le_bytes());
            put_u32(&mut out, cand.resolution);
            out.extend_from_slice(&cand.path_distance.to_le_bytes());
            put_u32(&mut out, cand.import_hops);
        }
        debug_assert_eq!(out.len(), strings_at);
        out.extend_from_slice(&strings.bytes);
        out
    }
}

/// Reads a ranking result: `u32 n` then `n` f32 scores. Checks the count
/// against the candidates and that every score is a finite number.
pub fn decode_scores(bytes: &[u8], want: usize) -> Result<Vec<f32>, OutputError> {
    if bytes.len() < 4 {
        return Err(OutputError::Malformed(format!(
            "{} bytes of output; a ranking starts with a 4-byte count",
            bytes.len()
        )));
    }
    let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if n != want {
        return Err(OutputError::WrongCount { got: n, want });
    }
    if bytes.len() != 4 + 4 * n {
        return Err(OutputError::Malformed(format!(
            "{} bytes of output for {n} scores; expected {}",
            bytes.len(),
            4 + 4 * n
        )));
    }
    let scores: Vec<f32> = bytes[4..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(OutputError::NotFinite {
            index: i,
            value: scores[i] as f64,
        });
    }
    Ok(scores)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Float,
    Int,
    LogFloat,
}

/// One tunable setting and its bounds (inclusive).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
    pub lo: f64,
    pub hi: f64,
}

/// A measured trial: the values tried (in parameter order) and the metric
/// (lower is better).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    pub values: Vec<f64>,
    pub metric: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneInput {
    pub params: Vec<Param>,
    #[serde(default)]
    pub trials: Vec<Trial>,
    /// The policy's only source of randomness, so a proposal replays.
    #[serde(default)]
    pub seed: u64,
}

impl TuneInput {
    /// Checks the space and history; the message names the problem.
    pub fn validate(&self) -> Result<(), String> {
        for p in &self.params {
            if !(p.lo.is_finite() && p.hi.is_finite() && p.lo <= p.hi) {
                return Err(format!(
                    "parameter {}: bounds [{}, {}] are not a range",
                    p.name, p.lo, p.hi
                ));
            }
            if p.kind == ParamKind::LogFloat && p.lo <= 0.0 {
                return Err(format!(
                    "parameter {}: a log-scaled range must be positive",
                    p.name
                ));
            }
        }
        for (i, t) in self.trials.iter().enumerate() {
            if t.values.len() != self.params.len() {
                return Err(format!(
                    "trial {i} has {} values for {} parameters",
                    t.values.len(),
                    self.params.len()
                ));
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"KTUN");
        out.extend_from_slice(&ABI_MAJOR.to_le_bytes());
        out.extend_from_slice(&ABI_MINOR.to_le_bytes());
        for v in [
            TUNE_HEADER as u32,
            self.params.len() as u32,
            self.trials.len() as u32,
            PARAM_RECORD as u32,
        ] {
            put_u32(&mut out, v);
        }
        out.extend_from_slice(&self.seed.to_le_bytes());
        for p in &self.params {
            let kind = match p.kind {
                ParamKind::Float => 0,
                ParamKind::Int => 1,
                ParamKind::LogFloat => 2,
            };
            put_u32(&mut out, kind);
            put_u32(&mut out, 0);
            out.extend_from_slice(&p.lo.to_le_bytes());
            out.extend_from_slice(&p.hi.to_le_bytes());
        }
        for t in &self.trials {
            out.extend_from_slice(&t.metric.to_le_bytes());
            for v in &t.values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }
}

/// Reads a tuning proposal (one f64 per parameter) and enforces the bounds.
pub fn decode_proposal(bytes: &[u8], params: &[Param]) -> Result<Vec<f64>, OutputError> {
    if bytes.len() != 8 * params.len() {
        return Err(OutputError::Malformed(format!(
            "{} bytes of output for {} parameters; expected {}",
            bytes.len(),
            params.len(),
            8 * params.len()
        )));
    }
    let values: Vec<f64> = bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    for (i, (v, p)) in values.iter().zip(params).enumerate() {
        if !v.is_finite() {
            return Err(OutputError::NotFinite {
                index: i,
                value: *v,
            });
        }
        let integral = p.kind != ParamKind::Int || v.fract() == 0.0;
        if *v < p.lo || *v > p.hi || !integral {
            return Err(OutputError::OutOfBounds {
                param: p.name.clone(),
                value: *v,
                lo: p.lo,
                hi: p.hi,
            });
        }
    }
    Ok(values)
}

/// What is wrong with a policy's output.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OutputError {
    #[error("malformed output: {0}")]
    Malformed(String),
    #[error("returned {got} scores for {want} candidates")]
    WrongCount { got: usize, want: usize },
    #[error("value {index} is {value}, not a finite number")]
    NotFinite { index: usize, value: f64 },
    #[error("proposed {param} = {value}, outside its bounds [{lo}, {hi}] (or not an integer)")]
    OutOfBounds {
        param: String,
        value: f64,
        lo: f64,
        hi: f64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RankInput {
        RankInput {
            cursor: Cursor {
                language: "rust".into(),
                path: "src/main.rs".into(),
                prefix: "fn main() {".into(),
                suffix: "}".into(),
                line: 3,
                column: 4,
            },
            candidates: vec![Candidate {
                id: 7,
                path: "src/lib.rs".into(),
                text: "pub fn helper() {}".into(),
                token_count: 6,
                bm25: 1.5,
                jaccard: 0.25,
                edit_recency_s: 30.0,
                open_recency_s: -1.0,
                line_distance: -1,
                same_file: false,
                import_related: true,
                open_in_editor: false,
                symbol_overlap: 0.5,
                definition: 0.75,
                resolution: RESOLUTION_SIGNATURE,
                path_distance: 2,
                import_hops: 1,
            }],
        }
    }

    #[test]
    fn rank_layout_matches_the_spec() {
        // Two parameter values (16 bytes) between the header and the
        // cursor; the candidates follow the cursor's 40 bytes.
        let b = sample().encode_with(&[0.5, 64.0]);
        assert_eq!(&b[..4], b"KRNK");
        assert_eq!(&b[4..8], &[1, 0, 4, 0]);
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(
            (u32_at(8), u32_at(12), u32_at(16), u32_at(20), u32_at(24)),
            (40, 56, 96, 72, 1)
        );
        assert_eq!((u32_at(32), u32_at(36)), (40, 2));
        let f64_at = |at: usize| f64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        assert_eq!((f64_at(40), f64_at(48)), (0.5, 64.0));
        let strings = u32_at(28) as usize;
        assert_eq!(strings, 96 + 72);
        // The cursor's prefix and the candidate's text, through their
        // string references.
        let (off, len) = (u32_at(56 + 16) as usize, u32_at(56 + 20) as usize);
        assert_eq!(&b[strings + off..strings + off + len], b"fn main() {");
        let (off, len) = (u32_at(96 + 40) as usize, u32_at(96 + 44) as usize);
        assert_eq!(
            &b[strings + off..strings + off + len],
            b"pub fn helper() {}"
        );
        assert_eq!(u32_at(96 + 28), IMPORT_RELATED);
        let f32_at = |at: usize| f32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(f32_at(96 + 48), 0.5);
        assert_eq!(f32_at(96 + 56), 0.75);
        assert_eq!(u32_at(96 + 60), RESOLUTION_SIGNATURE);
        assert_eq!(u32_at(96 + 64), 2);
        assert_eq!(u32_at(96 + 68), 1);
        // No parameters: the cursor right after the header.
        let b = sample().encode();
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(
            (u32_at(12), u32_at(16), u32_at(32), u32_at(36)),
            (40, 80, 40, 0)
        );
    }

    #[test]
    fn outputs_are_checked() {
        let mut ok = 2u32.to_le_bytes().to_vec();
        ok.extend_from_slice(&1.0f32.to_le_bytes());
        ok.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(decode_scores(&ok, 2).unwrap(), vec![1.0, 2.0]);
        assert_eq!(
            decode_scores(&ok, 3).unwrap_err(),
            OutputError::WrongCount { got: 2, want: 3 }
        );
        let mut nan = ok.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            decode_scores(&nan, 2),
            Err(OutputError::NotFinite { index: 1, .. })
        ));
        assert!(matches!(
            decode_scores(&ok[..9], 2),
            Err(OutputError::Malformed(_))
        ));
        let params = vec![Param {
            name: "batch".into(),
            kind: ParamKind::Int,
            lo: 1.0,
            hi: 8.0,
        }];
        assert_eq!(
            decode_proposal(&4.0f64.to_le_bytes(), &params).unwrap(),
            vec![4.0]
        );
        assert!(matches!(
            decode_proposal(&9.0f64.to_le_bytes(), &params),
            Err(OutputError::OutOfBounds { .. })
        ));
        assert!(matches!(
            decode_proposal(&2.5f64.to_le_bytes(), &params),
            Err(OutputError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn json_inputs_default_the_optional_features() {
        let i: RankInput = serde_json::from_str(
            r#"{"cursor": {"prefix": "x"}, "candidates": [{"id": 1, "bm25": 2.0}]}"#,
        )
        .unwrap();
        assert_eq!(i.candidates[0].edit_recency_s, -1.0);
        assert_eq!(i.candidates[0].line_distance, -1);
        assert!(
            serde_json::from_str::<RankInput>(
                r#"{"cursor": {}, "candidates": [{"id": 1, "bm52": 2.0}]}"#
            )
            .is_err()
        );
    }
}
