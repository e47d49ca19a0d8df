//! `kiln tune`'s search, apart from what it measures: a [`Space`] of
//! knobs, samplers that propose the next setting from the trials so far
//! (grid, random, successive halving, and a WebAssembly tuning policy such
//! as the shipped `tpe` and `genetic`, through the policy ABI's tuning
//! half), the Pareto front of two objectives, and the paired sign test
//! that must pass before a setting is declared better than the default.

use kiln_sandbox::{Param, ParamKind, Trial, TuneInput};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// One knob: integers or numbers in a range (log-spaced in a grid when
/// `log`), or one of a list of names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Knob {
    Int {
        name: String,
        lo: i64,
        hi: i64,
        log: bool,
    },
    Choice {
        name: String,
        options: Vec<String>,
    },
    /// Any number in `lo..=hi` (a policy's declared parameter).
    Float {
        name: String,
        lo: f64,
        hi: f64,
        log: bool,
    },
}

/// Values a grid visits of a [`Knob::Float`]: its ends and three between.
const FLOAT_GRID: usize = 5;

impl Knob {
    pub fn name(&self) -> &str {
        match self {
            Knob::Int { name, .. } | Knob::Choice { name, .. } | Knob::Float { name, .. } => name,
        }
    }

    /// The values a grid visits: every integer when there are at most 8;
    /// for `log`, `lo` doubled up to `hi` (and `hi`) when that is at most
    /// 12; else 8 spread (log-spaced for `log`), ends included. A float:
    /// [`FLOAT_GRID`] spread the same way.
    fn grid(&self) -> Vec<Value> {
        match self {
            Knob::Choice { options, .. } => options.iter().map(|o| json!(o)).collect(),
            Knob::Float { lo, hi, log, .. } => {
                let mut out: Vec<f64> = (0..FLOAT_GRID)
                    .map(|i| spread(*lo, *hi, *log, i as f64 / (FLOAT_GRID - 1) as f64))
                    .collect();
                out.dedup();
                out.into_iter().map(|v| json!(v)).collect()
            }
            Knob::Int { lo, hi, log, .. } => {
                if hi - lo < 8 {
                    return (*lo..=*hi).map(|v| json!(v)).collect();
                }
                if *log && *lo > 0 {
                    let mut doubling: Vec<i64> =
                        std::iter::successors(Some(*lo), |v| v.checked_mul(2).filter(|n| n <= hi))
                            .collect();
                    if doubling.last() != Some(hi) {
                        doubling.push(*hi);
                    }
                    if doubling.len() <= 12 {
                        return doubling.into_iter().map(|v| json!(v)).collect();
                    }
                }
                let mut out: Vec<i64> = (0..8)
                    .map(|i| {
                        let f = i as f64 / 7.0;
                        if *log && *lo > 0 {
                            ((*lo as f64).ln() + f * ((*hi as f64).ln() - (*lo as f64).ln()))
                                .exp()
                                .round() as i64
                        } else {
                            (*lo as f64 + f * (hi - lo) as f64).round() as i64
                        }
                    })
                    .collect();
                out.dedup();
                out.into_iter().map(|v| json!(v)).collect()
            }
        }
    }

    fn random(&self, rng: &mut fastrand::Rng) -> Value {
        match self {
            Knob::Choice { options, .. } => json!(options[rng.usize(..options.len())]),
            Knob::Float { lo, hi, log, .. } => json!(spread(*lo, *hi, *log, rng.f64())),
            Knob::Int { lo, hi, log, .. } => {
                if *log && *lo > 0 {
                    let (a, b) = ((*lo as f64).ln(), (*hi as f64).ln());
                    json!(((a + rng.f64() * (b - a)).exp().round() as i64).clamp(*lo, *hi))
                } else {
                    json!(rng.i64(*lo..=*hi))
                }
            }
        }
    }

    /// The value as the policy ABI sees it: the integer, or the index of
    /// the choice.
    fn encode(&self, v: &Value) -> f64 {
        match self {
            Knob::Choice { options, .. } => v
                .as_str()
                .and_then(|s| options.iter().position(|o| o == s))
                .unwrap_or(0) as f64,
            Knob::Int { lo, .. } => v.as_i64().unwrap_or(*lo) as f64,
            Knob::Float { lo, .. } => v.as_f64().unwrap_or(*lo),
        }
    }

    fn decode(&self, x: f64) -> Value {
        match self {
            Knob::Choice { options, .. } => {
                json!(options[(x.round().max(0.0) as usize).min(options.len() - 1)])
            }
            Knob::Int { lo, hi, .. } => json!((x.round() as i64).clamp(*lo, *hi)),
            Knob::Float { lo, hi, .. } => json!(significant(x).clamp(*lo, *hi)),
        }
    }

    fn param(&self) -> Param {
        match self {
            Knob::Choice { name, options } => Param {
                name: name.clone(),
                kind: ParamKind::Int,
                lo: 0.0,
                hi: (options.len() - 1) as f64,
            },
            Knob::Int { name, lo, hi, log } => Param {
                name: name.clone(),
                kind: if *log && *lo > 0 {
                    ParamKind::LogFloat
                } else {
                    ParamKind::Int
                },
                lo: *lo as f64,
                hi: *hi as f64,
            },
            Knob::Float { name, lo, hi, log } => Param {
                name: name.clone(),
                kind: if *log && *lo > 0.0 {
                    ParamKind::LogFloat
                } else {
                    ParamKind::Float
                },
                lo: *lo,
                hi: *hi,
            },
        }
    }
}

/// The point `f` (0 to 1) of the way from `lo` to `hi`, on a log scale
/// when `log` (and `lo` is positive); rounded to 4 significant digits so
/// that a setting reads (and is written to `config.toml`) as a number a
/// person would pick.
fn spread(lo: f64, hi: f64, log: bool, f: f64) -> f64 {
    let v = if log && lo > 0.0 {
        (lo.ln() + f * (hi.ln() - lo.ln())).exp()
    } else {
        lo + f * (hi - lo)
    };
    significant(v).clamp(lo, hi)
}

/// `v` to 4 significant digits: a float knob's values (a sampler's
/// proposals too) are numbers a person would write in `config.toml`.
fn significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// A setting: knob name → value (an integer or a choice's name).
pub type Setting = BTreeMap<String, Value>;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Space {
    pub knobs: Vec<Knob>,
}

impl Space {
    /// Every setting of the grid, in order (the first knob slowest). Only
    /// for a small space: a dozen knobs make hundreds of millions of
    /// settings; [`Space::grid_iter`] walks them without keeping them.
    pub fn grid(&self) -> Vec<Setting> {
        self.grid_iter().collect()
    }

    /// Settings in the grid (saturating).
    pub fn grid_len(&self) -> usize {
        (self.knobs.iter()).fold(1usize, |n, k| n.saturating_mul(k.grid().len().max(1)))
    }

    /// The grid's settings in order (the first knob slowest), one at a
    /// time.
    pub fn grid_iter(&self) -> impl Iterator<Item = Setting> + '_ {
        let values: Vec<Vec<Value>> = self.knobs.iter().map(Knob::grid).collect();
        let len = self.grid_len();
        (0..len).map(move |mut i| {
            let mut s = Setting::new();
            for (k, v) in self.knobs.iter().zip(&values).rev() {
                if v.is_empty() {
                    continue;
                }
                s.insert(k.name().to_string(), v[i % v.len()].clone());
                i /= v.len();
            }
            s
        })
    }

    pub fn random(&self, rng: &mut fastrand::Rng) -> Setting {
        self.knobs
            .iter()
            .map(|k| (k.name().to_string(), k.random(rng)))
            .collect()
    }

    pub fn params(&self) -> Vec<Param> {
        self.knobs.iter().map(Knob::param).collect()
    }

    pub fn encode(&self, s: &Setting) -> Vec<f64> {
        self.knobs
            .iter()
            .map(|k| k.encode(s.get(k.name()).unwrap_or(&Value::Null)))
            .collect()
    }

    pub fn decode(&self, x: &[f64]) -> Setting {
        self.knobs
            .iter()
            .zip(x)
            .map(|(k, &v)| (k.name().to_string(), k.decode(v)))
            .collect()
    }
}

/// A measured setting: `metric` is what is minimised (infinite when the
/// setting broke a constraint or failed), over `repeats` measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub setting: Setting,
    pub metric: f64,
    pub repeats: u32,
}

/// What to measure next: a setting, and how many times.
#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    pub setting: Setting,
    pub repeats: u32,
}

/// Proposes settings from what was measured. `None`: nothing left.
pub trait Sampler {
    fn propose(
        &mut self,
        space: &Space,
        history: &[Observation],
    ) -> Result<Option<Proposal>, String>;
}

/// Every setting of the grid, in order, skipping measured ones.
pub struct Grid {
    pub repeats: u32,
}

impl Sampler for Grid {
    fn propose(
        &mut self,
        space: &Space,
        history: &[Observation],
    ) -> Result<Option<Proposal>, String> {
        Ok(space
            .grid_iter()
            .find(|s| !history.iter().any(|o| &o.setting == s))
            .map(|setting| Proposal {
                setting,
                repeats: self.repeats,
            }))
    }
}

/// Uniform (log-uniform for log knobs) settings, new ones first.
pub struct Random {
    pub rng: fastrand::Rng,
    pub repeats: u32,
}

impl Sampler for Random {
    fn propose(
        &mut self,
        space: &Space,
        history: &[Observation],
    ) -> Result<Option<Proposal>, String> {
        let mut setting = space.random(&mut self.rng);
        for _ in 0..64 {
            if !history.iter().any(|o| o.setting == setting) {
                break;
            }
            setting = space.random(&mut self.rng);
        }
        Ok(Some(Proposal {
            setting,
            repeats: self.repeats,
        }))
    }
}

/// Successive halving: a rung of `width` settings (grid order when the
/// grid is that small, else random) measured `repeats` times each; the
/// better half goes on to the next rung, measured twice as often, until
/// one is left.
pub struct Halving {
    pub rng: fastrand::Rng,
    pub width: usize,
    pub repeats: u32,
    rung: Vec<Setting>,
    rung_repeats: u32,
    queue: Vec<Setting>,
    /// Where this rung's observations start in the history.
    rung_start: usize,
    done: bool,
}

impl Halving {
    pub fn new(seed: u64, width: usize, repeats: u32) -> Halving {
        Halving {
            rng: fastrand::Rng::with_seed(seed),
            width: width.max(2),
            repeats: repeats.max(1),
            rung: Vec::new(),
            rung_repeats: repeats.max(1),
            queue: Vec::new(),
            rung_start: 0,
            done: false,
        }
    }
}

impl Sampler for Halving {
    fn propose(
        &mut self,
        space: &Space,
        history: &[Observation],
    ) -> Result<Option<Proposal>, String> {
        if self.done {
            return Ok(None);
        }
        if self.rung.is_empty() {
            self.rung = if space.grid_len() <= self.width {
                space.grid()
            } else {
                let mut picked: Vec<Setting> = Vec::new();
                for _ in 0..self.width * 8 {
                    if picked.len() == self.width {
                        break;
                    }
                    let s = space.random(&mut self.rng);
                    if !picked.contains(&s) {
                        picked.push(s);
                    }
                }
                picked
            };
            self.queue = self.rung.iter().rev().cloned().collect();
            self.rung_start = history.len();
        }
        if let Some(setting) = self.queue.pop() {
            return Ok(Some(Proposal {
                setting,
                repeats: self.rung_repeats,
            }));
        }
        // The rung is measured: keep the better half.
        let measured = &history[self.rung_start.min(history.len())..];
        let mut ranked: Vec<&Observation> = measured.iter().collect();
        ranked.sort_by(|a, b| a.metric.total_cmp(&b.metric));
        let keep = ranked.len().div_ceil(2);
        if keep <= 1 {
            self.done = true;
            return Ok(None);
        }
        self.rung = ranked[..keep].iter().map(|o| o.setting.clone()).collect();
        self.rung_repeats *= 2;
        self.queue = self.rung.iter().rev().cloned().collect();
        self.rung_start = history.len();
        let setting = self.queue.pop().expect("at least two kept");
        Ok(Some(Proposal {
            setting,
            repeats: self.rung_repeats,
        }))
    }
}

/// A WebAssembly tuning policy: given the space and the trials (values
/// and metric, infinite ones passed as a large number), it proposes
/// values, which are rounded onto the knobs.
pub struct PolicySampler {
    pub policy: kiln_sandbox::Policy,
    pub seed: u64,
    pub repeats: u32,
}

impl Sampler for PolicySampler {
    fn propose(
        &mut self,
        space: &Space,
        history: &[Observation],
    ) -> Result<Option<Proposal>, String> {
        let worst = history
            .iter()
            .map(|o| o.metric)
            .filter(|m| m.is_finite())
            .fold(1.0f64, f64::max);
        let mut input = TuneInput {
            params: space.params(),
            trials: history
                .iter()
                .map(|o| Trial {
                    values: space.encode(&o.setting),
                    metric: if o.metric.is_finite() {
                        o.metric
                    } else {
                        worst * 10.0
                    },
                })
                .collect(),
            seed: self.seed.wrapping_add(history.len() as u64),
        };
        // A setting measured already (the policy's values round onto the
        // knobs) is asked for again with other seeds, a few times.
        let mut setting = Setting::new();
        for attempt in 0..4u64 {
            input.seed = input.seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
            let out = self
                .policy
                .tune(&input)
                .map_err(|e| format!("the tuning policy failed: {e}"))?;
            setting = space.decode(&out.value);
            if !history.iter().any(|o| o.setting == setting) {
                break;
            }
        }
        Ok(Some(Proposal {
            setting,
            repeats: self.repeats,
        }))
    }
}

/// The indices of the points no other point beats in every coordinate
/// (all minimised; a point with a coordinate not finite is out), by the
/// first coordinate.
pub fn pareto_front<P: AsRef<[f64]>>(points: &[P]) -> Vec<usize> {
    let dominates = |c: &[f64], a: &[f64]| {
        c.iter().zip(a).all(|(c, a)| c <= a) && c.iter().zip(a).any(|(c, a)| c < a)
    };
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| {
            let a = points[i].as_ref();
            a.iter().all(|x| x.is_finite())
                && !points
                    .iter()
                    .enumerate()
                    .any(|(j, c)| j != i && dominates(c.as_ref(), a))
        })
        .collect();
    front.sort_by(|&i, &j| points[i].as_ref()[0].total_cmp(&points[j].as_ref()[0]));
    front.dedup_by(|a, b| points[*a].as_ref() == points[*b].as_ref());
    front
}

/// The one-sided sign test that `candidate` is lower than `baseline`,
/// over pairs measured side by side: the probability, were neither
/// better, of the candidate winning at least as many of the untied pairs
/// as it did.
pub fn sign_test(pairs: &[(f64, f64)]) -> f64 {
    let wins = pairs.iter().filter(|(c, b)| c < b).count();
    let n = pairs.iter().filter(|(c, b)| c != b).count();
    if n == 0 {
        return 1.0;
    }
    let mut p = 0.0;
    for k in wins..=n {
        p += binomial(n, k) * 0.5f64.powi(n as i32);
    }
    p.min(1.0)
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// The median of `xs` (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> Space {
        Space {
            knobs: vec![
                Knob::Int {
                    name: "threads".into(),
                    lo: 1,
                    hi: 8,
                    log: false,
                },
                Knob::Choice {
                    name: "kv".into(),
                    options: vec!["f16".into(), "q8_0".into(), "q4_0".into()],
                },
                Knob::Int {
                    name: "block".into(),
                    lo: 8,
                    hi: 512,
                    log: true,
                },
            ],
        }
    }

    /// Lowest at threads 6, q8_0, block 64 (the grid's blocks are 8, 16,
    /// … 512).
    fn objective(s: &Setting) -> f64 {
        let t = s["threads"].as_i64().unwrap() as f64;
        let kv = match s["kv"].as_str().unwrap() {
            "q8_0" => 0.0,
            "f16" => 1.0,
            _ => 3.0,
        };
        let b = (s["block"].as_i64().unwrap() as f64 / 64.0).ln().abs();
        10.0 + (t - 6.0).powi(2) + kv + 2.0 * b
    }

    fn search(sampler: &mut dyn Sampler, trials: usize, noise: f64) -> Vec<Observation> {
        let space = space();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut history = Vec::new();
        for _ in 0..trials {
            let Some(p) = sampler.propose(&space, &history).unwrap() else {
                break;
            };
            let runs: Vec<f64> = (0..p.repeats)
                .map(|_| objective(&p.setting) + noise * (rng.f64() - 0.5))
                .collect();
            history.push(Observation {
                setting: p.setting,
                metric: median(&runs),
                repeats: p.repeats,
            });
        }
        history
    }

    fn best(h: &[Observation]) -> &Observation {
        h.iter()
            .min_by(|a, b| a.metric.total_cmp(&b.metric))
            .unwrap()
    }

    fn optimum() -> Setting {
        [
            ("threads".to_string(), json!(6)),
            ("kv".to_string(), json!("q8_0")),
            ("block".to_string(), json!(64)),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn a_float_knob_spreads_its_tries_and_stays_in_its_range() {
        let linear = Knob::Float {
            name: "policy.bm25-recency.definition".into(),
            lo: 0.0,
            hi: 128.0,
            log: false,
        };
        assert_eq!(
            linear.grid(),
            vec![
                json!(0.0),
                json!(32.0),
                json!(64.0),
                json!(96.0),
                json!(128.0)
            ]
        );
        let log = Knob::Float {
            name: "policy.bm25-recency.edit_seconds".into(),
            lo: 1.0,
            hi: 10000.0,
            log: true,
        };
        assert_eq!(
            log.grid(),
            vec![
                json!(1.0),
                json!(10.0),
                json!(100.0),
                json!(1000.0),
                json!(10000.0)
            ]
        );
        assert_eq!(log.param().kind, ParamKind::LogFloat);
        assert_eq!(linear.param().kind, ParamKind::Float);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..200 {
            for k in [&linear, &log] {
                let v = k.random(&mut rng).as_f64().unwrap();
                let Knob::Float { lo, hi, .. } = k else {
                    unreachable!()
                };
                assert!((*lo..=*hi).contains(&v), "{v}");
                // Rounded to 4 significant digits.
                assert_eq!(k.decode(k.encode(&json!(v))), json!(v));
            }
        }
        assert_eq!(linear.decode(-3.0), json!(0.0));
        assert_eq!(linear.decode(101.11258023242198), json!(101.1));
        assert_eq!(linear.decode(1e9), json!(128.0));
    }

    #[test]
    fn a_grid_of_many_knobs_is_walked_not_kept() {
        // 24 knobs of 8 values: 8^24 settings, far past memory.
        let space = Space {
            knobs: (0..24)
                .map(|i| Knob::Int {
                    name: format!("k{i:02}"),
                    lo: 0,
                    hi: 7,
                    log: false,
                })
                .collect(),
        };
        assert_eq!(space.grid_len(), usize::MAX, "saturated");
        let mut first = space.grid_iter();
        let a = first.next().unwrap();
        let b = first.next().unwrap();
        assert!(a.values().all(|v| v == &json!(0)));
        assert_eq!(b["k23"], json!(1), "the last knob fastest");
        assert_eq!(b["k00"], json!(0));
        let p = Grid { repeats: 1 }
            .propose(
                &space,
                &[Observation {
                    setting: a,
                    metric: 1.0,
                    repeats: 1,
                }],
            )
            .unwrap()
            .unwrap();
        assert_eq!(p.setting, b);
        let mut halving = Halving::new(1, 8, 1);
        let p = halving.propose(&space, &[]).unwrap().unwrap();
        assert_eq!(p.setting.len(), 24);
    }

    #[test]
    fn the_grid_visits_every_setting_once_and_finds_the_optimum() {
        let space = space();
        let grid = space.grid();
        assert_eq!(grid.len(), 8 * 3 * 7);
        assert!(grid.contains(&optimum()));
        let h = search(&mut Grid { repeats: 1 }, 1000, 0.0);
        assert_eq!(h.len(), grid.len());
        assert_eq!(best(&h).setting, optimum());
    }

    #[test]
    fn random_search_comes_near_the_optimum_in_sixty_trials() {
        let h = search(
            &mut Random {
                rng: fastrand::Rng::with_seed(3),
                repeats: 1,
            },
            60,
            0.0,
        );
        let gap = best(&h).metric - objective(&optimum());
        assert!(gap < 1.5, "best {:?} is {gap} off", best(&h));
    }

    #[test]
    fn successive_halving_keeps_the_better_half_under_noise() {
        let mut s = Halving::new(5, 32, 1);
        let h = search(&mut s, 1000, 0.5);
        // 32 + 16×2… settings: it ends by itself.
        assert!(h.len() < 70, "{} trials", h.len());
        let last = h.last().unwrap();
        assert!(last.repeats >= 8, "{last:?}");
        let gap = objective(&best(&h).setting) - objective(&optimum());
        assert!(gap < 2.0, "{:?}", best(&h));
    }

    #[test]
    fn settings_round_trip_through_the_policy_abi() {
        let space = space();
        let s = optimum();
        assert_eq!(space.decode(&space.encode(&s)), s);
        assert_eq!(space.params()[2].kind, ParamKind::LogFloat);
        let off = space.decode(&[99.0, -3.0, 700.4]);
        assert_eq!(off["threads"], json!(8));
        assert_eq!(off["kv"], json!("f16"));
        assert_eq!(off["block"], json!(512));
    }

    #[test]
    fn the_front_and_the_sign_test() {
        let pts = [
            [1.0, 5.0],
            [2.0, 2.0],
            [3.0, 3.0],
            [4.0, 1.0],
            [f64::INFINITY, 0.0],
        ];
        assert_eq!(pareto_front(&pts), vec![0, 1, 3]);
        // A third coordinate (quality lost) brings (3, 3) back: it loses none.
        let pts = [
            [1.0, 5.0, 1.0],
            [2.0, 2.0, 1.0],
            [3.0, 3.0, 0.0],
            [4.0, 1.0, 1.0],
            [2.0, 2.0, 1.0],
        ];
        assert_eq!(pareto_front(&pts), vec![0, 1, 2, 3]);
        // 5 of 5 wins: 1/32.
        let five: Vec<(f64, f64)> = (0..5).map(|i| (1.0, 2.0 + i as f64)).collect();
        assert!((sign_test(&five) - 1.0 / 32.0).abs() < 1e-12);
        // 3 of 5: not significant.
        let mixed = [(1.0, 2.0), (1.0, 2.0), (1.0, 2.0), (3.0, 2.0), (3.0, 2.0)];
        assert!(sign_test(&mixed) > 0.4);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
