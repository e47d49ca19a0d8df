//! A small seeded mutational fuzzer for the bounded fuzz runs in CI
//! (`tests/tests/fuzz.rs`): byte-level mutations of valid seeds (flips,
//! interesting values, cuts, copies, splices, dictionary words), the
//! kind of damage parsers meet. Deterministic for a seed, so a failure is
//! reproduced by its seed and iteration, and becomes a test.

use std::time::{Duration, Instant};

pub struct Mutator {
    rng: fastrand::Rng,
    dictionary: Vec<Vec<u8>>,
}

const INTERESTING: &[u8] = b"\0\xff\x7f\x80\"\\{}[]:,\n\r -0123456789e.";

const INTERESTING_U32: &[u32] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    255,
    256,
    0x7fff,
    0xffff,
    0x10000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

impl Mutator {
    /// A mutator with `seed` and words worth inserting (tokens of the
    /// format: header names, keys, magic numbers).
    pub fn new(seed: u64, dictionary: &[&[u8]]) -> Mutator {
        Mutator {
            rng: fastrand::Rng::with_seed(seed),
            dictionary: dictionary.iter().map(|w| w.to_vec()).collect(),
        }
    }

    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }

    /// One to four mutations of `input`; `others` are seeds to splice from.
    pub fn mutate(&mut self, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
        let mut v = input.to_vec();
        for _ in 0..self.rng.usize(1..=4) {
            self.mutate_once(&mut v, others);
        }
        v
    }

    fn mutate_once(&mut self, v: &mut Vec<u8>, others: &[Vec<u8>]) {
        let r = &mut self.rng;
        let pos = |r: &mut fastrand::Rng, len: usize| r.usize(0..=len);
        match r.u8(0..9) {
            0 if !v.is_empty() => {
                let i = r.usize(..v.len());
                v[i] ^= 1 << r.u8(0..8);
            }
            1 if !v.is_empty() => {
                let i = r.usize(..v.len());
                v[i] = INTERESTING[r.usize(..INTERESTING.len())];
            }
            2 if !v.is_empty() => {
                let a = r.usize(..v.len());
                let b = (a + r.usize(1..=16.min(v.len() - a))).min(v.len());
                v.drain(a..b);
            }
            3 if !v.is_empty() => {
                let a = r.usize(..v.len());
                let b = (a + r.usize(1..=32)).min(v.len());
                let piece = v[a..b].to_vec();
                let at = pos(r, v.len());
                v.splice(at..at, piece);
            }
            4 if !self.dictionary.is_empty() => {
                let w = self.dictionary[r.usize(..self.dictionary.len())].clone();
                let at = pos(r, v.len());
                v.splice(at..at, w);
            }
            5 => {
                let at = pos(r, v.len());
                v.truncate(at);
            }
            6 if v.len() >= 4 => {
                let i = r.usize(..=v.len() - 4);
                let x = INTERESTING_U32[r.usize(..INTERESTING_U32.len())];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            7 if !others.is_empty() => {
                let o = &others[r.usize(..others.len())];
                let (a, b) = (pos(r, v.len()), pos(r, o.len()));
                v.truncate(a);
                v.extend_from_slice(&o[b..]);
            }
            _ => {
                let at = pos(r, v.len());
                let n = r.usize(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| r.u8(..)).collect();
                v.splice(at..at, bytes);
            }
        }
    }
}

/// Runs `one(iteration)` until `iterations` are done or `budget` is spent;
/// returns how many ran.
pub fn run_for(iterations: usize, budget: Duration, mut one: impl FnMut(usize)) -> usize {
    let start = Instant::now();
    let mut done = 0;
    while done < iterations && start.elapsed() < budget {
        one(done);
        done += 1;
    }
    done
}
