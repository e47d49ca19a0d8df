//! A genetic search: the best trials so far are the population; a child
//! is made from two tournament-selected parents by uniform crossover and
//! Gaussian mutation, clamped to the bounds. Seeded from the input.

use kiln_policy::{export_tuner, ParamKind, Rng, TuneInput};

const POPULATION: usize = 8;
const MUTATION_RATE: f64 = 0.3;
const MUTATION_SCALE: f64 = 0.1;

fn clamp(kind: ParamKind, lo: f64, hi: f64, v: f64) -> f64 {
    let v = v.max(lo).min(hi);
    if kind == ParamKind::Int {
        v.round().max(lo).min(hi)
    } else {
        v
    }
}

fn tune(input: &TuneInput) -> Vec<f64> {
    let mut rng = Rng::new(input.seed ^ (input.trials.len() as u64).rotate_left(29));
    let params = &input.params;
    if input.trials.len() < 2 {
        return params
            .iter()
            .map(|p| match p.kind {
                ParamKind::LogFloat => clamp(p.kind, p.lo, p.hi, (p.lo.ln() + rng.f64() * (p.hi.ln() - p.lo.ln())).exp()),
                _ => clamp(p.kind, p.lo, p.hi, p.lo + rng.f64() * (p.hi - p.lo)),
            })
            .collect();
    }
    let mut order: Vec<usize> = (0..input.trials.len()).collect();
    order.sort_by(|&a, &b| {
        input.trials[a]
            .metric
            .partial_cmp(&input.trials[b].metric)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    order.truncate(POPULATION);
    let pick = |rng: &mut Rng| {
        let a = order[(rng.next_u64() % order.len() as u64) as usize];
        let b = order[(rng.next_u64() % order.len() as u64) as usize];
        if input.trials[a].metric <= input.trials[b].metric { a } else { b }
    };
    let (pa, pb) = (pick(&mut rng), pick(&mut rng));
    params
        .iter()
        .enumerate()
        .map(|(j, p)| {
            let from = if rng.f64() < 0.5 { pa } else { pb };
            let mut v = input.trials[from].values[j];
            if rng.f64() < MUTATION_RATE {
                v = match p.kind {
                    ParamKind::LogFloat => (v.max(p.lo).ln() + MUTATION_SCALE * (p.hi.ln() - p.lo.ln()) * rng.normal()).exp(),
                    _ => v + MUTATION_SCALE * (p.hi - p.lo) * rng.normal(),
                };
            }
            clamp(p.kind, p.lo, p.hi, v)
        })
        .collect()
}

export_tuner!(
    tune,
    b"{\"abi\":\"1.1\",\"kind\":\"tune\",\"name\":\"genetic\",\"version\":\"1.0.0\"}"
);
