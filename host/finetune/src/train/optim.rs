//! AdamW (Loshchilov & Hutter: Adam with decoupled weight decay), the
//! learning rate's warm-up and cosine decay, and clipping by the global
//! gradient norm.

use super::model::Adapter;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// The peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup: usize,
    /// All steps: after the warm-up the rate follows a half cosine from
    /// `lr` down to `min_ratio · lr` at the last step.
    pub steps: usize,
    pub min_ratio: f64,
}

impl Schedule {
    /// The rate at `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

/// AdamW's moments, shaped as the adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (for the bias correction).
    pub t: u64,
    pub m: Adapter<f32>,
    pub v: Adapter<f32>,
}

impl AdamW {
    pub fn new(like: &Adapter<f32>, weight_decay: f64) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: like.zeros_like(),
            v: like.zeros_like(),
        }
    }

    /// One update of `params` by `grads` at rate `lr`.
    pub fn step(&mut self, params: &mut Adapter<f32>, grads: &Adapter<f32>, lr: f64) {
        self.t += 1;
        let (c1, c2) = self.corrections(self.t);
        let tensors = params
            .tensors_mut()
            .zip(grads.tensors())
            .zip(self.m.tensors_mut().zip(self.v.tensors_mut()));
        let (betas, decay) = ((self.beta1, self.beta2, self.eps), self.weight_decay);
        for ((p, g), (m, v)) in tensors {
            update(betas, p, g, m, v, lr, decay, (c1, c2));
        }
    }

    /// The bias corrections of step `t` (from 1).
    pub fn corrections(&self, t: u64) -> (f64, f64) {
        (
            1.0 - self.beta1.powi(t as i32),
            1.0 - self.beta2.powi(t as i32),
        )
    }
}

/// AdamW's update of one tensor `p` by its gradient `g` and moments `m`,
/// `v`, at rate `lr` with decay `decay`; `betas` are (β1, β2, ε) and
/// `(c1, c2)` this step's bias corrections.
#[allow(clippy::too_many_arguments)]
pub fn update(
    (b1, b2, eps): (f64, f64, f64),
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    decay: f64,
    (c1, c2): (f64, f64),
) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g as f64;
        let mm = b1 * *m as f64 + (1.0 - b1) * g;
        let vv = b2 * *v as f64 + (1.0 - b2) * g * g;
        *m = mm as f32;
        *v = vv as f32;
        let update = (mm / c1) / ((vv / c2).sqrt() + eps);
        let w = *p as f64;
        *p = (w - lr * (update + decay * w)) as f32;
    }
}

/// Scales `grads` so that their global L2 norm is at most `max`; returns
/// the norm before.
pub fn clip(grads: &mut Adapter<f32>, max: f64) -> f64 {
    let norm = grads
        .tensors()
        .map(|t| super::linalg::sum_squares(t))
        .sum::<f64>()
        .sqrt();
    if norm > max && norm > 0.0 {
        let s = (max / norm) as f32;
        for t in grads.tensors_mut() {
            t.iter_mut().for_each(|g| *g *= s);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_its_floor() {
        let s = Schedule {
            lr: 1e-3,
            warmup: 10,
            steps: 110,
            min_ratio: 0.1,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - 0.55e-3).abs() < 1e-9);
        assert!((s.at(110) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|i| s.at(i) <= s.at(i.max(10) - 1) + 1e-15 || i <= 10));
    }
}
