//! The built-in ranking formula: BM25 plus recency and locality bonuses.
//!
//! One source for two builds: kiln's native fallback ranker includes this
//! file, and so does the `bm25-recency` policy compiled to WebAssembly.
//! Only f32 additions, multiplications and divisions, in a fixed order, so
//! both produce the same bits for the same input.

/// `flags` bits of a candidate.
pub const SAME_FILE: u32 = 1;
pub const IMPORT_RELATED: u32 = 2;
pub const OPEN_IN_EDITOR: u32 = 4;

/// What a definition of a name used on the cursor's line is worth, in
/// BM25 units: the definitions of what the code around the cursor uses
/// are what a completion most often needs (chosen on ctxbench: 16 and 64
/// found fewer definitions than 32 in four repositories).
pub const DEFINITION: f32 = 32.0;

/// What a snippet of a file the cursor's file imports is worth, in BM25
/// units (half that two imports away).
pub const IMPORT: f32 = 2.0;

/// Score of one candidate. Recencies are seconds (negative: unknown);
/// `line_distance` is lines from the cursor in the same file (negative:
/// another file); `definition` is how near the cursor the nearest name the
/// candidate defines is used (ABI 1.2; 0: none); `import_hops` is 1 when
/// the cursor's file imports the candidate's, 2 when a file it imports
/// does (ABI 1.3; 0: neither).
pub fn bm25_recency(
    bm25: f32,
    edit_recency_s: f32,
    open_recency_s: f32,
    line_distance: i32,
    flags: u32,
    definition: f32,
    import_hops: u32,
) -> f32 {
    let mut score = bm25;
    if definition > 0.0 {
        score += DEFINITION * definition;
    }
    if edit_recency_s >= 0.0 {
        score += 2.0 / (1.0 + edit_recency_s / 60.0);
    }
    if open_recency_s >= 0.0 {
        score += 1.0 / (1.0 + open_recency_s / 300.0);
    }
    if flags & SAME_FILE != 0 {
        score += 1.0;
        if line_distance >= 0 {
            score += 1.0 / (1.0 + line_distance as f32 / 50.0);
        }
    }
    if flags & IMPORT_RELATED != 0 {
        score += 0.75;
    }
    if flags & OPEN_IN_EDITOR != 0 {
        score += 0.25;
    }
    if import_hops > 0 {
        score += IMPORT / import_hops as f32;
    }
    score
}
