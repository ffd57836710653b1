//! Per-gene statistics for `highly_variable_genes` (flavor "seurat", Satija et
//! al. 2015, as in scanpy): the mean and variance of `expm1(x)` per gene,
//! accumulated in one streaming pass, optionally per batch. The dispersion
//! ranking itself works on these small per-gene tables (Python side).

use super::SparseRow;

/// Running sums for one batch: n cells, Σ expm1(x) and Σ expm1(x)² per gene.
#[derive(Debug, Clone)]
pub struct GeneStats {
    pub n_cells: u64,
    pub sum: Vec<f64>,   // (n_genes,)
    pub sumsq: Vec<f64>, // (n_genes,)
    pub nnz: Vec<u64>,   // (n_genes,) cells with a non-zero entry
}

impl GeneStats {
    pub fn new(n_genes: usize) -> Self {
        GeneStats { n_cells: 0, sum: vec![0.0; n_genes], sumsq: vec![0.0; n_genes], nnz: vec![0; n_genes] }
    }

    /// Add one cell of log-normalised values. Rows must be validated against
    /// `n_genes` first (`validate_rows`).
    pub fn add(&mut self, row: SparseRow<'_>) {
        self.n_cells += 1;
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
                if self.n_cells > 1 { v * n / (n - 1.0) } else { v }
            })
            .collect();
        (mean, var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Rows;

    #[test]
    fn mean_var_match_dense_two_pass() {
        let rows = Rows::random(40, 12, 0.4, 7);
        let mut st = GeneStats::new(12);
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
}
