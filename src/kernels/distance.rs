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

/// Fewest centres for which [`nearest`] bounds distances on a subset of the
/// coordinates first: with fewer, the full GEMM is already cheap.
pub const PRUNE_MIN_CENTRES: usize = 256;
/// Share of the centres' summed per-coordinate variance that the subset
/// holds. The coordinates where centres differ most separate them most, so
/// a row's partial distance there already exceeds its distance to the
/// nearest centre for nearly every other centre. Chosen on the k-means
/// benchmark's PCA-like embeddings (d = 50 and 300, K = 2048; variance per
/// component falling as 1/i): 3–4 centres of 2048 survive the bound there.
pub const PRUNE_SHARE: f64 = 0.6;

/// Centres probed by [`Subset::for_search`].
pub const PROBES: usize = 128;
/// Probes measured together (one GEMM against every centre).
const PROBE_GROUP: usize = 32;

/// What a search through the [`Subset`] bound costs, in units of one
/// multiply-add of the blocked GEMM, against K·(d + [`SCAN_COST`]) for the
/// plain search. Fitted to the k-means and kNN benchmarks' timings of both
/// paths on this machine (d = 50 and 300); rough, but enough to tell a few
/// survivors from hundreds.
#[derive(Debug, Clone, Copy)]
pub struct BoundCost {
    /// GEMM passes over the subset's coordinates.
    pub passes: f64,
    /// Scans of the bounds, per centre.
    pub per_centre: f64,
    /// One coordinate of a survivor measured in full (a lone float64
    /// distance, its centre often fetched from memory).
    pub per_survivor_coord: f64,
}

/// Scan of one row's GEMM output per centre in the plain search (arg-min or
/// top-k), in the units of [`BoundCost`].
pub const SCAN_COST: f64 = 10.0;

/// Most centres [`nearest`] searches through the bound (its GEMM output for
/// a block of rows is 128 × K floats: 4 MiB here).
pub const NEAREST_MAX_CENTRES: usize = 8192;

/// [`nearest`]'s: one GEMM pass, an arg-min and a bound scan.
pub const NEAREST_COST: BoundCost = BoundCost { passes: 1.0, per_centre: 20.0, per_survivor_coord: 40.0 };

/// The centres restricted to the coordinates `dims`: ‖x_S − c_S‖² ≤ ‖x − c‖²
/// for any subset S, so a centre whose partial distance exceeds a row's full
/// distance to another centre cannot be that row's nearest. Exact whatever
/// the data; how much it saves depends on them (nothing where every
/// coordinate matters equally, and then it is not built).
#[derive(Debug, Clone)]
pub struct Subset {
    dims: Vec<usize>,
    /// The points (centres, or the seeding's rows) on `dims`, row-major.
    points: Vec<f32>,
    norms: Vec<f32>,
    max_norm: f32,
}

impl Subset {
    /// For [`nearest`]: [`Subset::of_points`] of the centres, `None` for
    /// fewer than [`PRUNE_MIN_CENTRES`] (the full GEMM is already cheap).
    pub fn of(c: &Centres<'_>) -> Option<Subset> {
        if c.len() < PRUNE_MIN_CENTRES {
            return None;
        }
        Self::of_points(c.data, c.d)
    }

    /// The fewest coordinates (by the points' variance, largest first, at
    /// least 8) holding [`PRUNE_SHARE`] of it, with the points restricted to
    /// them; `None` where they would be more than a third of `d` (the bound
    /// would cost about what it saves).
    pub fn of_points(data: &[f32], d: usize) -> Option<Subset> {
        let k = data.len() / d;
        if k == 0 {
            return None;
        }
        let mut mean = vec![0f64; d];
        for row in data.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        let mut var = vec![0f64; d];
        for row in data.chunks_exact(d) {
            for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (v as f64 - m / k as f64).powi(2);
            }
        }
        let total: f64 = var.iter().sum();
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
        let (mut m, mut held) = (0, 0.0);
        while m < d && held < PRUNE_SHARE * total {
            held += var[order[m]];
            m += 1;
        }
        let m = m.max(8).min(d);
        if m * 3 > d {
            return None;
        }
        let mut dims = order[..m].to_vec();
        dims.sort_unstable();
        let points: Vec<f32> = data.chunks_exact(d).flat_map(|row| dims.iter().map(move |&j| row[j])).collect();
        let norms: Vec<f32> = points.chunks_exact(m).map(sq_norm).collect();
        let max_norm = norms.iter().copied().fold(0.0, f32::max);
        Some(Subset { dims, points, norms, max_norm })
    }

    /// [`Subset::of`] the centres where a search for each row's `k` nearest
    /// through it costs less than 0.8× the plain one, by a probe of the
    /// centres themselves as rows. For up to [`PROBES`] centres spread over
    /// the set: the centres whose partial distance is within the probe's
    /// `k`-th nearest other centre (those a row there would measure in
    /// full), priced by `cost`. Clustered centres (k-means of a PCA
    /// embedding) leave a few survivors; centres scattered at random in many
    /// dimensions leave hundreds, and get the plain GEMM. Depends on the
    /// centres alone, so every call with them takes the same path.
    pub fn for_search(c: &Centres<'_>, k: usize, cost: BoundCost) -> Option<Subset> {
        let s = Self::of(c)?;
        let (n, d, m) = (c.len(), c.d, s.len());
        let plain = 0.8 * n as f64 * (d as f64 + SCAN_COST);
        let fixed = n as f64 * (cost.passes * m as f64 + cost.per_centre);
        // No probe where the bound would not pay even with no survivor
        // (at d = 50 the kNN search's scans alone cost what it saves).
        if k >= n || fixed >= plain {
            return None;
        }
        let step = n.div_ceil(PROBES);
        let probes: Vec<usize> = (0..n).step_by(step).collect();
        // Distances of every centre to a group of probes, full and partial,
        // by the GEMM expansion (an estimate needs no exact distance), in
        // groups of PROBE_GROUP so the buffers stay n × 32 floats.
        let mut survivors = 0usize;
        let (mut full, mut part) = (Vec::new(), Vec::new());
        for group in probes.chunks(PROBE_GROUP) {
            let p = group.len();
            let dists = |pts: &[f32], norms: &[f32], w: usize, out: &mut Vec<f32>| {
                let q: Vec<f32> = group.iter().flat_map(|&i| pts[i * w..(i + 1) * w].iter().copied()).collect();
                let qn: Vec<f32> = group.iter().map(|&i| norms[i]).collect();
                out.resize(n * p, 0.0);
                out.par_chunks_mut(TASK_ROWS * p).enumerate().for_each(|(b, o)| {
                    let r = b * TASK_ROWS..b * TASK_ROWS + o.len() / p;
                    sq_dists_to(&pts[r.start * w..r.end * w], &norms[r], &q, &qn, w, o);
                });
            };
            dists(c.data, &c.norms, d, &mut full);
            dists(&s.points, &s.norms, m, &mut part);
            survivors += group
                .par_iter()
                .enumerate()
                .map(|(t, &q)| {
                    let mut col: Vec<f32> = (0..n).filter(|&j| j != q).map(|j| full[j * p + t]).collect();
                    let tau = *col.select_nth_unstable_by(k - 1, f32::total_cmp).1;
                    (0..n).filter(|&j| j != q && part[j * p + t] <= tau).count()
                })
                .sum::<usize>();
        }
        let per_row = survivors as f64 / probes.len() as f64;
        (fixed + per_row * d as f64 * cost.per_survivor_coord < plain).then_some(s)
    }

    /// Append the subset's coordinates of each row of `rows` (`d` wide) to `out`.
    pub fn gather(&self, rows: &[f32], d: usize, out: &mut Vec<f32>) {
        for row in rows.chunks_exact(d) {
            out.extend(self.dims.iter().map(|&j| row[j]));
        }
    }

    /// The points restricted to the subset (row-major, [`Subset::len`] wide).
    pub fn points(&self) -> &[f32] {
        &self.points
    }

    /// The largest of [`Subset::norms`].
    pub fn max_norm(&self) -> f32 {
        self.max_norm
    }

    /// Squared norms of [`Subset::points`].
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// Bound on the float32 rounding of a partial distance from the
    /// expansion ‖a‖² + ‖b‖² − 2a·b over the subset, for squared norms `na`
    /// and `nb`: a few units in the last place per term, with room to spare.
    pub fn rounding(&self, na: f32, nb: f32) -> f32 {
        (self.dims.len() as f32 + 8.0) * 2.4e-7 * (na + nb)
    }

    /// Number of coordinates in the subset.
    pub fn len(&self) -> usize {
        self.dims.len()
    }

    /// Whether the subset holds no coordinate (never, for a built one).
    pub fn is_empty(&self) -> bool {
        self.dims.is_empty()
    }
}

/// [`nearest_serial`] through the [`Subset`] bound: one GEMM on the subset's
/// coordinates, the best centre there measured in full, then every centre
/// whose partial distance (less its float32 rounding bound) is not above
/// that full distance (plus its rounding bound) measured in full too. The
/// nearest of those is the nearest of all; ties go to the lowest index.
fn nearest_pruned_serial(
    x: &[f32],
    c: &Centres<'_>,
    s: &Subset,
    hint: Option<&[u32]>,
    scratch: &mut Vec<f32>,
    labels: &mut [u32],
) {
    let (d, m, k) = (c.d, s.dims.len(), c.len());
    let mut xs: Vec<f32> = Vec::with_capacity(GEMM_ROWS * m);
    let mut hits: Vec<u32> = Vec::new();
    // Rounding of the direct float32 distance (d-term sums).
    let rel_d = (d as f32 + 8.0) * 2.4e-7;
    for (b, (xb, lb)) in x.chunks(GEMM_ROWS * d).zip(labels.chunks_mut(GEMM_ROWS)).enumerate() {
        xs.clear();
        s.gather(xb, d, &mut xs);
        dot_block(&xs, &s.points, m, scratch);
        for (i, (col, row)) in scratch[..k * lb.len()].chunks_exact(k).zip(xb.chunks_exact(d)).enumerate() {
            let xn = sq_norm(&xs[i * m..(i + 1) * m]);
            // The first centre measured in full: the hint (a row's previous
            // centre, usually still nearest or nearly so) saves the arg-min scan.
            let j0 = match hint.map(|h| h[b * GEMM_ROWS + i]) {
                Some(h) if (h as usize) < k => h as usize,
                _ => argmin_shifted(col, &s.norms).0,
            };
            let mut best = (j0, sq_dist(row, c.row(j0)));
            let limit = best.1 * (1.0 + rel_d) + s.rounding(xn, s.max_norm) - xn;
            // A squared norm beyond float32 makes it NaN: measure every centre.
            let limit = if limit.is_nan() { f32::INFINITY } else { limit };
            hits.clear();
            below(col, &s.norms, limit, &mut hits);
            for &j in &hits {
                let j = j as usize;
                if j != j0 {
                    let v = sq_dist(row, c.row(j));
                    if v < best.1 || (v == best.1 && j < best.0) {
                        best = (j, v);
                    }
                }
            }
            lb[i] = best.0 as u32;
        }
    }
}

/// Push every j with norms[j] − 2·dots[j] ≤ limit onto `out`, ascending.
/// Each block of 16 becomes one bit mask (two vector compares), visited
/// only where it is not zero: nearly every block holds no such j.
pub(crate) fn below(dots: &[f32], norms: &[f32], limit: f32, out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { below_avx2(dots, norms, limit, out) };
    }
    below_generic(dots, norms, limit, out)
}

/// Written with intrinsics: the compiler's version of the generic loop
/// below spilled the mask to the stack and ran at half this speed.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn below_avx2(dots: &[f32], norms: &[f32], limit: f32, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let n = dots.len().min(norms.len());
    let lim = _mm256_set1_ps(limit);
    let mut j = 0;
    while j + 16 <= n {
        // SAFETY: j + 16 ≤ n, the length of both slices.
        let (g0, g1) = (_mm256_loadu_ps(dots.as_ptr().add(j)), _mm256_loadu_ps(dots.as_ptr().add(j + 8)));
        let (n0, n1) = (_mm256_loadu_ps(norms.as_ptr().add(j)), _mm256_loadu_ps(norms.as_ptr().add(j + 8)));
        // n − (g + g): the same bits as the generic n − 2·g.
        let v0 = _mm256_sub_ps(n0, _mm256_add_ps(g0, g0));
        let v1 = _mm256_sub_ps(n1, _mm256_add_ps(g1, g1));
        let mut mask = (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(v0, lim)) as u32)
            | ((_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(v1, lim)) as u32) << 8);
        while mask != 0 {
            out.push(j as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
        j += 16;
    }
    for t in j..n {
        if norms[t] - 2.0 * dots[t] <= limit {
            out.push(t as u32);
        }
    }
}

#[inline(always)]
fn below_generic(dots: &[f32], norms: &[f32], limit: f32, out: &mut Vec<u32>) {
    const L: usize = 16;
    let (dc, nc) = (dots.chunks_exact(L), norms.chunks_exact(L));
    let (dr, nr) = (dc.remainder(), nc.remainder());
    for (b, (g, n)) in dc.zip(nc).enumerate() {
        let g: &[f32; L] = g.try_into().expect("chunk of L");
        let n: &[f32; L] = n.try_into().expect("chunk of L");
        // A bit mask, not a branch per entry: one vector compare per block.
        let mut mask = 0u32;
        for l in 0..L {
            mask |= ((n[l] - 2.0 * g[l] <= limit) as u32) << l;
        }
        while mask != 0 {
            out.push((b * L) as u32 + mask.trailing_zeros());
            mask &= mask - 1;
        }
    }
    let base = dots.len() - dr.len();
    for (t, (g, n)) in dr.iter().zip(nr).enumerate() {
        if n - 2.0 * g <= limit {
            out.push((base + t) as u32);
        }
    }
}

/// `labels[i]` = index of the centre nearest to row `i` of `x` (row-major,
/// `d` wide), parallel over fixed blocks of rows; through the [`Subset`]
/// bound where one pays ([`Subset::for_search`]).
pub fn nearest(x: &[f32], c: &Centres<'_>, labels: &mut [u32]) {
    nearest_from(x, c, None, labels);
}

/// [`nearest`], where `hint[i]` (if a valid centre index) is a centre near
/// row `i`, such as its previous one in Lloyd's iterations: the same result,
/// found with one scan of the bounds instead of two.
pub fn nearest_from(x: &[f32], c: &Centres<'_>, hint: Option<&[u32]>, labels: &mut [u32]) {
    let d = c.d;
    debug_assert_eq!(x.len(), labels.len() * d);
    assert!(hint.is_none_or(|h| h.len() == labels.len()), "one hint per row");
    // The bound's GEMM runs against every centre at once (128 × K floats of
    // scratch a task), so it is kept to K ≤ NEAREST_MAX_CENTRES.
    let subset = if x.is_empty() || c.len() > NEAREST_MAX_CENTRES { None } else { Subset::for_search(c, 1, NEAREST_COST) };
    x.par_chunks(TASK_ROWS * d).zip(labels.par_chunks_mut(TASK_ROWS)).enumerate().for_each(|(t, (xb, lb))| {
        let mut scratch = Vec::new();
        let hint = hint.map(|h| &h[t * TASK_ROWS..t * TASK_ROWS + lb.len()]);
        match &subset {
            Some(s) => nearest_pruned_serial(xb, c, s, hint, &mut scratch, lb),
            None => nearest_serial(xb, c, &mut scratch, lb),
        }
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

    /// Rows around 40 clusters whose spread falls as 1/√i per coordinate
    /// (a PCA embedding's shape), so that the subset bound is built.
    fn pca_like(n: usize, d: usize, seed: u64) -> Vec<f32> {
        clusters(n, d, 40, seed)
    }

    /// `n` rows around `g` cluster means (drawn from the same seed).
    fn clusters(n: usize, d: usize, g: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        let means: Vec<f32> = (0..g * d).map(|i| ((r.uniform() * 8.0 - 4.0) / ((i % d + 1) as f64).sqrt()) as f32).collect();
        (0..n)
            .flat_map(|_| {
                let g = r.below(g);
                (0..d).map(|j| means[g * d + j] + ((r.uniform() - 0.5) / ((j + 1) as f64).sqrt()) as f32).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn pruned_search_is_exact() {
        for &(n, k, d) in &[(3000, 700, 64), (2000, 2049, 50), (500, 300, 300)] {
            // Centres of the rows' law, plus exact duplicates (ties).
            let src = pca_like(k, d, 5);
            let mut c: Vec<f32> = src[..(k - 20) * d].to_vec();
            c.extend_from_slice(&src[..20 * d]);
            let x = pca_like(n, d, 6);
            let cs = Centres::new(&c, d);
            let s = Subset::of(&cs).expect("the bound is built for this shape");
            assert!(s.len() * 3 <= d && s.len() >= 8, "{} of {d} coordinates", s.len());
            // Through the bound directly (whatever the probe would choose),
            // without and with hints (a wrong hint included), and through
            // `nearest`.
            let mut runs = Vec::new();
            for hint in [None, Some((0..n as u32).map(|i| (i * 7) % k as u32).collect::<Vec<_>>())] {
                let mut labels = vec![0u32; n];
                nearest_pruned_serial(&x, &cs, &s, hint.as_deref(), &mut Vec::new(), &mut labels);
                runs.push(labels);
            }
            let mut labels = vec![0u32; n];
            nearest(&x, &cs, &mut labels);
            runs.push(labels);
            for labels in &runs {
                for i in 0..n {
                    let xi = &x[i * d..(i + 1) * d];
                    let got = sq_dist_f64(xi, cs.row(labels[i] as usize));
                    let best = (0..k).map(|j| sq_dist_f64(xi, cs.row(j))).fold(f64::INFINITY, f64::min);
                    assert!(got <= best + 1e-5 * (1.0 + best), "n={n} k={k} d={d} row {i}: {got} vs {best}");
                    // A duplicated centre: the lower index wins.
                    assert!(labels[i] < (k - 20) as u32, "row {i} took the duplicate {}", labels[i]);
                }
            }
            assert_eq!(runs[0], runs[1], "a hint changes the work, not the answer");
        }
        // Centres like k-means centroids of a PCA embedding (2048 over 300
        // cell types): the probe keeps the bound.
        let c = clusters(2048, 128, 300, 7);
        assert!(Subset::for_search(&Centres::new(&c, 128), 1, NEAREST_COST).is_some());
        // Every coordinate alike: no subset (the full GEMM is used).
        let c = random(2048, 50, 2);
        assert!(Subset::of(&Centres::new(&c, 50)).is_none());
        assert!(Subset::of(&Centres::new(&pca_like(100, 50, 1), 50)).is_none(), "fewer than PRUNE_MIN_CENTRES");
    }

    #[test]
    fn distances_agree() {
        let (a, b) = (random(1, 37, 3), random(1, 37, 4));
        let exact = sq_dist_f64(&a, &b);
        assert!((sq_dist(&a, &b) as f64 - exact).abs() <= 1e-5 * exact);
        assert!((sq_norm(&a) as f64 - sq_dist_f64(&a, &[0.0; 37])).abs() <= 1e-5 * exact.max(1.0));
    }
}
