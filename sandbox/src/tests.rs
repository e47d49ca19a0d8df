//! The sandbox's mechanics on hand-written WAT policies.

use super::*;
use crate::abi::Candidate;

/// A ranking policy in WAT: a bump allocator and `kiln_rank` with `body`.
/// The input's candidate count is at input+24.
pub fn wat_ranker(meta_abi: &str, alloc_body: &str, rank_body: &str, extra: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (@custom "kiln_policy" "{{\"abi\":\"{meta_abi}\",\"kind\":\"rank\",\"name\":\"wat\",\"version\":\"1.0.0\"}}")
  {extra}
  (memory (export "memory") 2)
  (global $top (mut i32) (i32.const 4096))
  (func (export "kiln_alloc") (param $n i32) (result i32)
    (local $p i32)
    {alloc_body}
    global.get $top
    local.set $p
    global.get $top
    local.get $n
    i32.add
    global.set $top
    local.get $p)
  (func (export "kiln_rank") (param $ptr i32) (param $len i32) (result i64)
    {rank_body}))"#
    );
    wat::parse_str(text).expect("valid WAT")
}

/// Writes `n` (from the input) then n copies of `score_bits` at 64 KiB and
/// returns that block.
pub fn scores_body(score_bits: u32, count_delta: i32) -> String {
    format!(
        r#"(local $n i32) (local $i i32)
    (local.set $n (i32.add (i32.load (i32.add (local.get $ptr) (i32.const 24))) (i32.const {count_delta})))
    (i32.store (i32.const 65536) (local.get $n))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store (i32.add (i32.const 65540) (i32.mul (local.get $i) (i32.const 4))) (i32.const {score_bits}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i64.or (i64.shl (i64.const 65536) (i64.const 32))
            (i64.extend_i32_u (i32.add (i32.const 4) (i32.mul (local.get $n) (i32.const 4)))))"#
    )
}

fn input(n: u32) -> RankInput {
    RankInput {
        cursor: Cursor::default(),
        candidates: (0..n)
            .map(|id| Candidate {
                id,
                path: format!("f{id}.rs"),
                text: "x".repeat(id as usize),
                token_count: id,
                bm25: id as f32,
                jaccard: 0.0,
                edit_recency_s: -1.0,
                open_recency_s: -1.0,
                line_distance: -1,
                same_file: false,
                import_related: false,
                open_in_editor: false,
                symbol_overlap: 0.0,
                definition: 0.0,
                resolution: 0,
                path_distance: -1,
                import_hops: 0,
            })
            .collect(),
    }
}

fn load(bytes: &[u8]) -> Result<Policy, PolicyError> {
    Sandbox::new(None).load(bytes, None)
}

#[test]
fn a_well_behaved_wat_policy_ranks() {
    let p = load(&wat_ranker(
        "1.1",
        "",
        &scores_body(2.5f32.to_bits(), 0),
        "",
    ))
    .unwrap();
    let out = p.rank(&input(3)).unwrap();
    assert_eq!(out.value, vec![2.5; 3]);
    assert!(out.fuel_used > 0);
    assert_eq!(p.meta.name, "wat");
}

#[test]
fn an_older_minor_loads() {
    assert_eq!(
        load(&wat_ranker("1.0", "", &scores_body(0, 0), ""))
            .unwrap()
            .meta
            .abi,
        (1, 0)
    );
}

#[test]
fn refusals_before_compiling() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            wat_ranker("2.0", "", &scores_body(0, 0), ""),
            "built for policy ABI 2.0",
        ),
        (
            wat_ranker(
                "1.1",
                "",
                &scores_body(0, 0),
                r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
            ),
            "imports wasi_snapshot_preview1.fd_write",
        ),
        (
            wat_ranker(
                "1.1",
                "",
                &scores_body(0, 0),
                r#"(import "kiln" "open_file" (func))"#,
            ),
            "imports kiln.open_file",
        ),
        (
            wat::parse_str("(module (memory (export \"memory\") 1))").unwrap(),
            "no kiln_policy custom section",
        ),
        (
            b"\0asm\x01\0\0\0\x05junk".to_vec(),
            "not a WebAssembly module",
        ),
    ];
    for (bytes, want) in cases {
        let err = load(&bytes).err().expect("refused").to_string();
        assert!(err.contains(want), "{want:?} not in {err:?}");
    }
    let mut huge = b"\0asm\x01\0\0\0".to_vec();
    huge.resize(100 << 20, 0);
    let err = load(&huge).err().unwrap();
    assert!(
        matches!(err, PolicyError::TooLarge { bytes, .. } if bytes == 100 << 20),
        "{err}"
    );
}

/// Loaded with little fuel and the longest deadline, so that fuel, not
/// the clock, stops a spinning loop however loaded the machine is.
fn spin_on_fuel(bytes: &[u8]) -> Policy {
    let mut limits = load(bytes).unwrap().limits;
    limits.fuel = 10_000_000;
    limits.deadline_ms = limits::CEILING.deadline_ms;
    Sandbox::new(None).load(bytes, Some(limits)).unwrap()
}

#[test]
fn runaway_policies_are_stopped() {
    let spin = wat_ranker("1.1", "", "(loop $l (br $l)) (i64.const 0)", "");
    let p = spin_on_fuel(&spin);
    assert!(matches!(
        p.rank(&input(1)),
        Err(PolicyError::OutOfFuel { .. })
    ));
    // With fuel to spare, the deadline stops it.
    let mut limits = p.limits;
    limits.fuel = limits::CEILING.fuel;
    limits.deadline_ms = 20;
    let p = Sandbox::new(None).load(&spin, Some(limits)).unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        p.rank(&input(1)),
        Err(PolicyError::Timeout { ms: 20 })
    ));
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    let grow = wat_ranker(
        "1.1",
        "",
        "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (i64.const 0)",
        "",
    );
    assert!(matches!(
        load(&grow).unwrap().rank(&input(1)),
        Err(PolicyError::MemoryLimit { .. })
    ));
    let recurse = wat_ranker(
        "1.1",
        "",
        "(call $deep (i32.const 0)) (i64.const 0)",
        "(func $deep (param i32) (call $deep (i32.add (local.get 0) (i32.const 1))))",
    );
    assert!(matches!(
        load(&recurse).unwrap().rank(&input(1)),
        Err(PolicyError::StackOverflow)
    ));
    let bad_alloc = wat_ranker("1.1", "unreachable", &scores_body(0, 0), "");
    let err = load(&bad_alloc)
        .unwrap()
        .rank(&input(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("in kiln_alloc") && err.contains("unreachable"),
        "{err}"
    );
}

#[test]
fn bad_outputs_are_named() {
    let nan = load(&wat_ranker(
        "1.1",
        "",
        &scores_body(f32::NAN.to_bits(), 0),
        "",
    ))
    .unwrap();
    assert!(matches!(
        nan.rank(&input(2)),
        Err(PolicyError::Output(OutputError::NotFinite { index: 0, .. }))
    ));
    let short = load(&wat_ranker("1.1", "", &scores_body(0, -1), "")).unwrap();
    assert!(matches!(
        short.rank(&input(2)),
        Err(PolicyError::Output(OutputError::WrongCount {
            got: 1,
            want: 2
        }))
    ));
    let wild = load(&wat_ranker("1.1", "", "(i64.const 0x7fff000000000010)", "")).unwrap();
    let err = wild.rank(&input(2)).unwrap_err().to_string();
    assert!(err.contains("outside the policy's"), "{err}");
}

#[test]
fn the_breaker_falls_back_then_trips() {
    let spin = wat_ranker("1.1", "", "(loop $l (br $l)) (i64.const 0)", "");
    let r = breaker::Ranker::new(Some(std::sync::Arc::new(spin_on_fuel(&spin))), 3);
    let i = input(4);
    for n in 1..=3 {
        let out = r.rank(&i);
        assert_eq!(out.scores, builtin::rank(&i));
        assert!(
            matches!(out.source, breaker::Source::Builtin(Some(ref why)) if why.contains("ran out of fuel"))
        );
        assert_eq!(out.tripped_now, n == 3);
    }
    assert!(r.is_tripped());
    let out = r.rank(&i);
    assert!(
        matches!(out.source, breaker::Source::Builtin(Some(ref why)) if why.contains("circuit breaker"))
    );
    r.reset();
    assert!(!r.is_tripped());
}

#[test]
fn the_compile_cache_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wat_ranker("1.1", "", &scores_body(1.0f32.to_bits(), 0), "");
    let sb = Sandbox::new(Some(dir.path().to_path_buf()));
    sb.load(&bytes, None).unwrap();
    let cached: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    let cwasm = cached
        .iter()
        .find(|p| p.extension().unwrap() == "cwasm")
        .unwrap();
    // A tampered cache file is detected and replaced, not executed.
    let mut b = std::fs::read(cwasm).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0xff;
    std::fs::write(cwasm, &b).unwrap();
    let p = sb.load(&bytes, None).unwrap();
    assert_eq!(p.rank(&input(2)).unwrap().value, vec![1.0, 1.0]);
    assert_ne!(std::fs::read(cwasm).unwrap(), b);
}

/// A ranking module whose `kiln_policy` section is `meta` (JSON, quotes
/// escaped for WAT).
fn with_meta(meta: &str) -> Vec<u8> {
    let meta = meta.replace('"', "\\\"");
    wat::parse_str(format!(
        r#"(module
  (@custom "kiln_policy" "{meta}")
  (memory (export "memory") 1)
  (func (export "kiln_alloc") (param i32) (result i32) i32.const 0)
  (func (export "kiln_rank") (param i32 i32) (result i64) i64.const 0))"#
    ))
    .expect("valid WAT")
}

#[test]
fn declared_parameters_are_checked_when_loaded() {
    let head = r#""kind":"rank","name":"p","version":"1.0.0""#;
    let ok = with_meta(&format!(
        r#"{{"abi":"1.4",{head},"params":[{{"name":"weight_2","default":1.5,"min":0,"max":4}},{{"name":"span","default":60,"min":1,"max":3600,"log":true,"integer":true,"doc":"seconds"}}]}}"#
    ));
    let meta = load(&ok).unwrap().meta;
    assert_eq!(meta.params.len(), 2);
    assert_eq!(
        (
            meta.params[1].name.as_str(),
            meta.params[1].log,
            meta.params[1].integer
        ),
        ("span", true, true)
    );
    assert!(
        meta.params[1]
            .check(59.5)
            .unwrap_err()
            .contains("whole number")
    );
    let param = |p: &str| format!(r#"{{"abi":"1.4",{head},"params":[{p}]}}"#);
    let cases = [
        (
            format!(
                r#"{{"abi":"1.3",{head},"params":[{{"name":"w","default":1,"min":0,"max":2}}]}}"#
            ),
            "params need policy ABI 1.4",
        ),
        (
            param(
                r#"{"name":"w","default":1,"min":0,"max":2},{"name":"w","default":1,"min":0,"max":2}"#,
            ),
            "declared twice",
        ),
        (
            param(r#"{"name":"w","default":3,"min":0,"max":2}"#),
            "w's default: w = 3: give 0 to 2",
        ),
        (
            param(r#"{"name":"w","default":1,"min":2,"max":0}"#),
            "not a range",
        ),
        (
            param(r#"{"name":"w","default":1,"min":0,"max":2,"log":true}"#),
            "log-scaled range must be positive",
        ),
        (
            param(r#"{"name":"Weight","default":1,"min":0,"max":2}"#),
            "lowercase letters",
        ),
        (
            param(r#"{"name":"w.x","default":1,"min":0,"max":2}"#),
            "lowercase letters",
        ),
        (
            param(r#"{"name":"w","default":1,"min":0}"#),
            "missing field `max`",
        ),
        (
            param(r#"{"name":"w","default":1,"min":0,"max":2,"step":1}"#),
            "unknown field `step`",
        ),
        (
            format!(r#"{{"abi":"1.9",{head}}}"#),
            "built for policy ABI 1.9, newer than this kiln's 1.4",
        ),
    ];
    for (meta, want) in cases {
        let err = load(&with_meta(&meta)).err().expect("refused").to_string();
        assert!(err.contains(want), "{meta}: {err}");
    }
    let many: Vec<String> = (0..33)
        .map(|i| format!(r#"{{"name":"w{i}","default":1,"min":0,"max":2}}"#))
        .collect();
    let err = load(&with_meta(&param(&many.join(","))))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("33 params declared; at most 32"), "{err}");
}
