//! Exact k nearest centres, and the interpolation that moves each cell by
//! the weighted displacement of its nearest centres.
//!
//! One fused pass per block of rows: a float32 GEMM of the rows against a slab
//! of centres (`distance::dot_block`), a vectorised top-k scan of each row's
//! distances while they are still in cache, then an exact re-rank of the few
//! candidates and the weighted gather of their displacements. Nothing of size
//! rows × centres or rows × k × d is ever allocated.

use rayon::prelude::*;

use super::distance::{below, dot_block, sq_dist_f64, sq_norm, BoundCost, Centres, Subset, GEMM_CENTRES, GEMM_ROWS, TASK_ROWS};
use super::{gpu, Device};
use crate::error::KernelError;

/// Candidates kept beyond `k` from the float32 ranking before the exact
/// re-rank. The expansion ‖x‖² + ‖c‖² − 2x·c can misorder centres whose
/// distances differ by less than its rounding error; keeping a few more and
/// re-ranking them by the exact distance makes the chosen set the exact one
/// unless more than this many centres sit inside that error band.
pub const RERANK_EXTRA: usize = 4;

pub use super::distance::MIN_DIST;

/// One set of centres to search, with their squared norms precomputed and,
/// for interpolation, one displacement per centre.
#[derive(Debug, Clone)]
pub struct CentroidIndex {
    d: usize,
    centres: Vec<f32>,
    norms: Vec<f32>,
    displacement: Option<Vec<f32>>,
    /// The centres on the GPU, uploaded on the first device='cuda' search and
    /// shared by clones (the same centres).
    on_gpu: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<gpu::DeviceCentres>>>>,
    /// For each `k` searched so far: the coordinate-subset bound, where it
    /// pays for these centres (`Subset::for_search`, a probe worth doing
    /// once per index and k, not per call). Shared by clones.
    bounds: std::sync::Arc<std::sync::Mutex<Vec<KnownBound>>>,
}

/// A `k` and the bound for it (`None`: the probe declined it).
type KnownBound = (usize, Option<std::sync::Arc<Subset>>);

impl CentroidIndex {
    /// `centres` and `displacement` are row-major, `d` wide, one row per
    /// centre. Both must be finite.
    pub fn new(centres: Vec<f32>, displacement: Option<Vec<f32>>, d: usize) -> Result<Self, KernelError> {
        if d == 0 || !centres.len().is_multiple_of(d) {
            return Err(KernelError::Invalid(format!("{} centre values do not make rows of width {d}", centres.len())));
        }
        if let Some(i) = centres.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::Invalid(format!("centroid {} holds the non-finite value {}", i / d, centres[i])));
        }
        if let Some(disp) = &displacement {
            if disp.len() != centres.len() {
                return Err(KernelError::Shape { what: "displacement values", expected: centres.len(), got: disp.len() });
            }
            if let Some(i) = disp.iter().position(|v| !v.is_finite()) {
                return Err(KernelError::Invalid(format!("displacement {} holds the non-finite value {}", i / d, disp[i])));
            }
        }
        if centres.len() / d >= u32::MAX as usize {
            return Err(KernelError::Invalid(format!("{} centres is more than u32 indices can address", centres.len() / d)));
        }
        let norms = Centres::new(&centres, d).norms;
        // The float32 ranking key ‖c‖² − 2x·c needs finite squared norms.
        if let Some(j) = norms.iter().position(|v| !v.is_finite()) {
            return Err(KernelError::Invalid(format!(
                "centroid {j} has a squared norm beyond float32 (values near ±1.8e19); rescale the embedding"
            )));
        }
        Ok(CentroidIndex {
            d,
            centres,
            norms,
            displacement,
            on_gpu: Default::default(),
            bounds: Default::default(),
        })
    }

    /// The bound for searches of `k` nearest, probed on first use.
    fn bound(&self, k: usize) -> Option<std::sync::Arc<Subset>> {
        // A poisoned lock only means a probe panicked elsewhere: search
        // without the bound (the k + 4 search). The lock is never held while
        // the probe runs: the probe is a rayon loop, and a rayon worker
        // waiting on it may pick up another call on this index from the same
        // thread, which would then lock a mutex its thread already holds.
        // Two first calls may both probe; they find the same bound (it
        // depends on the centres alone) and the first kept wins.
        if let Some((_, b)) = self.bounds.lock().ok()?.iter().find(|(kk, _)| *kk == k) {
            return b.clone();
        }
        // Two GEMM passes where the centres make several slabs (see
        // search_pruned_serial); a top-k scan and a bound scan per centre.
        let passes = if self.len() > GEMM_CENTRES { 2.0 } else { 1.0 };
        let cost = BoundCost { passes, per_centre: 36.0, per_survivor_coord: 90.0 };
        let b = Subset::for_search(&self.centres(), k, cost).map(std::sync::Arc::new);
        let mut known = self.bounds.lock().ok()?;
        match known.iter().find(|(kk, _)| *kk == k) {
            Some((_, first)) => first.clone(),
            None => {
                known.push((k, b.clone()));
                b
            },
        }
    }

    /// Width of the centres.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Number of centres.
    pub fn len(&self) -> usize {
        self.norms.len()
    }

    /// Whether the index holds no centre.
    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// The centres and displacements, row-major.
    pub fn rows(&self) -> (&[f32], Option<&[f32]>) {
        (&self.centres, self.displacement.as_deref())
    }

    fn centres(&self) -> Centres<'_> {
        Centres { data: &self.centres, d: self.d, norms: self.norms.clone() }
    }
}

/// The `cap` smallest (value, index) pairs seen so far, ascending; on equal
/// values the earlier (lower) index stays first, and a later equal value does
/// not displace it.
struct TopK {
    cap: usize,
    len: usize,
    vals: Vec<f32>,
    idx: Vec<u32>,
}

impl TopK {
    fn new(cap: usize) -> Self {
        TopK { cap, len: 0, vals: vec![f32::INFINITY; cap], idx: vec![0; cap] }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Values must be strictly below this to enter.
    #[inline(always)]
    fn threshold(&self) -> f32 {
        if self.len < self.cap {
            f32::INFINITY
        } else {
            self.vals[self.cap - 1]
        }
    }

    /// Insert `v < threshold()` keeping the order.
    #[inline(always)]
    fn push(&mut self, v: f32, j: u32) {
        let mut p = if self.len < self.cap {
            self.len += 1;
            self.len - 1
        } else {
            self.cap - 1
        };
        while p > 0 && self.vals[p - 1] > v {
            self.vals[p] = self.vals[p - 1];
            self.idx[p] = self.idx[p - 1];
            p -= 1;
        }
        self.vals[p] = v;
        self.idx[p] = j;
    }
}

/// Offer centres `base..base + dots.len()` to `top`, ranked by
/// norms[j] − 2·dots[j] (the squared distance less the row's own ‖x‖²).
fn scan(dots: &[f32], norms: &[f32], base: u32, top: &mut TopK) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { scan_avx2(dots, norms, base, top) };
    }
    scan_generic(dots, norms, base, top)
}

/// The crate targets baseline x86-64; compiled for AVX2 the 16-lane compare
/// below becomes two vector compares and a mask test (see `argmin_shifted`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(dots: &[f32], norms: &[f32], base: u32, top: &mut TopK) {
    scan_generic(dots, norms, base, top)
}

#[inline(always)]
fn scan_generic(dots: &[f32], norms: &[f32], base: u32, top: &mut TopK) {
    const L: usize = 16;
    // Pass 1, branch-free: the minimum of each of M lanes. Those M values are
    // M distinct centres, so the cap-th smallest of them bounds the slab's
    // cap-th smallest distance from above: nothing beyond it can enter. Pass
    // 2 then offers only the ~1.5·cap centres under the bound, instead of
    // the ~cap·(1 + ln(K/cap)) a running threshold lets in, each of them a
    // mispredicted branch (that had made the scan cost as much as the GEMM
    // at d = 50).
    const M: usize = 32;
    let mut bound = f32::INFINITY;
    if top.cap <= M && dots.len() >= 4 * M {
        let mut lane = [f32::INFINITY; M];
        for (g, n) in dots.chunks_exact(M).zip(norms.chunks_exact(M)) {
            for l in 0..M {
                lane[l] = lane[l].min(n[l] - 2.0 * g[l]);
            }
        }
        let (_, kth, _) = lane.select_nth_unstable_by(top.cap - 1, f32::total_cmp);
        bound = kth.next_up();
    }
    let mut thr = top.threshold().min(bound);
    let (dc, nc) = (dots.chunks_exact(L), norms.chunks_exact(L));
    let (dr, nr) = (dc.remainder(), nc.remainder());
    let mut j0 = base;
    for (g, n) in dc.zip(nc) {
        let g: &[f32; L] = g.try_into().expect("chunk of L");
        let n: &[f32; L] = n.try_into().expect("chunk of L");
        let mut v = [0f32; L];
        let mut mask = 0u32;
        for l in 0..L {
            v[l] = n[l] - 2.0 * g[l];
            mask |= ((v[l] < thr) as u32) << l;
        }
        // One well-predicted branch per 16 centres, then a visit of the set
        // lanes only.
        while mask != 0 {
            let l = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if v[l] < thr {
                top.push(v[l], j0 + l as u32);
                thr = top.threshold().min(bound);
            }
        }
        j0 += L as u32;
    }
    for (t, (g, n)) in dr.iter().zip(nr).enumerate() {
        let v = n - 2.0 * g;
        if v < thr {
            top.push(v, j0 + t as u32);
            thr = top.threshold().min(bound);
        }
    }
}

/// What to write for each row once its neighbours are known.
trait Sink: Send {
    /// Row `i` of this task (its values `x`), neighbours ascending by exact
    /// distance: `(squared distance, centre index)`.
    fn row(&mut self, i: usize, x: &[f32], nbrs: &[(f64, u32)]);
}

/// `psc.knn`: indices and Euclidean distances, `k` per row.
struct Neighbours<'o> {
    k: usize,
    idx: &'o mut [u32],
    dist: &'o mut [f32],
}

impl Sink for Neighbours<'_> {
    fn row(&mut self, i: usize, _x: &[f32], nbrs: &[(f64, u32)]) {
        for (t, &(d2, j)) in nbrs.iter().enumerate() {
            self.idx[i * self.k + t] = j;
            self.dist[i * self.k + t] = d2.sqrt() as f32;
        }
    }
}

/// `psc.knn_interpolate`: y = x + Σ w_j·D_j, w_j ∝ 1 / max(dist_j, MIN_DIST).
struct Interpolated<'o> {
    d: usize,
    displacement: &'o [f32],
    out: &'o mut [f32],
    w: Vec<f32>,
}

impl Sink for Interpolated<'_> {
    fn row(&mut self, i: usize, x: &[f32], nbrs: &[(f64, u32)]) {
        let d = self.d;
        // Weights in float64, then float32 for the gather: k terms of a
        // float32 sum are well inside float32 tolerance of the float64 formula.
        let inv: f64 = nbrs.iter().map(|&(d2, _)| 1.0 / d2.sqrt().max(MIN_DIST)).sum();
        self.w.clear();
        self.w.extend(nbrs.iter().map(|&(d2, _)| ((1.0 / d2.sqrt().max(MIN_DIST)) / inv) as f32));
        let out = &mut self.out[i * d..(i + 1) * d];
        out.copy_from_slice(x);
        for (&(_, j), &w) in nbrs.iter().zip(&self.w) {
            axpy(out, w, &self.displacement[j as usize * d..(j as usize + 1) * d]);
        }
    }
}

/// `y += a·x`, compiled for AVX2 where the CPU has it (no FMA: the same bits
/// on every x86-64 CPU).
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { axpy_avx2(y, a, x) };
    }
    axpy_generic(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_generic(y, a, x)
}

#[inline(always)]
fn axpy_generic(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The fused search over one task's rows (serial): per block of `GEMM_ROWS`
/// rows, GEMM against each slab of centres, top-(k + RERANK_EXTRA) scan, then
/// exact distances for the candidates, re-ranked by (distance, index).
fn search_serial(x: &[f32], c: &Centres<'_>, k: usize, sink: &mut impl Sink) {
    let d = c.d;
    let cap = (k + RERANK_EXTRA).min(c.len());
    let mut tops: Vec<TopK> = (0..GEMM_ROWS).map(|_| TopK::new(cap)).collect();
    let mut scratch = Vec::new();
    let mut cand: Vec<(f64, u32)> = Vec::with_capacity(cap);
    for (blk, xb) in x.chunks(GEMM_ROWS * d).enumerate() {
        let b = xb.len() / d;
        tops[..b].iter_mut().for_each(TopK::clear);
        for j0 in (0..c.len()).step_by(GEMM_CENTRES) {
            let j1 = (j0 + GEMM_CENTRES).min(c.len());
            dot_block(xb, &c.data[j0 * d..j1 * d], d, &mut scratch);
            let kc = j1 - j0;
            for (col, top) in scratch[..kc * b].chunks_exact(kc).zip(&mut tops) {
                scan(col, &c.norms[j0..j1], j0 as u32, top);
            }
        }
        for (i, (xi, top)) in xb.chunks_exact(d).zip(&tops).enumerate() {
            rerank(xi, c, &top.idx[..top.len], &mut cand);
            sink.row(blk * GEMM_ROWS + i, xi, &cand[..k]);
        }
    }
}

/// [`search_serial`] through the coordinate-subset bound (`Subset`), per
/// block of rows in two passes over the centres' slabs, each a GEMM on the
/// subset's coordinates only. Pass 1: each row's `k` best partial distances
/// over all centres, measured in full (float64); the `k`-th of those bounds
/// the row's `k`-th nearest. Pass 2: every other centre whose partial
/// distance, less its float32 rounding bound, is within that bound is
/// measured too. A centre left out is farther than `k` measured ones, so the
/// result is the exact `k` nearest, ascending by (float64 distance, index)
/// as `rerank` orders them. (One pass with a running bound measured
/// hundreds of centres a row: a row's first slabs, often another batch's
/// centroids, bound it loosely.)
fn search_pruned_serial(x: &[f32], c: &Centres<'_>, s: &Subset, k: usize, sink: &mut impl Sink) {
    let (d, m, n_c) = (c.d, s.len(), c.len());
    let one_slab = n_c <= GEMM_CENTRES;
    let mut xs: Vec<f32> = Vec::with_capacity(GEMM_ROWS * m);
    let mut xn: Vec<f32> = Vec::with_capacity(GEMM_ROWS);
    let mut best: Vec<Vec<(f64, u32)>> = (0..GEMM_ROWS).map(|_| Vec::with_capacity(k + 1)).collect();
    let mut tops: Vec<TopK> = (0..GEMM_ROWS).map(|_| TopK::new(k)).collect();
    let (mut scratch, mut hits) = (Vec::new(), Vec::new());
    for (blk, xb) in x.chunks(GEMM_ROWS * d).enumerate() {
        let b = xb.len() / d;
        xs.clear();
        s.gather(xb, d, &mut xs);
        xn.clear();
        xn.extend(xs.chunks_exact(m).map(sq_norm));
        tops[..b].iter_mut().for_each(TopK::clear);
        best[..b].iter_mut().for_each(Vec::clear);
        for j0 in (0..n_c).step_by(GEMM_CENTRES) {
            let j1 = (j0 + GEMM_CENTRES).min(n_c);
            dot_block(&xs, &s.points()[j0 * m..j1 * m], m, &mut scratch);
            for (col, top) in scratch[..(j1 - j0) * b].chunks_exact(j1 - j0).zip(&mut tops) {
                scan(col, &s.norms()[j0..j1], j0 as u32, top);
            }
        }
        for (i, (row, top)) in xb.chunks_exact(d).zip(&tops).enumerate() {
            for &j in &top.idx[..top.len] {
                offer(&mut best[i], k, sq_dist_f64(row, c.row(j as usize)), j);
            }
        }
        for j0 in (0..n_c).step_by(GEMM_CENTRES) {
            let j1 = (j0 + GEMM_CENTRES).min(n_c);
            if !one_slab {
                dot_block(&xs, &s.points()[j0 * m..j1 * m], m, &mut scratch);
            }
            for (i, col) in scratch[..(j1 - j0) * b].chunks_exact(j1 - j0).enumerate() {
                let (row, bi, top) = (&xb[i * d..(i + 1) * d], &mut best[i], &tops[i]);
                // float64 → float32 rounds by half a unit: 1e-6 covers it. A
                // row whose squared norm overflows float32 makes the limit
                // NaN: every centre is then measured.
                let limit = (bi[k - 1].0 * (1.0 + 1e-6)) as f32 + s.rounding(xn[i], s.max_norm()) - xn[i];
                let limit = if limit.is_nan() { f32::INFINITY } else { limit };
                hits.clear();
                below(col, &s.norms()[j0..j1], limit, &mut hits);
                for &t in &hits {
                    let j = j0 as u32 + t;
                    if !top.idx[..top.len].contains(&j) {
                        offer(bi, k, sq_dist_f64(row, c.row(j as usize)), j);
                    }
                }
            }
        }
        for (i, xi) in xb.chunks_exact(d).enumerate() {
            sink.row(blk * GEMM_ROWS + i, xi, &best[i]);
        }
    }
}

/// Keep `best` the `k` smallest (distance, index) pairs offered, ascending.
fn offer(best: &mut Vec<(f64, u32)>, k: usize, v: f64, j: u32) {
    let before = |&(bv, bj): &(f64, u32)| bv < v || (bv == v && bj < j);
    if best.len() == k {
        if best.last().is_some_and(before) {
            return;
        }
        best.pop();
    }
    let p = best.partition_point(before);
    best.insert(p, (v, j));
}

/// `cand` = the candidate centres `idx` of row `xi` with their exact float64
/// squared distances, ascending, ties to the lower index. Both devices' CPU
/// re-rank; the GPU's `rerank_gather` kernel mirrors it.
fn rerank(xi: &[f32], c: &Centres<'_>, idx: &[u32], cand: &mut Vec<(f64, u32)>) {
    cand.clear();
    cand.extend(idx.iter().map(|&j| (sq_dist_f64(xi, c.row(j as usize)), j)));
    cand.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
}

/// The exact half of a GPU search: each task's rows, with `cap` candidate
/// centres per row from the GPU, re-ranked by exact float64 distance (ties to
/// the lower index) exactly as `search_serial` re-ranks its own candidates.
fn rerank_tasks<S: Sink>(tasks: Vec<(&[f32], &Centres<'_>, S, &[u32])>, k: usize, cap: usize) {
    let run = |(x, c, mut sink, cands): (&[f32], &Centres<'_>, S, &[u32])| {
        let mut cand: Vec<(f64, u32)> = Vec::with_capacity(cap);
        for (i, (xi, ci)) in x.chunks_exact(c.d).zip(cands.chunks_exact(cap)).enumerate() {
            rerank(xi, c, ci, &mut cand);
            sink.row(i, xi, &cand[..k]);
        }
    };
    // Plain scoped threads, not rayon: this runs while the GPU lock is held,
    // and a rayon worker waiting on a parallel loop may pick up another
    // plugin call that wants the same lock (a deadlock seen under Polars'
    // streaming engine).
    super::scoped_for_each(tasks, run);
}

/// Rows per re-rank task within one GPU block: enough tasks for every core
/// (each row's result depends on that row alone, so any split gives the same bits).
fn rerank_rows(block_rows: usize) -> usize {
    block_rows.div_ceil(4 * rayon::current_num_threads()).max(256)
}

/// The GPU half of a search against an index, handed to `each(first_row,
/// block)` block by block; the centres (and displacements) are uploaded once
/// per index. `gather = Some(k)` asks the GPU to re-rank and gather too; it
/// answers with candidates instead where its gather kernel is unavailable.
fn index_search_each(
    x: &[f32],
    index: &CentroidIndex,
    cap: usize,
    gather: Option<usize>,
    each: impl FnMut(usize, gpu::Block<'_>),
) -> Result<(), KernelError> {
    let on_gpu = {
        let mut slot = index.on_gpu.lock().map_err(|_| KernelError::Invalid("a GPU index is poisoned by an earlier panic".into()))?;
        match &*slot {
            Some(c) => c.clone(),
            None => {
                let disp = index.displacement.as_deref();
                let c = std::sync::Arc::new(gpu::upload_centres(&index.centres, &index.norms, disp, index.d)?);
                *slot = Some(c.clone());
                c
            },
        }
    };
    gpu::search_each(x, &on_gpu, cap, gather.filter(|_| gpu::gathers()), each)
}

fn check(x: &[f32], index: &CentroidIndex, k: usize) -> Result<(), KernelError> {
    let d = index.d;
    if !x.len().is_multiple_of(d) {
        return Err(KernelError::Invalid(format!("{} values do not make rows of width {d}", x.len())));
    }
    if k == 0 || k > index.len() {
        return Err(KernelError::Invalid(format!("k = {k} must be between 1 and the {} centroids searched", index.len())));
    }
    check_finite(x, d)
}

fn check_interpolable(x: &[f32], index: &CentroidIndex, k: usize) -> Result<(), KernelError> {
    check(x, index, k)?;
    match index.displacement {
        Some(_) => Ok(()),
        None => Err(KernelError::Invalid("this index has no displacements to interpolate".into())),
    }
}

fn check_finite(x: &[f32], d: usize) -> Result<(), KernelError> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(KernelError::Invalid(format!("row {} holds the non-finite value {}", i / d, x[i]))),
        None => Ok(()),
    }
}

/// Split a call across the current rayon pool from this many rows. A row
/// costs microseconds here (a GEMM against thousands of centres), so even one
/// streaming morsel is worth splitting, unlike the cheap row-wise kernels
/// (`kernels::PAR_BLOCK`).
const PAR_ROWS: usize = 2 * TASK_ROWS;

fn parallel(n_rows: usize) -> bool {
    n_rows >= PAR_ROWS && rayon::current_num_threads() > 1
}

/// Search each (rows, centres, sink) task, in parallel when the call has
/// `PAR_ROWS` rows or more (or the caller says so). Each row's result depends
/// on that row alone, so both give the same bits.
fn run_tasks<S: Sink>(tasks: Vec<(&[f32], &Centres<'_>, Option<&Subset>, S)>, k: usize, force_parallel: bool) {
    let n_rows: usize = tasks.iter().map(|(x, c, _, _)| x.len() / c.d).sum();
    let run = |(x, c, bound, mut sink): (&[f32], &Centres<'_>, Option<&Subset>, S)| match bound {
        Some(s) => search_pruned_serial(x, c, s, k, &mut sink),
        None => search_serial(x, c, k, &mut sink),
    };
    if parallel(n_rows) || (force_parallel && tasks.len() > 1) {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// Rows per task of a `knn` call: `TASK_ROWS`, or fewer when a call has few
/// rows against many centres (a metric's whole-sample index), so every core
/// gets several tasks. Calls of under `PAR_ROWS` rows against at most 2048
/// centres keep one task (serial): splitting them costs more than it saves.
fn knn_task_rows(n_rows: usize, n_centres: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads == 1 || n_rows.saturating_mul(n_centres) < PAR_ROWS * 2048 {
        return TASK_ROWS;
    }
    // A multiple of GEMM_ROWS: the GEMM blocks (and so every bit) stay the
    // same whatever the thread count.
    n_rows.div_ceil(4 * threads).next_multiple_of(GEMM_ROWS).clamp(GEMM_ROWS, TASK_ROWS)
}

/// For each row of `x` (row-major, `index.d()` wide): its `k` nearest centres
/// by exact Euclidean distance, ascending, ties to the lower index.
/// Writes `idx[i·k + t]` and the distance (not squared) `dist[i·k + t]`.
pub fn knn(
    x: &[f32],
    index: &CentroidIndex,
    k: usize,
    idx: &mut [u32],
    dist: &mut [f32],
    device: Device,
) -> Result<(), KernelError> {
    check(x, index, k)?;
    let (d, n) = (index.d, x.len() / index.d);
    assert!(idx.len() == n * k && dist.len() == n * k, "output buffers sized n·k");
    let c = index.centres();
    if device == Device::Cuda {
        // Each GPU block's candidates re-ranked on the CPU while the GPU
        // searches the next block.
        let cap = (k + RERANK_EXTRA).min(index.len());
        return index_search_each(x, index, cap, None, |row0, block| {
            let gpu::Block::Candidates(cands) = block else { unreachable!("no gather asked for") };
            let b = cands.len() / cap;
            let rows = rerank_rows(b);
            let tasks = x[row0 * d..(row0 + b) * d]
                .chunks(rows * d)
                .zip(idx[row0 * k..(row0 + b) * k].chunks_mut(rows * k))
                .zip(dist[row0 * k..(row0 + b) * k].chunks_mut(rows * k))
                .zip(cands.chunks(rows * cap))
                .map(|(((xb, idx), dist), cb)| (xb, &c, Neighbours { k, idx, dist }, cb))
                .collect();
            rerank_tasks(tasks, k, cap);
        });
    }
    let rows = knn_task_rows(n, index.len());
    let bound = index.bound(k);
    let tasks = x
        .chunks(rows * d)
        .zip(idx.chunks_mut(rows * k).zip(dist.chunks_mut(rows * k)))
        .map(|(xb, (idx, dist))| (xb, &c, bound.as_deref(), Neighbours { k, idx, dist }))
        .collect();
    run_tasks(tasks, k, rows < TASK_ROWS);
    Ok(())
}

/// `out` row i = x_i + Σ_j w_j·D_j over the `k` nearest centres j of x_i,
/// with w_j = (1 / max(dist_j, 1e-3)) / Σ (1 / max(dist, 1e-3)) and dist the
/// Euclidean distance. Weights in float64, the sum in float32.
pub fn interpolate(x: &[f32], index: &CentroidIndex, k: usize, out: &mut [f32], device: Device) -> Result<(), KernelError> {
    check_interpolable(x, index, k)?;
    assert_eq!(out.len(), x.len(), "output buffer sized like the input");
    run_interpolation(vec![(x, index, out)], k, device)
}

/// Interpolate several (rows, index, out) parts as one pool of fixed
/// `TASK_ROWS`-row tasks, so many small batches still fill every core.
/// Parts are checked by the caller.
fn run_interpolation(parts: Vec<(&[f32], &CentroidIndex, &mut [f32])>, k: usize, device: Device) -> Result<(), KernelError> {
    let centres: Vec<Centres<'_>> = parts.iter().map(|p| p.1.centres()).collect();
    if device == Device::Cuda {
        // One GPU search per part (its own centres); each GPU block's exact
        // re-rank and gather run on the CPU while the GPU searches the next.
        for ((x, index, out), c) in parts.into_iter().zip(&centres) {
            let d = index.d;
            let cap = (k + RERANK_EXTRA).min(index.len());
            let displacement = index.displacement.as_deref().expect("checked: the index has displacements");
            index_search_each(x, index, cap, Some(k), |row0, block| match block {
                // The GPU re-ranked and gathered (the same bits): copy out.
                gpu::Block::Moved(y) => {
                    let pieces: Vec<_> = out[row0 * d..row0 * d + y.len()].chunks_mut(1 << 18).zip(y.chunks(1 << 18)).collect();
                    super::scoped_for_each(pieces, |(o, y)| o.copy_from_slice(y));
                },
                gpu::Block::Candidates(cands) => {
                    let b = cands.len() / cap;
                    let rows = rerank_rows(b);
                    let tasks = x[row0 * d..(row0 + b) * d]
                        .chunks(rows * d)
                        .zip(out[row0 * d..(row0 + b) * d].chunks_mut(rows * d))
                        .zip(cands.chunks(rows * cap))
                        .map(|((xb, out), cb)| (xb, c, Interpolated { d, displacement, out, w: Vec::with_capacity(k) }, cb))
                        .collect();
                    rerank_tasks(tasks, k, cap);
                },
            })?;
        }
        return Ok(());
    }
    let bounds: Vec<_> = parts.iter().map(|p| p.1.bound(k)).collect();
    let mut tasks = Vec::new();
    for (((x, index, out), c), bound) in parts.into_iter().zip(&centres).zip(&bounds) {
        let d = index.d;
        let displacement = index.displacement.as_deref().expect("checked: the index has displacements");
        for (xb, out) in x.chunks(TASK_ROWS * d).zip(out.chunks_mut(TASK_ROWS * d)) {
            tasks.push((xb, c, bound.as_deref(), Interpolated { d, displacement, out, w: Vec::with_capacity(k) }));
        }
    }
    run_tasks(tasks, k, false);
    Ok(())
}

/// `interpolate` where row i searches `indexes[group[i]]` only (a cell's own
/// batch). Rows are gathered group by group into one contiguous buffer, run
/// as one pool of tasks, and scattered back.
pub fn interpolate_grouped(
    x: &[f32],
    d: usize,
    group: &[u32],
    indexes: &[&CentroidIndex],
    k: usize,
    out: &mut [f32],
    device: Device,
) -> Result<(), KernelError> {
    if x.len() != group.len() * d || out.len() != x.len() {
        return Err(KernelError::Shape { what: "rows × width", expected: group.len() * d, got: x.len() });
    }
    if let Some(ix) = indexes.iter().find(|ix| ix.d != d) {
        return Err(KernelError::Shape { what: "centroid width", expected: d, got: ix.d });
    }
    // Checked here, before gathering, so the error names the caller's row.
    check_finite(x, d)?;
    if let Some(&g) = group.iter().find(|&&g| g as usize >= indexes.len()) {
        return Err(KernelError::Invalid(format!("group {g} has no index ({} indexes)", indexes.len())));
    }
    // The common case in a stream of one batch per file: nothing to gather.
    if let Some(&g0) = group.first() {
        if group.iter().all(|&g| g == g0) {
            return interpolate(x, indexes[g0 as usize], k, out, device);
        }
    }
    let mut rows_of: Vec<Vec<usize>> = vec![Vec::new(); indexes.len()];
    for (i, &g) in group.iter().enumerate() {
        rows_of[g as usize].push(i);
    }
    let used: Vec<usize> = (0..indexes.len()).filter(|&g| !rows_of[g].is_empty()).collect();
    for &g in &used {
        check_interpolable(&[], indexes[g], k)?;
    }
    let mut xs = Vec::with_capacity(x.len());
    for &g in &used {
        for &i in &rows_of[g] {
            xs.extend_from_slice(&x[i * d..(i + 1) * d]);
        }
    }
    let mut ys = vec![0f32; xs.len()];
    let mut parts = Vec::with_capacity(used.len());
    let (mut xr, mut yr): (&[f32], &mut [f32]) = (&xs, &mut ys);
    for &g in &used {
        let len = rows_of[g].len() * d;
        let (xh, xt) = xr.split_at(len);
        let (yh, yt) = std::mem::take(&mut yr).split_at_mut(len);
        parts.push((xh, indexes[g], yh));
        (xr, yr) = (xt, yt);
    }
    run_interpolation(parts, k, device)?;
    let mut t = 0;
    for &g in &used {
        for &i in &rows_of[g] {
            out[i * d..(i + 1) * d].copy_from_slice(&ys[t * d..(t + 1) * d]);
            t += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::device::for_each_device;
    use crate::kernels::rng::Rng;

    fn random(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n * d).map(|_| (r.uniform() * 4.0 - 2.0) as f32).collect()
    }

    /// Exact brute force in float64, ties to the lower index.
    fn brute(x: &[f32], c: &[f32], d: usize, k: usize) -> Vec<Vec<(f64, u32)>> {
        x.chunks_exact(d)
            .map(|xi| {
                let mut all: Vec<(f64, u32)> =
                    c.chunks_exact(d).enumerate().map(|(j, cj)| (sq_dist_f64(xi, cj), j as u32)).collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                all.truncate(k);
                all
            })
            .collect()
    }

    #[test]
    fn knn_matches_brute_force() {
        for_each_device(|dev| {
            for &(n, kc, d, k) in &[(1, 1, 1, 1), (300, 5000, 7, 8), (2000, 33, 50, 33), (700, 2049, 16, 5), (130, 40, 300, 1)] {
                let (x, c) = (random(n, d, 1), random(kc, d, 2));
                let index = CentroidIndex::new(c.clone(), None, d).unwrap();
                let (mut idx, mut dist) = (vec![0u32; n * k], vec![0f32; n * k]);
                knn(&x, &index, k, &mut idx, &mut dist, dev).unwrap();
                for (i, want) in brute(&x, &c, d, k).iter().enumerate() {
                    let got = &idx[i * k..(i + 1) * k];
                    let want_idx: Vec<u32> = want.iter().map(|p| p.1).collect();
                    assert_eq!(got, &want_idx[..], "{dev:?} n={n} kc={kc} d={d} k={k} row {i}");
                    for t in 0..k {
                        assert_eq!(dist[i * k + t], want[t].0.sqrt() as f32);
                    }
                }
            }
        });
    }

    /// `n` rows around `g` cluster means (the same means for every `seed`),
    /// spread falling as 1/√j per coordinate: a PCA embedding's shape, where
    /// the coordinate-subset bound applies.
    fn clustered(n: usize, d: usize, g: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(99);
        let means: Vec<f32> = (0..g * d).map(|i| ((r.uniform() * 8.0 - 4.0) / ((i % d + 1) as f64).sqrt()) as f32).collect();
        let mut r = Rng::new(seed);
        (0..n)
            .flat_map(|_| {
                let c = r.below(g);
                (0..d).map(|j| means[c * d + j] + ((r.uniform() - 0.5) / ((j + 1) as f64).sqrt()) as f32).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn pruned_search_is_exact() {
        // 3000 centres: two GEMM slabs; 1500: one (its GEMM output serves
        // both passes). Through the bound directly, whatever the probe would
        // choose.
        let (n, d) = (700, 64);
        let x = clustered(n, d, 60, 1);
        for (kc, k) in [(3000, 1), (3000, 8), (3000, 30), (1500, 8)] {
            let c = clustered(kc, d, 60, 2);
            let cs = Centres::new(&c, d);
            let s = Subset::of(&cs).expect("a subset for this shape");
            let (mut idx, mut dist) = (vec![0u32; n * k], vec![0f32; n * k]);
            search_pruned_serial(&x, &cs, &s, k, &mut Neighbours { k, idx: &mut idx, dist: &mut dist });
            for (i, want) in brute(&x, &c, d, k).iter().enumerate() {
                let want_idx: Vec<u32> = want.iter().map(|p| p.1).collect();
                assert_eq!(&idx[i * k..(i + 1) * k], &want_idx[..], "kc={kc} k={k} row {i}");
                for t in 0..k {
                    assert_eq!(dist[i * k + t], want[t].0.sqrt() as f32);
                }
            }
        }
        // The probe: 300 tight clusters of ~20 centres in 300 dimensions (k-means centroids
        // of a PCA embedding) keep the bound, and `knn` through it is exact;
        // centres scattered at random decline it.
        let kc = 6000;
        let (x, c) = (clustered(300, 300, 300, 3), clustered(kc, 300, 300, 4));
        let index = CentroidIndex::new(c.clone(), None, 300).unwrap();
        assert!(index.bound(8).is_some(), "the probe keeps the bound");
        let (mut idx, mut dist) = (vec![0u32; 300 * 8], vec![0f32; 300 * 8]);
        knn(&x, &index, 8, &mut idx, &mut dist, Device::Cpu).unwrap();
        for (i, want) in brute(&x, &c, 300, 8).iter().enumerate() {
            assert_eq!(idx[i * 8..(i + 1) * 8], want.iter().map(|p| p.1).collect::<Vec<_>>()[..], "row {i}");
        }
        assert!(CentroidIndex::new(random(kc, 300, 5), None, 300).unwrap().bound(8).is_none());
    }

    #[test]
    fn devices_agree_on_a_large_search() {
        // More rows than one GPU block of dots at this size, 2048 centres,
        // d = 50: the GPU's candidates re-ranked give the CPU's bits.
        let (n, kc, d, k) = (70_000, 2048, 50, 8);
        let (x, c, disp) = (random(n, d, 31), random(kc, d, 32), random(kc, d, 33));
        let index = CentroidIndex::new(c, Some(disp), d).unwrap();
        let mut want = vec![0f32; n * d];
        interpolate(&x, &index, k, &mut want, Device::Cpu).unwrap();
        for_each_device(|dev| {
            let mut got = vec![0f32; n * d];
            interpolate(&x, &index, k, &mut got, dev).unwrap();
            let differ = got.chunks(d).zip(want.chunks(d)).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{dev:?}: {differ} of {n} rows differ");
        });
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        // Centres 0 and 2 are the same point; 1 and 3 too.
        let c = vec![1.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 3.0, 9.0, 9.0];
        let index = CentroidIndex::new(c, None, 2).unwrap();
        for_each_device(|dev| {
            let (mut idx, mut dist) = (vec![0u32; 3], vec![0f32; 3]);
            knn(&[0.9, 0.1], &index, 3, &mut idx, &mut dist, dev).unwrap();
            assert_eq!(idx, vec![0, 2, 1], "{dev:?}");
        });
    }

    #[test]
    fn interpolation_is_the_formula() {
        let (n, kc, d, k) = (500, 300, 12, 8);
        let (x, c, disp) = (random(n, d, 5), random(kc, d, 6), random(kc, d, 7));
        let index = CentroidIndex::new(c.clone(), Some(disp.clone()), d).unwrap();
        for_each_device(|dev| {
            let mut out = vec![0f32; n * d];
            interpolate(&x, &index, k, &mut out, dev).unwrap();
            for (i, nb) in brute(&x, &c, d, k).iter().enumerate() {
                let w: Vec<f64> = nb.iter().map(|p| 1.0 / p.0.sqrt().max(MIN_DIST)).collect();
                let tot: f64 = w.iter().sum();
                for t in 0..d {
                    let want = x[i * d + t] as f64 + nb.iter().zip(&w).map(|(p, w)| w / tot * disp[p.1 as usize * d + t] as f64).sum::<f64>();
                    assert!((out[i * d + t] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{dev:?} row {i} dim {t}");
                }
            }
        });
        // A cell on a centroid takes (almost) only that centroid's displacement.
        let mut on = vec![0f32; d];
        interpolate(&c[..d], &index, k, &mut on, Device::Cpu).unwrap();
        let moved: Vec<f32> = on.iter().zip(&c[..d]).map(|(a, b)| a - b).collect();
        for (m, want) in moved.iter().zip(&disp[..d]) {
            assert!((m - want).abs() < 0.05, "{m} vs {want}");
        }
    }

    #[test]
    fn grouped_equals_one_group_at_a_time() {
        let (n, d, k) = (3000, 9, 4);
        let x = random(n, d, 8);
        let a = CentroidIndex::new(random(50, d, 9), Some(random(50, d, 10)), d).unwrap();
        let b = CentroidIndex::new(random(70, d, 11), Some(random(70, d, 12)), d).unwrap();
        let group: Vec<u32> = (0..n).map(|i| ((i * 7919) % 3 == 0) as u32).collect();
        for_each_device(|dev| {
            let mut out = vec![0f32; n * d];
            interpolate_grouped(&x, d, &group, &[&a, &b], k, &mut out, dev).unwrap();
            for (i, &g) in group.iter().enumerate() {
                let mut one = vec![0f32; d];
                interpolate(&x[i * d..(i + 1) * d], if g == 0 { &a } else { &b }, k, &mut one, Device::Cpu).unwrap();
                assert_eq!(&out[i * d..(i + 1) * d], &one[..], "{dev:?} row {i}");
            }
        });
    }

    #[test]
    fn same_bits_serial_and_parallel() {
        // Above PAR_ROWS rows the call splits across the pool.
        let (n, d, k) = (5 * PAR_ROWS + 17, 5, 3);
        let x = random(n, d, 13);
        let index = CentroidIndex::new(random(64, d, 14), Some(random(64, d, 15)), d).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![0f32; n * d];
            pool.install(|| interpolate(&x, &index, k, &mut out, Device::Cpu)).unwrap();
            out
        };
        let one = run(1);
        assert!(one == run(3));
        // And equal to calls on small pieces (a stream of morsels).
        let mut pieces = vec![0f32; n * d];
        for (xb, ob) in x.chunks(1000 * d).zip(pieces.chunks_mut(1000 * d)) {
            interpolate(xb, &index, k, ob, Device::Cpu).unwrap();
        }
        assert!(one == pieces);
    }

    #[test]
    fn bad_input() {
        let index = CentroidIndex::new(random(10, 3, 1), Some(random(10, 3, 2)), 3).unwrap();
        let mut out = vec![0f32; 6];
        let msg = |e: KernelError| e.to_string();
        assert!(msg(interpolate(&[0.0, 1.0, 2.0, 0.0, f32::NAN, 0.0], &index, 2, &mut out, Device::Cpu).unwrap_err()).contains("row 1"));
        assert!(msg(interpolate(&[0.0; 6], &index, 11, &mut out, Device::Cpu).unwrap_err()).contains("k = 11"));
        assert!(msg(interpolate(&[0.0; 6], &index, 0, &mut out, Device::Cpu).unwrap_err()).contains("k = 0"));
        assert!(CentroidIndex::new(vec![0.0, f32::INFINITY], None, 2).is_err());
        let e = CentroidIndex::new(vec![2e19, 0.0], None, 2).unwrap_err().to_string();
        assert!(e.contains("centroid 0 has a squared norm beyond float32"), "{e}");
        assert!(CentroidIndex::new(vec![0.0; 4], Some(vec![0.0; 2]), 2).is_err());
        let plain = CentroidIndex::new(vec![0.0; 4], None, 2).unwrap();
        assert!(interpolate(&[0.0; 2], &plain, 1, &mut [0.0; 2], Device::Cpu).is_err());
        // A non-finite value in a gathered group names the caller's row.
        let other = CentroidIndex::new(random(10, 3, 3), Some(random(10, 3, 4)), 3).unwrap();
        let x = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, f32::NAN, 0.0];
        let mut out = vec![0f32; 9];
        let e = interpolate_grouped(&x, 3, &[0, 1, 1], &[&index, &other], 2, &mut out, Device::Cpu).unwrap_err();
        assert!(msg(e).starts_with("row 2 holds"));
    }
}
