//! Series-level operations: the same functions back the Python plugin
//! (`crate::python`) and Rust Polars pipelines (`col(..).map_many(..)`).
//! They convert and validate through `convert` and leave arithmetic to the
//! kernels.

pub mod convert;
pub mod fit;
pub mod integration;
pub mod schema;
pub mod spill;

pub use integration::{check_model_width, fit_integration, knn, knn_dtype, knn_interpolate, knn_search, IntegrationOutput, InterpolationModel};

use polars::prelude::*;
use polars_core::runtime::THREAD_POOL;

use crate::kernels::hvg::{ClippedSums, GeneStats, Transform};
use crate::kernels::kmeans::{KMeansFit, KMeansParams};
use crate::kernels::sample::BottomK;
use crate::kernels::pca::{Clip, CovAccumulator, PcaProjector};
use crate::kernels::cells::Genes;
use crate::error::KernelError;
use crate::kernels::{self, select_genes::GeneMap, Device, SparseRow};

/// `normalize_total` + `log1p` of each cell; `List(Float32)` aligned with `gene_idx`.
/// `target_sum = None`: the median of the non-zero cell totals of this Series.
///
/// Large calls (eager frames) split their rows over Polars' thread pool;
/// streaming batches stay serial (see `kernels::PAR_BLOCK`).
pub fn normalize(gene_idx: &Series, values: &Series, target_sum: Option<f64>, log1p: bool) -> PolarsResult<Series> {
    THREAD_POOL
        .install(|| {
            convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
                let out = kernels::normalize::normalize(rows, target_sum.map(|t| t as f32), log1p)?;
                Ok((rows.iter().map(|r| r.values.len()).collect::<Vec<_>>(), out, validity.cloned()))
            })
        })
        .and_then(|(lens, out, validity)| convert::list_series(values.name(), lens.into_iter(), out, validity.as_ref()))
}

/// Total counts per cell (float64 sum rounded to float32, as scanpy); `Float32`.
pub fn total_counts(gene_idx: &Series, values: &Series) -> PolarsResult<Series> {
    convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
        Ok((kernels::normalize::total_counts(rows), validity.cloned()))
    })
    .and_then(|(t, validity)| convert::column_f32("total_counts", t, validity.as_ref()))
}

/// Keep `genes` (old indices) and renumber them `0..genes.len()`. Returns the
/// new (gene_idx, values) pair.
pub fn select_genes(gene_idx: &Series, values: &Series, genes: &[u32]) -> PolarsResult<(Series, Series)> {
    let map = GeneMap::new(genes)?;
    let (lens, idx, val, validity) = convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
        let (lens, idx, val) = kernels::select_genes::select_genes(rows, &map);
        Ok((lens, idx, val, validity.cloned()))
    })?;
    Ok((
        convert::list_series(gene_idx.name(), lens.iter().copied(), idx, validity.as_ref())?,
        convert::list_series(values.name(), lens.iter().copied(), val, validity.as_ref())?,
    ))
}

/// Two columns of one row count as a struct column named `name` (the
/// struct outputs of `select_genes` and `to_cells`).
pub fn pair_struct(name: &PlSmallStr, a: Series, b: Series) -> PolarsResult<Series> {
    Ok(StructChunked::from_series(name.clone(), a.len(), [a, b].iter())?.into_series())
}

/// Cells in the layout from a published (gene ids, values) pair of any
/// integer / numeric list dtypes (see [`kernels::cells`]): `(gene_idx:
/// List(UInt32), values: List(Float32))`, sorted per cell; null rows stay null.
pub fn to_cells(genes: &Series, values: &Series, how: &Genes<'_>) -> PolarsResult<(Series, Series)> {
    let ((lens, idx, val), validity) = THREAD_POOL.install(|| {
        convert::with_token_rows(genes, values, |rows, validity| Ok((kernels::cells::to_cells(rows, how)?, validity.cloned())))
    })?;
    Ok((
        convert::list_series("gene_idx", lens.iter().copied(), idx, validity.as_ref())?,
        convert::list_series("values", lens.iter().copied(), val, validity.as_ref())?,
    ))
}

/// A CSR matrix's rows (`indptr`: Int64, one more than the rows; `indices`:
/// Int32, Int64 or UInt32; `data`: any number type, read as Float32) as the
/// layout's `(gene_idx, values)`; duplicates summed as scipy does.
pub fn from_csr(indptr: &Series, indices: &Series, data: &Series, n_genes: usize) -> PolarsResult<(Series, Series)> {
    let flat = |s: &Series, dtype: DataType| -> PolarsResult<Series> {
        polars_ensure!(s.null_count() == 0, ComputeError: "'{}' holds nulls; a CSR matrix has none", s.name());
        Ok(s.cast(&dtype)?.rechunk())
    };
    let indptr = flat(indptr, DataType::Int64)?;
    let data = flat(data, DataType::Float32)?;
    let (ptr, val) = (indptr.i64()?.cont_slice()?, data.f32()?.cont_slice()?);
    let indices = indices.rechunk();
    let cells = THREAD_POOL.install(|| -> PolarsResult<_> {
        let found = match indices.dtype() {
            DataType::Int32 => kernels::cells::from_csr(ptr, indices.i32()?.cont_slice()?, val, n_genes),
            DataType::UInt32 => kernels::cells::from_csr(ptr, indices.u32()?.cont_slice()?, val, n_genes),
            DataType::Int64 => kernels::cells::from_csr(ptr, indices.i64()?.cont_slice()?, val, n_genes),
            other => polars_bail!(ComputeError: "CSR indices have dtype {other}; expected Int32, Int64 or UInt32"),
        };
        found.map_err(|e| polars_err!(ComputeError: "{}", e.describe("indices", "data")))
    });
    let (lens, idx, val) = cells?;
    Ok((
        convert::list_series("gene_idx", lens.iter().copied(), idx, None)?,
        convert::list_series("values", lens.iter().copied(), val, None)?,
    ))
}

/// Project each cell onto fitted axes; `Array(Float32, n_comps)`, null where the row is null.
pub fn pca_project(gene_idx: &Series, values: &Series, model: &PcaProjector, device: Device) -> PolarsResult<Series> {
    let (out, validity) = THREAD_POOL.install(|| {
        convert::with_sparse_rows(gene_idx, values, Some(model.n_genes), |rows, validity| {
            Ok((kernels::pca::pca_project(rows, model, device)?, validity.cloned()))
        })
    })?;
    convert::array_f32("X_pca", model.n_comps, out, validity.as_ref())
}

/// Add a batch of cells to a streaming PCA fit. Null cells are an error: a fit
/// cannot leave them out silently.
/// With `clip` (`sc.pp.scale(max_value=...)`'s second pass), each entry is
/// clipped and scaled first.
pub(crate) fn fit_pca_update(acc: &mut CovAccumulator, clip: Option<&Clip>, gene_idx: &Series, values: &Series) -> PolarsResult<()> {
    convert::with_sparse_rows(gene_idx, values, Some(acc.n_genes()), |rows, validity| {
        convert::reject_null_rows(validity, "fit_pca")?;
        match clip {
            Some(c) => {
                let d = c.apply(rows);
                acc.add(&Clip::rows(rows, &d))
            },
            None => acc.add(rows),
        }
    })
}

/// Add a batch of cells to per-batch gene statistics (of `transform`);
/// `batch[i]` names the batch of row `i` (`None`: one batch).
pub(crate) fn gene_stats_update(
    stats: &mut std::collections::BTreeMap<String, GeneStats>,
    n_genes: usize,
    transform: Transform,
    gene_idx: &Series,
    values: &Series,
    batch: Option<&StringChunked>,
) -> PolarsResult<()> {
    check_batch(gene_idx, batch)?;
    convert::with_sparse_rows(gene_idx, values, Some(n_genes), |rows, validity| {
        convert::reject_null_rows(validity, "highly_variable_genes")?;
        // Only valid rows add batches. Each row's batch as an index into the
        // statistics, in label order.
        let labels: Vec<&str> = match batch {
            Some(b) => b.iter().map(|x| x.unwrap_or("")).collect(), // no null: checked above
            None => vec![""; rows.len()],
        };
        for &key in &labels {
            if !stats.contains_key(key) {
                stats.insert(key.to_string(), GeneStats::new(n_genes, transform));
            }
        }
        let position: std::collections::HashMap<&str, usize> = stats.keys().enumerate().map(|(i, k)| (k.as_str(), i)).collect();
        let index: Vec<usize> = labels.iter().map(|k| position[k]).collect();
        drop(position);
        let mut targets: Vec<&mut GeneStats> = stats.values_mut().collect();
        THREAD_POOL.install(|| kernels::hvg::add_rows(&mut targets, rows, &index));
        Ok(())
    })
}

/// seurat_v3's second pass: add a batch of raw counts to each batch's clipped
/// sums. A batch label the first pass did not see is an error (the data
/// changed between the passes).
pub(crate) fn clipped_sums_update(
    sums: &mut std::collections::BTreeMap<String, ClippedSums>,
    n_genes: usize,
    gene_idx: &Series,
    values: &Series,
    batch: Option<&StringChunked>,
) -> PolarsResult<()> {
    rows_by_batch(gene_idx, values, n_genes, batch, |key, r| match sums.get_mut(key) {
        Some(s) => {
            s.add(r);
            Ok(())
        },
        None => Err(KernelError::Invalid(format!(
            "batch '{key}' was not in the first pass over the data; the source changed while highly_variable_genes read it"
        ))),
    })
}

/// A batch column, where given, has one label per cell and no null.
fn check_batch(gene_idx: &Series, batch: Option<&StringChunked>) -> PolarsResult<()> {
    if let Some(b) = batch {
        if b.len() != gene_idx.len() {
            polars_bail!(ComputeError: "batch column '{}' has {} rows but the cells have {}", b.name(), b.len(), gene_idx.len());
        }
        if let Some(i) = b.iter().position(|x| x.is_none()) {
            polars_bail!(ComputeError: "batch column '{}' is null at row {i}; fill or drop null batches first", b.name());
        }
    }
    Ok(())
}

/// Validated rows of a chunk with each row's batch label ("" without one).
fn rows_by_batch(
    gene_idx: &Series,
    values: &Series,
    n_genes: usize,
    batch: Option<&StringChunked>,
    mut f: impl FnMut(&str, SparseRow<'_>) -> Result<(), KernelError>,
) -> PolarsResult<()> {
    check_batch(gene_idx, batch)?;
    convert::with_sparse_rows(gene_idx, values, Some(n_genes), |rows, validity| {
        convert::reject_null_rows(validity, "highly_variable_genes")?;
        for (i, r) in rows.iter().enumerate() {
            f(batch.and_then(|b| b.get(i)).unwrap_or(""), *r)?;
        }
        Ok(())
    })
}

/// The dtype `kmeans_centroids` returns for a `d`-wide embedding:
/// `Struct{centroid: List(Array(Float32, d)), mass: List(Float64)}`.
pub fn centroids_dtype(d: usize) -> DataType {
    DataType::Struct(vec![
        Field::new("centroid".into(), DataType::List(Box::new(DataType::Array(Box::new(DataType::Float32), d)))),
        Field::new("mass".into(), DataType::List(Box::new(DataType::Float64))),
    ])
}

/// Per-cell weights as float64 (any numeric dtype is cast; a null is an error).
pub(crate) fn weights_f64(s: &Series) -> PolarsResult<Vec<f64>> {
    if !s.dtype().is_primitive_numeric() {
        polars_bail!(ComputeError: "weights column '{}' has dtype {}, expected a number per cell", s.name(), s.dtype());
    }
    let w = s.cast(&DataType::Float64)?;
    let w = w.f64()?;
    if let Some(i) = w.iter().position(|v| v.is_none()) {
        polars_bail!(ComputeError: "weights column '{}' is null at row {i}; fill it (e.g. .fill_null(1.0)) or drop the cell", s.name());
    }
    Ok(w.into_no_null_iter().collect())
}

/// k-means of one group of cells (an aggregation: one row out). Its
/// centroids and their masses, as `centroids_dtype(d)`.
pub fn kmeans_centroids(embedding: &Series, weights: Option<&Series>, params: &KMeansParams) -> PolarsResult<Series> {
    let (x, d) = convert::embedding_rows(embedding)?;
    let w = weights.map(weights_f64).transpose()?;
    if x.is_empty() {
        // No cells, no centroids (the rule "every distinct row becomes a
        // centroid" at zero rows). Polars also calls an aggregation on an
        // empty group when a group_by meets an empty frame.
        return centroids_row(d, Vec::new(), Vec::new());
    }
    let fit = THREAD_POOL
        .install(|| kernels::kmeans::kmeans(&x, d, w.as_deref(), params))
        .map_err(|e| polars_err!(ComputeError: "kmeans_centroids of '{}': {e}", embedding.name()))?;
    centroids_row(d, fit.centroids, fit.mass)
}

/// [`kmeans_centroids`] as an aggregation's inputs arrive: inside
/// `group_by(...).agg` Polars hands each group's Series unnamed, so
/// `names` (the inputs' planned names, where known) name them, and an
/// error says that its row numbers count within the group.
pub fn kmeans_centroids_of_group(inputs: &[Series], names: &[Option<&str>], params: &KMeansParams) -> PolarsResult<Series> {
    polars_ensure!(!inputs.is_empty(), ComputeError: "kmeans_centroids takes an embedding column");
    let in_group = inputs.iter().any(|s| s.name().is_empty());
    let named: Vec<Series> = inputs
        .iter()
        .zip(names.iter().copied().chain(std::iter::repeat(None)))
        .map(|(s, name)| match name {
            Some(n) if s.name().is_empty() => s.clone().with_name(n.into()),
            _ => s.clone(),
        })
        .collect();
    kmeans_centroids(&named[0], named.get(1), params).map_err(|e| match e {
        PolarsError::ComputeError(m) if in_group => {
            PolarsError::ComputeError(format!("{m} (in a group_by group: rows count from the group's first)").into())
        },
        e => e,
    })
}

/// One `centroids_dtype(d)` row from row-major centroids and their masses.
fn centroids_row(d: usize, centroids: Vec<f32>, mass: Vec<f64>) -> PolarsResult<Series> {
    let centroid = convert::array_f32("centroid", d, centroids, None)?.implode()?.into_series();
    let mass = Series::new("mass".into(), mass).implode()?.into_series();
    Ok(StructChunked::from_series("centroids".into(), 1, [centroid, mass].iter())?.into_series())
}

/// Offer a record batch of cells to per-batch bottom-k samplers. `row0` is
/// the global number of the first row (sampling keys hash it).
pub(crate) fn centroid_sample_update(
    samplers: &mut std::collections::BTreeMap<String, BottomK>,
    cap: usize,
    seed: u64,
    width: usize,
    row0: u64,
    embedding: &Series,
    batch: &StringChunked,
) -> PolarsResult<usize> {
    let (x, d) = checked_sample_rows(width, row0, embedding, batch)?;
    for (i, (b, row)) in batch.iter().zip(x.chunks_exact(d)).enumerate() {
        let b = b.expect("checked: no null batch");
        let s = match samplers.get_mut(b) {
            Some(s) => s,
            None => samplers.entry(b.to_string()).or_insert_with(|| BottomK::new(cap, d, seed)),
        };
        s.offer(row0 + i as u64, row);
    }
    Ok(batch.len())
}

/// One batch's k-means on its sample, with masses scaled to its full size.
pub struct BatchCentroids {
    /// Cells of the batch in the data (rows seen, not only those sampled).
    pub n_cells: u64,
    /// Cells of the batch in the sample k-means ran on.
    pub n_sampled: usize,
    /// The k-means fit, its masses scaled by n_cells / n_sampled.
    pub fit: KMeansFit,
}

pub(crate) fn fit_sampled_centroids(sampler: &BottomK, params: &KMeansParams, min_cells_per_centroid: usize) -> PolarsResult<BatchCentroids> {
    let (x, _) = sampler.finish();
    fit_sample(&x, sampler.d(), sampler.n_seen, params, min_cells_per_centroid)
}

/// The fewest centroids `min_cells_per_centroid` leaves a batch (fewer only
/// where `n_centroids` asks for fewer): a batch of a few hundred cells keeps
/// enough centroids to be matched population by population (CellBench's
/// ~200-cell batches in `benches/bench_integration.py`: 12 centroids each
/// mixed 0.559 before the floor existed, 64 each 0.670 in
/// `benches/results/integration.md`).
pub const MIN_CENTROIDS_PER_BATCH: usize = 64;

/// k-means on one batch's sample of `n_cells` cells, masses scaled to them;
/// at most one centroid per `min_cells_per_centroid` sampled cells, but not
/// fewer than [`MIN_CENTROIDS_PER_BATCH`].
pub fn fit_sample(x: &[f32], d: usize, n_cells: u64, params: &KMeansParams, min_cells_per_centroid: usize) -> PolarsResult<BatchCentroids> {
    let n_sampled = x.len() / d;
    let mut params = params.clone();
    params.n_centroids = params.n_centroids.min((n_sampled / min_cells_per_centroid.max(1)).max(MIN_CENTROIDS_PER_BATCH));
    let mut fit = kernels::kmeans::kmeans(x, d, None, &params)?;
    let scale = n_cells as f64 / n_sampled as f64;
    fit.mass.iter_mut().for_each(|m| *m *= scale);
    Ok(BatchCentroids { n_cells, n_sampled, fit })
}

/// The first null of a batch column is an error naming its row.
pub(crate) fn check_no_null_batch(batch: &StringChunked, row0: u64) -> PolarsResult<()> {
    if let Some(i) = batch.iter().position(|b| b.is_none()) {
        polars_bail!(ComputeError: "batch column '{}' is null at row {}; fill or drop null batches first", batch.name(), row0 + i as u64);
    }
    Ok(())
}

/// A record batch's embedding rows, checked as the centroid fit needs them.
pub(crate) fn checked_sample_rows<'a>(width: usize, row0: u64, embedding: &'a Series, batch: &StringChunked) -> PolarsResult<(std::borrow::Cow<'a, [f32]>, usize)> {
    let (x, d) = convert::embedding_rows(embedding)
        .map_err(|e| polars_err!(ComputeError: "{e} (row numbers count from {row0}, the first row of this record batch)"))?;
    if batch.len() * d != x.len() {
        polars_bail!(ComputeError: "batch column '{}' has {} rows but the embedding has {}", batch.name(), batch.len(), x.len() / d);
    }
    check_no_null_batch(batch, row0)?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        polars_bail!(ComputeError: "column '{}' holds the non-finite value {} at row {}; k-means needs finite embeddings (drop or fix those cells)", embedding.name(), x[i], row0 + (i / d) as u64);
    }
    if d != width {
        polars_bail!(ComputeError: "column '{}' has width {d} here but {width} in the schema", embedding.name());
    }
    Ok((x, d))
}
