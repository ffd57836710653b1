//! Nearest centres by squared Euclidean distance, as a blocked GEMM:
//! ‖x − c‖² = ‖x‖² + ‖c‖² − 2·x·c. The `x·c` products are one faer matmul per
//! block of rows against a block of centres (sequential inside, so the bits
//! never depend on the thread count); rayon splits fixed blocks of rows.
//!
//! float32 expansion loses digits when ‖x‖² ≫ ‖x − c‖², so callers that need an
//! exact distance for a chosen centre recompute it with [`sq_dist_f64`].

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Distances below this floor weigh as if they were this far in
/// interpolation (a cell sitting on a centroid would otherwise take all of
/// the weight, or divide by zero). Here, not in `knn`, because both the CPU
/// interpolation and the GPU's gather kernel use it.
pub const MIN_DIST: f64 = 1e-3;

/// Rows per GEMM call: 128 rows × 2048 centres of float32 scratch is 1 MiB,
/// about one core's L2 share (measured: 128 rows beat 256–1024 at d = 50).
pub const GEMM_ROWS: usize = 128;
/// Centres per GEMM call; larger sets are scanned in slabs of this size.
pub const GEMM_CENTRES: usize = 2048;
/// Rows per parallel task: fixed, so the split never depends on the threads.
pub const TASK_ROWS: usize = 4096;

/// Centres in row-major order with their squared norms.
#[derive(Debug, Clone)]
pub struct Centres<'a> {
    /// The centres' values, row-major (len × d).
    pub data: &'a [f32],
    /// Values per centre (the embedding's width).
    pub d: usize,
    /// Each centre's squared norm ‖c‖² in float32 ([`sq_norm`]), in centre order.
    pub norms: Vec<f32>,
}

impl<'a> Centres<'a> {
    /// Borrow `data` (row-major, `d` wide) and compute its squared norms.
    pub fn new(data: &'a [f32], d: usize) -> Self {
        let norms = data.chunks_exact(d).map(sq_norm).collect();
        Centres { data, d, norms }
    }

    /// Number of centres.
    pub fn len(&self) -> usize {
        self.norms.len()
    }

    /// Whether there are no centres.
    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// Centre `j`'s `d` values.
    pub fn row(&self, j: usize) -> &'a [f32] {
        &self.data[j * self.d..(j + 1) * self.d]
    }
}

/// ‖a‖² in float32 with 8 partial sums (vectorises; fixed order).
pub fn sq_norm(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = a.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let tail: f32 = it.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// ‖a − b‖² in float32 with 8 partial sums.
pub fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut ia, mut ib) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in (&mut ia).zip(&mut ib) {
        for l in 0..8 {
            let t = x[l] - y[l];
            acc[l] += t * t;
        }
    }
    let tail: f32 = ia.remainder().iter().zip(ib.remainder()).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// ‖a − b‖² with the differences and sums in float64: the exact distance of a
/// chosen pair, for inertia and for comparing two candidates fairly.
pub fn sq_dist_f64(a: &[f32], b: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { sq_dist_f64_avx2(a, b) };
    }
    sq_dist_f64_generic(a, b)
}

/// The same loop with 4-wide float64 vectors (no FMA: the same bits as the
/// generic build, which keeps the same four partial sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sq_dist_f64_avx2(a: &[f32], b: &[f32]) -> f64 {
    sq_dist_f64_generic(a, b)
}

#[inline(always)]
fn sq_dist_f64_generic(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 4];
    let (mut ia, mut ib) = (a.chunks_exact(4), b.chunks_exact(4));
    for (x, y) in (&mut ia).zip(&mut ib) {
        for l in 0..4 {
            let t = x[l] as f64 - y[l] as f64;
            acc[l] += t * t;
        }
    }
    let tail: f64 =
        ia.remainder().iter().zip(ib.remainder()).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `scratch[j + i·k] = x_i · c_j` for one block of rows (column-major k × b).
pub(crate) fn dot_block(x: &[f32], c: &[f32], d: usize, scratch: &mut Vec<f32>) {
    let (b, k) = (x.len() / d, c.len() / d);
    // Grow only: the matmul overwrites every entry (zero-filling each call
    // cost a third of the assignment time).
    if scratch.len() < k * b {
        scratch.resize(k * b, 0.0);
    }
    let dst = MatMut::from_column_major_slice_mut(&mut scratch[..k * b], k, b);
    let lhs = MatRef::from_row_major_slice(c, k, d);
    let rhs = MatRef::from_column_major_slice(x, d, b);
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, Par::Seq);
}

/// `out[i·t + c] = ‖x_i − c_c‖²` for every row of `x` and each of the `t`
/// rows of `c`, by the expansion with precomputed squared norms `x_norms`
/// and `c_norms` (serial). Clamped at 0: the expansion can dip below.
pub fn sq_dists_to(x: &[f32], x_norms: &[f32], c: &[f32], c_norms: &[f32], d: usize, out: &mut [f32]) {
    let (t, b) = (c.len() / d, x_norms.len());
    let dst = MatMut::from_column_major_slice_mut(&mut out[..t * b], t, b);
    let lhs = MatRef::from_row_major_slice(c, t, d);
    let rhs = MatRef::from_column_major_slice(x, d, b);
    matmul(dst, Accum::Replace, lhs, rhs, -2.0f32, Par::Seq);
    for (col, &n) in out.chunks_exact_mut(t).zip(x_norms) {
        for (v, &cn) in col.iter_mut().zip(c_norms) {
            *v = (*v + n + cn).max(0.0);
        }
    }
}

/// The nearest centre of each row of one task's rows (serial). Ties in the
/// float32 expanded distance go to the lowest index.
fn nearest_serial(x: &[f32], c: &Centres<'_>, scratch: &mut Vec<f32>, labels: &mut [u32]) {
    let d = c.d;
    for (xb, lb) in x.chunks(GEMM_ROWS * d).zip(labels.chunks_mut(GEMM_ROWS)) {
        let mut best = vec![f32::INFINITY; lb.len()];
        for j0 in (0..c.len()).step_by(GEMM_CENTRES) {
            let j1 = (j0 + GEMM_CENTRES).min(c.len());
            dot_block(xb, &c.data[j0 * d..j1 * d], d, scratch);
            let k = j1 - j0;
            let norms = &c.norms[j0..j1];
            for (i, col) in scratch[..k * xb.len() / d].chunks_exact(k).enumerate() {
                // ‖x‖² is the same for every centre: leave it out of the argmin.
                let (j, v) = argmin_shifted(col, norms);
                if v < best[i] {
                    best[i] = v;
                    lb[i] = (j0 + j) as u32;
                }
            }
        }
    }
}

/// (j, v) minimising v = norms[j] − 2·dots[j]; the lowest j on ties.
/// Sixteen independent lanes, so the compiler turns it into vector compares
/// and blends (a plain running argmin is a serial dependency chain and cost
/// as much as the GEMM itself).
fn argmin_shifted(dots: &[f32], norms: &[f32]) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { argmin_shifted_avx2(dots, norms) };
    }
    argmin_shifted_generic(dots, norms)
}

/// The same loop compiled for AVX2: the crate is built for baseline x86-64
/// (SSE2), where this loop does not vectorise; faer dispatches its own
/// kernels at run time, and this does the same for ours.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn argmin_shifted_avx2(dots: &[f32], norms: &[f32]) -> (usize, f32) {
    argmin_shifted_generic(dots, norms)
}

#[inline(always)]
fn argmin_shifted_generic(dots: &[f32], norms: &[f32]) -> (usize, f32) {
    const L: usize = 16;
    let mut bv = [f32::INFINITY; L];
    let mut bi = [0u32; L];
    let mut idx: [u32; L] = std::array::from_fn(|l| l as u32);
    let (dc, nc) = (dots.chunks_exact(L), norms.chunks_exact(L));
    let (dr, nr) = (dc.remainder(), nc.remainder());
    for (g, n) in dc.zip(nc) {
        let g: &[f32; L] = g.try_into().expect("chunk of L");
        let n: &[f32; L] = n.try_into().expect("chunk of L");
        for l in 0..L {
            let v = n[l] - 2.0 * g[l];
            let better = v < bv[l];
            bv[l] = if better { v } else { bv[l] };
            bi[l] = if better { idx[l] } else { bi[l] };
            idx[l] += L as u32;
        }
    }
    let (mut j, mut v) = (usize::MAX, f32::INFINITY);
    for l in 0..L {
        if bv[l] < v || (bv[l] == v && (bi[l] as usize) < j) {
            (j, v) = (bi[l] as usize, bv[l]);
        }
    }
    let base = dots.len() - dr.len();
    for (t, (g, n)) in dr.iter().zip(nr).enumerate() {
        let x = n - 2.0 * g;
        if x < v {
            (j, v) = (base + t, x);
        }
    }
    (j, v)
}

/// `labels[i]` = index of the centre nearest to row `i` of `x` (row-major,
/// `d` wide), parallel over fixed blocks of rows.
pub fn nearest(x: &[f32], c: &Centres<'_>, labels: &mut [u32]) {
    let d = c.d;
    debug_assert_eq!(x.len(), labels.len() * d);
    x.par_chunks(TASK_ROWS * d).zip(labels.par_chunks_mut(TASK_ROWS)).for_each(|(xb, lb)| {
        let mut scratch = Vec::new();
        nearest_serial(xb, c, &mut scratch, lb);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rng::Rng;

    fn random(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n * d).map(|_| (r.uniform() * 4.0 - 2.0) as f32).collect()
    }

    #[test]
    fn nearest_matches_brute_force() {
        for &(n, k, d) in &[(1, 1, 1), (300, 5000, 7), (5000, 33, 50), (700, 2049, 16)] {
            let (x, c) = (random(n, d, 1), random(k, d, 2));
            let cs = Centres::new(&c, d);
            let mut labels = vec![0u32; n];
            nearest(&x, &cs, &mut labels);
            for i in 0..n {
                let xi = &x[i * d..(i + 1) * d];
                let got = sq_dist_f64(xi, cs.row(labels[i] as usize));
                let best = (0..k).map(|j| sq_dist_f64(xi, cs.row(j))).fold(f64::INFINITY, f64::min);
                // float32 expansion: the chosen centre is nearest to within rounding.
                assert!(got <= best + 1e-5 * (1.0 + best), "n={n} k={k} d={d} row {i}: {got} vs {best}");
            }
        }
    }

    #[test]
    fn distances_agree() {
        let (a, b) = (random(1, 37, 3), random(1, 37, 4));
        let exact = sq_dist_f64(&a, &b);
        assert!((sq_dist(&a, &b) as f64 - exact).abs() <= 1e-5 * exact);
        assert!((sq_norm(&a) as f64 - sq_dist_f64(&a, &[0.0; 37])).abs() <= 1e-5 * exact.max(1.0));
    }
}
