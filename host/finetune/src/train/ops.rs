//! The trainer's ops, forward and backward, over row-major slices: RMS
//! norm, RoPE, causal attention within documents, SwiGLU and the
//! cross-entropy of the output head. Each backward takes what its forward
//! saved and the gradient of its output, and returns (or adds to) the
//! gradients of its inputs. Every one is checked against central finite
//! differences in f64 (`tests`).

use super::linalg::{Float, Op, for_rows, for_rows_work, gemm};
use std::borrow::Cow;

/// `y = x / rms(x) · w` per row of width `w.len()`; returns `y` and each
/// row's `1 / rms`.
pub fn rms_norm<T: Float>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let n = w.len();
    let rows = x.len() / n;
    let mut y = vec![T::zero(); x.len()];
    let mut rstd = vec![T::zero(); rows];
    for ((xr, yr), r) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)).zip(&mut rstd) {
        let ms: f64 = xr.iter().map(|v| v.f64() * v.f64()).sum::<f64>() / n as f64;
        *r = T::of(1.0 / (ms + eps).sqrt());
        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * *r * w;
        }
    }
    (y, rstd)
}

/// Adds to `dx` the gradient through [`rms_norm`] (the weight is frozen).
pub fn rms_norm_back<T: Float>(x: &[T], w: &[T], rstd: &[T], dy: &[T], dx: &mut [T]) {
    let n = w.len();
    for (((xr, dyr), dxr), &r) in (x.chunks_exact(n))
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
        .zip(rstd)
    {
        // dx_j = r·w_j·dy_j − x_j·r³/n · Σ_i dy_i·w_i·x_i
        let dot: T = (dyr.iter().zip(w).zip(xr))
            .map(|((&d, &w), &x)| d * w * x)
            .sum();
        let c = dot * r * r * r / T::of(n as f64);
        for (((dx, &d), &w), &x) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            *dx += d * w * r - x * c;
        }
    }
}

/// Adds to `dw` the gradient of [`rms_norm`]'s weights: per element, the
/// sum over rows of `dy · x · rstd`.
pub fn rms_norm_back_weight<T: Float>(x: &[T], rstd: &[T], dy: &[T], dw: &mut [T]) {
    let n = dw.len();
    for ((xr, dyr), &r) in x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(rstd) {
        for ((dw, &d), &x) in dw.iter_mut().zip(dyr).zip(xr) {
            *dw += d * x * r;
        }
    }
}

/// RoPE's angles for `positions`: per position, `n_rot / 2` pairs of
/// (sin, cos) of `pos · scale · base^(−2j/n_rot)`.
pub struct Rope<T> {
    pub pairs: usize,
    pub neox: bool,
    pub sin: Vec<T>,
    pub cos: Vec<T>,
}

impl<T: Float> Rope<T> {
    pub fn new(positions: &[usize], n_rot: usize, base: f32, scale: f32, neox: bool) -> Rope<T> {
        let pairs = n_rot / 2;
        let mut sin = Vec::with_capacity(positions.len() * pairs);
        let mut cos = Vec::with_capacity(positions.len() * pairs);
        for &p in positions {
            for j in 0..pairs {
                let theta =
                    p as f64 * scale as f64 * (base as f64).powf(-2.0 * j as f64 / n_rot as f64);
                sin.push(T::of(theta.sin()));
                cos.push(T::of(theta.cos()));
            }
        }
        Rope {
            pairs,
            neox,
            sin,
            cos,
        }
    }

    /// Turns each head (width `head_dim`) of each row of `x` in place;
    /// `back` turns by the negative angle (the backward pass: the
    /// rotation's transpose).
    pub fn apply(&self, x: &mut [T], head_dim: usize, back: bool) {
        if self.pairs == 0 {
            return;
        }
        let rows = self.sin.len() / self.pairs;
        let width = x.len() / rows;
        for i in 0..rows {
            let (s, c) = (
                &self.sin[i * self.pairs..(i + 1) * self.pairs],
                &self.cos[i * self.pairs..(i + 1) * self.pairs],
            );
            for head in x[i * width..(i + 1) * width].chunks_exact_mut(head_dim) {
                for j in 0..self.pairs {
                    let (a, b) = if self.neox {
                        (j, j + self.pairs)
                    } else {
                        (2 * j, 2 * j + 1)
                    };
                    let sin = if back { -s[j] } else { s[j] };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * c[j] - x1 * sin;
                    head[b] = x0 * sin + x1 * c[j];
                }
            }
        }
    }
}

/// The shape of attention: `t` positions, `heads` query heads sharing
/// `kv_heads` key/value heads of width `head_dim`; position `i` sees the
/// positions from `first[i]` (its document's start) to itself.
pub struct Attn<'a> {
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub first: &'a [usize],
}

fn gather<T: Float>(x: &[T], width: usize, head: usize, hd: usize, t: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(t * hd);
    for i in 0..t {
        out.extend_from_slice(&x[i * width + head * hd..i * width + (head + 1) * hd]);
    }
    out
}

struct Shared<T>(*mut T);
// SAFETY: each task writes its own heads' columns and probabilities.
unsafe impl<T> Sync for Shared<T> {}

impl Attn<'_> {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Softmax attention of `q` (t × heads·hd) over `k`, `v` (t ×
    /// kv_heads·hd), scaled by 1/√hd: the output (t × heads·hd) and the
    /// probabilities (heads × t × t, zero where masked).
    pub fn forward<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
        let (t, hd) = (self.t, self.head_dim);
        let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
        let mut o = vec![T::zero(); t * qw];
        let mut p = vec![T::zero(); self.heads * t * t];
        let scale = T::of(1.0 / (hd as f64).sqrt());
        let (op, pp) = (Shared(o.as_mut_ptr()), Shared(p.as_mut_ptr()));
        let task = |heads: std::ops::Range<usize>| {
            let (op, pp) = (&op, &pp);
            for h in heads {
                let g = h / self.group();
                let (qh, kg, vg) = (
                    gather(q, qw, h, hd, t),
                    gather(k, kw, g, hd, t),
                    gather(v, kw, g, hd, t),
                );
                // SAFETY: head h's probabilities are its own t × t block.
                let ph = unsafe { std::slice::from_raw_parts_mut(pp.0.add(h * t * t), t * t) };
                gemm(Op::N, Op::T, t, t, hd, scale, &qh, &kg, T::zero(), ph);
                for i in 0..t {
                    let row = &mut ph[i * t..(i + 1) * t];
                    let lo = self.first[i];
                    let max = row[lo..=i].iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                    let mut sum = T::zero();
                    for x in &mut row[lo..=i] {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    for x in &mut row[lo..=i] {
                        *x = *x / sum;
                    }
                    row[..lo].fill(T::zero());
                    row[i + 1..].fill(T::zero());
                }
                let mut oh = vec![T::zero(); t * hd];
                gemm(
                    Op::N,
                    Op::N,
                    t,
                    hd,
                    t,
                    T::one(),
                    ph,
                    &vg,
                    T::zero(),
                    &mut oh,
                );
                for i in 0..t {
                    for d in 0..hd {
                        // SAFETY: head h's columns of row i are this task's.
                        unsafe { *op.0.add(i * qw + h * hd + d) = oh[i * hd + d] };
                    }
                }
            }
        };
        kiln_cpu::kernels::parallel_for(self.heads, self.heads * t * t * hd, &task);
        (o, p)
    }

    /// The gradients of `q`, `k`, `v` from the output's gradient `dout`
    /// and what [`Attn::forward`] saved (its probabilities `p`).
    #[allow(clippy::type_complexity)]
    pub fn backward<T: Float>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        p: &[T],
        dout: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (t, hd) = (self.t, self.head_dim);
        let (qw, kw) = (self.heads * hd, self.kv_heads * hd);
        let mut dq = vec![T::zero(); t * qw];
        let mut dk = vec![T::zero(); t * kw];
        let mut dv = vec![T::zero(); t * kw];
        let scale = T::of(1.0 / (hd as f64).sqrt());
        let (dqp, dkp, dvp) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        // One task per key/value head: its query heads add to its dK, dV.
        let task = |groups: std::ops::Range<usize>| {
            let (dqp, dkp, dvp) = (&dqp, &dkp, &dvp);
            for g in groups {
                let (kg, vg) = (gather(k, kw, g, hd, t), gather(v, kw, g, hd, t));
                let mut dkg = vec![T::zero(); t * hd];
                let mut dvg = vec![T::zero(); t * hd];
                for h in g * self.group()..(g + 1) * self.group() {
                    let qh = gather(q, qw, h, hd, t);
                    let doh = gather(dout, qw, h, hd, t);
                    let ph = &p[h * t * t..(h + 1) * t * t];
                    // dV += Pᵀ·dO; dP = dO·Vᵀ
                    gemm(
                        Op::T,
                        Op::N,
                        t,
                        hd,
                        t,
                        T::one(),
                        ph,
                        &doh,
                        T::one(),
                        &mut dvg,
                    );
                    let mut ds = vec![T::zero(); t * t];
                    gemm(
                        Op::N,
                        Op::T,
                        t,
                        t,
                        hd,
                        T::one(),
                        &doh,
                        &vg,
                        T::zero(),
                        &mut ds,
                    );
                    // dS = P ⊙ (dP − Σ_j dP·P)
                    for i in 0..t {
                        let (pr, dr) = (&ph[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                        let lo = self.first[i];
                        let dot: T = (lo..=i).map(|j| pr[j] * dr[j]).sum();
                        for j in 0..t {
                            dr[j] = if j >= lo && j <= i {
                                pr[j] * (dr[j] - dot)
                            } else {
                                T::zero()
                            };
                        }
                    }
                    let mut dqh = vec![T::zero(); t * hd];
                    gemm(Op::N, Op::N, t, hd, t, scale, &ds, &kg, T::zero(), &mut dqh);
                    gemm(Op::T, Op::N, t, hd, t, scale, &ds, &qh, T::one(), &mut dkg);
                    for i in 0..t {
                        for d in 0..hd {
                            // SAFETY: head h's columns are this task's.
                            unsafe { *dqp.0.add(i * qw + h * hd + d) = dqh[i * hd + d] };
                        }
                    }
                }
                for i in 0..t {
                    for d in 0..hd {
                        // SAFETY: kv head g's columns are this task's.
                        unsafe {
                            *dkp.0.add(i * kw + g * hd + d) = dkg[i * hd + d];
                            *dvp.0.add(i * kw + g * hd + d) = dvg[i * hd + d];
                        }
                    }
                }
            }
        };
        kiln_cpu::kernels::parallel_for(self.kv_heads, self.heads * t * t * hd * 4, &task);
        (dq, dk, dv)
    }
}

/// `silu(g) · u`.
pub fn swiglu<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| g / (T::one() + (-g).exp()) * u)
        .collect()
}

/// The gradients of `g` and `u` through [`swiglu`].
pub fn swiglu_back<T: Float>(g: &[T], u: &[T], dm: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    let mut du = vec![T::zero(); g.len()];
    for i in 0..g.len() {
        let s = T::one() / (T::one() + (-g[i]).exp());
        let silu = g[i] * s;
        du[i] = dm[i] * silu;
        dg[i] = dm[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
    }
    (dg, du)
}

/// An output head of `vocab` rows, read a tile of `tile_rows` rows at a
/// time: `logits(v0, v1, h)` gives `h · W[v0..v1]ᵀ`, `weights(v0, v1,
/// out)` writes rows `v0..v1` of `W` (dequantized) to `out`.
pub struct Head<'a, T: Clone> {
    pub vocab: usize,
    pub tile_rows: usize,
    /// Bytes of logits (rows × vocabulary) the first pass may keep for the
    /// second instead of computing them again.
    pub keep_logits: usize,
    /// `h · W[v0..v1]ᵀ`: a tile's logits.
    #[allow(clippy::type_complexity)]
    pub logits: &'a (dyn Fn(usize, usize, &[T]) -> Vec<T> + Sync),
    /// Rows `v0..v1` of the head's matrix.
    #[allow(clippy::type_complexity)]
    pub weights: &'a (dyn Fn(usize, usize) -> Cow<'a, [T]> + Sync),
}

impl<T: Float> Head<'_, T> {
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.vocab)
            .step_by(self.tile_rows)
            .map(|v0| (v0, (v0 + self.tile_rows).min(self.vocab)))
    }

    /// The cross-entropy of the rows of `h` (n × e) against `targets`,
    /// summed, computed a tile of the vocabulary at a time. With `dh`,
    /// adds `scale ×` its gradient with respect to `h` to it: a second
    /// pass, the probabilities tile by tile once the first pass has the
    /// log-sum-exp of every row (over the first pass's logits where they
    /// fit `keep_logits`, else over the tile's logits computed again);
    /// with `dw` too (vocabulary × e), the head's matrix's.
    pub fn cross_entropy(
        &self,
        h: &[T],
        e: usize,
        targets: &[u32],
        scale: T,
        dh: Option<&mut [T]>,
        mut dw: Option<&mut [T]>,
    ) -> f64 {
        let n = targets.len();
        assert_eq!(h.len(), n * e);
        // Per row: running max, sum of exp(logit − max), the target's logit.
        let mut stats = vec![[f64::NEG_INFINITY, 0.0, 0.0]; n];
        let keep = dh.is_some()
            && n.saturating_mul(self.vocab)
                .saturating_mul(std::mem::size_of::<T>())
                <= self.keep_logits;
        let mut kept = Vec::new();
        for (v0, v1) in self.tiles() {
            let m = v1 - v0;
            let logits = (self.logits)(v0, v1, h);
            for_rows_work(&mut stats, 1, n * m * 8, &|r, st: &mut [[f64; 3]]| {
                let st = &mut st[0];
                let row = &logits[r * m..(r + 1) * m];
                let tmax = row.iter().fold(T::neg_infinity(), |a, &b| a.max(b)).f64();
                let new_max = st[0].max(tmax);
                let shift = T::of(new_max);
                // exp in T (the terms are at most 1; the sum is in f64).
                let add: f64 = row.iter().map(|&l| (l - shift).exp().f64()).sum();
                st[1] = st[1] * (st[0] - new_max).exp() + add;
                st[0] = new_max;
                let tg = targets[r] as usize;
                if (v0..v1).contains(&tg) {
                    st[2] = row[tg - v0].f64();
                }
            });
            if keep {
                kept.push(logits);
            }
        }
        let lse: Vec<f64> = stats.iter().map(|s| s[0] + s[1].ln()).collect();
        let loss: f64 = stats.iter().zip(&lse).map(|(s, l)| l - s[2]).sum();
        if let Some(dh) = dh {
            let mut kept = kept.into_iter();
            for (v0, v1) in self.tiles() {
                let m = v1 - v0;
                let mut logits = match kept.next() {
                    Some(l) => l,
                    None => (self.logits)(v0, v1, h),
                };
                for_rows(&mut logits, m, &|r, row: &mut [T]| {
                    let shift = T::of(lse[r]);
                    for (j, l) in row.iter_mut().enumerate() {
                        let p = (*l - shift).exp();
                        let onehot = if v0 + j == targets[r] as usize {
                            T::one()
                        } else {
                            T::zero()
                        };
                        *l = (p - onehot) * scale;
                    }
                });
                let w = (self.weights)(v0, v1);
                gemm(Op::N, Op::N, n, e, m, T::one(), &logits, &w, T::one(), dh);
                if let Some(dw) = dw.as_deref_mut() {
                    // The head's own rows: dW[v0..v1] += dlogitsᵀ · h.
                    let rows = &mut dw[v0 * e..v1 * e];
                    gemm(Op::T, Op::N, m, e, n, T::one(), &logits, h, T::one(), rows);
                }
            }
        }
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rng: &mut fastrand::Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.f64() * 2.0 - 1.0).collect()
    }

    /// The central difference of `f` at `x` along coordinate `i`.
    fn numeric(x: &mut [f64], i: usize, f: &dyn Fn(&[f64]) -> f64) -> f64 {
        let h = 1e-6;
        let keep = x[i];
        x[i] = keep + h;
        let up = f(x);
        x[i] = keep - h;
        let down = f(x);
        x[i] = keep;
        (up - down) / (2.0 * h)
    }

    /// Checks `analytic` (the gradient of `Σ probe ⊙ f(x)`) against
    /// finite differences at every coordinate.
    fn check(x: &[f64], analytic: &[f64], f: &dyn Fn(&[f64]) -> f64, what: &str) {
        let mut x = x.to_vec();
        for (i, &got) in analytic.iter().enumerate() {
            let want = numeric(&mut x, i, f);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{what}[{i}]: analytic {got}, numeric {want}"
            );
        }
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn rms_norm_gradient() {
        let mut rng = fastrand::Rng::with_seed(1);
        let (rows, n) = (3, 8);
        let x = random(&mut rng, rows * n);
        let w = random(&mut rng, n);
        let probe = random(&mut rng, rows * n);
        let f = |x: &[f64]| dot(&rms_norm(x, &w, 1e-5).0, &probe);
        let (_, rstd) = rms_norm(&x, &w, 1e-5);
        let mut dx = vec![0.0; x.len()];
        rms_norm_back(&x, &w, &rstd, &probe, &mut dx);
        check(&x, &dx, &f, "rms_norm");
        let mut dw = vec![0.0; w.len()];
        rms_norm_back_weight(&x, &rstd, &probe, &mut dw);
        let f = |w: &[f64]| dot(&rms_norm(&x, w, 1e-5).0, &probe);
        check(&w, &dw, &f, "rms_norm weight");
    }

    #[test]
    fn rope_gradient_in_both_modes() {
        let mut rng = fastrand::Rng::with_seed(2);
        let (t, heads, hd) = (4, 2, 6);
        for neox in [false, true] {
            // n_rot below the head size: the last dimensions pass through.
            let rope = Rope::<f64>::new(&[0, 1, 2, 0], 4, 10000.0, 1.0, neox);
            let x = random(&mut rng, t * heads * hd);
            let probe = random(&mut rng, x.len());
            let f = |x: &[f64]| {
                let mut y = x.to_vec();
                rope.apply(&mut y, hd, false);
                dot(&y, &probe)
            };
            let mut dx = probe.clone();
            rope.apply(&mut dx, hd, true);
            check(&x, &dx, &f, "rope");
            // Turning back undoes turning.
            let mut y = x.clone();
            rope.apply(&mut y, hd, false);
            rope.apply(&mut y, hd, true);
            assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-12));
        }
    }

    #[test]
    fn attention_gradients_with_groups_and_documents() {
        let mut rng = fastrand::Rng::with_seed(3);
        // Two documents (positions 0..3 and 3..7), 4 query heads over 2
        // key/value heads.
        let first = [0, 0, 0, 3, 3, 3, 3];
        let a = Attn {
            t: 7,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            first: &first,
        };
        let (qw, kw) = (12, 6);
        let q = random(&mut rng, 7 * qw);
        let k = random(&mut rng, 7 * kw);
        let v = random(&mut rng, 7 * kw);
        let probe = random(&mut rng, 7 * qw);
        let (_, p) = a.forward(&q, &k, &v);
        let (dq, dk, dv) = a.backward(&q, &k, &v, &p, &probe);
        check(&q, &dq, &|q| dot(&a.forward(q, &k, &v).0, &probe), "dq");
        check(&k, &dk, &|k| dot(&a.forward(&q, k, &v).0, &probe), "dk");
        check(&v, &dv, &|v| dot(&a.forward(&q, &k, v).0, &probe), "dv");
        // Nothing crosses a document: the second document's output does not
        // change with the first's keys.
        let mut k2 = k.clone();
        k2[..3 * kw].iter_mut().for_each(|x| *x += 1.0);
        let (o1, _) = a.forward(&q, &k, &v);
        let (o2, _) = a.forward(&q, &k2, &v);
        assert_eq!(o1[3 * qw..], o2[3 * qw..]);
        // Each row of probabilities adds up to 1.
        for row in p.chunks(7) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn swiglu_gradient() {
        let mut rng = fastrand::Rng::with_seed(4);
        let g = random(&mut rng, 10);
        let u = random(&mut rng, 10);
        let probe = random(&mut rng, 10);
        let (dg, du) = swiglu_back(&g, &u, &probe);
        check(&g, &dg, &|g| dot(&swiglu(g, &u), &probe), "dg");
        check(&u, &du, &|u| dot(&swiglu(&g, u), &probe), "du");
    }

    #[test]
    fn cross_entropy_gradient_and_value_in_tiles() {
        let mut rng = fastrand::Rng::with_seed(5);
        let (n, e, vocab) = (3, 4, 11);
        let h = random(&mut rng, n * e);
        let w = random(&mut rng, vocab * e);
        let targets = [0u32, 10, 5];
        // The head over the matrix `w` (vocab × e), in tiles of `tile_rows`.
        #[allow(clippy::too_many_arguments)]
        fn ce(
            w: &[f64],
            h: &[f64],
            e: usize,
            targets: &[u32],
            tile_rows: usize,
            keep_logits: usize,
            scale: f64,
            dh: Option<&mut [f64]>,
            dw: Option<&mut [f64]>,
        ) -> f64 {
            let weights = |v0: usize, v1: usize| Cow::Borrowed(&w[v0 * e..v1 * e]);
            let logits = |v0: usize, v1: usize, h: &[f64]| {
                let mut out = vec![0.0; h.len() / e * (v1 - v0)];
                let rows = &w[v0 * e..v1 * e];
                gemm(
                    Op::N,
                    Op::T,
                    h.len() / e,
                    v1 - v0,
                    e,
                    1.0,
                    h,
                    rows,
                    0.0,
                    &mut out,
                );
                out
            };
            let head = Head {
                vocab: w.len() / e,
                tile_rows,
                keep_logits,
                logits: &logits,
                weights: &weights,
            };
            head.cross_entropy(h, e, targets, scale, dh, dw)
        }
        // The loss is the same whatever the tile size, and is the plain
        // definition's.
        let plain: f64 = (0..n)
            .map(|r| {
                let logits: Vec<f64> = (0..vocab)
                    .map(|v| dot(&h[r * e..(r + 1) * e], &w[v * e..(v + 1) * e]))
                    .collect();
                let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
                lse - logits[targets[r] as usize]
            })
            .sum();
        for tile_rows in [1, 4, 11, 64] {
            let loss = ce(&w, &h, e, &targets, tile_rows, 0, 1.0, None, None);
            assert!((loss - plain).abs() < 1e-12, "{tile_rows}");
        }
        // The gradients of h and of the head's matrix, with the logits
        // computed again and kept.
        for keep in [0, usize::MAX] {
            let mut dh = vec![0.0; h.len()];
            let mut dw = vec![0.0; w.len()];
            ce(
                &w,
                &h,
                e,
                &targets,
                4,
                keep,
                0.5,
                Some(&mut dh),
                Some(&mut dw),
            );
            let f = |h: &[f64]| 0.5 * ce(&w, h, e, &targets, 3, 0, 1.0, None, None);
            check(&h, &dh, &f, "dh");
            let f = |w: &[f64]| 0.5 * ce(w, &h, e, &targets, 3, 0, 1.0, None, None);
            check(&w, &dw, &f, "dw");
        }
    }
}
