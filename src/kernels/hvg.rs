//! Per-gene statistics for `highly_variable_genes`, accumulated in streaming
//! passes, optionally per batch; the ranking itself works on these small
//! per-gene tables (Python side).
//!
//! - flavor "seurat" (Satija et al. 2015, as in scanpy): mean and variance of
//!   `expm1(x)` of log-normalised values ([`Transform::Expm1`]);
//! - flavor "seurat_v3" (Stuart et al. 2019, as in scanpy): mean and variance
//!   of the raw counts ([`Transform::Counts`]), then, once the loess gives each
//!   gene's expected deviation, a second pass of sums of the counts clipped at
//!   `mean + sqrt(n)·σ` ([`ClippedSums`]).

use super::SparseRow;

/// What the statistics are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone)]
pub struct GeneStats {
    pub transform: Transform,
    pub n_cells: u64,
    pub sum: Vec<f64>,   // (n_genes,)
    pub sumsq: Vec<f64>, // (n_genes,)
    pub nnz: Vec<u64>,   // (n_genes,) cells with a non-zero entry
    /// Entries that are not whole numbers ≥ 0 (seurat_v3 expects counts;
    /// scanpy's check counts -0.0 too).
    pub non_integer: u64,
}

impl GeneStats {
    pub fn new(n_genes: usize, transform: Transform) -> Self {
        GeneStats { transform, n_cells: 0, sum: vec![0.0; n_genes], sumsq: vec![0.0; n_genes], nnz: vec![0; n_genes], non_integer: 0 }
    }

    /// Add one cell. Rows must be validated against `n_genes` first
    /// (`validate_rows`).
    pub fn add(&mut self, row: SparseRow<'_>) {
        self.n_cells += 1;
        if self.transform != Transform::Expm1 {
            let exact = self.transform == Transform::Exact;
            for (&g, &v) in row.gene_idx.iter().zip(row.values) {
                // scanpy's sparse mean/var: float32 squares summed in float64.
                let g = g as usize;
                self.sum[g] += v as f64;
                self.sumsq[g] += if exact { v as f64 * v as f64 } else { (v * v) as f64 };
                self.nnz[g] += (v != 0.0) as u64;
                self.non_integer += (v.fract() != 0.0 || v.is_sign_negative()) as u64;
            }
            return;
        }
        for (&g, &v) in row.gene_idx.iter().zip(row.values) {
            // scanpy takes expm1 of the float32 matrix and squares it in
            // float32 (numba `value * value`), then sums in float64: do the
            // same, so only the summation order can differ from it. The
            // float32 expm1 itself is rounded correctly (computed in float64):
            // numpy's float32 expm1 is not, and differs by CPU (Intel SVML on
            // AVX-512 hosts, 2 ulp; glibc's expm1f elsewhere, 1 ulp).
            let e = (v as f64).exp_m1() as f32;
            let g = g as usize;
            self.sum[g] += e as f64;
            self.sumsq[g] += (e * e) as f64;
            self.nnz[g] += (v != 0.0) as u64;
        }
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

/// seurat_v3's second pass for one batch: Σ min(x, clip) and its square per
/// gene, in float64 as scanpy's `_sum_and_sum_squares_clipped`. Zeros add
/// nothing (clip values are ≥ the mean ≥ 0), so the sparse entries suffice.
#[derive(Debug, Clone)]
pub struct ClippedSums {
    pub clip: Vec<f64>,  // (n_genes,)
    pub sum: Vec<f64>,   // (n_genes,)
    pub sumsq: Vec<f64>, // (n_genes,)
}

impl ClippedSums {
    pub fn new(clip: Vec<f64>) -> Self {
        let n = clip.len();
        ClippedSums { clip, sum: vec![0.0; n], sumsq: vec![0.0; n] }
    }

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
