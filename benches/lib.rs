//! kiln's benchmarks live in `benches/`; this crate only hosts them.
//! Run `cargo bench -p kiln-benches` (see README.md).
