//! Fine-tuning on the user's own code. This crate holds the data
//! preparation (`kiln finetune prepare`): a repository's source files,
//! filtered, deduplicated, redacted and split by file, as token sequences
//! in the model's own prompt format, ready for a trainer.
//!
//! - [`filter`]: which files are code to learn from (and why others are
//!   not: binary, generated, vendored, minified, too large, secrets files).
//! - [`secrets`]: keys, tokens and passwords replaced before anything is
//!   tokenized.
//! - [`dedup`]: exact and near duplicates (MinHash over word 5-grams).
//! - [`spans`]: fill-in-the-middle holes at syntactic units (a function
//!   body, a match arm, a method, a statement, the rest of a line).
//! - [`prepare`]: the whole run, its report and the data directory it
//!   writes.

pub mod dedup;
pub mod filter;
pub mod prepare;
pub mod secrets;
pub mod spans;
pub mod train;
