//! A Tree-structured Parzen Estimator (Bergstra et al., 2011): split the
//! trials into the best quarter and the rest, fit a Parzen window density
//! to each (per parameter, in log space for log-scaled ones), draw
//! candidates from the good density and propose the one that maximises
//! l(x)/g(x). The first few proposals are random. Randomness comes from the
//! input's seed, so a proposal replays exactly.

use kiln_policy::{export_tuner, ParamKind, Rng, TuneInput};

const STARTUP: usize = 5;
const GAMMA: f64 = 0.25;
const CANDIDATES: usize = 24;

fn to_unit(kind: ParamKind, lo: f64, hi: f64, v: f64) -> f64 {
    match kind {
        ParamKind::LogFloat => (v.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln()).max(1e-300),
        _ => (v - lo) / (hi - lo).max(1e-300),
    }
}

fn from_unit(kind: ParamKind, lo: f64, hi: f64, u: f64) -> f64 {
    let u = u.max(0.0).min(1.0);
    let v = match kind {
        ParamKind::LogFloat => (lo.ln() + u * (hi.ln() - lo.ln())).exp(),
        _ => lo + u * (hi - lo),
    };
    let v = if kind == ParamKind::Int { v.round() } else { v };
    v.max(lo).min(hi)
}

/// log density of a Parzen mixture (Gaussians at `points`, plus a uniform
/// prior component) at `x` in the unit interval.
fn log_density(points: &[f64], bandwidth: f64, x: f64) -> f64 {
    let n = points.len() as f64 + 1.0;
    let mut p = 1.0 / n; // the prior, uniform on [0, 1]
    for &m in points {
        let z = (x - m) / bandwidth;
        p += (-0.5 * z * z).exp() / (bandwidth * (2.0 * std::f64::consts::PI).sqrt()) / n;
    }
    p.max(1e-300).ln()
}

fn tune(input: &TuneInput) -> Vec<f64> {
    let mut rng = Rng::new(input.seed ^ (input.trials.len() as u64).wrapping_mul(0x9E37_79B9));
    let params = &input.params;
    if input.trials.len() < STARTUP {
        return params.iter().map(|p| from_unit(p.kind, p.lo, p.hi, rng.f64())).collect();
    }
    let mut order: Vec<usize> = (0..input.trials.len()).collect();
    order.sort_by(|&a, &b| {
        input.trials[a]
            .metric
            .partial_cmp(&input.trials[b].metric)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let n_good = ((GAMMA * order.len() as f64).ceil() as usize).max(1);
    let unit = |i: usize, j: usize| {
        let p = params[j];
        to_unit(p.kind, p.lo, p.hi, input.trials[i].values[j])
    };
    let good: Vec<Vec<f64>> = (0..params.len())
        .map(|j| order[..n_good].iter().map(|&i| unit(i, j)).collect())
        .collect();
    let bad: Vec<Vec<f64>> = (0..params.len())
        .map(|j| order[n_good..].iter().map(|&i| unit(i, j)).collect())
        .collect();
    let bw = |n: usize| (1.0 / (n as f64 + 1.0).powf(0.2)).max(0.05) * 0.5;
    let mut best: Option<(f64, Vec<f64>)> = None;
    for _ in 0..CANDIDATES {
        let mut x = Vec::with_capacity(params.len());
        let mut score = 0.0;
        for j in 0..params.len() {
            let g = &good[j];
            let centre = g[(rng.next_u64() % g.len() as u64) as usize];
            let u = (centre + bw(g.len()) * rng.normal()).max(0.0).min(1.0);
            score += log_density(g, bw(g.len()), u) - log_density(&bad[j], bw(bad[j].len()), u);
            x.push(u);
        }
        if best.as_ref().map_or(true, |(s, _)| score > *s) {
            best = Some((score, x));
        }
    }
    let (_, x) = best.expect("at least one candidate");
    x.iter()
        .zip(params)
        .map(|(&u, p)| from_unit(p.kind, p.lo, p.hi, u))
        .collect()
}

export_tuner!(
    tune,
    b"{\"abi\":\"1.1\",\"kind\":\"tune\",\"name\":\"tpe\",\"version\":\"1.0.0\"}"
);
