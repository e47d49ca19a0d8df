//! Differential privacy for training (DP-SGD, Abadi et al. 2016): each
//! step samples sequences independently with probability `q` (Poisson
//! sampling), clips each sequence's gradient to a norm `C`, adds Gaussian
//! noise of standard deviation `σ·C` to their sum, and divides by the
//! expected batch size. The unit of privacy is a training sequence.
//!
//! - The noise is drawn exactly from the discrete Gaussian on a grid of
//!   2⁻²⁴ (Canonne, Kamath & Steinke 2020: Bernoulli(e^−γ) by rational
//!   arithmetic, a discrete Laplace proposal, rejection), not by
//!   floating-point Box-Muller, from a generator seeded by the operating
//!   system.
//! - The accountant is Rényi DP of the Poisson-subsampled Gaussian at
//!   integer orders (Mironov, Talwar & Zhang 2019), composed over the
//!   steps and converted to (ε, δ) as Balle et al. 2020 do; the noise
//!   multiplier `σ` is the smallest (to 0.1%) that keeps ε within the
//!   target.

use rand::{Rng, RngCore};

/// The grid the gradients' noisy sum is rounded to: 2⁻²⁴.
const GRID_BITS: i32 = 24;

/// Bernoulli(n / d).
fn bernoulli(rng: &mut impl RngCore, n: u128, d: u128) -> bool {
    rng.random_range(0..d) < n
}

/// Bernoulli(e^(−n/d)), exactly (`n/d` ≥ 0).
fn bernoulli_exp(rng: &mut impl RngCore, n: u128, d: u128) -> bool {
    let mut n = n;
    // e^−γ = (e^−1)^⌊γ⌋ · e^−(γ−⌊γ⌋)
    while n > d {
        if !bernoulli_exp_unit(rng, 1, 1) {
            return false;
        }
        n -= d;
    }
    bernoulli_exp_unit(rng, n, d)
}

/// Bernoulli(e^(−γ)) for γ = n/d in [0, 1]: draw Bernoulli(γ/k) for
/// k = 1, 2, … until one fails; the k it fails at is odd with
/// probability e^−γ (Canonne, Kamath & Steinke, Algorithm 1).
fn bernoulli_exp_unit(rng: &mut impl RngCore, n: u128, d: u128) -> bool {
    let mut k: u128 = 1;
    while bernoulli(rng, n, d * k) {
        k += 1;
    }
    k % 2 == 1
}

/// The discrete Laplace distribution with scale `t` (an integer ≥ 1):
/// P(x) ∝ e^(−|x|/t).
fn discrete_laplace(rng: &mut impl RngCore, t: u128) -> i128 {
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + t * v;
        let negative = rng.random::<bool>();
        if negative && x == 0 {
            continue;
        }
        return if negative { -(x as i128) } else { x as i128 };
    }
}

/// The discrete Gaussian with variance parameter `σ² = num / den`:
/// P(x) ∝ e^(−x²/2σ²) over the integers. `num·den` must stay below
/// about 10³² (σ below 10⁸ with `den` 1, 10⁵ with `den` 10⁶) for the
/// rational arithmetic to fit 128 bits.
pub fn discrete_gaussian(rng: &mut impl RngCore, num: u128, den: u128) -> i128 {
    // t = ⌊σ⌋ + 1
    let sigma = ((num as f64) / (den as f64)).sqrt();
    let mut t = sigma.floor() as u128 + 1;
    while t * t * den <= num {
        t += 1;
    }
    while t > 1 && (t - 1) * (t - 1) * den > num {
        t -= 1;
    }
    loop {
        let y = discrete_laplace(rng, t);
        // γ = (|y| − σ²/t)² / (2σ²) = (|y|·t·den − num)² / (2·num·den·t²)
        let a = y.unsigned_abs() * t * den;
        let diff = a.abs_diff(num);
        if bernoulli_exp(rng, diff * diff, 2 * num * den * t * t) {
            return y;
        }
    }
}

/// Adds discrete Gaussian noise of standard deviation `std` to each of
/// `values`, on the grid 2⁻²⁴ (each value rounded to it first).
pub fn add_noise(values: &mut [f32], std: f64, rng: &mut impl RngCore) {
    let scale = (2f64).powi(GRID_BITS);
    // σ² on the grid as a rational: σ to a thousandth where it is small,
    // else to a unit (a relative error under 10⁻⁴, and products that fit
    // 128 bits in the sampler).
    let sigma = std * scale;
    let (num, den) = if sigma < 1e4 {
        let s = (sigma * 1e3).round() as u128;
        (s * s, 1_000_000u128)
    } else {
        let s = sigma.round() as u128;
        (s * s, 1u128)
    };
    for v in values {
        let on_grid = (*v as f64 * scale).round();
        let noise = if num == 0 {
            0
        } else {
            discrete_gaussian(rng, num, den)
        };
        *v = ((on_grid + noise as f64) / scale) as f32;
    }
}

/// A generator for the noise and the sampling, seeded by the operating
/// system (never reproducible from a seed the data's owner chose).
pub fn secure_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    rand::rngs::StdRng::from_os_rng()
}

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// Rényi DP at integer order `alpha` ≥ 2 of one step of the Gaussian
/// mechanism with noise multiplier `sigma`, Poisson-subsampled at rate
/// `q`: ln(Σₖ C(α,k) (1−q)^(α−k) q^k e^((k²−k)/2σ²)) / (α − 1).
pub fn rdp_step(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q >= 1.0 {
        return alpha as f64 / (2.0 * sigma * sigma);
    }
    if q <= 0.0 {
        return 0.0;
    }
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0f64;
    for k in 0..=alpha {
        if k > 0 {
            log_binom += ((alpha - k + 1) as f64).ln() - (k as f64).ln();
        }
        let k_f = k as f64;
        let term = log_binom
            + (alpha - k) as f64 * (1.0 - q).ln()
            + k_f * q.ln()
            + (k_f * k_f - k_f) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a / (alpha as f64 - 1.0)
}

/// The orders the accountant tries.
fn orders() -> impl Iterator<Item = u32> {
    (2..=64).chain([80, 96, 128, 160, 192, 256])
}

/// ε after `steps` steps at rate `q` and noise multiplier `sigma`, for
/// `delta`: the best order's RDP converted to (ε, δ) (Balle et al. 2020:
/// ε = T·rdp + ln((α−1)/α) − (ln δ + ln α)/(α−1)).
pub fn epsilon(q: f64, sigma: f64, steps: usize, delta: f64) -> f64 {
    orders()
        .map(|a| {
            let af = a as f64;
            steps as f64 * rdp_step(q, sigma, a) + ((af - 1.0) / af).ln()
                - (delta.ln() + af.ln()) / (af - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

/// The smallest noise multiplier (to 0.1%) for which `steps` steps at rate
/// `q` spend at most `target` ε at `delta`; `None` when even σ = 1000 does
/// not.
pub fn noise_multiplier(q: f64, steps: usize, target: f64, delta: f64) -> Option<f64> {
    let (mut lo, mut hi) = (0.05f64, 1000.0f64);
    if epsilon(q, hi, steps, delta) > target {
        return None;
    }
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if epsilon(q, mid, steps, delta) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// Scales `g` so that its L2 norm is at most `c`; returns the norm before.
pub fn clip_to(g: &mut [&mut Vec<f32>], c: f64) -> f64 {
    let norm = g
        .iter()
        .map(|t| t.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    if norm > c {
        let s = (c / norm) as f32;
        for t in g.iter_mut() {
            t.iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn bernoulli_exp_has_its_probability() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (n, d) in [(1u128, 2u128), (1, 1), (5, 2), (0, 1)] {
            let trials = 200_000;
            let hits = (0..trials)
                .filter(|_| bernoulli_exp(&mut rng, n, d))
                .count();
            let p = (-(n as f64) / d as f64).exp();
            let se = (p * (1.0 - p) / trials as f64).sqrt().max(1e-9);
            let got = hits as f64 / trials as f64;
            assert!(
                (got - p).abs() < 5.0 * se + 1e-9,
                "e^-{n}/{d}: {got} vs {p}"
            );
        }
    }

    /// The sampler's frequencies against the discrete Gaussian's pmf, and
    /// its mean and variance (a chi-square-like check on the central
    /// values, five standard errors each).
    #[test]
    fn discrete_gaussian_matches_its_distribution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for (num, den) in [(9u128, 4u128), (1, 1), (400, 1)] {
            let s2 = num as f64 / den as f64;
            let n = 200_000;
            let xs: Vec<i128> = (0..n)
                .map(|_| discrete_gaussian(&mut rng, num, den))
                .collect();
            let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            // The discrete Gaussian's variance is below σ² (slightly, for σ ≳ 1).
            let z: f64 = (-60..=60)
                .map(|x: i32| (-(x * x) as f64 / (2.0 * s2)).exp())
                .sum();
            let true_var: f64 = (-60..=60)
                .map(|x: i32| (x * x) as f64 * (-(x * x) as f64 / (2.0 * s2)).exp())
                .sum::<f64>()
                / z;
            assert!(
                mean.abs() < 5.0 * (true_var / n as f64).sqrt(),
                "{s2}: mean {mean}"
            );
            assert!(
                (var - true_var).abs() < 0.03 * true_var,
                "{s2}: var {var} vs {true_var}"
            );
            for x in -2i128..=2 {
                let p = (-(x * x) as f64 / (2.0 * s2)).exp() / z;
                let got = xs.iter().filter(|&&v| v == x).count() as f64 / n as f64;
                let se = (p * (1.0 - p) / n as f64).sqrt();
                assert!((got - p).abs() < 5.0 * se, "{s2}: P({x}) {got} vs {p}");
            }
        }
    }

    #[test]
    fn the_accountant_matches_the_closed_forms_and_its_search() {
        // Without subsampling, RDP of the Gaussian is α/2σ² exactly; the
        // binomial sum at q → 1 approaches it.
        assert!((rdp_step(1.0, 2.0, 8) - 1.0).abs() < 1e-12);
        assert!((rdp_step(0.999_999, 2.0, 8) - 1.0).abs() < 1e-4);
        // Subsampling amplifies privacy: far less RDP at q = 0.01.
        assert!(rdp_step(0.01, 1.0, 8) < 0.01 * rdp_step(1.0, 1.0, 8));
        // More noise, fewer steps or a larger δ: less ε.
        let e = epsilon(0.01, 1.0, 1000, 1e-5);
        assert!(e > 0.0 && e.is_finite());
        assert!(epsilon(0.01, 1.5, 1000, 1e-5) < e);
        assert!(epsilon(0.01, 1.0, 100, 1e-5) < e);
        assert!(epsilon(0.01, 1.0, 1000, 1e-3) < e);
        // The search meets each target, tightly.
        for target in [1.0, 4.0, 8.0] {
            let s = noise_multiplier(0.02, 500, target, 1e-5).unwrap();
            let spent = epsilon(0.02, s, 500, 1e-5);
            assert!(
                spent <= target && spent > 0.97 * target,
                "{target}: σ {s}, ε {spent}"
            );
        }
    }

    #[test]
    fn noise_has_the_asked_spread_and_clipping_bounds_the_norm() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut v = vec![0.25f32; 50_000];
        add_noise(&mut v, 0.01, &mut rng);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let sd =
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((mean - 0.25).abs() < 5.0 * 0.01 / (v.len() as f64).sqrt());
        assert!((sd - 0.01).abs() < 0.0005, "{sd}");
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let before = clip_to(&mut [&mut a, &mut b], 1.0);
        assert!((before - 5.0).abs() < 1e-9);
        assert!(((a[0] * a[0] + b[0] * b[0]) as f64 - 1.0).abs() < 1e-6);
    }
}
