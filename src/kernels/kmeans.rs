//! Weighted k-means: greedy k-means++ seeding (as scikit-learn's `KMeans`),
//! then Lloyd iterations whose assignment step is the blocked GEMM of
//! [`super::distance`].
//!
//! Where the centres differ mostly in a few coordinates (a PCA embedding's
//! leading components) both the seeding and the assignment bound distances
//! on those coordinates first (`distance::Subset`) and measure in full only
//! the centres the bound cannot rule out: exact, and 3–5× less work on the
//! benchmark's embeddings (`benches/results/kmeans.md`).
//!
//! Large inputs are fitted coarse to fine: seeding on `init_size` rows, a few
//! Lloyd iterations on nested random subsamples growing ×4, then Lloyd on every
//! row. Most centre movement happens early and a subsample estimates it as well
//! as the full data at a fraction of the GEMM work; the last stage still
//! assigns every row, so masses and inertia are exact for the returned centres.
//!
//! Determinism: every parallel loop runs over fixed blocks (independent of the
//! thread count), per-centre sums add their members in row order, and all
//! randomness comes from one seeded [`Rng`]. Same input and seed ⇒ same bits.

use rayon::prelude::*;

use super::distance::{nearest_from, sq_dist, sq_dist_f64, sq_dists_to, sq_norm, Centres, Subset, PRUNE_MIN_CENTRES, TASK_ROWS};
use super::rng::Rng;
use super::{gpu, Device};
use crate::error::KernelError;

/// Options of [`kmeans`].
#[derive(Debug, Clone)]
pub struct KMeansParams {
    /// Centres wanted; fewer come back when the input has fewer distinct rows.
    pub n_centroids: usize,
    /// Lloyd iterations on all rows (after the subsample stages).
    pub max_iter: usize,
    /// Stop when the summed squared centre shift of an iteration is at most
    /// `tol × mean per-feature variance` (scikit-learn's relative tolerance).
    pub tol: f64,
    /// Seed of every random draw: the k-means++ seeding and the subsample
    /// order.
    pub seed: u64,
    /// Rows seeded by k-means++ (default: all rows up to max(3·K, 10 000)).
    pub init_size: Option<usize>,
    /// Lloyd iterations on each intermediate subsample (0: go straight to all rows).
    pub warm_iter: usize,
    /// Where the assignment step's GEMM and arg-min run.
    pub device: Device,
}

impl KMeansParams {
    /// `n_centroids` centres with the defaults: scikit-learn's `max_iter`
    /// (300) and `tol` (1e-4), seed 0, the default `init_size`, 3 warm-up
    /// iterations per subsample, on the CPU.
    pub fn new(n_centroids: usize) -> Self {
        KMeansParams { n_centroids, max_iter: 300, tol: 1e-4, seed: 0, init_size: None, warm_iter: 3, device: Device::Cpu }
    }
}

/// What [`kmeans`] returns.
#[derive(Debug, Clone)]
pub struct KMeansFit {
    /// Width of the rows and centres.
    pub d: usize,
    /// (k, d) row-major; `k ≤ n_centroids`.
    pub centroids: Vec<f32>,
    /// Summed weight of the rows assigned to each centre (row count when unweighted).
    pub mass: Vec<f64>,
    /// The centre of each input row.
    pub labels: Vec<u32>,
    /// Σ wᵢ‖xᵢ − c(xᵢ)‖² for the returned centres and labels.
    pub inertia: f64,
    /// Inertia after each assignment of all rows, first to last; never increases.
    pub inertia_history: Vec<f64>,
    /// Lloyd iterations on all rows.
    pub n_iter: usize,
    /// The last iteration moved no label, or the centres moved at most `tol`
    /// (already scaled by the mean per-feature variance, as scikit-learn's).
    pub converged: bool,
}

impl KMeansFit {
    /// Number of centres returned (`k`, at most the `n_centroids` asked for).
    pub fn n_centroids(&self) -> usize {
        self.mass.len()
    }
}

/// Fit `params.n_centroids` centres to the rows of `x` (row-major, `d` wide),
/// each row weighted by `weights` (default 1).
pub fn kmeans(x: &[f32], d: usize, weights: Option<&[f64]>, params: &KMeansParams) -> Result<KMeansFit, KernelError> {
    let n = check_input(x, d, weights, params)?;
    params.device.check()?;
    let w: Vec<f64> = match weights {
        Some(w) => w.to_vec(),
        None => vec![1.0; n],
    };
    if n <= params.n_centroids {
        return Ok(distinct_rows(x, d, &w));
    }
    let mut rng = Rng::new(params.seed);
    // Seeding and warm-up use rows of positive weight only (a zero-weight row
    // can never be drawn nor move a centre); the last stage assigns every row.
    let mut order: Vec<u32> = (0..n as u32).filter(|&i| w[i as usize] > 0.0).collect();
    let n_pos = order.len();
    let init_size = params
        .init_size
        .unwrap_or(params.n_centroids.saturating_mul(3).max(10_000))
        .max(params.n_centroids)
        .min(n_pos);
    if init_size < n_pos {
        // A random order; stage s uses its first m_s rows.
        shuffle(&mut order, &mut rng);
    }
    let gather = |m: usize| -> (Vec<f32>, Vec<f64>) {
        let mut xs = Vec::with_capacity(m * d);
        let mut ws = Vec::with_capacity(m);
        for &i in &order[..m] {
            xs.extend_from_slice(&x[i as usize * d..(i as usize + 1) * d]);
            ws.push(w[i as usize]);
        }
        (xs, ws)
    };

    let (mut xs, mut ws) = gather(init_size);
    let mut centres = kmeans_plusplus(&xs, d, &ws, params.n_centroids, &mut rng);
    let tol = params.tol * mean_variance(x, d, &w);

    // Warm-up on nested subsamples ×4 (none when the seeding used every row).
    // Stages stop at half of the rows: a larger one costs nearly a full pass.
    let mut m = init_size;
    while m.saturating_mul(2) <= n_pos && params.warm_iter > 0 {
        if m > init_size {
            (xs, ws) = gather(m);
        }
        centres = lloyd(&xs, d, &ws, centres, params.warm_iter, tol, params.device)?.centroids;
        m = m.saturating_mul(4);
    }
    Ok(drop_unused(lloyd(x, d, &w, centres, params.max_iter, tol, params.device)?))
}

/// Remove centres no row is assigned to (left when the data have fewer
/// distinct rows than centres) and renumber the labels.
fn drop_unused(mut fit: KMeansFit) -> KMeansFit {
    let k = fit.mass.len();
    let mut used = vec![false; k];
    for &l in &fit.labels {
        used[l as usize] = true;
    }
    if used.iter().all(|&u| u) {
        return fit;
    }
    let d = fit.d;
    let mut new_id = vec![u32::MAX; k];
    let (mut centroids, mut mass) = (Vec::new(), Vec::new());
    for j in (0..k).filter(|&j| used[j]) {
        new_id[j] = mass.len() as u32;
        centroids.extend_from_slice(&fit.centroids[j * d..(j + 1) * d]);
        mass.push(fit.mass[j]);
    }
    fit.labels.iter_mut().for_each(|l| *l = new_id[*l as usize]);
    fit.centroids = centroids;
    fit.mass = mass;
    fit
}

fn check_input(x: &[f32], d: usize, weights: Option<&[f64]>, p: &KMeansParams) -> Result<usize, KernelError> {
    if d == 0 {
        return Err(KernelError::Invalid("the embedding has width 0".into()));
    }
    if !x.len().is_multiple_of(d) {
        return Err(KernelError::Shape { what: "embedding values (a multiple of the width)", expected: d, got: x.len() });
    }
    let n = x.len() / d;
    if n == 0 {
        return Err(KernelError::Invalid("k-means needs at least one row, got an empty input".into()));
    }
    if n >= u32::MAX as usize {
        return Err(KernelError::Invalid(format!("k-means takes at most {} rows, got {n}; sample first", u32::MAX - 1)));
    }
    if p.n_centroids == 0 {
        return Err(KernelError::Invalid("n_centroids must be at least 1, got 0".into()));
    }
    if p.max_iter == 0 {
        return Err(KernelError::Invalid("max_iter must be at least 1, got 0".into()));
    }
    if !(p.tol >= 0.0 && p.tol.is_finite()) {
        return Err(KernelError::Invalid(format!("tol must be a finite number ≥ 0, got {}", p.tol)));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::Invalid(format!(
            "row {} holds the non-finite value {}; k-means needs finite embeddings (drop or fix those rows)",
            i / d,
            x[i]
        )));
    }
    // Squared norms must stay finite in float32 (the GEMM expansion).
    if let Some(i) = x.iter().position(|v| v.abs() > 1e15) {
        return Err(KernelError::Invalid(format!(
            "row {} holds {}, beyond ±1e15: its squared distances overflow float32 (rescale the embedding)",
            i / d,
            x[i]
        )));
    }
    if let Some(w) = weights {
        if w.len() != n {
            return Err(KernelError::Shape { what: "weights (one per row)", expected: n, got: w.len() });
        }
        if let Some(i) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(KernelError::Invalid(format!(
                "weight {} at row {i}: weights must be finite and ≥ 0",
                w[i]
            )));
        }
        if w.iter().all(|&v| v == 0.0) {
            return Err(KernelError::Invalid("every weight is 0; at least one row needs a positive weight".into()));
        }
    }
    Ok(n)
}

/// `n ≤ K`: every distinct row is a centre (first occurrence order); equal rows
/// pool their weight. −0.0 and 0.0 count as equal.
fn distinct_rows(x: &[f32], d: usize, w: &[f64]) -> KMeansFit {
    let n = w.len();
    let key = |i: usize| -> Vec<u32> { x[i * d..(i + 1) * d].iter().map(|v| (v + 0.0).to_bits()).collect() };
    let mut by_key: Vec<usize> = (0..n).collect();
    by_key.sort_by_cached_key(|&i| (key(i), i));
    // first[i] = the first row equal to row i
    let mut first = vec![0usize; n];
    let mut g = 0;
    for (p, &i) in by_key.iter().enumerate() {
        if p == 0 || key(by_key[p - 1]) != key(i) {
            g = i;
        }
        first[i] = g;
    }
    let mut slot = vec![u32::MAX; n];
    let (mut centroids, mut mass, mut labels) = (Vec::new(), Vec::new(), Vec::with_capacity(n));
    for i in 0..n {
        let f = first[i];
        if slot[f] == u32::MAX {
            slot[f] = mass.len() as u32;
            centroids.extend_from_slice(&x[f * d..(f + 1) * d]);
            mass.push(0.0);
        }
        mass[slot[f] as usize] += w[i];
        labels.push(slot[f]);
    }
    KMeansFit { d, centroids, mass, labels, inertia: 0.0, inertia_history: vec![0.0], n_iter: 0, converged: true }
}

/// Fisher–Yates: a uniformly random permutation, in place.
fn shuffle(v: &mut [u32], rng: &mut Rng) {
    for i in 0..v.len().saturating_sub(1) {
        let j = i + rng.below(v.len() - i);
        v.swap(i, j);
    }
}

/// Weighted mean over features of the per-feature variance (scikit-learn's
/// scale for `tol`).
fn mean_variance(x: &[f32], d: usize, w: &[f64]) -> f64 {
    let wsum: f64 = w.iter().sum();
    let mut mean = vec![0f64; d];
    for (row, &wi) in x.chunks_exact(d).zip(w) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += wi * v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= wsum);
    let mut var = 0f64;
    for (row, &wi) in x.chunks_exact(d).zip(w) {
        var += wi * row.iter().zip(&mean).map(|(&v, m)| (v as f64 - m).powi(2)).sum::<f64>();
    }
    var / wsum / d as f64
}

/// Sum `f(block)` over fixed blocks of `TASK_ROWS` rows, in block order.
fn block_sum(n: usize, f: impl Fn(std::ops::Range<usize>) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> =
        (0..n.div_ceil(TASK_ROWS)).into_par_iter().map(|b| f(b * TASK_ROWS..((b + 1) * TASK_ROWS).min(n))).collect();
    parts.iter().sum()
}

/// Greedy k-means++ (Arthur & Vassilvitskii; scikit-learn's variant with
/// 2 + ⌊ln k⌋ candidates per step, keeping the one that lowers the potential
/// most). Stops early when every row already sits on a centre, so it never
/// returns two equal centres.
fn kmeans_plusplus(x: &[f32], d: usize, w: &[f64], k: usize, rng: &mut Rng) -> Vec<f32> {
    let n = w.len();
    let trials = 2 + (k as f64).ln() as usize;
    let mut cum = vec![0f64; n];
    // Fill `cum` with the running sum of `mass(i)`; return the total.
    let cumulate = |cum: &mut Vec<f64>, mass: &dyn Fn(usize) -> f64| -> f64 {
        let mut s = 0.0;
        for (i, c) in cum.iter_mut().enumerate() {
            s += mass(i);
            *c = s;
        }
        s
    };
    // A row drawn with probability ∝ its mass: the first row whose running
    // sum exceeds r, so never a row of mass 0.
    let draw = |cum: &[f64], total: f64, rng: &mut Rng| -> usize {
        let r = rng.uniform() * total;
        cum.partition_point(|&c| c <= r).min(n - 1)
    };
    let total = cumulate(&mut cum, &|i| w[i]);
    let first = draw(&cum, total, rng);
    let mut centres = x[first * d..(first + 1) * d].to_vec();
    let mut closest: Vec<f32> = x.chunks_exact(d).map(|r| sq_dist(r, &centres)).collect();
    let x_norms: Vec<f32> = x.chunks_exact(d).map(sq_norm).collect();
    // With many centres to seed, candidates' distances are bounded on a
    // subset of the coordinates first: a row whose partial distance to a
    // candidate is already beyond its closest centre keeps that distance
    // (distance::Subset), so after the first few steps almost no row needs
    // the full one.
    let subset = if k >= PRUNE_MIN_CENTRES { Subset::of_points(x, d) } else { None };
    let mut cand_dist = vec![0f32; trials * n];
    while centres.len() / d < k {
        let total = cumulate(&mut cum, &|i| w[i] * closest[i] as f64);
        if total <= 0.0 {
            break; // every row of positive weight sits on a centre
        }
        let cands: Vec<usize> = (0..trials).map(|_| draw(&cum, total, rng)).collect();
        let t = trials;
        // Distances of every row to the candidates (one skinny GEMM per
        // block), floored by `closest`, and each block's potential per
        // candidate; blocks summed in order. One pass: rayon's per-call cost
        // matters at 2048 steps.
        let cand_rows: Vec<f32> = cands.iter().flat_map(|&c| x[c * d..(c + 1) * d].iter().copied()).collect();
        let cand_norms: Vec<f32> = cands.iter().map(|&c| x_norms[c]).collect();
        let parts: Vec<Vec<f64>> = cand_dist[..t * n]
            .par_chunks_mut(TASK_ROWS * t)
            .enumerate()
            .map(|(b, o)| {
                let r = b * TASK_ROWS..(b * TASK_ROWS + o.len() / t);
                if let Some(s) = &subset {
                    return seed_block_pruned(x, d, s, &cands, &closest[r.clone()], &w[r.clone()], r.start, o);
                }
                sq_dists_to(&x[r.start * d..r.end * d], &x_norms[r.clone()], &cand_rows, &cand_norms, d, o);
                // The expansion leaves a rounding residue where a row equals a
                // candidate; recompute such near-zero distances exactly, so a
                // row already chosen has potential exactly 0 and is never drawn
                // again (no duplicate centres).
                for (i, o) in r.clone().zip(o.chunks_exact_mut(t)) {
                    for ((v, c), &c_norm) in o.iter_mut().zip(cand_rows.chunks_exact(d)).zip(&cand_norms) {
                        if *v <= (d as f32 + 8.0) * 2.4e-7 * (x_norms[i] + c_norm) {
                            *v = sq_dist(&x[i * d..(i + 1) * d], c);
                        }
                    }
                }
                let mut pot = vec![0f64; t];
                for ((o, &c), &wi) in o.chunks_exact_mut(t).zip(&closest[r.clone()]).zip(&w[r]) {
                    for (v, p) in o.iter_mut().zip(pot.iter_mut()) {
                        *v = v.min(c);
                        *p += wi * *v as f64;
                    }
                }
                pot
            })
            .collect();
        let pots: Vec<f64> = (0..t).map(|c| parts.iter().map(|p| p[c]).sum()).collect();
        let best = (0..t).fold(0, |b, c| if pots[c] < pots[b] { c } else { b });
        for (i, cl) in closest.iter_mut().enumerate() {
            *cl = cand_dist[i * t + best];
        }
        centres.extend_from_slice(&x[cands[best] * d..(cands[best] + 1) * d]);
    }
    centres
}

/// One block of rows (starting at row `start`) of a k-means++ step through the
/// subset bound: `o[i·t + c]` = min(distance of row i to candidate c,
/// closest[i]), the full (direct float32) distance computed only where the
/// partial one, less its rounding bound, is below `closest[i]`. Returns the
/// block's potential per candidate.
#[allow(clippy::too_many_arguments)]
fn seed_block_pruned(
    x: &[f32],
    d: usize,
    s: &Subset,
    cands: &[usize],
    closest: &[f32],
    w: &[f64],
    start: usize,
    o: &mut [f32],
) -> Vec<f64> {
    let (t, m) = (cands.len(), s.len());
    let rows = start..start + closest.len();
    let rel_d = 1.0 + (d as f32 + 8.0) * 2.4e-7;
    let cand_rows: Vec<f32> = cands.iter().flat_map(|&c| s.points()[c * m..(c + 1) * m].iter().copied()).collect();
    let cand_norms: Vec<f32> = cands.iter().map(|&c| s.norms()[c]).collect();
    sq_dists_to(&s.points()[rows.start * m..rows.end * m], &s.norms()[rows.clone()], &cand_rows, &cand_norms, m, o);
    let mut pot = vec![0f64; t];
    for ((i, o), (&cl, &wi)) in rows.zip(o.chunks_exact_mut(t)).zip(closest.iter().zip(w)) {
        for ((v, p), (&c, &cn)) in o.iter_mut().zip(pot.iter_mut()).zip(cands.iter().zip(&cand_norms)) {
            // Measured unless the partial distance (less its rounding) is at
            // least `cl` plus the direct distance's own rounding: then the
            // direct one could not come out below `cl` either.
            *v = if *v - s.rounding(s.norms()[i], cn) < cl * rel_d {
                sq_dist(&x[i * d..(i + 1) * d], &x[c * d..(c + 1) * d]).min(cl)
            } else {
                cl
            };
            *p += wi * *v as f64;
        }
    }
    pot
}

/// Lloyd iterations from `centres` on all rows of `x`; ends with an assignment
/// to the final centres.
fn lloyd(
    x: &[f32],
    d: usize,
    w: &[f64],
    mut centres: Vec<f32>,
    max_iter: usize,
    tol: f64,
    device: Device,
) -> Result<KMeansFit, KernelError> {
    let n = w.len();
    let mut labels = vec![u32::MAX; n];
    let mut dist = vec![0f64; n];
    let mut history = vec![assign(x, d, &centres, &mut labels, &mut dist, w, device)?];
    let (mut n_iter, mut converged) = (0, false);
    while n_iter < max_iter {
        let new = update(x, d, w, &labels, &dist, &centres);
        let shift: f64 = new.chunks_exact(d).zip(centres.chunks_exact(d)).map(|(a, b)| sq_dist_f64(a, b)).sum();
        centres = new;
        n_iter += 1;
        let before = labels.clone();
        history.push(assign(x, d, &centres, &mut labels, &mut dist, w, device)?);
        if labels == before || shift <= tol {
            converged = true;
            break;
        }
    }
    let k = centres.len() / d;
    let mut mass = vec![0f64; k];
    for (&l, &wi) in labels.iter().zip(w) {
        mass[l as usize] += wi;
    }
    let inertia = *history.last().expect("one assignment at least");
    Ok(KMeansFit { d, centroids: centres, mass, labels, inertia, inertia_history: history, n_iter, converged })
}

/// Assign every row to its nearest centre and return the inertia. A row keeps
/// its previous centre unless the new one is strictly nearer in exact
/// (float64) distance, so rounding in the GEMM never raises the inertia.
fn assign(
    x: &[f32],
    d: usize,
    centres: &[f32],
    labels: &mut [u32],
    dist: &mut [f64],
    w: &[f64],
    device: Device,
) -> Result<f64, KernelError> {
    let c = Centres::new(centres, d);
    let mut fresh = vec![0u32; labels.len()];
    match device {
        // The previous labels bound the search (distance::nearest_from).
        Device::Cpu => nearest_from(x, &c, Some(labels), &mut fresh),
        // Centres change every step: uploaded for this search only.
        Device::Cuda => fresh = gpu::candidates(x, &gpu::upload_centres(c.data, &c.norms, None, d)?, 1)?,
    }
    labels.par_chunks_mut(TASK_ROWS).zip(dist.par_chunks_mut(TASK_ROWS)).zip(fresh.par_chunks(TASK_ROWS)).enumerate().for_each(
        |(b, ((lb, db), fb))| {
            for (ii, ((l, dd), &f)) in lb.iter_mut().zip(db.iter_mut()).zip(fb).enumerate() {
                let row = &x[(b * TASK_ROWS + ii) * d..(b * TASK_ROWS + ii + 1) * d];
                let df = sq_dist_f64(row, c.row(f as usize));
                if *l == u32::MAX || *l == f {
                    (*l, *dd) = (f, df);
                } else {
                    let dl = sq_dist_f64(row, c.row(*l as usize));
                    if df < dl {
                        (*l, *dd) = (f, df);
                    } else {
                        *dd = dl;
                    }
                }
            }
        },
    );
    Ok(block_sum(labels.len(), |r| r.map(|i| w[i] * dist[i]).sum()))
}

/// Weighted means of each centre's rows (summed in row order, float64). A
/// centre left with no weight moves to the row farthest from its centre
/// (largest weighted distance; lowest row on ties), one row per empty centre,
/// as scikit-learn relocates empty clusters.
fn update(x: &[f32], d: usize, w: &[f64], labels: &[u32], dist: &[f64], old: &[f32]) -> Vec<f32> {
    let k = old.len() / d;
    // Counting sort of rows by centre: members of each centre in row order.
    let mut start = vec![0usize; k + 1];
    for &l in labels {
        start[l as usize + 1] += 1;
    }
    for j in 0..k {
        start[j + 1] += start[j];
    }
    let mut fill = start.clone();
    let mut members = vec![0u32; labels.len()];
    for (i, &l) in labels.iter().enumerate() {
        members[fill[l as usize]] = i as u32;
        fill[l as usize] += 1;
    }
    let mut centres = vec![0f32; k * d];
    let empty: Vec<bool> = centres
        .par_chunks_mut(d)
        .enumerate()
        .map(|(j, c)| {
            let mut sum = vec![0f64; d];
            let mut wsum = 0f64;
            for &i in &members[start[j]..start[j + 1]] {
                let wi = w[i as usize];
                if wi == 0.0 {
                    continue;
                }
                wsum += wi;
                for (s, &v) in sum.iter_mut().zip(&x[i as usize * d..(i as usize + 1) * d]) {
                    *s += wi * v as f64;
                }
            }
            for (o, s) in c.iter_mut().zip(&sum) {
                *o = (s / wsum) as f32;
            }
            wsum == 0.0
        })
        .collect();
    if empty.iter().any(|&e| e) {
        // Rows not sitting on their centre, farthest first; each used once.
        // An empty centre left without such a row stays where it was (and is
        // dropped at the end if still unused).
        let mut far: Vec<usize> = (0..labels.len()).filter(|&i| w[i] > 0.0 && dist[i] > 0.0).collect();
        far.sort_by(|&a, &b| (w[b] * dist[b]).total_cmp(&(w[a] * dist[a])).then(a.cmp(&b)));
        let mut far = far.into_iter();
        for j in (0..k).filter(|&j| empty[j]) {
            match far.next() {
                Some(i) => centres[j * d..(j + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]),
                None => centres[j * d..(j + 1) * d].copy_from_slice(&old[j * d..(j + 1) * d]),
            }
        }
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows around `g` well-separated centres in `d` dimensions.
    fn blobs(n: usize, d: usize, g: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        let centers: Vec<f32> = (0..g * d).map(|_| (r.uniform() * 20.0 - 10.0) as f32).collect();
        let mut x = Vec::with_capacity(n * d);
        for _ in 0..n {
            let c = r.below(g);
            for j in 0..d {
                // sum of uniforms: roughly normal noise
                let e = (r.uniform() + r.uniform() + r.uniform() - 1.5) as f32;
                x.push(centers[c * d + j] + e);
            }
        }
        x
    }

    #[test]
    fn inertia_never_increases_and_masses_sum() {
        let (n, d) = (6000, 8);
        let x = blobs(n, d, 40, 1);
        let mut p = KMeansParams::new(64);
        p.max_iter = 100;
        p.tol = 0.0;
        let fit = kmeans(&x, d, None, &p).unwrap();
        for w in fit.inertia_history.windows(2) {
            assert!(w[1] <= w[0], "inertia rose: {:?}", fit.inertia_history);
        }
        assert_eq!(fit.n_centroids(), 64);
        assert_eq!(fit.mass.iter().sum::<f64>(), n as f64);
        // labels are the nearest centres of the returned centroids
        let c = Centres::new(&fit.centroids, d);
        for i in (0..n).step_by(97) {
            let row = &x[i * d..(i + 1) * d];
            let mine = sq_dist_f64(row, c.row(fit.labels[i] as usize));
            let best = (0..64).map(|j| sq_dist_f64(row, c.row(j))).fold(f64::INFINITY, f64::min);
            assert!(mine <= best * (1.0 + 1e-5) + 1e-9);
        }
    }

    #[test]
    fn devices_agree() {
        // 40k rows in 30 blobs, 256 centres: warm-up stages and full Lloyd.
        // The GPU's float32 GEMM rounds differently, which can flip a label
        // whose two centres are within rounding of each other, so labels are
        // compared by agreement, inertia relatively.
        let (n, d) = (40_000, 20);
        let x = blobs(n, d, 30, 41);
        let mut p = KMeansParams::new(256);
        p.seed = 7;
        let cpu = kmeans(&x, d, None, &p).unwrap();
        crate::kernels::device::for_each_device(|dev| {
            p.device = dev;
            let got = kmeans(&x, d, None, &p).unwrap();
            let same = got.labels.iter().zip(&cpu.labels).filter(|(a, b)| a == b).count();
            assert!(same as f64 >= 0.999 * n as f64, "{dev:?}: {same} of {n} labels agree");
            assert!((got.inertia - cpu.inertia).abs() <= 1e-4 * cpu.inertia, "{dev:?}: {} vs {}", got.inertia, cpu.inertia);
            let hist = &got.inertia_history;
            assert!(hist.windows(2).all(|w| w[1] <= w[0]), "{dev:?}: inertia rose");
        });
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (n, d) = (40_000, 12);
        let x = blobs(n, d, 100, 2);
        let mut p = KMeansParams::new(300);
        p.seed = 9;
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| kmeans(&x, d, None, &p).unwrap())
        };
        let (a, b) = (run(1), run(3));
        assert_eq!(a.centroids, b.centroids);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.inertia.to_bits(), b.inertia.to_bits());
        let mut q = p.clone();
        q.seed = 10;
        assert_ne!(kmeans(&x, d, None, &q).unwrap().centroids, a.centroids);
    }

    #[test]
    fn weights_act_like_repeated_rows() {
        // Row i with weight 2 behaves as two copies of it in the means and the masses.
        let d = 2;
        let x = vec![0.0, 0.0, 1.0, 0.0, 10.0, 10.0, 11.0, 10.0, 10.0, 11.0];
        let w = vec![2.0, 1.0, 1.0, 1.0, 1.0];
        let mut p = KMeansParams::new(2);
        p.max_iter = 50;
        let fit = kmeans(&x, d, Some(&w), &p).unwrap();
        let mut got: Vec<(Vec<f32>, f64)> =
            fit.centroids.chunks(2).map(|c| c.to_vec()).zip(fit.mass.iter().copied()).collect();
        got.sort_by(|a, b| a.0[0].total_cmp(&b.0[0]));
        assert!((got[0].0[0] - 1.0 / 3.0).abs() < 1e-6 && got[0].0[1] == 0.0);
        assert_eq!(got[0].1, 3.0);
        assert!((got[1].0[0] - 31.0 / 3.0).abs() < 1e-5 && (got[1].0[1] - 31.0 / 3.0).abs() < 1e-5);
        assert_eq!(got[1].1, 3.0);
    }

    #[test]
    fn fewer_rows_or_distinct_rows_than_centres() {
        let d = 3;
        let x = vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, -0.0, 0.0, 5.0, 0.0, 0.0, 5.0];
        let fit = kmeans(&x, d, None, &KMeansParams::new(10)).unwrap();
        assert_eq!(fit.centroids, vec![1.0, 2.0, 3.0, -0.0, 0.0, 5.0]);
        assert_eq!(fit.mass, vec![2.0, 2.0]);
        assert_eq!(fit.labels, vec![0, 0, 1, 1]);
        // more rows than K but only 3 distinct values: 3 centres, never duplicates
        let x: Vec<f32> = (0..300).flat_map(|i| vec![(i % 3) as f32; 4]).collect();
        let fit = kmeans(&x, 4, None, &KMeansParams::new(8)).unwrap();
        assert_eq!(fit.n_centroids(), 3);
        assert_eq!(fit.inertia, 0.0);
        assert_eq!(fit.mass, vec![100.0; 3]);
    }

    #[test]
    fn few_distinct_float_rows_give_each_once() {
        // Non-integer values, where the GEMM expansion leaves rounding residue.
        let mut r = Rng::new(5);
        let d = 7;
        let distinct: Vec<f32> = (0..3 * d).map(|_| (r.uniform() * 3.0 - 1.7) as f32).collect();
        let x: Vec<f32> = (0..600).flat_map(|i| distinct[(i % 3) * d..(i % 3 + 1) * d].to_vec()).collect();
        for init_size in [None, Some(5)] {
            let mut p = KMeansParams::new(16);
            p.init_size = init_size;
            let fit = kmeans(&x, d, None, &p).unwrap();
            assert_eq!(fit.n_centroids(), 3, "{init_size:?}");
            assert_eq!(fit.mass, vec![200.0; 3]);
            let mut got: Vec<&[f32]> = fit.centroids.chunks(d).collect();
            let mut want: Vec<&[f32]> = distinct.chunks(d).collect();
            got.sort_by(|a, b| a[0].total_cmp(&b[0]));
            want.sort_by(|a, b| a[0].total_cmp(&b[0]));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn zero_weights_neither_seed_nor_move_centres() {
        let (n, d) = (20_000, 4);
        let x = blobs(n, d, 10, 6);
        // 1% of rows carry weight; the rest are assigned but weigh nothing.
        let w: Vec<f64> = (0..n).map(|i| if i % 100 == 0 { 1.0 } else { 0.0 }).collect();
        let mut p = KMeansParams::new(50);
        p.init_size = Some(1000);
        let fit = kmeans(&x, d, Some(&w), &p).unwrap();
        assert_eq!(fit.n_centroids(), 50);
        assert!(fit.centroids.iter().all(|v| v.is_finite()));
        assert_eq!(fit.mass.iter().sum::<f64>(), 200.0);
        // init_size below K is raised to K: still K centres
        let mut q = KMeansParams::new(300);
        q.init_size = Some(10);
        assert_eq!(kmeans(&x, d, None, &q).unwrap().n_centroids(), 300);
    }

    #[test]
    fn bad_input_is_an_error() {
        let p = KMeansParams::new(2);
        assert!(kmeans(&[], 2, None, &p).unwrap_err().to_string().contains("empty"));
        assert!(kmeans(&[1.0, f32::NAN, 0.0, 0.0], 2, None, &p).unwrap_err().to_string().contains("row 0"));
        assert!(kmeans(&[1.0, 2.0, 3.0], 2, None, &p).is_err());
        assert!(kmeans(&[1.0, 2.0], 2, None, &KMeansParams::new(0)).unwrap_err().to_string().contains("n_centroids"));
        assert!(kmeans(&[1.0, 2.0], 2, Some(&[-1.0]), &p).unwrap_err().to_string().contains("weight"));
        assert!(kmeans(&[1.0, 2.0], 2, Some(&[0.0]), &p).is_err());
        assert!(kmeans(&[1.0, 2e20], 2, None, &p).unwrap_err().to_string().contains("1e15"));
    }

    #[test]
    fn coarse_to_fine_stages_run_and_assign_every_row() {
        let (n, d) = (50_000, 5);
        let x = blobs(n, d, 30, 4);
        let mut p = KMeansParams::new(30);
        p.init_size = Some(1000);
        let fit = kmeans(&x, d, None, &p).unwrap();
        assert_eq!(fit.labels.len(), n);
        assert_eq!(fit.mass.iter().sum::<f64>(), n as f64);
        // 30 separated blobs with noise variance 0.25 per coordinate: inertia ≈ n·d·0.25.
        assert!(fit.inertia < 1.2 * n as f64 * d as f64 * 0.25, "{}", fit.inertia);
    }
}
