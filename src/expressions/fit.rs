//! Streaming fits: state that reads a data set one record batch at a time,
//! joins the state of the rows that follow it, travels as bytes, and finishes
//! into a model. One trait for all of them, so the Python package, a Rust
//! pipeline and a distributed engine drive every fit the same way.
//!
//! `a.merge(b)` is the state of a's rows followed by b's. The samplers'
//! states are exactly one stream's whatever the split (a bottom-k of a
//! union is the bottom-k of the parts' bottom-k's). The statistics add their
//! float64 sums, one addition per entry, so one stream and a split agree bit
//! for bit where every partial sum is exact (integer counts whose sums stay
//! below 2⁵³) and to rounding otherwise; a caller that needs the same bits
//! for any number of workers fixes the split by the data and merges in its
//! order.
//!
//! On the wire a state is `bincode` (serde, standard configuration) of
//! `Wire`: a format number, the fit's kind and its state. The covariance
//! carries the lower triangle of XᵀX only.

use std::collections::BTreeMap;

use polars::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{convert, BatchCentroids};
use crate::kernels::hvg::{ClippedSums, GeneStats, Transform};
use crate::kernels::kmeans::KMeansParams;
use crate::kernels::pca::{Clip, CovAccumulator, PcaFit};
use crate::kernels::sample::BottomK;
use crate::kernels::seurat;
use crate::kernels::{self, Device};

/// A fit that streams over record batches, merges and serialises.
pub trait StreamingFit: Sized {
    /// What [`finish`](Self::finish) needs beyond the state (the number of
    /// components, the k-means settings).
    type Options;
    /// What the fit returns.
    type Model;
    /// The fit's name in errors and on the wire.
    const KIND: &'static str;

    /// Add one record batch: its columns in the order the fit documents.
    fn update(&mut self, columns: &[Series]) -> PolarsResult<()>;
    /// Join the state of the rows that follow this state's (`later` is
    /// only read). On an error nothing has changed.
    fn merge(&mut self, later: &Self) -> PolarsResult<()>;
    /// The model of every row added so far (the state is kept).
    fn finish(&self, options: &Self::Options) -> PolarsResult<Self::Model>;
    /// The state as bytes (a GPU-held state is read, and stays on the GPU).
    fn to_bytes(&self) -> PolarsResult<Vec<u8>>;
    /// A state from [`to_bytes`](Self::to_bytes); on the CPU.
    fn from_bytes(bytes: &[u8]) -> PolarsResult<Self>;
}

/// Bumped when a state's wire layout changes: older bytes are refused with
/// a message, never misread.
const WIRE_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Wire<T> {
    format: u32,
    kind: String,
    state: T,
}

/// [`Wire`]'s first fields: read before the state (bincode reads a prefix).
#[derive(Deserialize)]
struct Head {
    format: u32,
    kind: String,
}

fn encode<T: Serialize>(kind: &str, state: T) -> PolarsResult<Vec<u8>> {
    let wire = Wire { format: WIRE_FORMAT, kind: kind.to_string(), state };
    bincode::serde::encode_to_vec(&wire, bincode::config::standard()).map_err(|e| polars_err!(ComputeError: "cannot serialise a {kind} state: {e}"))
}

fn decode<T: DeserializeOwned>(kind: &str, bytes: &[u8]) -> PolarsResult<T> {
    // The envelope first, so a state of another kind or format is named.
    let bad = |e: String| polars_err!(ComputeError: "these bytes are not a {kind} state ({e}); pass what {kind}.to_bytes() returned");
    let (head, _): (Head, usize) = bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(|e| bad(e.to_string()))?;
    if head.kind != kind {
        return Err(bad(format!("they hold a {} state", head.kind)));
    }
    if head.format != WIRE_FORMAT {
        return Err(bad(format!("wire format {}, this build reads {WIRE_FORMAT}; use the same polars-singlecell version on both ends", head.format)));
    }
    let (wire, _): (Wire<T>, usize) = bincode::serde::decode_from_slice(bytes, bincode::config::standard()).map_err(|e| bad(e.to_string()))?;
    Ok(wire.state)
}

fn check_same<T: PartialEq + std::fmt::Debug>(kind: &str, what: &str, a: T, b: T) -> PolarsResult<()> {
    polars_ensure!(a == b, ComputeError: "cannot merge {kind} states with different {what}: {a:?} and {b:?}");
    Ok(())
}

/// A batch column as text (fits key batches by their label's text).
pub fn batch_labels(batch: &Series) -> PolarsResult<StringChunked> {
    Ok(batch.cast(&DataType::String)?.str()?.clone())
}

/// `(gene_idx, values[, batch])` of a statistics fit's record batch.
fn sparse_columns<'a>(kind: &str, columns: &'a [Series]) -> PolarsResult<(&'a Series, &'a Series, Option<StringChunked>)> {
    match columns {
        [g, v] => Ok((g, v, None)),
        [g, v, b] => Ok((g, v, Some(batch_labels(b)?))),
        _ => polars_bail!(ComputeError: "{kind}.update takes (gene_idx, values[, batch]), got {} columns", columns.len()),
    }
}

// ------------------------------------------------------------ gene statistics

/// Per-batch gene statistics of `highly_variable_genes` (see
/// [`kernels::hvg`]). Columns: `gene_idx`, `values` and optionally `batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeneStatsFit {
    n_genes: usize,
    transform: Transform,
    batches: BTreeMap<String, GeneStats>,
}

impl GeneStatsFit {
    /// An empty state for cells of `n_genes` genes, summing `transform` of
    /// each value (what the statistics are of).
    pub fn new(n_genes: usize, transform: Transform) -> PolarsResult<Self> {
        polars_ensure!(n_genes > 0, ComputeError: "n_genes must be at least 1");
        Ok(GeneStatsFit { n_genes, transform, batches: BTreeMap::new() })
    }

    /// Entries seen that are not whole numbers (raw counts are).
    pub fn non_integer(&self) -> u64 {
        self.batches.values().map(|b| b.non_integer).sum()
    }

    /// scanpy's `highly_variable_genes(flavor="seurat")` on these
    /// statistics (of log-normalised values, `Transform::Expm1`): one row per
    /// gene, `gene_idx`, `means`, `dispersions`, `dispersions_norm`,
    /// `highly_variable` and, fitted `batched` (with a batch column),
    /// `highly_variable_nbatches` and `highly_variable_intersection`.
    pub fn seurat(&self, batched: bool, n_bins: usize, n_top_genes: Option<usize>, cutoffs: &seurat::Cutoffs) -> PolarsResult<DataFrame> {
        polars_ensure!(self.transform == Transform::Expm1, ComputeError: "flavor='seurat' needs the statistics of log-normalised values (transform 'expm1'), these are {:?}", self.transform);
        polars_ensure!(n_bins > 0, ComputeError: "n_bins must be at least 1");
        polars_ensure!(n_top_genes != Some(0), ComputeError: "n_top_genes must be at least 1");
        polars_ensure!(!self.batches.is_empty(), ComputeError: "no cells: highly_variable_genes needs at least one row");
        let gene = Column::new("gene_idx".into(), (0..self.n_genes as u32).collect::<Vec<_>>());
        let moments: Vec<(Vec<f64>, Vec<f64>, &[u64])> = self.batches.values().map(|st| {
            let (m, v) = st.mean_var();
            (m, v, &st.nnz[..])
        }).collect();
        if !batched {
            let [(m, v, _)] = &moments[..] else {
                polars_bail!(ComputeError: "these statistics hold {} batches; rank them with batched = true", moments.len());
            };
            let r = seurat::seurat_single(m, v, n_bins, n_top_genes, cutoffs);
            return DataFrame::new_infer_height(vec![
                gene,
                Column::new("means".into(), r.means),
                Column::new("dispersions".into(), r.dispersions),
                Column::new("dispersions_norm".into(), r.dispersions_norm),
                Column::new("highly_variable".into(), r.highly_variable),
            ]);
        }
        if let Some(label) = self.batches.iter().find(|(_, st)| st.nnz.iter().all(|&n| n == 0)).map(|(l, _)| l) {
            polars_bail!(ComputeError: "batch '{label}' expresses no gene (every cell of it is empty): nothing to rank there; drop its cells");
        }
        let stats: Vec<seurat::BatchStats<'_>> = moments.iter().map(|(m, v, nnz)| seurat::BatchStats { mean: m, var: v, nnz }).collect();
        let r = seurat::seurat_batched(&stats, n_bins, n_top_genes, cutoffs);
        DataFrame::new_infer_height(vec![
            gene,
            Column::new("means".into(), r.means),
            Column::new("dispersions".into(), r.dispersions),
            Column::new("dispersions_norm".into(), r.dispersions_norm),
            Column::new("highly_variable".into(), r.highly_variable),
            Column::new("highly_variable_nbatches".into(), r.nbatches),
            Column::new("highly_variable_intersection".into(), r.intersection),
        ])
    }

    /// seurat_v3's first step (statistics of raw counts, `Transform::Counts`):
    /// per batch, in label order, the genes' expected standard deviation
    /// from the loess (`span`). A loess that fails names the batch.
    pub fn seurat_v3_loess(&self, span: f64, batched: bool) -> PolarsResult<Vec<(String, Vec<f64>)>> {
        polars_ensure!(self.transform == Transform::Counts, ComputeError: "flavor='seurat_v3' needs the statistics of raw counts (transform 'counts'), these are {:?}", self.transform);
        polars_ensure!(span > 0.0 && span <= 1.0, ComputeError: "span must be in (0, 1], got {span}");
        polars_ensure!(!self.batches.is_empty(), ComputeError: "no cells: highly_variable_genes needs at least one row");
        self.batches
            .iter()
            .map(|(label, st)| {
                let (mean, var) = st.mean_var();
                let where_ = if batched { format!("batch '{label}' ({} cells)", st.n_cells) } else { format!("the data ({} cells)", st.n_cells) };
                seurat::v3_reg_std(&mean, &var, span)
                    .map(|r| (label.clone(), r))
                    .map_err(|e| polars_err!(ComputeError: "seurat_v3's loess failed on {where_}: {e}"))
            })
            .collect()
    }

    /// The second pass's clip per batch: `mean + sqrt(n)·reg_std`.
    pub fn seurat_v3_clips(&self, reg_std: &[(String, Vec<f64>)]) -> PolarsResult<Vec<(String, Vec<f64>)>> {
        reg_std
            .iter()
            .map(|(label, r)| {
                let st = self.batches.get(label).ok_or_else(|| polars_err!(ComputeError: "seurat_v3: no statistics of batch {label:?}"))?;
                polars_ensure!(r.len() == self.n_genes, ComputeError: "seurat_v3: batch {label:?} has {} deviations, expected {}", r.len(), self.n_genes);
                Ok((label.clone(), seurat::v3_clip(st.n_cells, &st.mean_var().0, r)))
            })
            .collect()
    }

    /// scanpy's `highly_variable_genes(flavor="seurat_v3")` from the
    /// statistics, the loess' deviations and the clipped sums: one row per
    /// gene, `gene_idx`, `means`, `variances` (of the whole data),
    /// `variances_norm`, `highly_variable_rank`, `highly_variable` and,
    /// `batched`, `highly_variable_nbatches`.
    pub fn seurat_v3(&self, sums: &ClippedSumsFit, reg_std: &[(String, Vec<f64>)], n_top_genes: usize, batched: bool) -> PolarsResult<DataFrame> {
        polars_ensure!(n_top_genes > 0, ComputeError: "n_top_genes must be at least 1");
        polars_ensure!(batched || self.batches.len() == 1, ComputeError: "these statistics hold {} batches; rank them with batched = true", self.batches.len());
        polars_ensure!(reg_std.len() == self.batches.len(), ComputeError: "seurat_v3: {} deviations for {} batches", reg_std.len(), self.batches.len());
        polars_ensure!(sums.n_genes == self.n_genes, ComputeError: "seurat_v3: the clipped sums are of {} genes, the statistics of {}", sums.n_genes, self.n_genes);
        let mut parts = Vec::with_capacity(reg_std.len());
        for (label, r) in reg_std {
            let st = self.batches.get(label).ok_or_else(|| polars_err!(ComputeError: "seurat_v3: no statistics of batch {label:?}"))?;
            let cs = sums.batches.get(label).ok_or_else(|| polars_err!(ComputeError: "seurat_v3: no clipped sums of batch {label:?}"))?;
            polars_ensure!(r.len() == self.n_genes, ComputeError: "seurat_v3: batch {label:?} has {} deviations, expected {}", r.len(), self.n_genes);
            parts.push((st.n_cells, st.mean_var().0, r, cs));
        }
        let batches: Vec<seurat::V3Batch<'_>> = parts
            .iter()
            .map(|(n, mean, r, cs)| seurat::V3Batch { n_cells: *n, mean, reg_std: r, sum: &cs.sum, sumsq: &cs.sumsq })
            .collect();
        let v3 = seurat::seurat_v3_rank(&batches, n_top_genes);
        // The whole data's moments (scanpy reports these, not the batches'):
        // the batches' sums added in label order.
        let g = self.n_genes;
        let n_all: u64 = self.batches.values().map(|st| st.n_cells).sum();
        let (mut sum, mut sumsq) = (vec![0.0; g], vec![0.0; g]);
        for st in self.batches.values() {
            (0..g).for_each(|j| {
                sum[j] += st.sum[j];
                sumsq[j] += st.sumsq[j];
            });
        }
        let n = n_all as f64;
        let means: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let correction = if n_all > 1 { n / (n - 1.0) } else { 1.0 };
        let variances: Vec<f64> = sumsq.iter().zip(&means).map(|(q, m)| (q / n - m * m) * correction).collect();
        let mut cols = vec![
            Column::new("gene_idx".into(), (0..g as u32).collect::<Vec<_>>()),
            Column::new("means".into(), means),
            Column::new("variances".into(), variances),
            Column::new("variances_norm".into(), v3.variances_norm),
            Column::new("highly_variable_rank".into(), v3.rank),
            Column::new("highly_variable".into(), v3.highly_variable),
        ];
        if batched {
            cols.push(Column::new("highly_variable_nbatches".into(), v3.nbatches));
        }
        DataFrame::new_infer_height(cols)
    }
}

impl StreamingFit for GeneStatsFit {
    type Options = ();
    /// One row per (batch, gene): batch, gene_idx, n_cells, mean, var
    /// (ddof=1), nnz, sum, sumsq, and std as `sc.pp.scale` divides by.
    type Model = DataFrame;
    const KIND: &'static str = "GeneStatsFit";

    fn update(&mut self, columns: &[Series]) -> PolarsResult<()> {
        let (g, v, b) = sparse_columns(Self::KIND, columns)?;
        super::gene_stats_update(&mut self.batches, self.n_genes, self.transform, g, v, b.as_ref())
    }

    fn merge(&mut self, later: &Self) -> PolarsResult<()> {
        check_same(Self::KIND, "n_genes", self.n_genes, later.n_genes)?;
        check_same(Self::KIND, "transforms", self.transform, later.transform)?;
        for (label, st) in &later.batches {
            match self.batches.get_mut(label) {
                Some(mine) => mine.merge(st),
                None => {
                    self.batches.insert(label.clone(), st.clone());
                },
            }
        }
        Ok(())
    }

    fn finish(&self, _: &()) -> PolarsResult<DataFrame> {
        let g = self.n_genes;
        let (mut batch, mut gene, mut n_cells, mut mean, mut var, mut nnz) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut sum, mut sumsq, mut std) = (vec![], vec![], vec![]);
        for (label, st) in &self.batches {
            let (m, v) = st.mean_var();
            batch.extend(std::iter::repeat_n(label.as_str(), g));
            gene.extend(0..g as u32);
            n_cells.extend(std::iter::repeat_n(st.n_cells, g));
            std.extend(m.iter().zip(&v).map(|(&m, &v)| kernels::pca::scale_std(m, v)));
            mean.extend(m);
            var.extend(v);
            nnz.extend(st.nnz.iter().copied());
            sum.extend(st.sum.iter().copied());
            sumsq.extend(st.sumsq.iter().copied());
        }
        DataFrame::new_infer_height(vec![
            Column::new("batch".into(), batch),
            Column::new("gene_idx".into(), gene),
            Column::new("n_cells".into(), n_cells),
            Column::new("mean".into(), mean),
            Column::new("var".into(), var),
            Column::new("nnz".into(), nnz),
            Column::new("sum".into(), sum),
            Column::new("sumsq".into(), sumsq),
            Column::new("std".into(), std),
        ])
    }

    fn to_bytes(&self) -> PolarsResult<Vec<u8>> {
        encode(Self::KIND, self)
    }

    fn from_bytes(bytes: &[u8]) -> PolarsResult<Self> {
        decode(Self::KIND, bytes)
    }
}

/// seurat_v3's second pass: per batch, Σ min(x, clip) and its square per
/// gene. Columns: `gene_idx`, `values` and optionally `batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClippedSumsFit {
    n_genes: usize,
    batches: BTreeMap<String, ClippedSums>,
}

impl ClippedSumsFit {
    /// `clip`: (batch label, clip value per gene) for every batch.
    pub fn new(clip: Vec<(String, Vec<f64>)>) -> PolarsResult<Self> {
        let Some(n_genes) = clip.first().map(|c| c.1.len()) else {
            polars_bail!(ComputeError: "clip lists no batch");
        };
        let mut batches = BTreeMap::new();
        for (label, c) in clip {
            polars_ensure!(c.len() == n_genes, ComputeError: "batch {label:?} has {} clip values, expected {n_genes}", c.len());
            batches.insert(label, ClippedSums::new(c));
        }
        Ok(ClippedSumsFit { n_genes, batches })
    }
}

impl StreamingFit for ClippedSumsFit {
    type Options = ();
    /// One row per (batch, gene): batch, gene_idx, sum, sumsq.
    type Model = DataFrame;
    const KIND: &'static str = "ClippedSumsFit";

    fn update(&mut self, columns: &[Series]) -> PolarsResult<()> {
        let (g, v, b) = sparse_columns(Self::KIND, columns)?;
        super::clipped_sums_update(&mut self.batches, self.n_genes, g, v, b.as_ref())
    }

    fn merge(&mut self, later: &Self) -> PolarsResult<()> {
        check_same(Self::KIND, "n_genes", self.n_genes, later.n_genes)?;
        check_same(Self::KIND, "batches", self.batches.keys().collect::<Vec<_>>(), later.batches.keys().collect())?;
        // Every batch checked before any is added: a failed merge changes nothing.
        if let Some(label) = later.batches.iter().find(|(l, st)| self.batches[*l].clip != st.clip).map(|(l, _)| l) {
            polars_bail!(ComputeError: "cannot merge ClippedSumsFit states with different clip values (batch {label:?})");
        }
        for (label, st) in &later.batches {
            self.batches.get_mut(label).expect("same batches: checked").merge(st);
        }
        Ok(())
    }

    fn finish(&self, _: &()) -> PolarsResult<DataFrame> {
        let g = self.n_genes;
        let (mut batch, mut gene, mut sum, mut sumsq) = (vec![], vec![], vec![], vec![]);
        for (label, st) in &self.batches {
            batch.extend(std::iter::repeat_n(label.as_str(), g));
            gene.extend(0..g as u32);
            sum.extend(st.sum.iter().copied());
            sumsq.extend(st.sumsq.iter().copied());
        }
        DataFrame::new_infer_height(vec![
            Column::new("batch".into(), batch),
            Column::new("gene_idx".into(), gene),
            Column::new("sum".into(), sum),
            Column::new("sumsq".into(), sumsq),
        ])
    }

    fn to_bytes(&self) -> PolarsResult<Vec<u8>> {
        encode(Self::KIND, self)
    }

    fn from_bytes(bytes: &[u8]) -> PolarsResult<Self> {
        decode(Self::KIND, bytes)
    }
}

// ----------------------------------------------------------------- covariance

/// The exact float64 covariance behind `fit_pca`. Columns: `gene_idx`,
/// `values`. With a [`Clip`] (`sc.pp.scale(max_value=...)`'s second pass),
/// each entry is scaled and clipped first.
pub struct CovarianceFit {
    acc: CovAccumulator,
    clip: Option<Clip>,
}

/// [`CovarianceFit::finish`]'s options.
#[derive(Debug, Clone, Copy)]
pub struct PcaOptions {
    /// Number of principal components to keep (1 to n_genes).
    pub n_comps: usize,
    /// The PCA of the genes scaled to unit variance (`std` is returned).
    pub scale: bool,
}

#[derive(Serialize, Deserialize)]
struct CovarianceWire {
    n_genes: usize,
    n_cells: u64,
    sum: Vec<f64>,
    lower: Vec<f64>,
    clip: Option<(Vec<f64>, Vec<f64>, f64, bool)>,
}

impl CovarianceFit {
    /// An empty state for cells of `n_genes` genes, accumulating on `device`;
    /// `clip` (of the same genes) scales and clips each entry first.
    pub fn new(n_genes: usize, device: Device, clip: Option<Clip>) -> PolarsResult<Self> {
        if let Some(c) = &clip {
            polars_ensure!(c.n_genes() == n_genes, ComputeError: "clip has {} genes, the fit {n_genes}", c.n_genes());
        }
        Ok(CovarianceFit { acc: CovAccumulator::with_device(n_genes, device)?, clip })
    }

    /// Cells added so far.
    pub fn n_cells(&self) -> u64 {
        self.acc.n_cells()
    }
}

impl StreamingFit for CovarianceFit {
    type Options = PcaOptions;
    /// With a clip, `mean` is the scaled genes' mean.
    type Model = PcaFit;
    const KIND: &'static str = "CovarianceFit";

    fn update(&mut self, columns: &[Series]) -> PolarsResult<()> {
        let [g, v] = columns else {
            polars_bail!(ComputeError: "{}.update takes (gene_idx, values), got {} columns", Self::KIND, columns.len());
        };
        super::fit_pca_update(&mut self.acc, self.clip.as_ref(), g, v)
    }

    fn merge(&mut self, later: &Self) -> PolarsResult<()> {
        check_same(Self::KIND, "clips", self.clip.as_ref().map(Clip::parts), later.clip.as_ref().map(Clip::parts))?;
        Ok(self.acc.merge(&later.acc)?)
    }

    fn finish(&self, options: &PcaOptions) -> PolarsResult<PcaFit> {
        let mut fit = self.acc.fit_with(options.n_comps, options.scale)?;
        if let Some(c) = &self.clip {
            fit.mean = c.scaled_mean(&fit.mean);
        }
        Ok(fit)
    }

    fn to_bytes(&self) -> PolarsResult<Vec<u8>> {
        let wire = CovarianceWire {
            n_genes: self.acc.n_genes(),
            n_cells: self.acc.n_cells(),
            lower: self.acc.lower_triangle()?,
            sum: self.acc.sums().to_vec(),
            clip: self.clip.as_ref().map(|c| {
                let (m, s, v, z) = c.parts();
                (m.to_vec(), s.to_vec(), v, z)
            }),
        };
        encode(Self::KIND, wire)
    }

    fn from_bytes(bytes: &[u8]) -> PolarsResult<Self> {
        let w: CovarianceWire = decode(Self::KIND, bytes)?;
        let clip = w.clip.map(|(m, s, v, z)| Clip::new(m, s, v, z)).transpose()?;
        let acc = CovAccumulator::from_parts(w.n_genes, w.n_cells, w.sum, &w.lower)?;
        Ok(CovarianceFit { acc, clip })
    }
}

// ------------------------------------------------------------ centroid sample

/// Per-batch seeded samples of an embedding (bottom-k by a hash of the
/// global row number), then k-means per batch. Columns: `embedding`
/// (`Array(Float32, d)`), `batch`.
#[derive(Debug, Clone)]
pub struct CentroidSampleFit {
    cap: usize,
    d: usize,
    seed: u64,
    /// The global number of this state's first row.
    first_row: u64,
    n_rows: u64,
    samplers: BTreeMap<String, BottomK>,
}

/// [`CentroidSampleFit::finish`]'s options.
#[derive(Debug, Clone)]
pub struct CentroidOptions {
    /// The k-means settings of every batch's fit (`n_centroids` is the most
    /// a batch gets).
    pub params: KMeansParams,
    /// At most one centroid per this many sampled cells of a batch, but not
    /// fewer than [`MIN_CENTROIDS_PER_BATCH`](super::MIN_CENTROIDS_PER_BATCH)
    /// (or `n_centroids`, if that is fewer).
    pub min_cells_per_centroid: usize,
}

#[derive(Serialize, Deserialize)]
struct SampleWire {
    cap: usize,
    d: usize,
    seed: u64,
    first_row: u64,
    n_rows: u64,
    /// Per batch: label, rows seen, kept row numbers, their values.
    batches: Vec<(String, u64, Vec<u64>, Vec<f32>)>,
}

impl CentroidSampleFit {
    /// A state whose rows start at global row `first_row` (0 for a whole
    /// data set; a partition's offset when the data is split).
    pub fn new(d: usize, max_samples_per_batch: usize, random_state: u64, first_row: u64) -> PolarsResult<Self> {
        polars_ensure!(max_samples_per_batch > 0 && d > 0, ComputeError: "max_samples_per_batch and the embedding width must be at least 1");
        Ok(CentroidSampleFit { cap: max_samples_per_batch, d, seed: random_state, first_row, n_rows: 0, samplers: BTreeMap::new() })
    }

    /// Rows added to this state (from `first_row` on).
    pub fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// The embedding's width.
    pub fn d(&self) -> usize {
        self.d
    }

    /// The sampling seed (`random_state`).
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl StreamingFit for CentroidSampleFit {
    type Options = CentroidOptions;
    /// One k-means fit per batch, in sorted label order.
    type Model = Vec<(String, BatchCentroids)>;
    const KIND: &'static str = "CentroidSampleFit";

    fn update(&mut self, columns: &[Series]) -> PolarsResult<()> {
        let [embedding, batch] = columns else {
            polars_bail!(ComputeError: "{}.update takes (embedding, batch), got {} columns", Self::KIND, columns.len());
        };
        let labels = batch_labels(batch)?;
        let row0 = self.first_row + self.n_rows;
        let n = super::centroid_sample_update(&mut self.samplers, self.cap, self.seed, self.d, row0, embedding, &labels)?;
        self.n_rows += n as u64;
        Ok(())
    }

    fn merge(&mut self, later: &Self) -> PolarsResult<()> {
        check_same(Self::KIND, "widths", self.d, later.d)?;
        check_same(Self::KIND, "max_samples_per_batch", self.cap, later.cap)?;
        check_same(Self::KIND, "random_state", self.seed, later.seed)?;
        let next = self.first_row + self.n_rows;
        polars_ensure!(later.first_row == next, ComputeError:
            "{}: the state merged must start at row {next}, where this one ends, but starts at row {}; merge partitions in row order",
            Self::KIND, later.first_row);
        for (label, s) in &later.samplers {
            match self.samplers.get_mut(label) {
                Some(mine) => mine.merge(s),
                None => {
                    self.samplers.insert(label.clone(), s.clone());
                },
            }
        }
        self.n_rows += later.n_rows;
        Ok(())
    }

    fn finish(&self, options: &CentroidOptions) -> PolarsResult<Self::Model> {
        self.samplers
            .iter()
            .map(|(b, s)| super::fit_sampled_centroids(s, &options.params, options.min_cells_per_centroid).map(|f| (b.clone(), f)))
            .collect()
    }

    fn to_bytes(&self) -> PolarsResult<Vec<u8>> {
        let batches = self
            .samplers
            .iter()
            .map(|(b, s)| {
                let (values, rows) = s.finish();
                (b.clone(), s.n_seen, rows, values)
            })
            .collect();
        let wire = SampleWire { cap: self.cap, d: self.d, seed: self.seed, first_row: self.first_row, n_rows: self.n_rows, batches };
        encode(Self::KIND, wire)
    }

    fn from_bytes(bytes: &[u8]) -> PolarsResult<Self> {
        let w: SampleWire = decode(Self::KIND, bytes)?;
        let mut fit = CentroidSampleFit::new(w.d, w.cap, w.seed, w.first_row)?;
        fit.n_rows = w.n_rows;
        for (label, n_seen, rows, values) in w.batches {
            polars_ensure!(values.len() == rows.len() * w.d, ComputeError: "{}: batch {label:?} has {} values for {} rows of width {}", Self::KIND, values.len(), rows.len(), w.d);
            fit.samplers.insert(label, BottomK::from_parts(w.cap, w.d, w.seed, n_seen, &values, &rows));
        }
        Ok(fit)
    }
}

/// The centroid fit's two tables from its per-batch fits: one row per
/// centroid (batch, centroid_id, centroid, mass) and one per batch (batch,
/// n_cells, n_sampled, n_centroids, inertia, n_iter, converged).
pub fn centroid_tables(d: usize, fits: &[(String, BatchCentroids)]) -> PolarsResult<(DataFrame, DataFrame)> {
    let (mut batch, mut cid, mut cent, mut mass) = (vec![], vec![], vec![], vec![]);
    let (mut sb, mut n_cells, mut n_sampled, mut k, mut inertia, mut n_iter, mut converged) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (b, f) in fits {
        let kb = f.fit.n_centroids();
        batch.extend(std::iter::repeat_n(b.as_str(), kb));
        cid.extend(0..kb as u32);
        cent.extend_from_slice(&f.fit.centroids);
        mass.extend_from_slice(&f.fit.mass);
        sb.push(b.as_str());
        n_cells.push(f.n_cells);
        n_sampled.push(f.n_sampled as u64);
        k.push(kb as u32);
        inertia.push(f.fit.inertia);
        n_iter.push(f.fit.n_iter as u32);
        converged.push(f.fit.converged);
    }
    let long = DataFrame::new_infer_height(vec![
        Column::new("batch".into(), batch),
        Column::new("centroid_id".into(), cid),
        convert::array_f32("centroid", d, cent, None)?.into(),
        Column::new("mass".into(), mass),
    ])?;
    let summary = DataFrame::new_infer_height(vec![
        Column::new("batch".into(), sb),
        Column::new("n_cells".into(), n_cells),
        Column::new("n_sampled".into(), n_sampled),
        Column::new("n_centroids".into(), k),
        Column::new("inertia".into(), inertia),
        Column::new("n_iter".into(), n_iter),
        Column::new("converged".into(), converged),
    ])?;
    Ok((long, summary))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `n` cells over `g` genes from a seed: sorted gene indices, values that
    /// are whole counts (`integer`) or not, and one of three batch labels.
    fn cells(n: usize, g: u32, seed: u64, integer: bool) -> (Series, Series, Series) {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut idx, mut val, mut bat) = (vec![], vec![], vec![]);
        for _ in 0..n {
            let genes: Vec<u32> = (0..g).filter(|_| next() % 3 == 0).collect();
            // Whole counts, or values like log-normalised ones (expm1 stays finite).
            let v: Vec<f32> = genes.iter().map(|_| if integer { (1 + next() % 20) as f32 } else { (next() % 1000) as f32 / 250.0 }).collect();
            idx.push(Series::new("".into(), genes));
            val.push(Series::new("".into(), v));
            bat.push(["a", "b", "c"][(next() % 3) as usize]);
        }
        (Series::new("gene_idx".into(), idx), Series::new("values".into(), val), Series::new("batch".into(), bat))
    }

    fn embedding(n: usize, d: usize, seed: u64) -> (Series, Series) {
        let x: Vec<f32> = (0..n * d).map(|i| ((i as u64 * 2_654_435_761 + seed) % 1000) as f32 / 10.0).collect();
        let b: Vec<&str> = (0..n).map(|i| ["p", "q"][(i * 7 + seed as usize) % 2]).collect();
        (convert::array_f32("X_pca", d, x, None).unwrap(), Series::new("batch".into(), b))
    }

    /// The state of rows `cuts[k]..cuts[k+1]` for each k, each built on its
    /// own, merged in order.
    fn split<F: StreamingFit>(cols: &[Series], cuts: &[usize], mut new: impl FnMut(usize) -> F) -> F {
        let mut parts = cuts.windows(2).map(|w| {
            let mut f = new(w[0]);
            let part: Vec<Series> = cols.iter().map(|c| c.slice(w[0] as i64, w[1] - w[0])).collect();
            f.update(&part).unwrap();
            f
        });
        let mut first = parts.next().unwrap();
        for p in parts {
            first.merge(&p).unwrap();
        }
        first
    }

    fn cut_points(n: usize, raw: &[usize]) -> Vec<usize> {
        let mut c: Vec<usize> = raw.iter().map(|r| r % (n + 1)).chain([0, n]).collect();
        c.sort_unstable();
        c
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Counts sum exactly in float64, so any split merged in order is the
        /// one stream, byte for byte on the wire.
        #[test]
        fn gene_stats_of_counts_merge_to_the_one_stream(seed in 0u64..1000, raw in proptest::collection::vec(0usize..200, 0..4)) {
            let (g, v, b) = cells(150, 12, seed, true);
            let cols = [g, v, b];
            for transform in [Transform::Counts, Transform::Exact] {
                let mut one = GeneStatsFit::new(12, transform).unwrap();
                one.update(&cols).unwrap();
                let merged = split(&cols, &cut_points(150, &raw), |_| GeneStatsFit::new(12, transform).unwrap());
                prop_assert_eq!(merged.to_bytes().unwrap(), one.to_bytes().unwrap());
                prop_assert!(merged.finish(&()).unwrap().equals_missing(&one.finish(&()).unwrap()));
            }
        }

        #[test]
        fn covariance_of_counts_merges_to_the_one_stream(seed in 0u64..1000, raw in proptest::collection::vec(0usize..200, 0..4)) {
            let (g, v, _) = cells(150, 9, seed, true);
            let cols = [g, v];
            let mut one = CovarianceFit::new(9, Device::Cpu, None).unwrap();
            one.update(&cols).unwrap();
            let merged = split(&cols, &cut_points(150, &raw), |_| CovarianceFit::new(9, Device::Cpu, None).unwrap());
            prop_assert_eq!(merged.to_bytes().unwrap(), one.to_bytes().unwrap());
        }

        /// A bottom-k of a union is the bottom-k of the parts' bottom-k's: the
        /// same sample, and so the same centroids, for any split.
        #[test]
        fn centroid_samples_merge_to_the_one_stream(seed in 0u64..1000, raw in proptest::collection::vec(0usize..300, 0..4)) {
            let (x, b) = embedding(300, 3, seed);
            let cols = [x, b];
            let mut one = CentroidSampleFit::new(3, 40, seed, 0).unwrap();
            one.update(&cols).unwrap();
            let merged = split(&cols, &cut_points(300, &raw), |row0| CentroidSampleFit::new(3, 40, seed, row0 as u64).unwrap());
            prop_assert_eq!(merged.to_bytes().unwrap(), one.to_bytes().unwrap());
            let opts = CentroidOptions { params: KMeansParams::new(4), min_cells_per_centroid: 1 };
            let (a, b) = (merged.finish(&opts).unwrap(), one.finish(&opts).unwrap());
            prop_assert_eq!(a.len(), b.len());
            for ((la, fa), (lb, fb)) in a.iter().zip(&b) {
                prop_assert_eq!(la, lb);
                prop_assert_eq!(&fa.fit.centroids, &fb.fit.centroids);
                prop_assert_eq!(&fa.fit.mass, &fb.fit.mass);
            }
        }
    }

    /// Values that are not whole numbers: a split changes the order of float64
    /// additions, so the sums agree to rounding, not bit for bit.
    #[test]
    fn non_integer_sums_agree_to_rounding() {
        let (g, v, b) = cells(200, 10, 7, false);
        let cols = [g, v, b];
        let mut one = GeneStatsFit::new(10, Transform::Expm1).unwrap();
        one.update(&cols).unwrap();
        let merged = split(&cols, &[0, 61, 133, 200], |_| GeneStatsFit::new(10, Transform::Expm1).unwrap());
        let (a, b) = (merged.finish(&()).unwrap(), one.finish(&()).unwrap());
        for name in ["sum", "sumsq", "var"] {
            let (x, y) = (a.column(name).unwrap().f64().unwrap(), b.column(name).unwrap().f64().unwrap());
            for (x, y) in x.into_no_null_iter().zip(y.into_no_null_iter()) {
                assert!((x - y).abs() <= 1e-12 * y.abs().max(1e-300), "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn every_state_round_trips_through_bytes() {
        let (g, v, b) = cells(80, 6, 3, false);
        let mut stats = GeneStatsFit::new(6, Transform::Expm1).unwrap();
        stats.update(&[g.clone(), v.clone(), b.clone()]).unwrap();
        let bytes = stats.to_bytes().unwrap();
        assert_eq!(GeneStatsFit::from_bytes(&bytes).unwrap().to_bytes().unwrap(), bytes);

        let mut clipped = ClippedSumsFit::new(["a", "b", "c"].iter().map(|l| (l.to_string(), vec![5.0; 6])).collect()).unwrap();
        clipped.update(&[g.clone(), v.clone(), b]).unwrap();
        let bytes = clipped.to_bytes().unwrap();
        assert_eq!(ClippedSumsFit::from_bytes(&bytes).unwrap().to_bytes().unwrap(), bytes);

        let clip = Clip::new(vec![1.0; 6], vec![2.0; 6], 3.0, true).unwrap();
        let mut cov = CovarianceFit::new(6, Device::Cpu, Some(clip)).unwrap();
        cov.update(&[g, v]).unwrap();
        let bytes = cov.to_bytes().unwrap();
        let back = CovarianceFit::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes().unwrap(), bytes);
        let opts = PcaOptions { n_comps: 2, scale: false };
        let (a, b) = (back.finish(&opts).unwrap(), cov.finish(&opts).unwrap());
        assert_eq!((a.mean, a.explained_variance), (b.mean, b.explained_variance));
    }

    #[test]
    fn bad_merges_and_bytes_are_errors_that_say_why() {
        let (x, b) = embedding(50, 2, 1);
        let mut first = CentroidSampleFit::new(2, 10, 0, 0).unwrap();
        first.update(&[x.clone(), b.clone()]).unwrap();
        let mut gap = CentroidSampleFit::new(2, 10, 0, 60).unwrap();
        gap.update(&[x, b]).unwrap();
        let e = first.clone().merge(&gap).unwrap_err().to_string();
        assert!(e.contains("must start at row 50") && e.contains("starts at row 60"), "{e}");
        let e = first.merge(&CentroidSampleFit::new(2, 10, 1, 50).unwrap()).unwrap_err().to_string();
        assert!(e.contains("random_state"), "{e}");

        let e = GeneStatsFit::new(3, Transform::Counts).unwrap().merge(&GeneStatsFit::new(4, Transform::Counts).unwrap()).unwrap_err();
        assert!(e.to_string().contains("n_genes"), "{e}");
        let stats = GeneStatsFit::new(3, Transform::Counts).unwrap();
        let e = CovarianceFit::from_bytes(&stats.to_bytes().unwrap()).err().unwrap().to_string();
        assert!(e.contains("not a CovarianceFit state") && e.contains("GeneStatsFit"), "{e}");
        let e = GeneStatsFit::from_bytes(b"junk").unwrap_err().to_string();
        assert!(e.contains("not a GeneStatsFit state"), "{e}");

        // A clip that differs in a later batch: refused before any batch is added.
        let (g, v, b) = cells(60, 4, 9, true);
        let clips = |c: f64| vec![("a".to_string(), vec![5.0; 4]), ("b".to_string(), vec![5.0; 4]), ("c".to_string(), vec![c; 4])];
        let mut mine = ClippedSumsFit::new(clips(5.0)).unwrap();
        mine.update(&[g.clone(), v.clone(), b.clone()]).unwrap();
        let mut other = ClippedSumsFit::new(clips(6.0)).unwrap();
        other.update(&[g, v, b]).unwrap();
        let before = mine.to_bytes().unwrap();
        let e = mine.merge(&other).unwrap_err().to_string();
        assert!(e.contains("different clip values (batch \"c\")"), "{e}");
        assert_eq!(mine.to_bytes().unwrap(), before);
    }
}
