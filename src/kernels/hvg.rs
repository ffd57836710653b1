//! Per-gene statistics for `highly_variable_genes`, accumulated in streaming
//! passes, optionally per batch; the rankings on these small per-gene
//! tables are [`super::seurat`].
//!
//! - flavor "seurat" (Satija et al. 2015, as in scanpy): mean and variance of
//!   `expm1(x)` of log-normalised values ([`Transform::Expm1`]);
//! - flavor "seurat_v3" (Stuart et al. 2019, as in scanpy): mean and variance
//!   of the raw counts ([`Transform::Counts`]), then, once the loess gives each
//!   gene's expected deviation, a second pass of sums of the counts clipped at
//!   `mean + sqrt(n)·σ` ([`ClippedSums`]).

use rayon::prelude::*;

use super::SparseRow;

/// What the statistics are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Transform {
    /// `expm1(x)` of log-normalised values (flavor "seurat").
    Expm1,
    /// The values as they are: raw counts (flavor "seurat_v3"), squared in
    /// float32 as scanpy does.
    Counts,
    /// The values as they are, squared in float64: exact moments
    /// (`fit_pca(scale=True, max_value=...)`'s first pass, which must agree
    /// with the exact covariance of the unclipped scaled fit).
    Exact,
}

/// Running sums for one batch: n cells, Σ t(x) and Σ t(x)² per gene.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GeneStats {
    /// What t is: the transform applied to each value before it is summed.
    pub transform: Transform,
    /// Cells added so far.
    pub n_cells: u64,
    /// Σ t(x) per gene.
    pub sum: Vec<f64>,   // (n_genes,)
    /// Σ t(x)² per gene, each square taken in float32 except for
    /// [`Transform::Exact`].
    pub sumsq: Vec<f64>, // (n_genes,)
    /// Cells whose entry for the gene is non-zero (stored zeros do not
    /// count), per gene.
    pub nnz: Vec<u64>,   // (n_genes,) cells with a non-zero entry
    /// Entries that are not whole numbers ≥ 0 (seurat_v3 expects counts;
    /// scanpy's check counts -0.0 too).
    pub non_integer: u64,
}

impl GeneStats {
    /// Empty sums over `n_genes` genes, of values transformed by `transform`.
    pub fn new(n_genes: usize, transform: Transform) -> Self {
        GeneStats { transform, n_cells: 0, sum: vec![0.0; n_genes], sumsq: vec![0.0; n_genes], nnz: vec![0; n_genes], non_integer: 0 }
    }

    /// Add one cell. Rows must be validated against `n_genes` first
    /// (`validate_rows`).
    pub fn add(&mut self, row: SparseRow<'_>) {
        self.n_cells += 1;
        let GeneStats { transform, sum, sumsq, nnz, non_integer, .. } = self;
        *non_integer += add_entries(*transform, row.gene_idx, row.values, 0, Sums { sum, sumsq, nnz });
    }

    /// Add the sums of the rows that follow (same genes and transform,
    /// checked by the caller): each sum is this one's plus the later one's.
    pub fn merge(&mut self, later: &GeneStats) {
        self.n_cells += later.n_cells;
        self.non_integer += later.non_integer;
        add_into(&mut self.sum, &later.sum);
        add_into(&mut self.sumsq, &later.sumsq);
        self.nnz.iter_mut().zip(&later.nnz).for_each(|(a, b)| *a += b);
    }

    /// Mean and unbiased (ddof=1) variance per gene, computed like scanpy's
    /// `_get_mean_var`: `(E[x²] − E[x]²) · n/(n−1)`, uncorrected when n = 1.
    pub fn mean_var(&self) -> (Vec<f64>, Vec<f64>) {
        let n = self.n_cells as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let var = self
            .sumsq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| {
                let v = sq / n - m * m;
                if self.n_cells > 1 { v * (n / (n - 1.0)) } else { v }
            })
            .collect();
        (mean, var)
    }
}

/// One batch's sums over a range of genes (its first gene is the `first`
/// that [`add_entries`] is given).
struct Sums<'a> {
    sum: &'a mut [f64],
    sumsq: &'a mut [f64],
    nnz: &'a mut [u64],
}

/// Add one row's entries with genes in `first..first + sums.sum.len()` (the
/// row's other entries are skipped); the count of entries that are not
/// whole numbers ≥ 0 (0 for `Transform::Expm1`, which does not check).
#[inline]
fn add_entries(transform: Transform, gene_idx: &[u32], values: &[f32], first: usize, s: Sums<'_>) -> u64 {
    let end = first + s.sum.len();
    let start = if first == 0 { 0 } else { gene_idx.partition_point(|&g| (g as usize) < first) };
    let mut non_integer = 0;
    // A cell's log-normalised values repeat (every count of 1 gives the same
    // value; at Tahoe's density nearly all are 1): recent values' expm1 are
    // kept, by the value's low bits, and reused when the same bits return.
    let mut recent = [(f32::NAN.to_bits(), 0f32); 8]; // no value is NaN (validated)
    for (&g, &v) in gene_idx[start..].iter().zip(&values[start..]) {
        let g = g as usize;
        if g >= end {
            break;
        }
        let i = g - first;
        match transform {
            Transform::Expm1 => {
                // scanpy takes expm1 of the float32 matrix and squares it in
                // float32 (numba `value * value`), then sums in float64: do the
                // same, so only the summation order can differ from it. The
                // float32 expm1 itself is rounded correctly (computed in float64):
                // numpy's float32 expm1 is not, and differs by CPU (Intel SVML on
                // AVX-512 hosts, 2 ulp; glibc's expm1f elsewhere, 1 ulp).
                let slot = &mut recent[(v.to_bits() & 7) as usize];
                if slot.0 != v.to_bits() {
                    *slot = (v.to_bits(), (v as f64).exp_m1() as f32);
                }
                let e = slot.1;
                s.sum[i] += e as f64;
                s.sumsq[i] += (e * e) as f64;
            },
            // scanpy's sparse mean/var: float32 squares summed in float64.
            Transform::Counts | Transform::Exact => {
                s.sum[i] += v as f64;
                s.sumsq[i] += if transform == Transform::Exact { v as f64 * v as f64 } else { (v * v) as f64 };
                non_integer += (v.fract() != 0.0 || v.is_sign_negative()) as u64;
            },
        }
        s.nnz[i] += (v != 0.0) as u64;
    }
    if transform == Transform::Expm1 { 0 } else { non_integer }
}

/// Genes per range in [`add_rows`]: a range costs each row a binary search,
/// so ranges stay wide; several per thread balance genes of unequal density.
const GENE_RANGE_MIN: usize = 512;

/// Add `rows` to the statistics of their batches (`stats[batch[i]]` for row
/// `i`; all of one `Transform` and width), split over the current rayon
/// pool by gene range: each thread sums its own genes over all the rows in
/// row order, so every sum is the one row-by-row `add` gives, bit for bit,
/// whatever the thread count. Rows must be validated first.
pub fn add_rows(stats: &mut [&mut GeneStats], rows: &[SparseRow<'_>], batch: &[usize]) {
    debug_assert_eq!(rows.len(), batch.len());
    let Some(first) = stats.first() else { return };
    let (transform, n_genes, n_batches) = (first.transform, first.sum.len(), stats.len());
    for &b in batch {
        stats[b].n_cells += 1;
    }
    let parts = (4 * rayon::current_num_threads()).min(n_genes.div_ceil(GENE_RANGE_MIN)).max(1);
    let width = n_genes.div_ceil(parts).max(1);
    // views[p][b]: batch b's sums over gene range p.
    let mut views: Vec<Vec<Sums<'_>>> = (0..n_genes.div_ceil(width)).map(|_| Vec::with_capacity(n_batches)).collect();
    for st in stats.iter_mut() {
        let GeneStats { sum, sumsq, nnz, .. } = &mut **st;
        let chunks = sum.chunks_mut(width).zip(sumsq.chunks_mut(width)).zip(nnz.chunks_mut(width));
        for (view, ((sum, sumsq), nnz)) in views.iter_mut().zip(chunks) {
            view.push(Sums { sum, sumsq, nnz });
        }
    }
    let non_integer: Vec<Vec<u64>> = views
        .into_par_iter()
        .enumerate()
        .map(|(p, mut view)| {
            let mut bad = vec![0u64; n_batches];
            for (r, &b) in rows.iter().zip(batch) {
                let s = &mut view[b];
                let sums = Sums { sum: &mut *s.sum, sumsq: &mut *s.sumsq, nnz: &mut *s.nnz };
                bad[b] += add_entries(transform, r.gene_idx, r.values, p * width, sums);
            }
            bad
        })
        .collect();
    for part in non_integer {
        for (st, n) in stats.iter_mut().zip(part) {
            st.non_integer += n;
        }
    }
}

/// `a[i] += b[i]`: two partial sums of consecutive rows joined.
fn add_into(a: &mut [f64], b: &[f64]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}

/// seurat_v3's second pass for one batch: Σ min(x, clip) and its square per
/// gene, in float64 as scanpy's `_sum_and_sum_squares_clipped`. Zeros add
/// nothing (clip values are ≥ the mean ≥ 0), so the sparse entries suffice.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClippedSums {
    /// Each gene's clip value, `mean + sqrt(n)·σ` of its batch
    /// ([`super::seurat::v3_clip`]).
    pub clip: Vec<f64>,  // (n_genes,)
    /// Σ min(x, clip) per gene.
    pub sum: Vec<f64>,   // (n_genes,)
    /// Σ min(x, clip)² per gene.
    pub sumsq: Vec<f64>, // (n_genes,)
}

impl ClippedSums {
    /// Empty sums for the genes of `clip`, one clip value per gene.
    pub fn new(clip: Vec<f64>) -> Self {
        let n = clip.len();
        ClippedSums { clip, sum: vec![0.0; n], sumsq: vec![0.0; n] }
    }

    /// Add the sums of the rows that follow (same clip values, checked by
    /// the caller).
    pub fn merge(&mut self, later: &ClippedSums) {
        add_into(&mut self.sum, &later.sum);
        add_into(&mut self.sumsq, &later.sumsq);
    }

    /// Add one cell: each entry, clipped at its gene's value, to that gene's
    /// sums (cells are counted by [`GeneStats`]). Rows must be validated
    /// against the number of genes first.
    pub fn add(&mut self, row: SparseRow<'_>) {
        for (&g, &v) in row.gene_idx.iter().zip(row.values) {
            let g = g as usize;
            let e = (v as f64).min(self.clip[g]);
            self.sum[g] += e;
            self.sumsq[g] += e * e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Rows;
    use crate::kernels::SparseRow;

    #[test]
    fn mean_var_match_dense_two_pass() {
        let rows = Rows::random(40, 12, 0.4, 7);
        let mut st = GeneStats::new(12, Transform::Expm1);
        for r in rows.view() {
            st.add(r);
        }
        let d = rows.dense(12);
        let (mean, var) = st.mean_var();
        for g in 0..12 {
            let col: Vec<f64> = (0..40).map(|c| d[c * 12 + g].exp_m1() as f32 as f64).collect();
            let m = col.iter().sum::<f64>() / 40.0;
            let v = col.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 39.0;
            assert!((mean[g] - m).abs() <= 1e-12 * m.abs().max(1.0));
            // float32 squares (as scanpy) bound the agreement to ~1e-7 relative
            assert!((var[g] - v).abs() <= 1e-6 * v.abs().max(1.0), "gene {g}: {} vs {v}", var[g]);
        }
    }

    /// The gene-range split sums each gene over the rows in row order: the
    /// same bits as row-by-row `add`, for any thread count and any batches.
    #[test]
    fn add_rows_is_row_by_row_add_bit_for_bit() {
        let n_genes = 3 * GENE_RANGE_MIN + 77; // several ranges, the last one short
        let rows = Rows::random(300, n_genes, 0.03, 11);
        let view = rows.view();
        // Values that are not whole numbers too (non_integer per batch).
        let fractions: Vec<Vec<f32>> = rows.0.iter().map(|(_, v)| v.iter().map(|x| x * 0.37).collect()).collect();
        let odd: Vec<SparseRow<'_>> = view.iter().zip(&fractions).map(|(r, v)| SparseRow { gene_idx: r.gene_idx, values: v }).collect();
        let batch: Vec<usize> = (0..view.len()).map(|i| (i * 7 + i / 13) % 3).collect();
        for transform in [Transform::Expm1, Transform::Counts, Transform::Exact] {
            for input in [&view, &odd] {
                let mut want: Vec<GeneStats> = (0..3).map(|_| GeneStats::new(n_genes, transform)).collect();
                for (r, &b) in input.iter().zip(&batch) {
                    want[b].add(*r);
                }
                for threads in [1, 2, 3, 8] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut got: Vec<GeneStats> = (0..3).map(|_| GeneStats::new(n_genes, transform)).collect();
                    // Two calls: a stream of record batches.
                    let (a, b) = input.split_at(120);
                    pool.install(|| {
                        let mut refs: Vec<&mut GeneStats> = got.iter_mut().collect();
                        add_rows(&mut refs, a, &batch[..120]);
                        add_rows(&mut refs, b, &batch[120..]);
                    });
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(g.n_cells, w.n_cells);
                        assert_eq!(g.nnz, w.nnz);
                        assert_eq!(g.non_integer, w.non_integer);
                        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&g.sum), bits(&w.sum), "{transform:?}, {threads} threads");
                        assert_eq!(bits(&g.sumsq), bits(&w.sumsq), "{transform:?}, {threads} threads");
                    }
                }
                if transform != Transform::Expm1 {
                    assert!(want.iter().map(|w| w.non_integer).sum::<u64>() > 0 || std::ptr::eq(input, &view));
                }
            }
        }
    }

    /// The expm1 of recent values, reused: the same bits as computing each.
    #[test]
    fn reused_expm1_is_each_expm1() {
        let rows = Rows::random(200, 700, 0.3, 9); // whole counts 1..20: values repeat within a cell
        let logs: Vec<Vec<f32>> = rows.0.iter().map(|(_, v)| v.iter().map(|x| (x / 7.0).ln_1p()).collect()).collect();
        let (mut sum, mut sumsq) = (vec![0.0f64; 700], vec![0.0f64; 700]);
        let mut st = GeneStats::new(700, Transform::Expm1);
        for ((idx, _), v) in rows.0.iter().zip(&logs) {
            st.add(SparseRow { gene_idx: idx, values: v });
            for (&g, &x) in idx.iter().zip(v) {
                let e = (x as f64).exp_m1() as f32;
                sum[g as usize] += e as f64;
                sumsq[g as usize] += (e * e) as f64;
            }
        }
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&st.sum), bits(&sum));
        assert_eq!(bits(&st.sumsq), bits(&sumsq));
    }

    #[test]
    fn counts_and_clipped_sums_match_dense() {
        let rows = Rows::random(50, 9, 0.5, 3);
        let mut st = GeneStats::new(9, Transform::Counts);
        let clip: Vec<f64> = (0..9).map(|g| 0.5 + g as f64 * 0.3).collect();
        let mut cl = ClippedSums::new(clip.clone());
        for r in rows.view() {
            st.add(r);
            cl.add(r);
        }
        let d = rows.dense(9);
        let (mean, _) = st.mean_var();
        for g in 0..9 {
            let col: Vec<f64> = (0..50).map(|c| d[c * 9 + g]).collect();
            assert!((mean[g] - col.iter().sum::<f64>() / 50.0).abs() <= 1e-12);
            let e: Vec<f64> = col.iter().map(|x| x.min(clip[g])).collect();
            assert!((cl.sum[g] - e.iter().sum::<f64>()).abs() <= 1e-12 * cl.sum[g].max(1.0));
            assert!((cl.sumsq[g] - e.iter().map(|x| x * x).sum::<f64>()).abs() <= 1e-12 * cl.sumsq[g].max(1.0));
            assert!(e.iter().any(|&x| x == clip[g]) || col.iter().all(|&x| x < clip[g]));
        }
        // Rows::random's values are whole numbers; a fraction is counted.
        assert_eq!(st.non_integer, 0);
        st.add(SparseRow { gene_idx: &[1, 4], values: &[2.0, 0.5] });
        assert_eq!(st.non_integer, 1);
    }
}
