//! PCA of sparse cells, out of core: a float64 covariance accumulated in one
//! pass (`CovAccumulator`: products of float32 values are exact in float64,
//! sums are float64, then `(XᵀX − n·μμᵀ)/(n−1)`), its symmetric eigendecomposition (faer), and the
//! projection of sparse rows onto the axes (`pca_project`).
//!
//! The Gram matrix XᵀX is accumulated by scattering each cell's sparse outer
//! product into the lower triangle, tiled by output rows so a tile stays in L2
//! and each tile is owned by one thread. Every entry is summed in cell order,
//! so the result is bit-identical for any thread count and any batching of
//! the rows. The scatter does density² of a dense GEMM's flops (1% at 10%
//! density) at a lower rate per flop; `benches/kernels` (criterion,
//! `cov_accumulate`) times both on the same block.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::diag::Diag;
use faer::{Mat, Par};
use rayon::prelude::*;

use super::{Device, SparseRow};
use crate::error::KernelError;

/// Output rows of the Gram matrix per tile: 32 rows × 2000 genes × 8 B = 0.5 MB.
const TILE_ROWS: usize = 32;

/// Exact streaming covariance of sparse cells.
pub struct CovAccumulator {
    n_genes: usize,
    n_cells: u64,
    sum: Vec<f64>,  // (n_genes,)
    gram: Vec<f64>, // (n_genes, n_genes) row-major; lower triangle used (empty on the GPU)
    /// device='cuda': XᵀX accumulates on the GPU instead of in `gram`.
    on_gpu: Option<super::gpu::DeviceGram>,
}

/// A fitted PCA, in scikit-learn's conventions.
#[derive(Debug, Clone)]
pub struct PcaFit {
    /// Number of cells the PCA was fitted on.
    pub n_cells: u64,
    /// Each gene's mean over those cells (scikit-learn's `mean_`): the PCA's
    /// centre, before the scaling by `std` where there is one (a clipped
    /// fit's is the scaled genes' mean).
    pub mean: Vec<f64>,                     // (n_genes,)
    /// The axes, largest variance first, one per row, each signed as
    /// `svd_flip` (scikit-learn's `components_`).
    pub components: Mat<f64>,               // (n_comps, n_genes)
    /// The variance along each axis: the covariance's eigenvalues, clamped at 0.
    pub explained_variance: Vec<f64>,       // (n_comps,)
    /// Each axis's share of the total variance (0 when the total is 0).
    pub explained_variance_ratio: Vec<f64>, // (n_comps,)
    /// With `scale`: each gene's standard deviation (ddof=1; 1 where it is
    /// 0, as `sc.pp.scale`), the axes being those of the scaled genes.
    pub std: Option<Vec<f64>>,
}

/// A gene's standard deviation for scaling, as `sc.pp.scale`: `sqrt(var)`,
/// and 1 for a constant gene. A constant's variance from sums of squares is
/// rounding noise of either sign (`n·mean²` cancels `Σx²`), which scanpy
/// turns into NaN or a huge factor; here a variance within 1e-10·mean² of 0
/// is taken as 0.
pub fn scale_std(mean: f64, var: f64) -> f64 {
    if var <= 1e-10 * mean * mean || var <= 0.0 { 1.0 } else { var.sqrt() }
}

/// `sc.pp.scale(zero_center, max_value)`'s clipping as a map of each
/// non-zero count: `d = z(v) − z(0)`, with `z(v) = clip((v − μ)/σ, ±M)`
/// (zero-centred) or `min(v/σ, M)` (not). A cell's scaled row is then the
/// constant `z(0)` plus the sparse `d`; the constant drops out of every
/// covariance, so the PCA of the scaled, clipped cells is the PCA of the
/// sparse `d`, and the dense scaled matrix is never built.
#[derive(Debug, Clone)]
pub struct Clip {
    mean: Vec<f64>,
    std: Vec<f64>,
    max_value: f64,
    zero_center: bool,
    at_zero: Vec<f64>, // z(0) per gene
}

impl Clip {
    /// `mean`, `std` (n_genes,): the genes' moments (std > 0: 1 for a
    /// constant gene, as scanpy); `max_value` > 0.
    pub fn new(mean: Vec<f64>, std: Vec<f64>, max_value: f64, zero_center: bool) -> Result<Self, KernelError> {
        if mean.len() != std.len() {
            return Err(KernelError::Shape { what: "std (n_genes)", expected: mean.len(), got: std.len() });
        }
        if !(max_value > 0.0 && max_value.is_finite()) {
            return Err(KernelError::Invalid(format!("max_value must be a finite number > 0, got {max_value}")));
        }
        if let Some(x) = std.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
            return Err(KernelError::Invalid(format!("std holds {x}; each must be finite and > 0")));
        }
        if let Some(x) = mean.iter().find(|x| !x.is_finite()) {
            return Err(KernelError::Invalid(format!("mean holds {x}; each must be finite")));
        }
        let at_zero = mean.iter().zip(&std).map(|(m, s)| if zero_center { (-m / s).clamp(-max_value, max_value) } else { 0.0 }).collect();
        Ok(Clip { mean, std, max_value, zero_center, at_zero })
    }

    /// Number of genes it scales.
    pub fn n_genes(&self) -> usize {
        self.mean.len()
    }

    /// What it was built from: (mean, std, max_value, zero_center).
    pub fn parts(&self) -> (&[f64], &[f64], f64, bool) {
        (&self.mean, &self.std, self.max_value, self.zero_center)
    }

    /// z(0) per gene: the scaled value of a zero count.
    pub fn at_zero(&self) -> &[f64] {
        &self.at_zero
    }

    /// The mean of the scaled genes from the mean of their `d`: z = z(0) + d.
    pub fn scaled_mean(&self, mean_d: &[f64]) -> Vec<f64> {
        mean_d.iter().zip(&self.at_zero).map(|(m, z0)| m + z0).collect()
    }

    /// Every entry's `d`, rows concatenated (float32, as scanpy's scaled
    /// float32 matrix). Rows must be validated against `n_genes`.
    pub fn apply(&self, rows: &[SparseRow<'_>]) -> Vec<f32> {
        let m = self.max_value;
        let mut out = Vec::with_capacity(rows.iter().map(|r| r.values.len()).sum());
        for r in rows {
            out.extend(r.gene_idx.iter().zip(r.values).map(|(&g, &v)| {
                let g = g as usize;
                let z = if self.zero_center {
                    ((v as f64 - self.mean[g]) / self.std[g]).clamp(-m, m)
                } else {
                    (v as f64 / self.std[g]).min(m)
                };
                (z - self.at_zero[g]) as f32
            }));
        }
        out
    }

    /// `rows` with their values replaced by `values` (from [`apply`](Self::apply)).
    pub fn rows<'a>(rows: &[SparseRow<'a>], values: &'a [f32]) -> Vec<SparseRow<'a>> {
        let mut at = 0;
        rows.iter()
            .map(|r| {
                let v = &values[at..at + r.values.len()];
                at += r.values.len();
                SparseRow { gene_idx: r.gene_idx, values: v }
            })
            .collect()
    }
}

/// Cells per block of [`CovAccumulator::add`]: the tile starts of 2,048 cells
/// (64 starts for 2,000 genes in 32-gene tiles: 0.5 MB) stay in cache while the tiles read them.
const ROW_BLOCK: usize = 2048;

/// Add one cell's products to the Gram rows `lo..` held in `tile` (row-major,
/// `g` wide): for each of its entries `a0..a1` (genes in the tile), the
/// products with its entries up to and including `a` (the lower triangle).
/// Entries go two at a time, sharing the loads of the cell's other entries;
/// each Gram element still receives one product per cell, so the sums are
/// the same, bit for bit, as one entry at a time.
#[inline]
fn gram_tile_add(tile: &mut [f64], g: usize, lo: usize, r: &SparseRow<'_>, a0: usize, a1: usize) {
    let (idx, val) = (r.gene_idx, r.values);
    let mut a = a0;
    while a + 1 < a1 {
        let (i1, i2) = (idx[a] as usize - lo, idx[a + 1] as usize - lo); // i1 < i2: sorted
        let (head, rest) = tile.split_at_mut(i2 * g);
        let (o1, o2) = (&mut head[i1 * g..][..g], &mut rest[..g]);
        let (v1, v2) = (val[a] as f64, val[a + 1] as f64);
        // Products of two f32 are exact in f64; only the sum rounds.
        for (&j, &vb) in idx[..=a].iter().zip(&val[..=a]) {
            let (j, vb) = (j as usize, vb as f64);
            o1[j] += v1 * vb;
            o2[j] += v2 * vb;
        }
        o2[idx[a + 1] as usize] += v2 * v2;
        a += 2;
    }
    if a < a1 {
        let out = &mut tile[(idx[a] as usize - lo) * g..][..g];
        let va = val[a] as f64;
        for (&j, &vb) in idx[..=a].iter().zip(&val[..=a]) {
            out[j as usize] += va * vb as f64;
        }
    }
}

impl CovAccumulator {
    /// An empty accumulator for cells of `n_genes` genes, on the CPU.
    pub fn new(n_genes: usize) -> Result<Self, KernelError> {
        Self::with_device(n_genes, Device::Cpu)
    }

    /// `device = Cuda` accumulates XᵀX on the GPU: the same products, summed
    /// in a different order, so the covariance agrees with the CPU's to
    /// float64 rounding rather than bit for bit.
    pub fn with_device(n_genes: usize, device: Device) -> Result<Self, KernelError> {
        if n_genes == 0 {
            return Err(KernelError::Invalid("n_genes must be at least 1".into()));
        }
        let too_large = || KernelError::Invalid(format!("n_genes={n_genes} is too large for a dense covariance; select genes first"));
        let cells = n_genes.checked_mul(n_genes).filter(|c| c.checked_mul(8).is_some()).ok_or_else(too_large)?;
        device.check()?;
        let mut gram = Vec::new();
        if device == Device::Cpu {
            gram.try_reserve_exact(cells).map_err(|_| too_large())?;
            gram.resize(cells, 0.0);
        }
        Ok(CovAccumulator {
            n_genes,
            n_cells: 0,
            sum: vec![0.0; n_genes],
            gram,
            on_gpu: match device {
                Device::Cpu => None,
                Device::Cuda => Some(super::gpu::new_gram(n_genes)?),
            },
        })
    }

    /// Cells added so far.
    pub fn n_cells(&self) -> u64 {
        self.n_cells
    }

    /// Genes per cell: the covariance is n_genes × n_genes.
    pub fn n_genes(&self) -> usize {
        self.n_genes
    }

    /// XᵀX, full g × g row-major (lower triangle valid): the host copy, or
    /// a read of the GPU's, which stays where it is.
    fn gram_on_host(&self) -> Result<std::borrow::Cow<'_, [f64]>, KernelError> {
        Ok(match &self.on_gpu {
            Some(acc) => super::gpu::read_gram(acc)?.into(),
            None => (&self.gram[..]).into(),
        })
    }

    /// XᵀX's lower triangle, row by row (`g(g+1)/2` values): all a
    /// serialised accumulator needs to carry. A GPU-held state stays on the GPU.
    pub fn lower_triangle(&self) -> Result<Vec<f64>, KernelError> {
        let g = self.n_genes;
        let gram = self.gram_on_host()?;
        Ok((0..g).flat_map(|i| gram[i * g..=i * g + i].iter().copied()).collect())
    }

    /// The per-gene sums (see [`lower_triangle`](Self::lower_triangle)).
    pub fn sums(&self) -> &[f64] {
        &self.sum
    }

    /// An accumulator from its parts, on the CPU: `sum` (n_genes,), `lower`
    /// the lower triangle of XᵀX row by row.
    pub fn from_parts(n_genes: usize, n_cells: u64, sum: Vec<f64>, lower: &[f64]) -> Result<Self, KernelError> {
        if sum.len() != n_genes {
            return Err(KernelError::Shape { what: "sum (n_genes)", expected: n_genes, got: sum.len() });
        }
        if lower.len() != n_genes * (n_genes + 1) / 2 {
            return Err(KernelError::Shape { what: "lower triangle (n_genes·(n_genes+1)/2)", expected: n_genes * (n_genes + 1) / 2, got: lower.len() });
        }
        let mut acc = Self::new(n_genes)?;
        let mut at = 0;
        for i in 0..n_genes {
            acc.gram[i * n_genes..=i * n_genes + i].copy_from_slice(&lower[at..at + i + 1]);
            at += i + 1;
        }
        acc.n_cells = n_cells;
        acc.sum = sum;
        Ok(acc)
    }

    /// Add the sums of the rows that follow: each sum is this one's plus the
    /// later one's (one float64 addition per entry). The sum is formed on
    /// the host: a GPU-held state is read back first and goes on on the CPU
    /// (the GPU adds rows; states are merged once per partition). Nothing
    /// changes when it fails.
    pub fn merge(&mut self, later: &CovAccumulator) -> Result<(), KernelError> {
        if later.n_genes != self.n_genes {
            return Err(KernelError::Invalid(format!("cannot merge a covariance of {} genes into one of {}", later.n_genes, self.n_genes)));
        }
        let theirs = later.gram_on_host()?;
        if self.on_gpu.is_some() {
            // Read before dropping the device copy: a failed read keeps the state.
            let mine = self.gram_on_host()?.into_owned();
            self.gram = mine;
            self.on_gpu = None;
        }
        let g = self.n_genes;
        self.n_cells += later.n_cells;
        self.sum.iter_mut().zip(&later.sum).for_each(|(a, b)| *a += b);
        for i in 0..g {
            let row = i * g..=i * g + i;
            self.gram[row.clone()].iter_mut().zip(&theirs[row]).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Add validated rows (indices sorted and `< n_genes`). Fails only on
    /// the GPU (a CUDA error).
    pub fn add(&mut self, rows: &[SparseRow<'_>]) -> Result<(), KernelError> {
        let g = self.n_genes;
        if let Some(acc) = &mut self.on_gpu {
            super::gpu::add_gram(acc, rows)?;
        }
        self.n_cells += rows.len() as u64;
        for r in rows {
            for (&i, &v) in r.gene_idx.iter().zip(r.values) {
                self.sum[i as usize] += v as f64;
            }
        }
        if self.gram.is_empty() {
            return Ok(());
        }
        let n_tiles = g.div_ceil(TILE_ROWS);
        for block in rows.chunks(ROW_BLOCK) {
            // starts[k * (n_tiles + 1) + t]: row k's first entry in tile t or
            // later; one merge per row instead of a binary search per tile.
            let mut starts = vec![0u32; block.len() * (n_tiles + 1)];
            starts.par_chunks_mut(n_tiles + 1).zip(block).for_each(|(s, r)| {
                let mut a = 0;
                for (t, s) in s.iter_mut().enumerate() {
                    while a < r.gene_idx.len() && (r.gene_idx[a] as usize) < t * TILE_ROWS {
                        a += 1;
                    }
                    *s = a as u32;
                }
            });
            self.gram.par_chunks_mut(TILE_ROWS * g).enumerate().for_each(|(t, tile)| {
                let lo = t * TILE_ROWS;
                for (k, r) in block.iter().enumerate() {
                    let at = k * (n_tiles + 1) + t;
                    gram_tile_add(tile, g, lo, r, starts[at] as usize, starts[at + 1] as usize);
                }
            });
        }
        Ok(())
    }

    /// The unbiased (n−1) covariance matrix, full and symmetric.
    pub fn covariance(&self) -> Result<Mat<f64>, KernelError> {
        if self.n_cells < 2 {
            return Err(KernelError::Invalid(format!(
                "PCA needs at least 2 cells, got {}",
                self.n_cells
            )));
        }
        let g = self.n_genes;
        let n = self.n_cells as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let from_gpu = self.on_gpu.as_ref().map(super::gpu::read_gram).transpose()?;
        let gram = from_gpu.as_deref().unwrap_or(&self.gram);
        Ok(Mat::from_fn(g, g, |i, j| {
            let (i, j) = if i >= j { (i, j) } else { (j, i) };
            (gram[i * g + j] - n * mean[i] * mean[j]) / (n - 1.0)
        }))
    }

    /// Eigendecomposition of the covariance: the top `n_comps` axes, each
    /// signed so its largest-|loading| entry is positive (scikit-learn's
    /// `svd_flip(u_based_decision=False)`).
    pub fn fit(&self, n_comps: usize) -> Result<PcaFit, KernelError> {
        self.fit_with(n_comps, false)
    }

    /// Each gene's mean and standard deviation (ddof=1; 1 where it is 0, as
    /// `sc.pp.scale`): what [`Clip`] needs from a first pass.
    pub fn moments(&self) -> Result<(Vec<f64>, Vec<f64>), KernelError> {
        let cov = self.covariance()?;
        let n = self.n_cells as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let sd = (0..self.n_genes).map(|i| scale_std(mean[i], cov[(i, i)])).collect();
        Ok((mean, sd))
    }

    /// [`fit`](Self::fit), with `scale`: the PCA of the genes scaled to unit
    /// variance first (`sc.pp.scale(zero_center=True, max_value=None)` then
    /// PCA). Scaling is a congruence of the covariance, Σ' = D⁻¹ΣD⁻¹ with D
    /// the standard deviations, so it folds into the fit and the projection
    /// (components / σ) without a scaled copy of the data.
    pub fn fit_with(&self, n_comps: usize, scale: bool) -> Result<PcaFit, KernelError> {
        let g = self.n_genes;
        if n_comps == 0 || n_comps > g {
            return Err(KernelError::Invalid(format!(
                "n_comps must be between 1 and n_genes={g}, got {n_comps}"
            )));
        }
        let mut cov = self.covariance()?;
        let n = self.n_cells as f64;
        let std = scale.then(|| {
            let sd: Vec<f64> = (0..g).map(|i| scale_std(self.sum[i] / n, cov[(i, i)])).collect();
            for j in 0..g {
                for i in 0..g {
                    cov[(i, j)] /= sd[i] * sd[j];
                }
            }
            sd
        });
        let total_var: f64 = (0..g).map(|i| cov[(i, i)]).sum();
        // Sequential on purpose: faer's parallel EVD blocks by thread count,
        // which changes the last bits; the fit must not depend on it.
        let par = Par::Seq;
        let mut u = Mat::<f64>::zeros(g, g);
        let mut s = Diag::<f64>::zeros(g);
        let scratch = self_adjoint_evd_scratch::<f64>(g, ComputeEigenvectors::Yes, par, Default::default());
        self_adjoint_evd(
            cov.as_ref(),
            s.as_mut(),
            Some(u.as_mut()),
            par,
            MemStack::new(&mut MemBuffer::new(scratch)),
            Default::default(),
        )
        .map_err(|e| KernelError::Invalid(format!("eigendecomposition failed: {e:?}")))?;
        let s = s.column_vector();
        // faer returns ascending eigenvalues: take them from the end.
        let order: Vec<usize> = (0..n_comps).map(|k| g - 1 - k).collect();
        let mut components = Mat::<f64>::zeros(n_comps, g);
        for (k, &c) in order.iter().enumerate() {
            let col = u.col(c);
            let mut best = 0;
            for i in 1..g {
                if col[i].abs() > col[best].abs() {
                    best = i;
                }
            }
            let sign = if col[best] < 0.0 { -1.0 } else { 1.0 };
            for i in 0..g {
                components[(k, i)] = sign * col[i];
            }
        }
        // Rounding can make the smallest eigenvalues slightly negative.
        let explained_variance: Vec<f64> = order.iter().map(|&c| s[c].max(0.0)).collect();
        let explained_variance_ratio = explained_variance
            .iter()
            .map(|v| if total_var > 0.0 { v / total_var } else { 0.0 })
            .collect();
        let n = self.n_cells as f64;
        Ok(PcaFit {
            n_cells: self.n_cells,
            mean: self.sum.iter().map(|s| s / n).collect(),
            components,
            explained_variance,
            explained_variance_ratio,
            std,
        })
    }
}

impl PcaFit {
    /// `components` as a row-major (n_comps, n_genes) buffer.
    pub fn components_row_major(&self) -> Vec<f64> {
        let (k, g) = (self.components.nrows(), self.components.ncols());
        (0..k).flat_map(|r| (0..g).map(move |c| self.components[(r, c)])).collect()
    }
}

/// Projection operands in the layout the kernel wants: loadings gene-major so
/// each non-zero entry adds one contiguous row.
#[derive(Debug, Clone)]
pub struct PcaProjector {
    /// Genes the model was fitted on; rows must be validated against it.
    pub n_genes: usize,
    /// Components per projected row.
    pub n_comps: usize,
    loadings: Vec<f32>, // (n_genes, n_comps): componentsᵀ
    offset: Vec<f32>,   // (n_comps,): mean · componentsᵀ
    /// A model of clipped scaled genes: each entry becomes its `d` first.
    clip: Option<Clip>,
    /// The loadings on the GPU, uploaded on the first device='cuda' call and
    /// kept (the plugin's registry keeps the model for the process).
    on_gpu: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<super::gpu::DeviceLoadings>>>>,
}

impl PcaProjector {
    /// `mean` (n_genes,), `components` (n_comps, n_genes) row-major, and
    /// with a scaled fit `std` (n_genes,): ((x − μ)/σ)·v = (x − μ)·(v/σ),
    /// the scaling folded into the loadings.
    pub fn new(mean: &[f64], components: &[f64], n_comps: usize, std: Option<&[f64]>) -> Result<Self, KernelError> {
        let n_genes = mean.len();
        if n_comps == 0 || components.len() != n_comps * n_genes {
            return Err(KernelError::Shape { what: "components (n_comps × n_genes)", expected: n_comps * n_genes, got: components.len() });
        }
        if let Some(sd) = std {
            if sd.len() != n_genes {
                return Err(KernelError::Shape { what: "std (n_genes)", expected: n_genes, got: sd.len() });
            }
            if let Some(x) = sd.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                return Err(KernelError::Invalid(format!("the PCA model's std holds {x}; each must be finite and > 0; refit it")));
            }
        }
        if let Some(x) = mean.iter().chain(components).find(|x| !x.is_finite()) {
            return Err(KernelError::Invalid(format!("the PCA model holds a non-finite number {x}; refit it")));
        }
        let mut loadings = vec![0f32; n_genes * n_comps];
        let mut offset = vec![0f64; n_comps];
        for k in 0..n_comps {
            for g in 0..n_genes {
                let w = components[k * n_genes + g] / std.map_or(1.0, |sd| sd[g]);
                loadings[g * n_comps + k] = w as f32;
                offset[k] += mean[g] * w;
            }
        }
        Ok(PcaProjector { n_genes, n_comps, loadings, offset: offset.into_iter().map(|x| x as f32).collect(), clip: None, on_gpu: Default::default() })
    }

    /// A model fitted on `clip`ped scaled genes: `scaled_mean` is the PCA's
    /// centre among the scaled genes (scikit-learn's `mean_` of the scaled
    /// matrix), `components` its axes. A cell projects as `(z − scaled_mean)
    /// · componentsᵀ = (d − (scaled_mean − z(0))) · componentsᵀ`.
    pub fn clipped(scaled_mean: &[f64], components: &[f64], n_comps: usize, clip: Clip) -> Result<Self, KernelError> {
        if scaled_mean.len() != clip.n_genes() {
            return Err(KernelError::Shape { what: "the clip's genes", expected: scaled_mean.len(), got: clip.n_genes() });
        }
        let centre: Vec<f64> = scaled_mean.iter().zip(&clip.at_zero).map(|(m, z0)| m - z0).collect();
        let mut p = Self::new(&centre, components, n_comps, None)?;
        p.clip = Some(clip);
        Ok(p)
    }

    /// A model from its saved parts: `centre` is the PCA's centre (the
    /// scaled genes' mean for a clipped fit), `components` row-major
    /// `n_comps × n_genes`; `clip` = (the genes' means before scaling,
    /// max_value, zero_center) of a clipped scaled fit, which needs `std`.
    pub fn from_parts(centre: &[f64], components: &[f64], n_comps: usize, std: Option<&[f64]>, clip: Option<(&[f64], f64, bool)>) -> Result<Self, KernelError> {
        match (clip, std) {
            (Some((clip_mean, max_value, zero_center)), Some(std)) => {
                let clip = Clip::new(clip_mean.to_vec(), std.to_vec(), max_value, zero_center)?;
                Self::clipped(centre, components, n_comps, clip)
            },
            (Some(_), None) => Err(KernelError::Invalid("a clipped PCA model needs its std; reload it with PcaModel.load".into())),
            (None, std) => Self::new(centre, components, n_comps, std),
        }
    }

    /// The projector of a fit: its mean, components and, for a scaled fit, std.
    pub fn from_fit(fit: &PcaFit) -> Result<Self, KernelError> {
        Self::new(&fit.mean, &fit.components_row_major(), fit.components.nrows(), fit.std.as_deref())
    }
}

/// Project cells onto fitted axes: (x − mean) · componentsᵀ, with x sparse.
/// Rows must be validated against `p.n_genes`. Returns (n_rows, n_comps)
/// row-major. Both devices sum each output in entry order with the same
/// rounding, so they give the same bits.
pub fn pca_project(rows: &[SparseRow<'_>], p: &PcaProjector, device: Device) -> Result<Vec<f32>, KernelError> {
    if let Some(clip) = &p.clip {
        let d = clip.apply(rows);
        return project(&Clip::rows(rows, &d), p, device);
    }
    project(rows, p, device)
}

fn project(rows: &[SparseRow<'_>], p: &PcaProjector, device: Device) -> Result<Vec<f32>, KernelError> {
    let k = p.n_comps;
    if device == Device::Cuda {
        let on_gpu = {
            let mut slot = p.on_gpu.lock().map_err(|_| KernelError::Invalid("a GPU PCA model is poisoned by an earlier panic".into()))?;
            match &*slot {
                Some(m) => m.clone(),
                None => slot.insert(std::sync::Arc::new(super::gpu::upload_loadings(&p.loadings, &p.offset, k)?)).clone(),
            }
        };
        return super::gpu::project(rows, &on_gpu);
    }
    let mut out = vec![0f32; rows.len() * k];
    super::for_row_blocks(rows, &mut out, |_| k, |block, dst| {
        for (r, y) in block.iter().zip(dst.chunks_exact_mut(k)) {
            for (&g, &v) in r.gene_idx.iter().zip(r.values) {
                let w = &p.loadings[g as usize * k..][..k];
                for (yk, wk) in y.iter_mut().zip(w) {
                    *yk += v * wk;
                }
            }
            for (yk, ok) in y.iter_mut().zip(&p.offset) {
                *yk -= ok;
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::device::for_each_device;
    use crate::kernels::testing::Rows;

    /// The tiled, blocked, two-entries-at-a-time Gram is the plain
    /// row-by-row sum of products, bit for bit, for any thread count: across
    /// a row block boundary, a gene count that is not a whole number of
    /// tiles, and cells with odd and even entry counts in a tile.
    #[test]
    fn gram_is_the_row_order_sum_bit_for_bit() {
        let g = 2 * TILE_ROWS + 7;
        let rows = Rows::random(ROW_BLOCK + 300, g, 0.35, 5);
        let view = rows.view();
        let mut want = vec![0.0f64; g * g];
        for r in &view {
            for (a, (&i, &va)) in r.gene_idx.iter().zip(r.values).enumerate() {
                for (&j, &vb) in r.gene_idx[..=a].iter().zip(&r.values[..=a]) {
                    want[i as usize * g + j as usize] += va as f64 * vb as f64;
                }
            }
        }
        for threads in [1, 2, 5] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut acc = CovAccumulator::new(g).unwrap();
            pool.install(|| {
                let (a, b) = view.split_at(100); // b spans two row blocks
                acc.add(a).unwrap();
                acc.add(b).unwrap();
            });
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&acc.gram), bits(&want), "{threads} threads");
        }
    }

    fn dense_cov(d: &[f64], n: usize, g: usize) -> Vec<f64> {
        let mean: Vec<f64> = (0..g).map(|j| (0..n).map(|i| d[i * g + j]).sum::<f64>() / n as f64).collect();
        let mut c = vec![0.0; g * g];
        for a in 0..g {
            for b in 0..g {
                c[a * g + b] = (0..n).map(|i| (d[i * g + a] - mean[a]) * (d[i * g + b] - mean[b])).sum::<f64>() / (n - 1) as f64;
            }
        }
        c
    }

    #[test]
    fn covariance_matches_two_pass_dense() {
        let (n, g) = (80, 70); // 70 genes: three tiles, the last one partial
        let rows = Rows::random(n, g, 0.2, 3);
        let want = dense_cov(&rows.dense(g), n, g);
        for_each_device(|dev| {
            let mut acc = CovAccumulator::with_device(g, dev).unwrap();
            acc.add(&rows.view()[..33]).unwrap();
            acc.add(&rows.view()[33..]).unwrap();
            let cov = acc.covariance().unwrap();
            for a in 0..g {
                for b in 0..g {
                    assert!((cov[(a, b)] - want[a * g + b]).abs() < 1e-9, "{dev:?} ({a},{b})");
                }
            }
        });
    }

    #[test]
    fn both_devices_fit_the_same_axes() {
        // 3000 cells in uneven batches: several GPU calls into one Gram matrix.
        let (n, g, k) = (3000, 600, 10);
        let rows = Rows::random(n, g, 0.05, 21);
        let v = rows.view();
        let fit = |dev| {
            let mut acc = CovAccumulator::with_device(g, dev).unwrap();
            for c in v.chunks(777) {
                acc.add(c).unwrap();
            }
            acc.fit(k).unwrap()
        };
        let cpu = fit(Device::Cpu);
        for_each_device(|dev| {
            let got = fit(dev);
            for c in 0..k {
                let rel = (got.explained_variance[c] - cpu.explained_variance[c]).abs() / cpu.explained_variance[c];
                assert!(rel < 1e-10, "{dev:?} variance {c}: {rel}");
                for j in 0..g {
                    assert!((got.components[(c, j)] - cpu.components[(c, j)]).abs() < 1e-8, "{dev:?} axis {c} gene {j}");
                }
            }
        });
    }

    #[test]
    fn batching_and_threads_do_not_change_a_bit() {
        let rows = Rows::random(120, 90, 0.15, 5);
        let v = rows.view();
        let mut one = CovAccumulator::new(90).unwrap();
        one.add(&v).unwrap();
        let mut split = CovAccumulator::new(90).unwrap();
        for c in v.chunks(7) {
            split.add(c).unwrap();
        }
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut seq = CovAccumulator::new(90).unwrap();
        single.install(|| seq.add(&v)).unwrap();
        assert_eq!(one.gram, split.gram);
        assert_eq!(one.gram, seq.gram);
    }

    #[test]
    fn axes_are_eigenvectors_sorted_and_signed() {
        let (n, g) = (200, 20);
        let rows = Rows::random(n, g, 0.5, 9);
        let mut acc = CovAccumulator::new(g).unwrap();
        acc.add(&rows.view()).unwrap();
        let fit = acc.fit(5).unwrap();
        let cov = acc.covariance().unwrap();
        for k in 0..5 {
            let v: Vec<f64> = (0..g).map(|i| fit.components[(k, i)]).collect();
            let cv: Vec<f64> = (0..g).map(|i| (0..g).map(|j| cov[(i, j)] * v[j]).sum()).collect();
            for i in 0..g {
                assert!((cv[i] - fit.explained_variance[k] * v[i]).abs() < 1e-9);
            }
            let big = v.iter().cloned().fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            assert!(big > 0.0);
            if k > 0 {
                assert!(fit.explained_variance[k] <= fit.explained_variance[k - 1]);
            }
        }
        let trace: f64 = (0..g).map(|i| cov[(i, i)]).sum();
        for k in 0..5 {
            assert!((fit.explained_variance_ratio[k] - fit.explained_variance[k] / trace).abs() < 1e-12);
        }
    }

    #[test]
    fn projection_equals_dense_centered_product() {
        let (n, g, k) = (30, 25, 4);
        let rows = Rows::random(n, g, 0.3, 11);
        let mut acc = CovAccumulator::new(g).unwrap();
        acc.add(&rows.view()).unwrap();
        let fit = acc.fit(k).unwrap();
        let comps = fit.components_row_major();
        let p = PcaProjector::from_fit(&fit).unwrap();
        let cpu = pca_project(&rows.view(), &p, Device::Cpu).unwrap();
        let d = rows.dense(g);
        for i in 0..n {
            for c in 0..k {
                let want: f64 = (0..g).map(|j| (d[i * g + j] - fit.mean[j]) * comps[c * g + j]).sum();
                assert!((cpu[i * k + c] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
        }
        // The GPU sums in the same order with the same rounding: same bits,
        // also with more than 32 components (lanes loop) and empty rows.
        let big = Rows::random(5000, 300, 0.05, 12);
        let mut acc = CovAccumulator::new(300).unwrap();
        acc.add(&big.view()).unwrap();
        let p = PcaProjector::from_fit(&acc.fit(50).unwrap()).unwrap();
        let mut rows = big.view();
        rows.push(SparseRow::default());
        let want = pca_project(&rows, &p, Device::Cpu).unwrap();
        for_each_device(|dev| assert_eq!(pca_project(&rows, &p, dev).unwrap(), want, "{dev:?}"));
    }

    #[test]
    fn scaled_fit_is_the_pca_of_the_scaled_genes() {
        let (n, g, k) = (60, 12, 3);
        let mut rows = Rows::random(n, g, 0.4, 5);
        rows.0.iter_mut().for_each(|(i, v)| {
            // Gene 11 never expressed: σ = 0 is taken as 1, as sc.pp.scale.
            if i.last() == Some(&11) {
                i.pop();
                v.pop();
            }
        });
        let mut acc = CovAccumulator::new(g).unwrap();
        acc.add(&rows.view()).unwrap();
        let fit = acc.fit_with(k, true).unwrap();
        let sd = fit.std.clone().unwrap();
        assert_eq!(sd[11], 1.0);
        let d = rows.dense(g);
        let z: Vec<f64> = (0..n * g).map(|i| (d[i] - fit.mean[i % g]) / sd[i % g]).collect();
        // The scaled data's covariance: 1 on the diagonal (0 for gene 11).
        let cov = |a: usize, b: usize| (0..n).map(|r| z[r * g + a] * z[r * g + b]).sum::<f64>() / (n as f64 - 1.0);
        for a in 0..11 {
            assert!((cov(a, a) - 1.0).abs() < 1e-12);
        }
        for c in 0..k {
            let v: Vec<f64> = (0..g).map(|j| fit.components[(c, j)]).collect();
            for a in 0..g {
                let cv: f64 = (0..g).map(|b| cov(a, b) * v[b]).sum();
                assert!((cv - fit.explained_variance[c] * v[a]).abs() < 1e-9, "axis {c} gene {a}");
            }
            assert!((fit.explained_variance_ratio[c] - fit.explained_variance[c] / 11.0).abs() < 1e-12);
        }
        let p = PcaProjector::from_fit(&fit).unwrap();
        let out = pca_project(&rows.view(), &p, Device::Cpu).unwrap();
        for r in 0..n {
            for c in 0..k {
                let want: f64 = (0..g).map(|j| z[r * g + j] * fit.components[(c, j)]).sum();
                assert!((out[r * k + c] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
        }
    }

    #[test]
    fn clipped_fit_is_the_pca_of_the_clipped_scaled_genes() {
        let (n, g, k) = (80, 10, 3);
        let rows = Rows::random(n, g, 0.3, 9);
        let mut first = CovAccumulator::new(g).unwrap();
        first.add(&rows.view()).unwrap();
        let (mean, sd) = first.moments().unwrap();
        let d = rows.dense(g);
        for zero_center in [true, false] {
            // max_value 0.5 clips many entries, zeros included (z(0) ≈ -0.55).
            let clip = Clip::new(mean.clone(), sd.clone(), 0.5, zero_center).unwrap();
            let view = rows.view();
            let vals = clip.apply(&view);
            let mut second = CovAccumulator::new(g).unwrap();
            second.add(&Clip::rows(&view, &vals)).unwrap();
            let fit = second.fit(k).unwrap();
            // The dense clipped scaled matrix, as scanpy builds it.
            let z: Vec<f64> = (0..n * g)
                .map(|i| {
                    let (x, m, s) = (d[i], mean[i % g], sd[i % g]);
                    if zero_center { ((x - m) / s).clamp(-0.5, 0.5) } else if x == 0.0 { 0.0 } else { (x / s).min(0.5) }
                })
                .collect();
            assert!(z.contains(&0.5) && (!zero_center || z.iter().any(|&v| v == -0.5)));
            let zm: Vec<f64> = (0..g).map(|j| (0..n).map(|r| z[r * g + j]).sum::<f64>() / n as f64).collect();
            let cov = |a: usize, b: usize| (0..n).map(|r| (z[r * g + a] - zm[a]) * (z[r * g + b] - zm[b])).sum::<f64>() / (n as f64 - 1.0);
            for c in 0..k {
                for a in 0..g {
                    let cv: f64 = (0..g).map(|b| cov(a, b) * fit.components[(c, b)]).sum();
                    // d is float32, as scanpy's scaled matrix: agreement to its rounding.
                    assert!((cv - fit.explained_variance[c] * fit.components[(c, a)]).abs() < 1e-5, "zc={zero_center} axis {c}");
                }
            }
            let scaled_mean = clip.scaled_mean(&fit.mean);
            for j in 0..g {
                assert!((scaled_mean[j] - zm[j]).abs() < 1e-6);
            }
            let p = PcaProjector::clipped(&scaled_mean, &fit.components_row_major(), k, clip).unwrap();
            let out = pca_project(&view, &p, Device::Cpu).unwrap();
            for r in 0..n {
                for c in 0..k {
                    let want: f64 = (0..g).map(|j| (z[r * g + j] - zm[j]) * fit.components[(c, j)]).sum();
                    assert!((out[r * k + c] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
                }
            }
        }
        assert!(Clip::new(vec![0.0], vec![1.0], 0.0, true).is_err());
        // A constant gene's variance is rounding noise of either sign: std 1.
        assert_eq!(scale_std(0.1, -2.6e-17), 1.0);
        assert_eq!(scale_std(0.1, 3e-17), 1.0);
        assert_eq!(scale_std(0.0, 0.0), 1.0);
        assert_eq!(scale_std(2.0, 0.25), 0.5);
        assert!(Clip::new(vec![0.0], vec![0.0], 1.0, true).is_err());
    }

    #[test]
    fn parallel_projection_equals_serial() {
        let n = 4 * crate::kernels::PAR_BLOCK + 17;
        let rows: Vec<SparseRow<'_>> = (0..n)
            .map(|i| SparseRow { gene_idx: if i % 3 == 0 { &[0, 2] } else { &[1] }, values: if i % 3 == 0 { &[1.0, 3.0] } else { &[2.5] } })
            .collect();
        let mut acc = CovAccumulator::new(3).unwrap();
        acc.add(&rows[..1000]).unwrap();
        let p = PcaProjector::from_fit(&acc.fit(2).unwrap()).unwrap();
        let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let one = pool(1).install(|| pca_project(&rows, &p, Device::Cpu)).unwrap();
        let two = pool(2).install(|| pca_project(&rows, &p, Device::Cpu)).unwrap();
        assert_eq!(one, two);
        assert_eq!(&two[two.len() - 2..], &one[2..4]); // row n-1 is like row 1
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(CovAccumulator::new(0).is_err());
        let mut acc = CovAccumulator::new(3).unwrap();
        assert!(acc.fit(1).unwrap_err().to_string().contains("at least 2 cells"));
        let rows = Rows::random(5, 3, 0.9, 1);
        acc.add(&rows.view()).unwrap();
        assert!(acc.fit(4).is_err());
        assert!(PcaProjector::new(&[0.0; 3], &[0.0; 5], 2, None).is_err());
        assert!(PcaProjector::new(&[0.0; 3], &[0.0; 6], 2, Some(&[1.0, 0.0, 1.0])).is_err());
    }
}
