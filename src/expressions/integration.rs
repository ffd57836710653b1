//! Glue for `knn` and `knn_interpolate`: the searchable form of a fitted
//! integration model, and the Series-level operations over it.

use std::collections::HashMap;

use polars::prelude::*;
use polars_core::runtime::THREAD_POOL;

use super::convert;
use crate::error::KernelError;
use crate::kernels::integrate::{self, IntegrationFit, IntegrationParams, Reference};
use crate::kernels::knn::{self, CentroidIndex};
use crate::kernels::Device;

/// A fitted integration ready to search: one index per batch (own-batch
/// mode) and one over all centroids in model row order (pooled mode, and the
/// row numbers `knn` returns).
#[derive(Debug)]
pub struct InterpolationModel {
    d: usize,
    batches: Vec<String>,
    lookup: HashMap<String, u32>,
    per_batch: Vec<CentroidIndex>,
    pooled: CentroidIndex,
}

impl InterpolationModel {
    /// `labels[j]` is the batch of centroid row `j` (as text: the cells'
    /// batch column is cast to String to be looked up); `centroids` and
    /// `displacement` are row-major, `d` wide. Without displacements the
    /// model only serves `knn`. An empty `labels` means one unnamed set.
    pub fn new(labels: &[String], centroids: Vec<f32>, displacement: Option<Vec<f32>>, d: usize) -> Result<Self, KernelError> {
        let pooled = CentroidIndex::new(centroids, displacement, d)?;
        let n = pooled.len();
        if !labels.is_empty() && labels.len() != n {
            return Err(KernelError::Shape { what: "batch labels (one per centroid)", expected: n, got: labels.len() });
        }
        if n == 0 {
            return Err(KernelError::Invalid("the model has no centroids".into()));
        }
        let mut batches: Vec<String> = Vec::new();
        let mut lookup: HashMap<String, u32> = HashMap::new();
        let mut rows_of: Vec<Vec<usize>> = Vec::new();
        for (j, b) in labels.iter().enumerate() {
            let g = *lookup.entry(b.clone()).or_insert_with(|| {
                batches.push(b.clone());
                rows_of.push(Vec::new());
                (batches.len() - 1) as u32
            });
            rows_of[g as usize].push(j);
        }
        let (all_c, all_d) = pooled.rows();
        let per_batch = rows_of
            .iter()
            .map(|rows| {
                let c: Vec<f32> = rows.iter().flat_map(|&j| all_c[j * d..(j + 1) * d].iter().copied()).collect();
                let disp = all_d.map(|a| rows.iter().flat_map(|&j| a[j * d..(j + 1) * d].iter().copied()).collect());
                CentroidIndex::new(c, disp, d)
            })
            .collect::<Result<_, _>>()?;
        Ok(InterpolationModel { d, batches, lookup, per_batch, pooled })
    }

    /// The centroids' width (the embedding's number of components).
    pub fn d(&self) -> usize {
        self.d
    }

    /// Number of centroids over all batches (the model's rows).
    pub fn n_centroids(&self) -> usize {
        self.pooled.len()
    }

    /// The distinct batch labels, in order of first appearance in the model's
    /// rows (empty for a model without labels).
    pub fn batches(&self) -> &[String] {
        &self.batches
    }

    fn batch_list(&self) -> String {
        let shown: Vec<String> = self.batches.iter().take(10).map(|b| format!("'{b}'")).collect();
        let more = if self.batches.len() > 10 { format!(", … ({} in all)", self.batches.len()) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    }
}

/// An embedding of width `width` against a model of width `d` (also the
/// plugins' schema-time check).
pub fn check_model_width(op: &str, column: &str, width: usize, d: usize) -> PolarsResult<()> {
    if width != d {
        polars_bail!(ComputeError: "{op}: column '{column}' has width {width} but the model's centroids have {d}; project the cells with the same PCA model the centroids came from");
    }
    Ok(())
}

/// Rows of the embedding, checked against the model width; no nulls.
fn rows_for<'a>(op: &str, embedding: &'a Series, model: &InterpolationModel) -> PolarsResult<std::borrow::Cow<'a, [f32]>> {
    let (x, d) = convert::embedding_rows(embedding).map_err(|e| polars_err!(ComputeError: "{op}: {e}"))?;
    check_model_width(op, embedding.name(), d, model.d)?;
    Ok(x)
}

fn kernel_err(op: &str, embedding: &Series, e: KernelError) -> PolarsError {
    polars_err!(ComputeError: "{op} of '{}': {e}; drop or fix those cells", embedding.name())
}

/// Every cell moved by the weighted displacement of its `k` nearest
/// centroids (see `kernels::knn::interpolate`); `Array(Float32, d)` named
/// like `embedding`. `batch = None` searches all centroids. In own-batch mode
/// a cell whose batch is not in the model is an error unless
/// `unknown_pooled`, which sends it to all centroids.
pub fn knn_interpolate(
    embedding: &Series,
    batch: Option<&Series>,
    model: &InterpolationModel,
    k: usize,
    unknown_pooled: bool,
    device: Device,
) -> PolarsResult<Series> {
    const OP: &str = "knn_interpolate";
    let x = rows_for(OP, embedding, model)?;
    let d = model.d;
    let n = x.len() / d;
    let pooled_group = model.per_batch.len() as u32;
    let group: Vec<u32> = match batch {
        None => vec![pooled_group; n],
        Some(b) => {
            if b.len() != n {
                polars_bail!(ComputeError: "{OP}: batch column '{}' has {} rows but '{}' has {n}", b.name(), b.len(), embedding.name());
            }
            let text = b.cast(&DataType::String)?;
            let mut group = Vec::with_capacity(n);
            for (i, v) in text.str()?.iter().enumerate() {
                let Some(v) = v else {
                    polars_bail!(ComputeError: "{OP}: batch column '{}' is null at row {i}; fill or drop cells with no batch", b.name());
                };
                match model.lookup.get(v) {
                    Some(&g) => group.push(g),
                    None if unknown_pooled => group.push(pooled_group),
                    None => polars_bail!(ComputeError: "{OP}: batch column '{}' holds '{v}' at row {i}, which is not a batch of the model (its batches: {}); pass unknown_batch='pooled' to move such cells by all centroids, or refit the model with this batch", b.name(), model.batch_list()),
                }
            }
            group
        },
    };
    let mut indexes: Vec<&CentroidIndex> = model.per_batch.iter().collect();
    indexes.push(&model.pooled);
    // Name the batch whose centroids are too few for k (the kernel can't).
    let mut used = vec![false; indexes.len()];
    group.iter().for_each(|&g| used[g as usize] = true);
    for (g, ix) in indexes.iter().enumerate().filter(|(g, _)| used[*g]) {
        if k > ix.len() {
            let which = model.batches.get(g).map_or("all batches".to_string(), |b| format!("batch '{b}'"));
            polars_bail!(ComputeError: "{OP}: k = {k} is more than the {} centroids of {which}; lower k", ix.len());
        }
    }
    let mut out = vec![0f32; x.len()];
    THREAD_POOL
        .install(|| knn::interpolate_grouped(&x, d, &group, &indexes, k, &mut out, device))
        .map_err(|e| kernel_err(OP, embedding, e))?;
    convert::array_f32(embedding.name(), d, out, None)
}

/// The dtype `knn` returns: `Struct{indices: Array(UInt32, k), distances: Array(Float32, k)}`.
pub fn knn_dtype(k: usize) -> DataType {
    DataType::Struct(vec![
        Field::new("indices".into(), DataType::Array(Box::new(DataType::UInt32), k)),
        Field::new("distances".into(), DataType::Array(Box::new(DataType::Float32), k)),
    ])
}

/// Exact `k` nearest rows of `index` for every row of `queries` (both
/// `Array(Float32, d)`), without a registered model (the metrics search a
/// sample once and drop it). Returns (indices `Array(UInt32, k)`, distances
/// `Array(Float32, k)`), ascending, Euclidean, ties to the lower row.
pub fn knn_search(queries: &Series, index: &Series, k: usize, device: Device) -> PolarsResult<(Series, Series)> {
    let (q, d) = convert::embedding_rows(queries)?;
    let (c, dc) = convert::embedding_rows(index)?;
    polars_ensure!(d == dc, ComputeError: "column '{}' has width {d} but the index '{}' has {dc}", queries.name(), index.name());
    let c = c.into_owned(); // the index keeps its centres; the queries are only read
    let n = q.len() / d;
    let (idx, dist) = THREAD_POOL.install(|| {
        let ix = CentroidIndex::new(c, None, d)?;
        let (mut idx, mut dist) = (vec![0u32; n * k], vec![0f32; n * k]);
        knn::knn(&q, &ix, k, &mut idx, &mut dist, device)?;
        Ok::<_, KernelError>((idx, dist))
    })?;
    Ok((convert::array_of("indices", k, idx, None)?, convert::array_of("distances", k, dist, None)?))
}

/// Each cell's `k` nearest rows of the model (pooled, model row numbers) and
/// their Euclidean distances, ascending; ties go to the lower row.
pub fn knn(embedding: &Series, model: &InterpolationModel, k: usize, device: Device) -> PolarsResult<Series> {
    const OP: &str = "knn";
    let x = rows_for(OP, embedding, model)?;
    if k == 0 || k > model.n_centroids() {
        polars_bail!(ComputeError: "{OP}: k = {k} must be between 1 and the {} points of the index", model.n_centroids());
    }
    let n = x.len() / model.d;
    let (mut idx, mut dist) = (vec![0u32; n * k], vec![0f32; n * k]);
    THREAD_POOL
        .install(|| knn::knn(&x, &model.pooled, k, &mut idx, &mut dist, device))
        .map_err(|e| kernel_err(OP, embedding, e))?;
    let fields = [convert::array_of("indices", k, idx, None)?, convert::array_of("distances", k, dist, None)?];
    Ok(StructChunked::from_series(embedding.name().clone(), n, fields.iter())?.into_series())
}

/// A fitted integration: each centroid's displacement (`Array(Float32, d)`
/// named `displacement`, in the input's row order), the batch names in code
/// order, and the kernel's record of the passes.
#[derive(Debug)]
pub struct IntegrationOutput {
    /// Each centroid's displacement, `Array(Float32, d)`, in the input's row order.
    pub displacement: Series,
    /// The batch names in code order (sorted as `psc.metrics` sorts them).
    pub batches: Vec<String>,
    /// The kernel's fit: the displacements again, and each pass's record.
    pub fit: IntegrationFit,
}

/// Batch codes in sorted order of the batch values (numbers as numbers, the
/// rest as text: the order `psc.metrics` uses), and the names as text.
fn batch_codes(batch: &Series) -> PolarsResult<(Vec<u32>, Vec<String>)> {
    let text = batch.cast(&DataType::String)?;
    let names: Vec<Option<&str>> = text.str()?.iter().collect();
    if let Some(row) = names.iter().position(Option::is_none) {
        polars_bail!(ComputeError: "column '{}' is null at row {row}; every centroid needs a batch", batch.name());
    }
    let names: Vec<&str> = names.into_iter().flatten().collect();
    let mut distinct: Vec<(Option<f64>, &str)> = if batch.dtype().is_primitive_numeric() {
        let num = batch.cast(&DataType::Float64)?;
        num.f64()?.iter().map(|v| v.unwrap_or(f64::NAN)).zip(names.iter().copied()).map(|(v, s)| (Some(v), s)).collect()
    } else {
        names.iter().map(|&s| (None, s)).collect()
    };
    distinct.sort_by(|x, y| match (x.0, y.0) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        _ => x.1.cmp(y.1),
    });
    distinct.dedup_by(|x, y| x.1 == y.1);
    let lookup: HashMap<&str, u32> = distinct.iter().enumerate().map(|(g, (_, s))| (*s, g as u32)).collect();
    Ok((names.iter().map(|s| lookup[s]).collect(), distinct.iter().map(|(_, s)| s.to_string()).collect()))
}

/// `fit_integration` on a centroid table's columns: `centroid`
/// (`Array(Float32, d)`), `batch` (any type; one batch per value) and `mass`
/// (a positive number per centroid; `None`: all 1). `reference`: `None` for
/// the barycentre of all batches, or the name of the batch the others move
/// onto. `params.reference` is set from it.
pub fn fit_integration(
    centroid: &Series,
    batch: &Series,
    mass: Option<&Series>,
    reference: Option<&str>,
    params: &IntegrationParams,
) -> PolarsResult<IntegrationOutput> {
    let (x, d) = convert::embedding_rows(centroid)?;
    let n = x.len() / d.max(1);
    let (codes, batches) = batch_codes(batch)?;
    let w = match mass {
        Some(m) => super::weights_f64(m)?,
        None => vec![1.0; n],
    };
    if codes.len() != n || w.len() != n {
        polars_bail!(ComputeError: "fit_integration: columns '{}' ({n} rows), '{}' ({}) and the masses ({}) differ in length", centroid.name(), batch.name(), codes.len(), w.len());
    }
    if let Some(i) = w.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        polars_bail!(ComputeError: "column '{}' holds {} at row {i}; masses must be positive and finite (drop empty centroids)", mass.map(|m| m.name().as_str()).unwrap_or("mass"), w[i]);
    }
    if batches.len() < 2 {
        polars_bail!(ComputeError: "column '{}' has a single batch ({:?}); integration needs at least 2", batch.name(), batches.first().map(String::as_str).unwrap_or(""));
    }
    for (g, name) in batches.iter().enumerate() {
        let count = codes.iter().filter(|&&c| c as usize == g).count();
        if count < 2 {
            polars_bail!(ComputeError: "batch '{name}' has {count} centroid; each batch needs at least 2 (fit more centroids or drop it)");
        }
    }
    let mut p = params.clone();
    p.reference = match reference {
        None => Reference::Barycenter,
        Some(r) => match batches.iter().position(|b| b == r) {
            Some(g) => Reference::Batch(g),
            None => polars_bail!(ComputeError: "reference must be 'barycenter' or one of the batches {batches:?}, got '{r}'"),
        },
    };
    let fit = THREAD_POOL
        .install(|| integrate::fit_integration(&x, d, &codes, batches.len(), &w, &p))
        .map_err(|e| polars_err!(ComputeError: "fit_integration of '{}': {e}", centroid.name()))?;
    let displacement = convert::array_f32("displacement", d, fit.displacement.clone(), None)?;
    Ok(IntegrationOutput { displacement, batches, fit })
}
