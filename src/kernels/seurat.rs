//! scanpy's `highly_variable_genes` rankings on per-gene statistics
//! ([`super::hvg`]): flavor "seurat" on the mean and variance of `expm1(x)`,
//! one batch or several (Satija et al. 2015; scanpy's
//! `_highly_variable_genes_single_batch` and its `batch_key` combination),
//! and flavor "seurat_v3" on raw counts (Stuart et al. 2019; scanpy's
//! `_highly_variable_genes_seurat_v3`: a loess, then clipped counts).
//!
//! Rounding contract: every step is the numpy/pandas operation scanpy runs,
//! in its order — `np.linspace` edges (`i·step + lo`, the last `hi`),
//! `pd.cut`'s right-closed bins, pandas' groupby mean (Kahan-compensated sum)
//! and std (Welford, ddof=1), `np.nanmean` over batches as a sequential sum —
//! so a bin of identical dispersions has std exactly 0 and its genes NaN, as
//! in scanpy. `ln`, `ln_1p`, `log10` and `powf` are the platform libm's,
//! which numpy's may differ from by an ulp (5.5e-15 relative at most on the
//! generator's data, against the numpy version this replaced, with the same
//! genes selected); the ranking moves only where two genes tie to the ulp.

/// The cut-offs used when no `n_top_genes` is given.
#[derive(Debug, Clone, Copy)]
pub struct Cutoffs {
    /// A gene's `log1p` mean must be above this (default 0.0125).
    pub min_mean: f64,
    /// A gene's `log1p` mean must be below this (default 3).
    pub max_mean: f64,
    /// A gene's normalised dispersion, NaN counted as 0, must be above this
    /// (default 0.5).
    pub min_disp: f64,
    /// A gene's normalised dispersion must be below this (default ∞).
    pub max_disp: f64,
}

impl Default for Cutoffs {
    /// scanpy's.
    fn default() -> Self {
        Cutoffs { min_mean: 0.0125, max_mean: 3.0, min_disp: 0.5, max_disp: f64::INFINITY }
    }
}

/// One batch's ranking, per gene.
#[derive(Debug, Clone, PartialEq)]
pub struct Single {
    /// `log1p` of the mean.
    pub means: Vec<f64>,
    /// `ln(var / mean)` (NaN where it is 0).
    pub dispersions: Vec<f64>,
    /// (dispersion − its bin's mean) / its bin's std (ddof=1), the bins of
    /// equal width on `means`: 1 where the bin holds no other gene of defined
    /// dispersion, NaN where the dispersion is NaN or the bin's std is 0.
    pub dispersions_norm: Vec<f64>,
    /// Selected: the `n_top_genes` largest `dispersions_norm` (ties at the
    /// cut all kept), or, without `n_top_genes`, the genes within the
    /// [`Cutoffs`].
    pub highly_variable: Vec<bool>,
}

/// numpy's `nan_to_num`: NaN → 0, ±inf → ±f64::MAX.
fn nan_to_num(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(f64::MIN, f64::MAX)
    }
}

/// `np.linspace(lo, hi, n + 1)`.
fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let step = (hi - lo) / n as f64;
    let mut e: Vec<f64> = if step == 0.0 {
        (0..=n).map(|i| i as f64 / n as f64 * (hi - lo) + lo).collect()
    } else {
        (0..=n).map(|i| i as f64 * step + lo).collect()
    };
    e[n] = hi;
    e
}

/// Per-bin mean and std (ddof=1) of `x` with NaN skipped, as pandas'
/// groupby: a Kahan sum for the mean, Welford's update for the variance.
fn bin_mean_std(x: &[f64], bins: &[usize], n_bins: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut total, mut comp, mut count, mut mean, mut m2) = (vec![0.0; n_bins], vec![0.0; n_bins], vec![0.0; n_bins], vec![0.0; n_bins], vec![0.0; n_bins]);
    for (&v, &b) in x.iter().zip(bins) {
        if v.is_nan() {
            continue;
        }
        count[b] += 1.0;
        let y = v - comp[b];
        let t = total[b] + y;
        comp[b] = t - total[b] - y;
        if comp[b].is_nan() {
            comp[b] = 0.0;
        }
        total[b] = t;
        let old = mean[b];
        mean[b] += (v - old) / count[b];
        m2[b] += (v - mean[b]) * (v - old);
    }
    let avg = (0..n_bins).map(|b| if count[b] > 0.0 { total[b] / count[b] } else { f64::NAN }).collect();
    let std = (0..n_bins).map(|b| if count[b] > 1.0 { (m2[b] / (count[b] - 1.0)).sqrt() } else { f64::NAN }).collect();
    (avg, std)
}

/// scanpy's flavor="seurat" on one batch: `mean`, `var` of `expm1(x)` per gene.
pub fn seurat_single(mean: &[f64], var: &[f64], n_bins: usize, n_top_genes: Option<usize>, cut: &Cutoffs) -> Single {
    let n_bins = n_bins.max(1); // callers refuse 0; a kernel never panics on it
    let mean0: Vec<f64> = mean.iter().map(|&m| if m == 0.0 { 1e-12 } else { m }).collect();
    let dispersions: Vec<f64> = mean0
        .iter()
        .zip(var)
        .map(|(&m, &v)| {
            let d = v / m;
            if d == 0.0 {
                f64::NAN
            } else {
                d.ln()
            }
        })
        .collect();
    let means: Vec<f64> = mean0.iter().map(|m| m.ln_1p()).collect();
    // pandas.cut(means, n_bins): equal-width, right-closed bins, the lowest
    // edge pulled down by 0.1% of the range.
    let lo = means.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = means.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let edges = if lo == hi {
        let l = if lo != 0.0 { lo - 0.001 * lo.abs() } else { -0.001 };
        let h = if hi != 0.0 { hi + 0.001 * hi.abs() } else { 0.001 };
        linspace(l, h, n_bins)
    } else {
        let mut e = linspace(lo, hi, n_bins);
        e[0] -= (hi - lo) * 0.001;
        e
    };
    // searchsorted(side="left") − 1, clipped to the bins.
    let bins: Vec<usize> = means.iter().map(|&m| edges.partition_point(|&e| e < m).saturating_sub(1).min(n_bins - 1)).collect();
    let (mut avg, mut dev) = bin_mean_std(&dispersions, &bins, n_bins);
    // One gene in a bin (std undefined): scanpy sets its normalised dispersion to 1.
    for b in 0..n_bins {
        if dev[b].is_nan() {
            dev[b] = avg[b];
            avg[b] = 0.0;
        }
    }
    let norm: Vec<f64> = dispersions.iter().zip(&bins).map(|(&d, &b)| (d - avg[b]) / dev[b]).collect();
    let highly_variable = match n_top_genes {
        None => means
            .iter()
            .zip(&norm)
            .map(|(&m, &n)| {
                let n0 = nan_to_num(n);
                m > cut.min_mean && m < cut.max_mean && n0 > cut.min_disp && n0 < cut.max_disp
            })
            .collect(),
        Some(top) => {
            let mut finite: Vec<f64> = norm.iter().copied().filter(|v| !v.is_nan()).collect();
            finite.sort_by(|a, b| b.total_cmp(a));
            let n = top.min(finite.len());
            let cut = if n > 0 { finite[n - 1] } else { f64::INFINITY };
            // numpy: nan_to_num(norm, nan=-inf) >= cut, so an infinite
            // dispersion (clamped to f64::MAX) falls short of an infinite cut.
            norm.iter().map(|&v| if v.is_nan() { f64::NEG_INFINITY } else { nan_to_num(v) } >= cut).collect()
        },
    };
    Single { means, dispersions, dispersions_norm: norm, highly_variable }
}

/// The ranking over batches, per gene (scanpy's `batch_key` path).
#[derive(Debug, Clone, PartialEq)]
pub struct Batched {
    /// Mean over batches of the batches' `means` (0 in a batch that does not
    /// express the gene).
    pub means: Vec<f64>,
    /// Mean over batches of the batches' `dispersions`, NaN skipped (0 in a
    /// batch that does not express the gene).
    pub dispersions: Vec<f64>,
    /// Mean over batches of the batches' `dispersions_norm`, NaN skipped;
    /// without `n_top_genes`, a NaN left is then set to 0 (as scanpy).
    pub dispersions_norm: Vec<f64>,
    /// Selected: the `n_top_genes` first by `nbatches` then
    /// `dispersions_norm`, both descending, or, without `n_top_genes`, the
    /// genes within the [`Cutoffs`].
    pub highly_variable: Vec<bool>,
    /// Number of batches in which the gene is highly variable (scanpy's
    /// `highly_variable_nbatches`).
    pub nbatches: Vec<i64>,
    /// Highly variable in every batch (scanpy's
    /// `highly_variable_intersection`).
    pub intersection: Vec<bool>,
}

/// One batch's statistics: per gene mean, var and the cells expressing it.
pub struct BatchStats<'a> {
    /// Mean of `expm1(x)` per gene.
    pub mean: &'a [f64],
    /// Variance (ddof=1) of `expm1(x)` per gene.
    pub var: &'a [f64],
    /// Cells with a non-zero entry per gene: a gene at 0 is left out of
    /// this batch's ranking.
    pub nnz: &'a [u64],
}

/// Each batch ranked on the genes it expresses (the others count as not
/// variable there, 0 in its columns), then genes ranked by the number of
/// batches in which they are variable and their mean normalised dispersion
/// (NaN last, ties in gene order); without `n_top_genes`, the cut-offs on
/// the batch-mean statistics.
pub fn seurat_batched(batches: &[BatchStats<'_>], n_bins: usize, n_top_genes: Option<usize>, cut: &Cutoffs) -> Batched {
    let g = batches.first().map_or(0, |b| b.mean.len());
    let per: Vec<[Vec<f64>; 4]> = batches
        .iter()
        .map(|b| {
            let expressed: Vec<usize> = (0..g).filter(|&j| b.nnz[j] > 0).collect();
            let pick = |x: &[f64]| expressed.iter().map(|&j| x[j]).collect::<Vec<_>>();
            let s = seurat_single(&pick(b.mean), &pick(b.var), n_bins, n_top_genes, cut);
            let mut full = [vec![0.0; g], vec![0.0; g], vec![0.0; g], vec![0.0; g]];
            for (i, &j) in expressed.iter().enumerate() {
                full[0][j] = s.means[i];
                full[1][j] = s.dispersions[i];
                full[2][j] = s.dispersions_norm[i];
                full[3][j] = if s.highly_variable[i] { 1.0 } else { 0.0 };
            }
            full
        })
        .collect();
    // np.nanmean over batches (axis 0: a sum in batch order); all-NaN stays NaN.
    let nanmean = |k: usize| -> Vec<f64> {
        (0..g)
            .map(|j| {
                let (mut s, mut n) = (0.0, 0usize);
                for b in &per {
                    if !b[k][j].is_nan() {
                        s += b[k][j];
                        n += 1;
                    }
                }
                if n == 0 {
                    f64::NAN
                } else {
                    s / n as f64
                }
            })
            .collect()
    };
    let (means, dispersions, mut dispersions_norm) = (nanmean(0), nanmean(1), nanmean(2));
    let nbatches: Vec<i64> = (0..g).map(|j| per.iter().filter(|b| b[3][j] != 0.0).count() as i64).collect();
    let intersection: Vec<bool> = nbatches.iter().map(|&n| n as usize == batches.len()).collect();
    let highly_variable = match n_top_genes {
        None => {
            dispersions_norm.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0); // as scanpy (and Seurat)
            means
                .iter()
                .zip(&dispersions_norm)
                .map(|(&m, &d)| m > cut.min_mean && m < cut.max_mean && d > cut.min_disp && d < cut.max_disp)
                .collect()
        },
        Some(top) => {
            let mut order: Vec<usize> = (0..g).collect();
            // Descending by (nbatches, dispersions_norm), NaN last; stable.
            order.sort_by(|&a, &b| {
                nbatches[b].cmp(&nbatches[a]).then_with(|| match (dispersions_norm[a].is_nan(), dispersions_norm[b].is_nan()) {
                    (true, true) => std::cmp::Ordering::Equal,
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    (false, false) => dispersions_norm[b].partial_cmp(&dispersions_norm[a]).expect("not NaN"),
                })
            });
            let mut hv = vec![false; g];
            order.iter().take(top).for_each(|&j| hv[j] = true);
            hv
        },
    };
    Batched { means, dispersions, dispersions_norm, highly_variable, nbatches, intersection }
}

// ------------------------------------------------------------ seurat_v3

/// seurat_v3's expected standard deviation per gene of one batch
/// (scanpy's `_highly_variable_genes_seurat_v3`): the loess of `log10 var`
/// on `log10 mean` over the genes of non-zero variance, `sqrt(10^fit)`; a
/// constant gene gets `sqrt(10^0) = 1`.
pub fn v3_reg_std(mean: &[f64], var: &[f64], span: f64) -> Result<Vec<f64>, crate::KernelError> {
    let varying: Vec<usize> = (0..mean.len()).filter(|&j| var[j] > 0.0).collect();
    let x: Vec<f64> = varying.iter().map(|&j| mean[j].log10()).collect();
    let y: Vec<f64> = varying.iter().map(|&j| var[j].log10()).collect();
    let fit = super::loess::loess(&x, &y, span, 0.2)?;
    let mut est = vec![0.0; mean.len()];
    varying.iter().zip(fit).for_each(|(&j, f)| est[j] = f);
    Ok(est.iter().map(|&e| 10f64.powf(e).sqrt()).collect())
}

/// Counts above `mean + sqrt(n)·reg_std` are clipped there in the second pass.
pub fn v3_clip(n_cells: u64, mean: &[f64], reg_std: &[f64]) -> Vec<f64> {
    let root = (n_cells as f64).sqrt();
    reg_std.iter().zip(mean).map(|(&r, &m)| r * root + m).collect()
}

/// One batch of seurat_v3's second pass.
pub struct V3Batch<'a> {
    /// Cells in the batch.
    pub n_cells: u64,
    /// Mean of the raw counts per gene (the first pass).
    pub mean: &'a [f64],
    /// Expected standard deviation per gene ([`v3_reg_std`]).
    pub reg_std: &'a [f64],
    /// Σ min(x, clip) per gene ([`super::hvg::ClippedSums`]).
    pub sum: &'a [f64],
    /// Σ min(x, clip)² per gene.
    pub sumsq: &'a [f64],
}

/// seurat_v3's ranking per gene.
#[derive(Debug, Clone, PartialEq)]
pub struct V3 {
    /// The batches' mean normalised variance.
    pub variances_norm: Vec<f64>,
    /// The median over batches of the gene's rank (0 = most variable)
    /// where it is among the top `n_top_genes`; NaN where it is in none.
    pub rank: Vec<f32>,
    /// Number of batches that rank the gene among their top `n_top_genes`.
    pub nbatches: Vec<i64>,
    /// Selected: the `n_top_genes` first by `rank` (NaN last), then
    /// `nbatches` descending, then gene index.
    pub highly_variable: Vec<bool>,
}

/// Each batch's normalised variance of the clipped counts, ranked within
/// the batch (ties by gene index, NaN last, as numpy's stable argsort);
/// genes ordered by median rank (none last), then by the number of batches
/// that rank them in the top `n_top_genes`, then by index.
pub fn seurat_v3_rank(batches: &[V3Batch<'_>], n_top_genes: usize) -> V3 {
    let g = batches.first().map_or(0, |b| b.mean.len());
    // numpy's order of operations:
    // (1 / ((n − 1)·σ²)) · (n·μ² + Σx² − 2·Σx·μ).
    let norm: Vec<Vec<f64>> = batches
        .iter()
        .map(|b| {
            let n = b.n_cells as f64;
            (0..g).map(|j| (1.0 / ((n - 1.0) * (b.reg_std[j] * b.reg_std[j]))) * (n * (b.mean[j] * b.mean[j]) + b.sumsq[j] - 2.0 * b.sum[j] * b.mean[j])).collect()
        })
        .collect();
    let mut rank = vec![vec![f32::NAN; g]; batches.len()];
    let mut nbatches = vec![0i64; g];
    for (bi, v) in norm.iter().enumerate() {
        let mut order: Vec<usize> = (0..g).collect();
        // argsort(−v), stable: descending, NaN last.
        order.sort_by(|&a, &b| match (v[a].is_nan(), v[b].is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => v[b].partial_cmp(&v[a]).expect("not NaN"), // −0 ties +0, as numpy
        });
        for (r, &j) in order.iter().enumerate().take(n_top_genes) {
            rank[bi][j] = r as f32;
            nbatches[j] += 1;
        }
    }
    // np.nanmedian over batches: the middle value, or the mean of the middle two.
    let median: Vec<f32> = (0..g)
        .map(|j| {
            let mut r: Vec<f32> = rank.iter().map(|b| b[j]).filter(|x| !x.is_nan()).collect();
            r.sort_by(f32::total_cmp);
            match r.len() {
                0 => f32::NAN,
                n if n % 2 == 1 => r[n / 2],
                n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..g).collect();
    let key = |j: usize| if median[j].is_nan() { f32::INFINITY } else { median[j] };
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(nbatches[b].cmp(&nbatches[a])));
    let mut highly_variable = vec![false; g];
    order.iter().take(n_top_genes).for_each(|&j| highly_variable[j] = true);
    // norm_vars.mean(axis=0): a sum over batches in order, then the division.
    let variances_norm = (0..g).map(|j| norm.iter().map(|b| b[j]).sum::<f64>() / batches.len() as f64).collect();
    V3 { variances_norm, rank: median, nbatches, highly_variable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_is_numpys() {
        // np.linspace(0.013, 2.9, 21)[:6]: i·step + lo, where lo + (hi − lo)·i/n
        // differs in the last bit at 5 of the 21 edges.
        let e = linspace(0.013, 2.9, 20);
        assert_eq!(e[..6], [0.013, 0.15735000000000002, 0.3017, 0.44605000000000006, 0.5904, 0.73475]);
        assert_eq!(e[20], 2.9);
    }

    #[test]
    fn identical_dispersions_in_a_bin_give_nan_as_scanpy() {
        // The first bin holds two genes of the same dispersion: std exactly
        // 0, so 0/0; the second bin's single gene gets 1. (The old numpy
        // version's output on these numbers.)
        let s = seurat_single(&[1.0, 1.0, 5.0], &[2.0, 2.0, 3.0], 2, Some(1), &Cutoffs::default());
        assert!(s.dispersions_norm[0].is_nan() && s.dispersions_norm[1].is_nan());
        assert_eq!(s.dispersions_norm[2], 1.0);
        let ln2 = std::f64::consts::LN_2; // ln(2 / 1)
        assert_eq!(s.dispersions, [ln2, ln2, -0.5108256237659907]);
        assert_eq!(s.highly_variable, [false, false, true]);
    }

    #[test]
    fn top_genes_are_the_most_dispersed() {
        let mean: Vec<f64> = (0..40).map(|i| 1.0 + (i % 4) as f64).collect();
        let var: Vec<f64> = (0..40).map(|i| mean[i] * (1.0 + i as f64 / 10.0)).collect();
        let s = seurat_single(&mean, &var, 4, Some(5), &Cutoffs::default());
        assert_eq!(s.highly_variable.iter().filter(|&&h| h).count(), 5);
        // Within the bin of the highest means, the most dispersed genes win.
        assert!(s.highly_variable[39] && !s.highly_variable[3]);
    }
}
