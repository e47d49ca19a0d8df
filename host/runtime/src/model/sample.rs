//! Choosing the next token from logits, as llama.cpp's default sampler
//! chain does: repetition penalty, then top-k, top-p, min-p, temperature,
//! and a seeded draw. Temperature 0 (or below) is greedy.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Rejects values that make no sense, naming the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(format!(
                "repeat_penalty {} must be > 0",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: fastrand::Rng,
    /// Work buffers, kept from token to token: once they have grown,
    /// sampling allocates nothing.
    penalized: Vec<f32>,
    seen: Vec<u32>,
    cand: Vec<(u32, f32)>,
    probs: Vec<f64>,
}

/// Index of the largest value (the first one on ties); NaN never wins
/// (all NaN: the last index). The maximum first, in 16 lanes that the
/// compiler vectorizes, then its first place: a compare-and-branch per
/// logit had cost 2 % of Gemma 3's decode (262,144 logits a token).
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // `max` ignores a NaN.
            *l = l.max(v);
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let at = logits.iter().position(|&v| v == max);
    at.unwrap_or(logits.len().saturating_sub(1)) as u32
}

/// Candidates best first: the larger logit, then the smaller id. A total
/// order (ids differ), so any sort gives the same sequence.
fn better(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The candidates' softmax (best first, so `c[0]` holds the largest
/// logit), written into `out`.
fn softmax(c: &[(u32, f32)], out: &mut Vec<f64>) {
    let max = c[0].1 as f64;
    out.clear();
    out.extend(c.iter().map(|x| (x.1 as f64 - max).exp()));
    let sum: f64 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= sum);
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler {
            rng: fastrand::Rng::with_seed(params.seed),
            params,
            penalized: Vec::new(),
            seen: Vec::new(),
            cand: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Picks a token. `history` is every token so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let Sampler {
            params: p,
            rng,
            penalized,
            seen,
            cand,
            probs,
        } = self;
        let logits = if p.repeat_penalty != 1.0 {
            penalized.clear();
            penalized.extend_from_slice(logits);
            // Each token seen in the window, once.
            let start = history.len().saturating_sub(p.repeat_last_n);
            seen.clear();
            // Room for the whole window at once: it fills as the history
            // grows, and is not grown a step at a time.
            seen.reserve(p.repeat_last_n);
            seen.extend_from_slice(&history[start..]);
            seen.sort_unstable();
            seen.dedup();
            for &t in seen.iter() {
                if let Some(l) = penalized.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
            &penalized[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if cand.is_empty() {
            return argmax(logits);
        }
        // The best `top_k` found without sorting the whole vocabulary.
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, better);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(better);
        if p.top_p < 1.0 {
            softmax(cand, probs);
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p.top_p as f64
                })
                .map_or(cand.len(), |i| i + 1);
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            softmax(cand, probs);
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count();
            cand.truncate(keep.max(1));
        }
        for c in cand.iter_mut() {
            c.1 /= p.temperature;
        }
        softmax(cand, probs);
        let r = rng.f64();
        let mut acc = 0.0;
        for (c, q) in cand.iter().zip(probs.iter()) {
            acc += q;
            if r < acc {
                return c.0;
            }
        }
        cand.last().expect("not empty").0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 0.9, 0.9, -1.0], &[]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.0, 1.0]), 2);
    }

    #[test]
    fn argmax_agrees_with_a_plain_scan() {
        // The first of the largest, NaN never winning: as a plain scan
        // finds it, on lengths around the lanes and on every kind of value.
        let scan = |v: &[f32]| {
            let mut best = 0;
            for (i, &x) in v.iter().enumerate() {
                if x > v[best] || v[best].is_nan() {
                    best = i;
                }
            }
            best as u32
        };
        let mut seed = 7u64;
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 1.0];
        for len in [0, 1, 2, 15, 16, 17, 31, 33, 100, 1000] {
            for round in 0..40 {
                let v: Vec<f32> = (0..len)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let r = (seed >> 33) as usize;
                        match round % 4 {
                            // Few values, so ties are common.
                            0 => (r % 5) as f32,
                            1 => specials[r % specials.len()],
                            2 => f32::NAN,
                            _ => (r as f32 / 1e6).sin(),
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), scan(&v), "{v:?}");
            }
        }
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[1.0, 0.8], &[0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            temperature: 1.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                ..SamplingParams::default()
            });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    /// Top-k picks without sorting everything: ties go to the smaller id,
    /// as the full sort put them.
    #[test]
    fn top_k_keeps_the_best_with_ties_to_the_smaller_id() {
        let logits = [1.0, 5.0, 5.0, 5.0, 5.0, 2.0, f32::NAN, 5.0];
        let mut s = Sampler::new(SamplingParams {
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            temperature: 1.0,
            ..SamplingParams::default()
        });
        let mut seen = [0; 8];
        for _ in 0..300 {
            seen[s.sample(&logits, &[]) as usize] += 1;
        }
        assert!(seen[1] > 0 && seen[2] > 0 && seen[3] > 0, "{seen:?}");
        assert_eq!(seen[1] + seen[2] + seen[3], 300, "{seen:?}");
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        // One dominant token: min_p 0.5 and top_p 0.5 leave only it.
        let logits = [10.0, 0.0, 0.0, 0.0];
        for params in [
            SamplingParams {
                min_p: 0.5,
                top_p: 1.0,
                top_k: 0,
                temperature: 1.0,
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.0,
                top_p: 0.5,
                top_k: 0,
                temperature: 1.0,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            assert!((0..50).all(|_| s.sample(&logits, &[]) == 0));
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
    }
}
