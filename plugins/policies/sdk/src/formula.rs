//! The built-in ranking formula: BM25 plus recency and locality bonuses,
//! each weighed by a parameter the `bm25-recency` policy declares (ABI
//! 1.4), so that `kiln tune` can fit them to a repository.
//!
//! One source for two builds: kiln's native fallback ranker includes this
//! file, and so does the `bm25-recency` policy compiled to WebAssembly.
//! Only f32 additions, multiplications and divisions, in a fixed order, so
//! both produce the same bits for the same input and the same weights.

/// `flags` bits of a candidate.
pub const SAME_FILE: u32 = 1;
pub const IMPORT_RELATED: u32 = 2;
pub const OPEN_IN_EDITOR: u32 = 4;

/// One declared parameter: its name, default, bounds (inclusive), and
/// whether a search should spread its tries on a log scale.
pub struct ParamSpec {
    pub name: &'static str,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    pub log: bool,
    pub doc: &'static str,
}

/// The formula's parameters, in the order the policy declares them (and
/// the host sends their values). The defaults are kiln's own ranking:
/// `definition` was chosen on ctxbench (16 and 64 found fewer definitions
/// than 32 in four repositories).
pub const PARAMS: [ParamSpec; 11] = [
    ParamSpec {
        name: "definition",
        default: 32.0,
        min: 0.0,
        max: 128.0,
        log: false,
        doc: "what a definition of a name used on the cursor's line is worth, in BM25 units",
    },
    ParamSpec {
        name: "import",
        default: 2.0,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a snippet of a file the cursor's file imports (half that two imports away)",
    },
    ParamSpec {
        name: "edit",
        default: 2.0,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a file edited just now (halved after edit_seconds)",
    },
    ParamSpec {
        name: "edit_seconds",
        default: 60.0,
        min: 1.0,
        max: 86400.0,
        log: true,
        doc: "seconds after which an edit's bonus is halved",
    },
    ParamSpec {
        name: "open",
        default: 1.0,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a file opened or viewed just now (halved after open_seconds)",
    },
    ParamSpec {
        name: "open_seconds",
        default: 300.0,
        min: 1.0,
        max: 86400.0,
        log: true,
        doc: "seconds after which a view's bonus is halved",
    },
    ParamSpec {
        name: "same_file",
        default: 1.0,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a snippet of the cursor's own file",
    },
    ParamSpec {
        name: "nearby",
        default: 1.0,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a snippet of the cursor's file at the cursor (halved nearby_lines away)",
    },
    ParamSpec {
        name: "nearby_lines",
        default: 50.0,
        min: 1.0,
        max: 10000.0,
        log: true,
        doc: "lines from the cursor after which the nearby bonus is halved",
    },
    ParamSpec {
        name: "import_related",
        default: 0.75,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a file related by imports or whose name is used near the cursor",
    },
    ParamSpec {
        name: "open_in_editor",
        default: 0.25,
        min: 0.0,
        max: 16.0,
        log: false,
        doc: "a file open in the editor",
    },
];

/// The formula's weights, one per entry of [`PARAMS`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    pub definition: f32,
    pub import: f32,
    pub edit: f32,
    pub edit_seconds: f32,
    pub open: f32,
    pub open_seconds: f32,
    pub same_file: f32,
    pub nearby: f32,
    pub nearby_lines: f32,
    pub import_related: f32,
    pub open_in_editor: f32,
}

impl Weights {
    /// The declared defaults.
    pub fn defaults() -> Weights {
        Weights::from_values(&[])
    }

    /// Weights from values in [`PARAMS`] order; a value missing (an older
    /// host sends none) takes its default.
    pub fn from_values(values: &[f64]) -> Weights {
        let v = |i: usize| values.get(i).copied().unwrap_or(PARAMS[i].default) as f32;
        Weights {
            definition: v(0),
            import: v(1),
            edit: v(2),
            edit_seconds: v(3),
            open: v(4),
            open_seconds: v(5),
            same_file: v(6),
            nearby: v(7),
            nearby_lines: v(8),
            import_related: v(9),
            open_in_editor: v(10),
        }
    }
}

/// Score of one candidate. Recencies are seconds (negative: unknown);
/// `line_distance` is lines from the cursor in the same file (negative:
/// another file); `definition` is how near the cursor the nearest name the
/// candidate defines is used (ABI 1.2; 0: none); `import_hops` is 1 when
/// the cursor's file imports the candidate's, 2 when a file it imports
/// does (ABI 1.3; 0: neither).
#[allow(clippy::too_many_arguments)]
pub fn bm25_recency(
    w: &Weights,
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
        score += w.definition * definition;
    }
    if edit_recency_s >= 0.0 {
        score += w.edit / (1.0 + edit_recency_s / w.edit_seconds);
    }
    if open_recency_s >= 0.0 {
        score += w.open / (1.0 + open_recency_s / w.open_seconds);
    }
    if flags & SAME_FILE != 0 {
        score += w.same_file;
        if line_distance >= 0 {
            score += w.nearby / (1.0 + line_distance as f32 / w.nearby_lines);
        }
    }
    if flags & IMPORT_RELATED != 0 {
        score += w.import_related;
    }
    if flags & OPEN_IN_EDITOR != 0 {
        score += w.open_in_editor;
    }
    if import_hops > 0 {
        score += w.import / import_hops as f32;
    }
    score
}
