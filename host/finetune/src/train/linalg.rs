//! Dense products for the trainer, in f32 (training) or f64 (the
//! gradient checks), split over the CPU backend's thread pool.
//!
//! Matrices are row-major slices. [`gemm`] computes
//! `C = alpha · op(A) · op(B) + beta · C` where `op` transposes or not;
//! the rows of `C` are split between threads, each running
//! `matrixmultiply`'s packed kernel on its share.

/// The element types the trainer runs in.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    /// # Safety
    /// As `matrixmultiply::sgemm`: the pointers and strides describe valid
    /// matrices of the given sizes, `c` writable and not aliased.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// `x (t × cols) · Wᵀ` by the CPU backend's own mat-mul (the kernels
    /// inference runs, activations rounded as they round them), where this
    /// type is what those kernels take (f32); `None` otherwise.
    fn kernel_product(
        _dtype: kiln_plugin_api::DType,
        _w: &[u8],
        _rows: usize,
        _cols: usize,
        _x: &[Self],
    ) -> Option<Vec<Self>> {
        None
    }

    /// One row of `dtype` weights dequantized into `dst`.
    fn dequantize(dtype: kiln_plugin_api::DType, src: &[u8], dst: &mut [Self]) {
        let mut f = vec![0f32; dst.len()];
        kiln_blocks::dequantize_row(dtype, src, &mut f);
        for (d, v) in dst.iter_mut().zip(f) {
            *d = Self::of32(v);
        }
    }

    fn of(x: f64) -> Self {
        Self::from_f64(x).expect("a float")
    }

    fn of32(x: f32) -> Self {
        Self::of(x as f64)
    }

    fn f64(self) -> f64 {
        self.to_f64().expect("a float")
    }
}

impl Float for f32 {
    fn dequantize(dtype: kiln_plugin_api::DType, src: &[u8], dst: &mut [f32]) {
        kiln_blocks::dequantize_row(dtype, src, dst);
    }

    fn kernel_product(
        dtype: kiln_plugin_api::DType,
        w: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
    ) -> Option<Vec<f32>> {
        use kiln_cpu::kernels::{self, Isa};
        use kiln_cpu::ops::{self, View};
        use kiln_plugin_api::{DType, Desc, OpKind};
        let t = x.len() / cols;
        let mut y = vec![0f32; t * rows];
        let wv = View {
            data: w.as_ptr() as *mut u8,
            desc: Desc::contiguous(dtype, [cols, rows, 1, 1]),
        };
        let xv = View {
            data: x.as_ptr() as *mut u8,
            desc: Desc::contiguous(DType::F32, [cols, t, 1, 1]),
        };
        let dv = View {
            data: y.as_mut_ptr() as *mut u8,
            desc: Desc::contiguous(DType::F32, [rows, t, 1, 1]),
        };
        let params = [0i32; 8];
        ops::check(OpKind::MulMat, &[wv.desc, xv.desc], &dv.desc, &params).ok()?;
        // SAFETY: the views describe `w`, `x` and `y` exactly (checked
        // above); the kernels only read the sources and write `y`.
        unsafe {
            if kernels::run(Isa::current(), OpKind::MulMat, &[wv, xv], &dv, &params).is_none() {
                ops::run(OpKind::MulMat, &[wv, xv], &dv, &params).ok()?;
            }
        }
        Some(y)
    }

    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Float for f64 {
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// A pointer that may cross to the pool's threads: each task writes only
/// its own rows.
struct Shared<T>(*mut T);
// SAFETY: tasks write disjoint rows of the matrix behind it.
unsafe impl<T> Sync for Shared<T> {}

/// `C (m×n) = alpha · op(A) · op(B) + beta · C`: `op(A)` is m×k (`A` is
/// stored m×k for [`Op::N`], k×m for [`Op::T`]), `op(B)` is k×n.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float>(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: &[T],
    b: &[T],
    beta: T,
    c: &mut [T],
) {
    assert_eq!(a.len(), m * k, "A");
    assert_eq!(b.len(), k * n, "B");
    assert_eq!(c.len(), m * n, "C");
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = match ta {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (rsb, csb) = match tb {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    let out = Shared(c.as_mut_ptr());
    // Each task packs the whole of the operand it does not split: split
    // C's rows (A's) where B is the smaller, its columns (B's) otherwise.
    if m >= n {
        let task = |rows: std::ops::Range<usize>| {
            let out = &out;
            // SAFETY: rows are in 0..m; A's and C's offsets stay inside
            // them and this task writes only its rows of C.
            unsafe {
                T::raw_gemm(
                    rows.len(),
                    k,
                    n,
                    alpha,
                    a.as_ptr().offset(rows.start as isize * rsa),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    beta,
                    out.0.add(rows.start * n),
                    n as isize,
                    1,
                )
            }
        };
        kiln_cpu::kernels::parallel_for(m, m * n * k, &task);
    } else {
        let task = |cols: std::ops::Range<usize>| {
            let out = &out;
            // SAFETY: cols are in 0..n; B's and C's offsets stay inside
            // them and this task writes only its columns of C.
            unsafe {
                T::raw_gemm(
                    m,
                    k,
                    cols.len(),
                    alpha,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr().offset(cols.start as isize * csb),
                    rsb,
                    csb,
                    beta,
                    out.0.add(cols.start),
                    n as isize,
                    1,
                )
            }
        };
        kiln_cpu::kernels::parallel_for(n, m * n * k, &task);
    }
}

/// Calls `f(i, row)` for each of the `rows` rows of width `width` in `x`,
/// on the pool's threads.
pub fn for_rows<T: Send>(x: &mut [T], width: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    for_rows_work(x, width, x.len() * 8, f)
}

/// [`for_rows`] where the caller knows the work (about the multiply-adds).
pub fn for_rows_work<T: Send>(
    x: &mut [T],
    width: usize,
    work: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let rows = x.len() / width.max(1);
    let out = Shared(x.as_mut_ptr());
    let task = |r: std::ops::Range<usize>| {
        let out = &out;
        for i in r {
            // SAFETY: row i is inside x and only this task touches it.
            let row = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * width), width) };
            f(i, row);
        }
    };
    kiln_cpu::kernels::parallel_for(rows, work, &task);
}

/// The sum of squares of `x`, in f64.
pub fn sum_squares<T: Float>(x: &[T]) -> f64 {
    x.iter().map(|v| v.f64() * v.f64()).sum()
}

/// `y += a · x`.
pub fn axpy<T: Float>(a: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: Op, tb: Op, m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let at = |i: usize, l: usize| {
            if ta == Op::N {
                a[i * k + l]
            } else {
                a[l * m + i]
            }
        };
        let bt = |l: usize, j: usize| {
            if tb == Op::N {
                b[l * n + j]
            } else {
                b[j * k + l]
            }
        };
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    #[test]
    fn every_transpose_matches_the_definition() {
        let mut rng = fastrand::Rng::with_seed(3);
        // Split over C's rows (m ≥ n) and over its columns (m < n), both
        // big enough for the pool.
        for (m, n, k) in [
            (1, 1, 1),
            (7, 5, 3),
            (130, 33, 65),
            (300, 9, 17),
            (33, 130, 65),
            (9, 300, 40),
        ] {
            let a: Vec<f64> = (0..m * k).map(|_| rng.f64() - 0.5).collect();
            let b: Vec<f64> = (0..k * n).map(|_| rng.f64() - 0.5).collect();
            for ta in [Op::N, Op::T] {
                for tb in [Op::N, Op::T] {
                    let want = naive(ta, tb, m, n, k, &a, &b);
                    let mut c = vec![1.0; m * n];
                    gemm(ta, tb, m, n, k, 2.0, &a, &b, 0.5, &mut c);
                    for (got, want) in c.iter().zip(&want) {
                        assert!((got - (2.0 * want + 0.5)).abs() < 1e-12, "{ta:?} {tb:?}");
                    }
                    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
                    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                    let mut c32 = vec![0.0f32; m * n];
                    gemm(ta, tb, m, n, k, 1.0, &a32, &b32, 0.0, &mut c32);
                    for (got, want) in c32.iter().zip(&want) {
                        assert!((*got as f64 - want).abs() < 1e-5);
                    }
                }
            }
        }
    }
}
