//! The Python extension `polars_singlecell._internal`: the `#[polars_expr]`
//! plugin functions and the streaming-fit accumulators. Glue only: convert,
//! validate options, call `crate::expressions` / `crate::kernels`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use polars::prelude::*;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3_polars::derive::polars_expr;
use pyo3_polars::{PolarsAllocator, PyDataFrame, PySeries};
use serde::Deserialize;

use crate::expressions::{self, convert, InterpolationModel};
use crate::kernels;
use crate::kernels::hvg::{ClippedSums, GeneStats, Transform};
use crate::kernels::kmeans::KMeansParams;
use crate::kernels::sample::{BottomK, KeyCut};
use crate::kernels::pca::{Clip, CovAccumulator, PcaProjector};
use crate::kernels::Device;

#[global_allocator]
static ALLOC: PolarsAllocator = PolarsAllocator::new();

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

// ---------------------------------------------------------------- normalize

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NormalizeKwargs {
    target_sum: Option<f64>,
    log1p: bool,
}

/// Inputs are (values, gene_idx): the output takes the name of the first
/// input, so `with_columns(psc.normalize(...))` replaces `values`.
fn normalize_output(fields: &[Field]) -> PolarsResult<Field> {
    let [values, gene_idx] = fields else {
        polars_bail!(ComputeError: "normalize takes 2 inputs (gene_idx, values), got {}", fields.len());
    };
    convert::check_sparse_fields(&[gene_idx.clone(), values.clone()])?;
    Ok(Field::new(fields[0].name().clone(), DataType::List(Box::new(DataType::Float32))))
}

#[polars_expr(output_type_func = normalize_output)]
fn normalize(inputs: &[Series], kwargs: NormalizeKwargs) -> PolarsResult<Series> {
    expressions::normalize(&inputs[1], &inputs[0], kwargs.target_sum, kwargs.log1p)
}

fn total_counts_output(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new("total_counts".into(), DataType::Float32))
}

#[polars_expr(output_type_func = total_counts_output)]
fn total_counts(inputs: &[Series]) -> PolarsResult<Series> {
    expressions::total_counts(&inputs[0], &inputs[1])
}

// ------------------------------------------------------------- select_genes

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectGenesKwargs {
    genes: Vec<u32>,
}

fn select_genes_output(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new(
        fields[0].name().clone(),
        DataType::Struct(vec![fields[0].clone(), fields[1].clone()]),
    ))
}

#[polars_expr(output_type_func = select_genes_output)]
fn select_genes(inputs: &[Series], kwargs: SelectGenesKwargs) -> PolarsResult<Series> {
    let (idx, val) = expressions::select_genes(&inputs[0], &inputs[1], &kwargs.genes)?;
    let len = idx.len();
    Ok(StructChunked::from_series(inputs[0].name().clone(), len, [idx, val].iter())?.into_series())
}

// ---------------------------------------------------------------- to_cells

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToCellsKwargs {
    /// The vocabulary's token ids, int64 little-endian, gene order (None:
    /// the ids are the gene indices).
    #[serde(with = "serde_bytes")]
    tokens: Option<Vec<u8>>,
    n_genes: Option<usize>,
}

fn to_cells_output(fields: &[Field]) -> PolarsResult<Field> {
    convert::check_token_fields(fields)?;
    let (idx, val) = (DataType::List(Box::new(DataType::UInt32)), DataType::List(Box::new(DataType::Float32)));
    Ok(Field::new("cells".into(), DataType::Struct(vec![Field::new("gene_idx".into(), idx), Field::new("values".into(), val)])))
}

/// The vocabulary is re-read per record batch: 62,710 tokens are 0.5 MB of
/// kwargs and a dense table built in well under a millisecond, against
/// seconds of work per batch.
#[polars_expr(output_type_func = to_cells_output)]
fn to_cells(inputs: &[Series], kwargs: ToCellsKwargs) -> PolarsResult<Series> {
    let map = match &kwargs.tokens {
        Some(b) => {
            polars_ensure!(b.len() % 8 == 0, ComputeError: "tokens: {} bytes is not a whole number of int64", b.len());
            let ids: Vec<i64> = b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            Some(kernels::cells::TokenMap::new(&ids)?)
        },
        None => None,
    };
    let how = match &map {
        Some(m) => kernels::cells::Genes::Vocabulary(m),
        None => kernels::cells::Genes::Indices(kwargs.n_genes),
    };
    let (idx, val) = expressions::to_cells(&inputs[0], &inputs[1], &how)?;
    Ok(StructChunked::from_series("cells".into(), idx.len(), [idx, val].iter())?.into_series())
}

/// The `device` option of an expression or fit ("cpu" or "cuda"), checked
/// to be usable now.
fn device(name: &str) -> Result<Device, crate::error::KernelError> {
    let d: Device = name.parse()?;
    d.check()?;
    Ok(d)
}

fn cpu() -> String {
    "cpu".into()
}

fn yes() -> bool {
    true
}

// -------------------------------------------------------------- pca_project

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PcaProjectKwargs {
    n_comps: usize,
    /// float64 little-endian, (n_genes,)
    #[serde(with = "serde_bytes")]
    mean: Vec<u8>,
    /// float64 little-endian, (n_comps, n_genes) row-major
    #[serde(with = "serde_bytes")]
    components: Vec<u8>,
    /// float64 little-endian, (n_genes,): a scaled fit's standard deviations.
    #[serde(default, with = "serde_bytes")]
    std: Option<Vec<u8>>,
    /// A clipped scaled fit (`max_value`): the genes' means before scaling
    /// (float64 LE; `mean` is then the scaled genes' mean), `max_value`,
    /// `zero_center`.
    #[serde(default, with = "serde_bytes")]
    clip_mean: Option<Vec<u8>>,
    #[serde(default)]
    max_value: Option<f64>,
    #[serde(default = "yes")]
    zero_center: bool,
    #[serde(default = "cpu")]
    device: String,
}

fn f64_le(b: &[u8], what: &str) -> PolarsResult<Vec<f64>> {
    if !b.len().is_multiple_of(8) {
        polars_bail!(ComputeError: "{what}: {} bytes is not a whole number of float64", b.len());
    }
    Ok(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn pca_project_output(fields: &[Field], kwargs: PcaProjectKwargs) -> PolarsResult<Field> {
    convert::check_sparse_fields(fields)?;
    Ok(Field::new("X_pca".into(), DataType::Array(Box::new(DataType::Float32), kwargs.n_comps)))
}

#[polars_expr(output_type_func_with_kwargs = pca_project_output)]
fn pca_project(inputs: &[Series], kwargs: PcaProjectKwargs) -> PolarsResult<Series> {
    let mean = f64_le(&kwargs.mean, "mean")?;
    let components = f64_le(&kwargs.components, "components")?;
    let std = kwargs.std.as_deref().map(|b| f64_le(b, "std")).transpose()?;
    let model = match (kwargs.max_value, &kwargs.clip_mean, std) {
        (Some(max_value), Some(clip_mean), Some(std)) => {
            let clip = Clip::new(f64_le(clip_mean, "clip_mean")?, std, max_value, kwargs.zero_center)?;
            PcaProjector::clipped(&mean, &components, kwargs.n_comps, clip)?
        },
        (Some(_), _, _) => polars_bail!(ComputeError: "a clipped PCA model needs its std and clip_mean; reload it with PcaModel.load"),
        (None, _, std) => PcaProjector::new(&mean, &components, kwargs.n_comps, std.as_deref())?,
    };
    expressions::pca_project(&inputs[0], &inputs[1], &model, device(&kwargs.device)?)
}

// -------------------------------------------------------- kmeans_centroids

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KMeansKwargs {
    n_centroids: usize,
    max_iter: usize,
    tol: f64,
    random_state: u64,
    init_size: Option<usize>,
    #[serde(default = "cpu")]
    device: String,
    /// The input columns' names as Python planned them: inside
    /// `group_by(...).agg` Polars hands the plugin each group's Series
    /// unnamed, and an error message should still name the column.
    #[serde(default)]
    names: Vec<String>,
}

impl KMeansKwargs {
    fn params(&self) -> Result<KMeansParams, crate::error::KernelError> {
        let mut p = KMeansParams::new(self.n_centroids);
        p.max_iter = self.max_iter;
        p.tol = self.tol;
        p.seed = self.random_state;
        p.init_size = self.init_size;
        p.device = device(&self.device)?;
        Ok(p)
    }
}

fn kmeans_centroids_output(fields: &[Field]) -> PolarsResult<Field> {
    let Some(embedding) = fields.first() else {
        polars_bail!(ComputeError: "kmeans_centroids takes an embedding column");
    };
    let d = convert::check_embedding_field(embedding)?;
    if let Some(w) = fields.get(1) {
        if !w.dtype().is_primitive_numeric() {
            polars_bail!(ComputeError: "weights column '{}' has dtype {}, expected a number per cell", w.name(), w.dtype());
        }
    }
    Ok(Field::new("centroids".into(), expressions::centroids_dtype(d)))
}

#[polars_expr(output_type_func = kmeans_centroids_output)]
fn kmeans_centroids(inputs: &[Series], kwargs: KMeansKwargs) -> PolarsResult<Series> {
    // Unnamed inputs mean a group_by group: name them, and say that row
    // numbers count within the group.
    let in_group = inputs.iter().any(|s| s.name().is_empty());
    let named: Vec<Series> = inputs
        .iter()
        .zip(kwargs.names.iter().map(Some).chain(std::iter::repeat(None)))
        .map(|(s, name)| match name {
            Some(n) if s.name().is_empty() => s.clone().with_name(n.as_str().into()),
            _ => s.clone(),
        })
        .collect();
    expressions::kmeans_centroids(&named[0], named.get(1), &kwargs.params()?).map_err(|e| match e {
        PolarsError::ComputeError(m) if in_group => {
            PolarsError::ComputeError(format!("{m} (in a group_by group: rows count from the group's first)").into())
        },
        e => e,
    })
}

// ------------------------------------------------------ knn, knn_interpolate

/// Models registered from Python (`register_model`), keyed by a digest of
/// their contents. A plugin call looks its model up (one read lock, no copy),
/// so a model is built once per process however many record batches stream
/// through. Passing the arrays in kwargs instead would unpickle them on every
/// batch (BUILD.md: 2–4 ms per MB).
static MODELS: LazyLock<RwLock<HashMap<String, Arc<InterpolationModel>>>> = LazyLock::new(Default::default);
/// How many models this process has built (tests check it stays at one).
static MODEL_BUILDS: AtomicU64 = AtomicU64::new(0);

fn lookup_model(key: &str) -> PolarsResult<Arc<InterpolationModel>> {
    let models = MODELS.read().map_err(|_| polars_err!(ComputeError: "the model registry is poisoned by an earlier panic"))?;
    models.get(key).cloned().ok_or_else(|| {
        polars_err!(ComputeError: "model {key} is not loaded in this process (was the query built in another process, or psc.clear_models() called?); build the expression again here with model=<IntegrationModel or Parquet path>")
    })
}

/// Build and keep a model under `key` (a no-op when it is already there).
/// Returns whether it was built now.
#[pyfunction]
#[pyo3(signature = (key, labels, centroids, displacement=None))]
fn register_model(
    py: Python<'_>,
    key: String,
    labels: Vec<String>,
    centroids: PySeries,
    displacement: Option<PySeries>,
) -> PyResult<bool> {
    if MODELS.read().map_err(value_error)?.contains_key(&key) {
        return Ok(false);
    }
    let (c, d) = convert::embedding_rows(&centroids.0).map_err(value_error)?;
    let disp = match &displacement {
        Some(s) => {
            let (v, dd) = convert::embedding_rows(&s.0).map_err(value_error)?;
            if dd != d {
                return Err(value_error(format!("column '{}' has width {dd} but the centroids have {d}", s.0.name())));
            }
            Some(v.into_owned())
        },
        None => None,
    };
    let c = c.into_owned();
    let model = py.detach(|| InterpolationModel::new(&labels, c, disp, d)).map_err(value_error)?;
    MODELS.write().map_err(value_error)?.insert(key, Arc::new(model));
    MODEL_BUILDS.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

#[pyfunction]
fn model_builds() -> u64 {
    MODEL_BUILDS.load(Ordering::Relaxed)
}

/// Forget every registered model (queries built before fail clearly).
#[pyfunction]
fn clear_models() -> PyResult<()> {
    MODELS.write().map_err(value_error)?.clear();
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnnInterpolateKwargs {
    model: String,
    d: usize,
    k: usize,
    unknown_pooled: bool,
    #[serde(default = "cpu")]
    device: String,
}

/// Schema-time check: the embedding is `Array(Float32, d)` of the model's `d`.
fn embedding_for_model(op: &str, f: &Field, d: usize) -> PolarsResult<()> {
    let width = convert::check_embedding_field(f)?;
    expressions::check_model_width(op, f.name(), width, d)
}

fn knn_interpolate_output(fields: &[Field], kwargs: KnnInterpolateKwargs) -> PolarsResult<Field> {
    let Some(embedding) = fields.first() else {
        polars_bail!(ComputeError: "knn_interpolate takes an embedding column");
    };
    embedding_for_model("knn_interpolate", embedding, kwargs.d)?;
    if let Some(b) = fields.get(1) {
        if b.dtype().is_nested() {
            polars_bail!(ComputeError: "knn_interpolate: batch column '{}' has dtype {}, expected one label per cell (string, categorical or integer)", b.name(), b.dtype());
        }
    }
    Ok(Field::new(embedding.name().clone(), DataType::Array(Box::new(DataType::Float32), kwargs.d)))
}

#[polars_expr(output_type_func_with_kwargs = knn_interpolate_output)]
fn knn_interpolate(inputs: &[Series], kwargs: KnnInterpolateKwargs) -> PolarsResult<Series> {
    let model = lookup_model(&kwargs.model)?;
    expressions::knn_interpolate(&inputs[0], inputs.get(1), &model, kwargs.k, kwargs.unknown_pooled, device(&kwargs.device)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnnKwargs {
    index: String,
    d: usize,
    k: usize,
    #[serde(default = "cpu")]
    device: String,
}

fn knn_output(fields: &[Field], kwargs: KnnKwargs) -> PolarsResult<Field> {
    let Some(embedding) = fields.first() else {
        polars_bail!(ComputeError: "knn takes an embedding column");
    };
    embedding_for_model("knn", embedding, kwargs.d)?;
    Ok(Field::new(embedding.name().clone(), expressions::knn_dtype(kwargs.k)))
}

#[polars_expr(output_type_func_with_kwargs = knn_output)]
fn knn(inputs: &[Series], kwargs: KnnKwargs) -> PolarsResult<Series> {
    let model = lookup_model(&kwargs.index)?;
    expressions::knn(&inputs[0], &model, kwargs.k, device(&kwargs.device)?)
}

// ------------------------------------------------------------ streaming fits

/// A rayon pool for the single-call fits (never the global pool: inside a
/// plugin process that would fight Polars' own).
fn fit_pool(n_threads: usize) -> PyResult<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(n_threads.max(1)).build().map_err(value_error)
}

/// Per-batch gene statistics for `highly_variable_genes`, fed one record
/// batch at a time.
#[pyclass(module = "polars_singlecell._internal")]
struct GeneStatsAccumulator {
    n_genes: usize,
    transform: Transform,
    batches: BTreeMap<String, GeneStats>,
}

#[pymethods]
impl GeneStatsAccumulator {
    /// `transform`: "expm1" (flavor seurat: log-normalised values),
    /// "counts" (flavor seurat_v3: raw counts, float32 squares as scanpy) or
    /// "exact" (the values, float64 squares).
    #[new]
    #[pyo3(signature = (n_genes, transform = "expm1"))]
    fn new(n_genes: usize, transform: &str) -> PyResult<Self> {
        if n_genes == 0 {
            return Err(value_error("n_genes must be at least 1"));
        }
        let transform = match transform {
            "expm1" => Transform::Expm1,
            "counts" => Transform::Counts,
            "exact" => Transform::Exact,
            t => return Err(value_error(format!("transform must be 'expm1', 'counts' or 'exact', got {t:?}"))),
        };
        Ok(GeneStatsAccumulator { n_genes, transform, batches: BTreeMap::new() })
    }

    /// Entries seen that are not whole numbers (raw counts are).
    #[getter]
    fn non_integer(&self) -> u64 {
        self.batches.values().map(|b| b.non_integer).sum()
    }

    /// `batch`: a Series of batch labels (or None for one batch).
    #[pyo3(signature = (gene_idx, values, batch=None))]
    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries, batch: Option<PySeries>) -> PyResult<()> {
        let labels = match batch {
            Some(b) => Some(b.0.cast(&DataType::String).map_err(value_error)?.str().map_err(value_error)?.clone()),
            None => None,
        };
        let (n_genes, transform, batches) = (self.n_genes, self.transform, &mut self.batches);
        py.detach(|| expressions::gene_stats_update(batches, n_genes, transform, &gene_idx.0, &values.0, labels.as_ref()))
            .map_err(value_error)
    }

    /// One row per (batch, gene): n_cells, mean, var (ddof=1), nnz, sum,
    /// sumsq, and std as `sc.pp.scale` divides by (`pca::scale_std`).
    fn finish(&self) -> PyResult<PyDataFrame> {
        let g = self.n_genes;
        let (mut batch, mut gene, mut n_cells, mut mean, mut var, mut nnz) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut sum, mut sumsq, mut std) = (vec![], vec![], vec![]);
        for (label, st) in &self.batches {
            let (m, v) = st.mean_var();
            batch.extend(std::iter::repeat_n(label.clone(), g));
            gene.extend(0..g as u32);
            n_cells.extend(std::iter::repeat_n(st.n_cells, g));
            std.extend(m.iter().zip(&v).map(|(&m, &v)| kernels::pca::scale_std(m, v)));
            mean.extend(m);
            var.extend(v);
            nnz.extend(st.nnz.iter().copied());
            sum.extend(st.sum.iter().copied());
            sumsq.extend(st.sumsq.iter().copied());
        }
        let df = DataFrame::new_infer_height(vec![
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
        .map_err(value_error)?;
        Ok(PyDataFrame(df))
    }
}

/// seurat_v3's second pass: per batch, Σ min(x, clip) and Σ min(x, clip)²
/// per gene, fed one record batch at a time.
#[pyclass(module = "polars_singlecell._internal")]
struct ClippedSumsAccumulator {
    n_genes: usize,
    batches: BTreeMap<String, ClippedSums>,
}

#[pymethods]
impl ClippedSumsAccumulator {
    /// `clip`: (batch label, clip value per gene) for every batch.
    #[new]
    fn new(clip: Vec<(String, Vec<f64>)>) -> PyResult<Self> {
        let n_genes = clip.first().map(|c| c.1.len()).ok_or_else(|| value_error("clip lists no batch"))?;
        let mut batches = BTreeMap::new();
        for (label, c) in clip {
            if c.len() != n_genes {
                return Err(value_error(format!("batch {label:?} has {} clip values, expected {n_genes}", c.len())));
            }
            batches.insert(label, ClippedSums::new(c));
        }
        Ok(ClippedSumsAccumulator { n_genes, batches })
    }

    #[pyo3(signature = (gene_idx, values, batch=None))]
    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries, batch: Option<PySeries>) -> PyResult<()> {
        let labels = match batch {
            Some(b) => Some(b.0.cast(&DataType::String).map_err(value_error)?.str().map_err(value_error)?.clone()),
            None => None,
        };
        let (n_genes, batches) = (self.n_genes, &mut self.batches);
        py.detach(|| expressions::clipped_sums_update(batches, n_genes, &gene_idx.0, &values.0, labels.as_ref()))
            .map_err(value_error)
    }

    /// One row per (batch, gene): sum, sumsq.
    fn finish(&self) -> PyResult<PyDataFrame> {
        let g = self.n_genes;
        let (mut batch, mut gene, mut sum, mut sumsq) = (vec![], vec![], vec![], vec![]);
        for (label, st) in &self.batches {
            batch.extend(std::iter::repeat_n(label.clone(), g));
            gene.extend(0..g as u32);
            sum.extend(st.sum.iter().copied());
            sumsq.extend(st.sumsq.iter().copied());
        }
        let df = DataFrame::new_infer_height(vec![
            Column::new("batch".into(), batch),
            Column::new("gene_idx".into(), gene),
            Column::new("sum".into(), sum),
            Column::new("sumsq".into(), sumsq),
        ])
        .map_err(value_error)?;
        Ok(PyDataFrame(df))
    }
}

/// Degree-2 loess of `y` on `x` with scikit-misc's defaults (interpolate
/// surface): seurat_v3's expected log-variance per gene.
#[pyfunction]
#[pyo3(signature = (x, y, span = 0.3, cell = 0.2))]
fn loess(py: Python<'_>, x: Vec<f64>, y: Vec<f64>, span: f64, cell: f64) -> PyResult<Vec<f64>> {
    py.detach(|| kernels::loess::loess(&x, &y, span, cell)).map_err(value_error)
}

/// Exact float64 covariance of sparse cells, fed one record batch at a time.
#[pyclass(module = "polars_singlecell._internal")]
struct PcaAccumulator {
    acc: CovAccumulator,
    pool: rayon::ThreadPool,
    clip: Option<Clip>,
}

#[pymethods]
impl PcaAccumulator {
    /// `clip`: (mean, std, max_value, zero_center) of a first pass: this
    /// pass then fits the PCA of the scaled genes clipped at `max_value`.
    #[new]
    #[pyo3(signature = (n_genes, n_threads, device = "cpu", clip = None))]
    fn new(n_genes: usize, n_threads: usize, device: &str, clip: Option<(Vec<f64>, Vec<f64>, f64, bool)>) -> PyResult<Self> {
        let dev = self::device(device).map_err(value_error)?;
        let clip = clip.map(|(m, s, v, z)| Clip::new(m, s, v, z)).transpose().map_err(value_error)?;
        if let Some(c) = &clip {
            if c.n_genes() != n_genes {
                return Err(value_error(format!("clip has {} genes, the fit {n_genes}", c.n_genes())));
            }
        }
        Ok(PcaAccumulator { acc: CovAccumulator::with_device(n_genes, dev).map_err(value_error)?, pool: fit_pool(n_threads)?, clip })
    }

    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries) -> PyResult<()> {
        let (acc, pool, clip) = (&mut self.acc, &self.pool, self.clip.as_ref());
        py.detach(|| pool.install(|| expressions::fit_pca_update(acc, clip, &gene_idx.0, &values.0))).map_err(value_error)
    }

    /// (n_cells, mean, components flattened (n_comps × n_genes), explained
    /// variance, explained variance ratio) as float64 Series.
    /// `scale`: the PCA of the genes scaled to unit variance; `std` is then
    /// returned (else None). With `clip`, `mean` is the scaled genes' mean.
    #[pyo3(signature = (n_comps, scale = false))]
    #[allow(clippy::type_complexity)]
    fn finish(&self, py: Python<'_>, n_comps: usize, scale: bool) -> PyResult<(u64, PySeries, PySeries, PySeries, PySeries, Option<PySeries>)> {
        let (acc, pool) = (&self.acc, &self.pool);
        let fit = py.detach(|| pool.install(|| acc.fit_with(n_comps, scale))).map_err(value_error)?;
        let comps = fit.components_row_major();
        let s = |name: &str, v: Vec<f64>| PySeries(Series::new(name.into(), v));
        let mean = match &self.clip {
            Some(c) => c.scaled_mean(&fit.mean),
            None => fit.mean,
        };
        Ok((
            fit.n_cells,
            s("mean", mean),
            s("components", comps),
            s("explained_variance", fit.explained_variance),
            s("explained_variance_ratio", fit.explained_variance_ratio),
            fit.std.map(|v| s("std", v)),
        ))
    }

    #[getter]
    fn n_cells(&self) -> u64 {
        self.acc.n_cells()
    }
}

/// What both centroid samplers are built from: the embedding width, the
/// per-batch cap, the seed and the fit's thread pool.
struct SamplerSpec {
    cap: usize,
    d: usize,
    seed: u64,
    pool: rayon::ThreadPool,
}

impl SamplerSpec {
    fn new(d: usize, max_samples_per_batch: usize, random_state: u64, n_threads: usize) -> PyResult<Self> {
        if max_samples_per_batch == 0 || d == 0 {
            return Err(value_error("max_samples_per_batch and the embedding width must be at least 1"));
        }
        Ok(SamplerSpec { d, cap: max_samples_per_batch, seed: random_state, pool: fit_pool(n_threads)? })
    }

    fn params(&self, n_centroids: usize, max_iter: usize, tol: f64, init_size: Option<usize>, device: &str) -> PyResult<KMeansParams> {
        let kw = KMeansKwargs { n_centroids, max_iter, tol, random_state: self.seed, init_size, device: device.into(), names: Vec::new() };
        kw.params().map_err(value_error)
    }
}

/// A batch column as text (samplers key batches by their label's text).
fn batch_labels(batch: &PySeries) -> PyResult<StringChunked> {
    let labels = batch.0.cast(&DataType::String).map_err(value_error)?;
    Ok(labels.str().map_err(value_error)?.clone())
}

/// Per-batch seeded samples of an embedding (bottom-k by a hash of the row
/// number), fed one record batch at a time; then k-means per batch.
#[pyclass(module = "polars_singlecell._internal")]
struct CentroidSampler {
    spec: SamplerSpec,
    n_rows: u64,
    samplers: BTreeMap<String, BottomK>,
}

#[pymethods]
impl CentroidSampler {
    #[new]
    fn new(d: usize, max_samples_per_batch: usize, random_state: u64, n_threads: usize) -> PyResult<Self> {
        Ok(CentroidSampler { spec: SamplerSpec::new(d, max_samples_per_batch, random_state, n_threads)?, n_rows: 0, samplers: BTreeMap::new() })
    }

    fn update(&mut self, py: Python<'_>, embedding: PySeries, batch: PySeries) -> PyResult<()> {
        let labels = batch_labels(&batch)?;
        let SamplerSpec { cap, d, seed, .. } = self.spec;
        let (samplers, row0) = (&mut self.samplers, self.n_rows);
        let n = py
            .detach(|| expressions::centroid_sample_update(samplers, cap, seed, d, row0, &embedding.0, &labels))
            .map_err(value_error)?;
        self.n_rows += n as u64;
        Ok(())
    }

    #[getter]
    fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// k-means per batch (batches in sorted label order). Returns the long
    /// table (batch, centroid_id, centroid, mass) and one summary row per batch.
    #[pyo3(signature = (n_centroids, max_iter, tol, init_size, device = "cpu", min_cells_per_centroid = 1))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
    fn fit(
        &self,
        py: Python<'_>,
        n_centroids: usize,
        max_iter: usize,
        tol: f64,
        init_size: Option<usize>,
        device: &str,
        min_cells_per_centroid: usize,
    ) -> PyResult<(PyDataFrame, PyDataFrame)> {
        let params = self.spec.params(n_centroids, max_iter, tol, init_size, device)?;
        let (samplers, pool) = (&self.samplers, &self.spec.pool);
        let fits = py
            .detach(|| {
                pool.install(|| {
                    samplers
                        .iter()
                        .map(|(b, s)| expressions::fit_sampled_centroids(s, &params, min_cells_per_centroid).map(|f| (b.clone(), f)))
                        .collect::<PolarsResult<Vec<_>>>()
                })
            })
            .map_err(value_error)?;
        centroid_tables(self.spec.d, &fits)
    }
}

/// The centroid fit's two tables: one row per centroid (batch, centroid_id,
/// centroid, mass) and one per batch (its summary).
fn centroid_tables(d: usize, fits: &[(String, expressions::BatchCentroids)]) -> PyResult<(PyDataFrame, PyDataFrame)> {
    let (mut batch, mut cid, mut cent, mut mass) = (vec![], vec![], vec![], vec![]);
    let (mut sb, mut n_cells, mut n_sampled, mut k, mut inertia, mut n_iter, mut converged) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (b, f) in fits {
        let kb = f.fit.n_centroids();
        batch.extend(std::iter::repeat_n(b.clone(), kb));
        cid.extend(0..kb as u32);
        cent.extend_from_slice(&f.fit.centroids);
        mass.extend_from_slice(&f.fit.mass);
        sb.push(b.clone());
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
        convert::array_f32("centroid", d, cent, None).map_err(value_error)?.into(),
        Column::new("mass".into(), mass),
    ])
    .map_err(value_error)?;
    let summary = DataFrame::new_infer_height(vec![
        Column::new("batch".into(), sb),
        Column::new("n_cells".into(), n_cells),
        Column::new("n_sampled".into(), n_sampled),
        Column::new("n_centroids".into(), k),
        Column::new("inertia".into(), inertia),
        Column::new("n_iter".into(), n_iter),
        Column::new("converged".into(), converged),
    ])
    .map_err(value_error)?;
    Ok((PyDataFrame(long), PyDataFrame(summary)))
}

/// The low-memory centroid fit (`fit_centroids(low_memory=True)`): the same
/// sample and centroids as [`CentroidSampler`], with one batch's sample in
/// memory instead of all. Pass one (`count`) reads the batch column and fixes
/// each batch's sample; pass two (`update`) appends each kept row to its
/// batch's file under the folder given to `start`; `fit` loads one batch's
/// sample at a time.
#[pyclass(module = "polars_singlecell._internal")]
struct SpillSampler {
    spec: SamplerSpec,
    n_rows: u64,
    cuts: BTreeMap<String, KeyCut>,
    samples: Option<BTreeMap<String, expressions::SpilledSample>>,
    pass_rows: u64,
}

#[pymethods]
impl SpillSampler {
    #[new]
    fn new(d: usize, max_samples_per_batch: usize, random_state: u64, n_threads: usize) -> PyResult<Self> {
        let spec = SamplerSpec::new(d, max_samples_per_batch, random_state, n_threads)?;
        Ok(SpillSampler { spec, n_rows: 0, cuts: BTreeMap::new(), samples: None, pass_rows: 0 })
    }

    /// Pass one: a record batch of the batch column.
    fn count(&mut self, py: Python<'_>, batch: PySeries) -> PyResult<()> {
        if self.samples.is_some() {
            return Err(value_error("count() after start(): pass one is over"));
        }
        let labels = batch_labels(&batch)?;
        let (cuts, cap, seed, row0) = (&mut self.cuts, self.spec.cap, self.spec.seed, self.n_rows);
        let n = py.detach(|| expressions::centroid_cut_update(cuts, cap, seed, row0, &labels)).map_err(value_error)?;
        self.n_rows += n as u64;
        Ok(())
    }

    /// End pass one; pass two writes the batches' samples under `dir`.
    fn start(&mut self, dir: std::path::PathBuf) -> PyResult<()> {
        if self.samples.is_some() || (self.cuts.is_empty() && self.n_rows > 0) {
            return Err(value_error("start() twice: pass two has begun"));
        }
        // Enough buffer to write in large pieces: 64 MiB in all up to 1024 batches, 64 KiB a batch beyond.
        let flush_at = ((64usize << 20) / self.cuts.len().max(1)).clamp(64 << 10, 1 << 20);
        self.samples = Some(
            self.cuts
                .iter()
                .enumerate()
                .map(|(i, (b, c))| (b.clone(), expressions::SpilledSample::new(c.cut(), dir.join(format!("{i}.f32")), flush_at)))
                .collect(),
        );
        self.cuts = BTreeMap::new(); // the keys' memory goes before pass two's
        self.pass_rows = 0;
        Ok(())
    }

    /// Pass two: a record batch of the embedding and batch columns, the rows
    /// in the order of pass one.
    fn update(&mut self, py: Python<'_>, embedding: PySeries, batch: PySeries) -> PyResult<()> {
        let Some(samples) = self.samples.as_mut() else {
            return Err(value_error("update() before start()"));
        };
        let labels = batch_labels(&batch)?;
        let (d, row0) = (self.spec.d, self.pass_rows);
        let n = py.detach(|| expressions::centroid_spill_update(samples, d, row0, &embedding.0, &labels)).map_err(value_error)?;
        self.pass_rows += n as u64;
        Ok(())
    }

    #[getter]
    fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// k-means per batch, one batch's sample loaded at a time; the tables of
    /// [`CentroidSampler::fit`].
    #[pyo3(signature = (n_centroids, max_iter, tol, init_size, device = "cpu", min_cells_per_centroid = 1))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
    fn fit(
        &mut self,
        py: Python<'_>,
        n_centroids: usize,
        max_iter: usize,
        tol: f64,
        init_size: Option<usize>,
        device: &str,
        min_cells_per_centroid: usize,
    ) -> PyResult<(PyDataFrame, PyDataFrame)> {
        let mut samples = self.samples.take().ok_or_else(|| value_error("fit() before start(), or fit() twice"))?;
        if self.pass_rows != self.n_rows {
            return Err(value_error(format!(
                "the data gave {} rows on its first read and {} on its second; low_memory reads the data twice, \
                 so it must give the same rows in the same order each time",
                self.n_rows, self.pass_rows
            )));
        }
        // Same count, other rows (reordered or moved between batches): the
        // kept rows are no longer each batch's sample.
        if let Some((b, s)) = samples.iter().find(|(_, s)| s.n_seen != s.cut.n_seen || s.n_kept != s.cut.n_kept) {
            return Err(value_error(format!(
                "batch '{b}' had {} rows ({} sampled) on the data's first read and {} ({} sampled) on its second; \
                 low_memory reads the data twice, so it must give the same rows in the same order each time",
                s.cut.n_seen, s.cut.n_kept, s.n_seen, s.n_kept
            )));
        }
        // Nothing stays buffered while earlier batches' k-means run.
        for s in samples.values_mut() {
            s.flush().map_err(value_error)?;
        }
        let params = self.spec.params(n_centroids, max_iter, tol, init_size, device)?;
        let (pool, d) = (&self.spec.pool, self.spec.d);
        let fits = py
            .detach(|| {
                pool.install(|| {
                    samples
                        .into_iter()
                        .map(|(b, s)| {
                            let n_cells = s.cut.n_seen;
                            let x = s.load(d)?;
                            expressions::fit_sample(&x, d, n_cells, &params, min_cells_per_centroid).map(|f| (b, f))
                        })
                        .collect::<PolarsResult<Vec<_>>>()
                })
            })
            .map_err(value_error)?;
        centroid_tables(d, &fits)
    }
}

// ------------------------------------------------------------------ metrics

/// A flat numeric Series without nulls as a Vec (`expected` names its dtype
/// in the error).
fn flat_values<T: PolarsNumericType>(s: &Series, expected: &str) -> PyResult<Vec<T::Native>> {
    Ok(flat_slice::<T>(s, expected)?.into_owned())
}

/// [`flat_values`], borrowed where the data is one chunk (a NumPy array's
/// always is): a 2048 × 4096 cost matrix copied element by element took 9%
/// of a Sinkhorn solve.
fn flat_slice<'a, T: PolarsNumericType>(s: &'a Series, expected: &str) -> PyResult<std::borrow::Cow<'a, [T::Native]>> {
    let ca = s
        .unpack::<T>()
        .map_err(|_| value_error(format!("column '{}' has dtype {}, expected {expected}", s.name(), s.dtype())))?;
    if ca.null_count() > 0 {
        return Err(value_error(format!("column '{}' holds nulls", s.name())));
    }
    Ok(match ca.cont_slice() {
        Ok(values) => values.into(),
        Err(_) => ca.into_no_null_iter().collect::<Vec<_>>().into(),
    })
}

/// Exact `k` nearest rows of `index` for every row of `queries` (both
/// `Array(Float32, d)`), without registering a model: the metrics search a
/// sample once and drop it. Returns (indices `Array(UInt32, k)`, distances
/// `Array(Float32, k)`), ascending, Euclidean, ties to the lower row.
#[pyfunction]
#[pyo3(signature = (queries, index, k, device = "cpu"))]
fn knn_search(py: Python<'_>, queries: PySeries, index: PySeries, k: usize, device: &str) -> PyResult<(PySeries, PySeries)> {
    let dev = self::device(device).map_err(value_error)?;
    let (q, d) = convert::embedding_rows(&queries.0).map_err(value_error)?;
    let (c, dc) = convert::embedding_rows(&index.0).map_err(value_error)?;
    if d != dc {
        return Err(value_error(format!(
            "column '{}' has width {d} but the index '{}' has {dc}",
            queries.0.name(),
            index.0.name()
        )));
    }
    let c = c.into_owned(); // the index keeps its centres; the queries are only read
    let n = q.len() / d;
    let (idx, dist) = py
        .detach(|| {
            polars_core::runtime::THREAD_POOL.install(|| {
                let ix = kernels::knn::CentroidIndex::new(c, None, d)?;
                let (mut idx, mut dist) = (vec![0u32; n * k], vec![0f32; n * k]);
                kernels::knn::knn(&q, &ix, k, &mut idx, &mut dist, dev)?;
                Ok::<_, crate::error::KernelError>((idx, dist))
            })
        })
        .map_err(value_error)?;
    let idx = convert::array_of("indices", k, idx, None).map_err(value_error)?;
    let dist = convert::array_of("distances", k, dist, None).map_err(value_error)?;
    Ok((PySeries(idx), PySeries(dist)))
}

/// Entropic OT plan (log domain) between masses `a` and `b` for a row-major
/// cost matrix; `reg_m = inf` is balanced; `init_phi` warm-starts the row
/// potentials (a previous solve's). Returns (plan as a flat Float64 Series,
/// row potentials, iterations, converged, last potential change).
#[pyfunction]
#[pyo3(signature = (a, b, cost, epsilon, reg_m, max_iter, tol, init_phi=None))]
#[allow(clippy::too_many_arguments)]
fn sinkhorn(
    py: Python<'_>,
    a: PySeries,
    b: PySeries,
    cost: PySeries,
    epsilon: f64,
    reg_m: f64,
    max_iter: usize,
    tol: f64,
    init_phi: Option<PySeries>,
) -> PyResult<(PySeries, PySeries, usize, bool, f64)> {
    let f64s = |s: &PySeries| flat_values::<Float64Type>(&s.0, "Float64");
    let (a, b) = (f64s(&a)?, f64s(&b)?);
    let c = flat_slice::<Float64Type>(&cost.0, "Float64")?; // read where it lies, not copied
    let init = init_phi.as_ref().map(f64s).transpose()?;
    let params = kernels::ot::SinkhornParams { epsilon, reg_m, max_iter, tol };
    let (plan, fit) = py
        .detach(|| {
            polars_core::runtime::THREAD_POOL.install(|| {
                let fit = kernels::ot::sinkhorn_log(&a, &b, &c, &params, init.as_deref())?;
                Ok::<_, crate::error::KernelError>((kernels::ot::plan(&a, &b, &c, &fit, epsilon), fit))
            })
        })
        .map_err(value_error)?;
    let phi = Series::new("phi".into(), fit.phi);
    Ok((PySeries(Series::new("plan".into(), plan)), PySeries(phi), fit.iterations, fit.converged, fit.delta))
}

/// `fit_integration`'s algorithm (see `kernels::integrate`) on a centroid
/// table's columns. Returns (displacement, batch names in code order, each
/// pass's cost unit, each pass's kind, and per solve (pass, round, batch
/// code, iterations, converged, delta, marginal error)).
#[pyfunction]
#[pyo3(signature = (centroid, batch, mass, reference, epsilon, reg_m, n_rounds, min_passes, max_passes, max_iter, tol, n_neighbors, smooth_steps, n_reference, random_state))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn fit_integration(
    py: Python<'_>,
    centroid: PySeries,
    batch: PySeries,
    mass: Option<PySeries>,
    reference: Option<String>,
    epsilon: f64,
    reg_m: f64,
    n_rounds: usize,
    min_passes: usize,
    max_passes: usize,
    max_iter: usize,
    tol: f64,
    n_neighbors: usize,
    smooth_steps: usize,
    n_reference: usize,
    random_state: u64,
) -> PyResult<(PySeries, Vec<String>, Vec<f64>, Vec<&'static str>, Vec<(usize, usize, usize, usize, bool, f64, f64)>)> {
    let params = kernels::integrate::IntegrationParams {
        reference: kernels::integrate::Reference::Barycenter,
        epsilon,
        reg_m,
        n_rounds,
        min_passes,
        max_passes,
        max_iter,
        tol,
        n_neighbors,
        smooth_steps,
        n_reference,
        seed: random_state,
    };
    let out = py
        .detach(|| expressions::fit_integration(&centroid.0, &batch.0, mass.as_ref().map(|m| &m.0), reference.as_deref(), &params))
        .map_err(value_error)?;
    let passes = out.fit.passes.iter().map(|k| k.as_str()).collect();
    let records = out
        .fit
        .convergence
        .iter()
        .map(|r| (r.pass, r.round, r.batch, r.iterations, r.converged, r.delta, r.marginal_error))
        .collect();
    Ok((PySeries(out.displacement), out.batches, out.fit.scales, passes, records))
}

/// LISI of every row of a neighbour table: `distances` is `Array(Float32, k)`
/// (Euclidean, self excluded), `labels` the neighbours' category codes,
/// flattened row by row (n·k `UInt32`).
#[pyfunction]
fn lisi(py: Python<'_>, distances: PySeries, labels: PySeries, n_categories: usize, perplexity: f64) -> PyResult<PySeries> {
    let (d, k) = convert::embedding_rows(&distances.0).map_err(value_error)?;
    let l = flat_values::<UInt32Type>(&labels.0, "UInt32")?;
    let out = py
        .detach(|| polars_core::runtime::THREAD_POOL.install(|| kernels::metrics::lisi(&d, &l, k, n_categories, perplexity)))
        .map_err(value_error)?;
    Ok(PySeries(Series::new("lisi".into(), out)))
}

/// Connected components of the undirected graph on `n` nodes with edges
/// (src, dst); each node's component is named by its smallest member.
#[pyfunction]
fn connected_components(py: Python<'_>, n: usize, src: PySeries, dst: PySeries) -> PyResult<PySeries> {
    let (a, b) = (flat_values::<UInt32Type>(&src.0, "UInt32")?, flat_values::<UInt32Type>(&dst.0, "UInt32")?);
    let out = py.detach(|| kernels::metrics::components(n, &a, &b)).map_err(value_error)?;
    Ok(PySeries(Series::new("component".into(), out)))
}

/// A CSR matrix's rows in the layout (`io.h5ad_to_parquet`): returns
/// (`gene_idx: List(UInt32)`, `values: List(Float32)`), each row sorted and
/// duplicates summed as scipy does.
#[pyfunction]
fn from_csr(py: Python<'_>, indptr: PySeries, indices: PySeries, data: PySeries, n_genes: usize) -> PyResult<(PySeries, PySeries)> {
    let (idx, val) = py.detach(|| expressions::from_csr(&indptr.0, &indices.0, &data.0, n_genes)).map_err(value_error)?;
    Ok((PySeries(idx), PySeries(val)))
}

/// Whether device="cuda" works in this process (built with the `cuda`
/// feature, a driver and a GPU present, cuBLAS and NVRTC loaded).
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(kernels::cuda_available)
}

/// Each row group of the Parquet files `paths`, in order, as (rows, entries):
/// entries is the largest leaf value count among the columns named in
/// `columns` (a list column's entries, plus a slot for each empty or null
/// list) or, where none of them is in the file (columns computed from
/// others, as `to_cells` makes `gene_idx` from Tahoe's `genes`), among all
/// its columns: an upper bound, never 0 for rows with entries.
/// `record_batches` aligns its row slices to these: a slice that starts
/// inside a row group makes Polars decode that group from its first row.
#[pyfunction]
fn parquet_row_groups(py: Python<'_>, paths: Vec<String>, columns: Vec<String>) -> PyResult<Vec<(u64, u64)>> {
    py.detach(|| {
        let mut out = vec![];
        for path in &paths {
            let mut file = std::fs::File::open(path).map_err(|e| value_error(format!("{path}: {e}")))?;
            let meta = polars_parquet::read::read_metadata(&mut file).map_err(|e| value_error(format!("{path}: {e}")))?;
            for rg in &meta.row_groups {
                let count = |m: &polars_parquet::parquet::metadata::ColumnChunkMetadata| m.num_values().max(0) as u64;
                let entries = columns
                    .iter()
                    .filter_map(|c| rg.columns_under_root_iter(c))
                    .flat_map(|leaves| leaves.map(count))
                    .max()
                    .unwrap_or_else(|| rg.parquet_columns().iter().map(count).max().unwrap_or(0));
                out.push((rg.num_rows() as u64, entries));
            }
        }
        Ok(out)
    })
}

/// The GPU device="cuda" uses, described; a ValueError saying what is
/// missing when there is none.
#[pyfunction]
fn cuda_device(py: Python<'_>) -> PyResult<String> {
    py.detach(kernels::cuda_status).map_err(value_error)
}

#[pymodule]
fn _internal(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The Rust polars the plugin was built against, for the version check.
    m.add("POLARS_CRATE_VERSION", "0.55.2")?;
    m.add_class::<GeneStatsAccumulator>()?;
    m.add_class::<ClippedSumsAccumulator>()?;
    m.add_class::<PcaAccumulator>()?;
    m.add_class::<CentroidSampler>()?;
    m.add_class::<SpillSampler>()?;
    m.add_function(wrap_pyfunction!(register_model, m)?)?;
    m.add_function(wrap_pyfunction!(model_builds, m)?)?;
    m.add_function(wrap_pyfunction!(clear_models, m)?)?;
    m.add_function(wrap_pyfunction!(lisi, m)?)?;
    m.add_function(wrap_pyfunction!(sinkhorn, m)?)?;
    m.add_function(wrap_pyfunction!(fit_integration, m)?)?;
    m.add_function(wrap_pyfunction!(knn_search, m)?)?;
    m.add_function(wrap_pyfunction!(connected_components, m)?)?;
    m.add_function(wrap_pyfunction!(from_csr, m)?)?;
    m.add_function(wrap_pyfunction!(loess, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(parquet_row_groups, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device, m)?)?;
    m.add("CUDA_BUILD", cfg!(feature = "cuda"))?;
    Ok(())
}
