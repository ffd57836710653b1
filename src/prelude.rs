//! Rust Polars pipelines: every expression of the Python package as a lazy
//! [`Expr`], the fits over a [`LazyFrame`], and the models' files.
//!
//! ```no_run
//! use polars::prelude::*;
//! use polars_singlecell::prelude::*;
//!
//! # fn main() -> PolarsResult<()> {
//! let pca = PcaModel::read_parquet("pca.parquet")?.projector()?; // built once, shared by every batch
//! let cells = scan_parquet("cells.parquet")?
//!     .with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())])
//!     .select([pca_project(col("gene_idx"), col("values"), pca, Device::Cpu), col("batch")])
//!     .collect()?;
//! # Ok(()) }
//! ```
//!
//! Each builder returns an `Expr` with the same output name, dtype and
//! plan-time checks as Python's (`expressions::schema`), runs the same
//! Series function as the plugin (so the same errors from the data), and
//! takes options with Python's defaults.
//! Elementwise ones stream in Polars' streaming engine; models are shared
//! handles ([`PcaModel::projector`], [`IntegrationModel::interpolation`]),
//! never re-read per batch. The fits stream a `LazyFrame` once (twice for a
//! clipped PCA) through [`StreamingFit`] in row order, so they hold the
//! fit's state and one record batch, and give Python's numbers bit for bit.

use std::path::Path;
use std::sync::{Arc, Mutex};

use polars::prelude::*;
use polars_plan::prelude::{FunctionOptions, IR};

use crate::expressions::fit::{CentroidOptions, CentroidSampleFit, ClippedSumsFit, CovarianceFit, GeneStatsFit, PcaOptions};
use crate::kernels::hvg::Transform;
use crate::kernels::pca::Clip;
use crate::expressions::spill::SpillSampleFit;
use crate::expressions::{self, schema};
pub use crate::expressions::fit::StreamingFit;
pub use crate::expressions::{IntegrationOutput, InterpolationModel};
pub use crate::kernels::integrate::IntegrationParams;
pub use crate::kernels::kmeans::KMeansParams;
pub use crate::kernels::pca::PcaProjector;
pub use crate::kernels::seurat::Cutoffs;
pub use crate::kernels::Device;
pub use crate::models::{IntegrationModel, PcaModel};

/// An expression running `f` on its inputs' Series. `op` names it in
/// `explain()`.
fn udf<F, O>(op: &'static str, inputs: Vec<Expr>, options: FunctionOptions, f: F, output: O) -> Expr
where
    F: Fn(&[Series]) -> PolarsResult<Series> + Send + Sync + 'static,
    O: Fn(&[Field]) -> PolarsResult<Field> + Send + Sync + 'static,
{
    let function = move |columns: &mut [Column]| {
        let series: Vec<Series> = columns.iter().map(|c| c.as_materialized_series().clone()).collect();
        f(&series).map(Column::from)
    };
    let output = move |_: &Schema, fields: &[Field]| output(fields);
    Expr::AnonymousFunction {
        input: inputs,
        function: new_column_udf(BaseColumnUdf::new(function, output)),
        options,
        fmt_str: Box::new(op.into()),
    }
}

// ---------------------------------------------------------------- normalize

/// [`normalize`]'s options; `Default` is Python's (`target_sum=1e4`, `log1p=True`).
#[derive(Debug, Clone, Copy)]
pub struct NormalizeOptions {
    /// Total counts of each cell after scaling; `None`: the median of the
    /// non-zero totals of the whole column (not streamed: it needs every row).
    pub target_sum: Option<f64>,
    /// `log1p` after scaling (scanpy's `sc.pp.log1p`).
    pub log1p: bool,
}

impl Default for NormalizeOptions {
    fn default() -> Self {
        NormalizeOptions { target_sum: Some(1e4), log1p: true }
    }
}

/// `normalize_total` + `log1p` of each cell: `List(Float32)` named like
/// `values`, so `with_columns` replaces the counts.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let cells = df!(
///     "gene_idx" => [Series::new("".into(), [0u32, 2]), Series::new("".into(), [1u32])],
///     "values" => [Series::new("".into(), [1f32, 3.0]), Series::new("".into(), [5f32])],
/// )?;
/// let out = cells
///     .lazy()
///     .with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())])
///     .collect()?;
/// // Cell 0 has 4 counts: its gene 2 becomes log1p(3 / 4 * 1e4).
/// let first = out.column("values")?.list()?.get_as_series(0).unwrap();
/// assert!((first.f32()?.get(1).unwrap() - (7500f32).ln_1p()).abs() < 1e-5);
/// # Ok(()) }
/// ```
pub fn normalize(gene_idx: Expr, values: Expr, options: NormalizeOptions) -> Expr {
    let NormalizeOptions { target_sum, log1p } = options;
    // The median needs the whole column: not elementwise, as in Python.
    let how = if target_sum.is_some() { FunctionOptions::elementwise() } else { FunctionOptions::length_preserving() };
    udf("normalize", vec![values, gene_idx], how, move |s| expressions::normalize(&s[1], &s[0], target_sum, log1p), schema::normalize)
}

/// Each cell's total counts: `Float32` named `total_counts`.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let cells = df!(
///     "gene_idx" => [Series::new("".into(), [0u32, 2]), Series::new("".into(), [1u32])],
///     "values" => [Series::new("".into(), [1f32, 3.0]), Series::new("".into(), [5f32])],
/// )?;
/// let out = cells.lazy().select([total_counts(col("gene_idx"), col("values"))]).collect()?;
/// assert_eq!(out.column("total_counts")?.f32()?.to_vec(), [Some(4.0), Some(5.0)]);
/// # Ok(()) }
/// ```
pub fn total_counts(gene_idx: Expr, values: Expr) -> Expr {
    udf("total_counts", vec![gene_idx, values], FunctionOptions::elementwise(), |s| expressions::total_counts(&s[0], &s[1]), schema::total_counts)
        .alias("total_counts")
}

/// Keep `genes` (old indices, each once) renumbered `0..genes.len()`: a
/// struct named like `gene_idx` with both columns;
/// `.struct_().field_by_names(["*"])` inside `with_columns` replaces them.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let cells = df!(
///     "gene_idx" => [Series::new("".into(), [0u32, 2, 5]), Series::new("".into(), [1u32])],
///     "values" => [Series::new("".into(), [1f32, 3.0, 2.0]), Series::new("".into(), [5f32])],
/// )?;
/// let kept: Arc<[u32]> = Arc::from([5u32, 2]); // gene 5 becomes 0, gene 2 becomes 1
/// let out = cells
///     .lazy()
///     .with_columns([select_genes(col("gene_idx"), col("values"), kept).struct_().field_by_names(["*"])])
///     .collect()?;
/// let first = out.column("gene_idx")?.list()?.get_as_series(0).unwrap();
/// assert_eq!(first.u32()?.to_vec(), [Some(0), Some(1)]);
/// let first = out.column("values")?.list()?.get_as_series(0).unwrap();
/// assert_eq!(first.f32()?.to_vec(), [Some(2.0), Some(3.0)]);
/// # Ok(()) }
/// ```
pub fn select_genes(gene_idx: Expr, values: Expr, genes: Arc<[u32]>) -> Expr {
    udf(
        "select_genes",
        vec![gene_idx, values],
        FunctionOptions::elementwise(),
        move |s| {
            let (idx, val) = expressions::select_genes(&s[0], &s[1], &genes)?;
            expressions::pair_struct(s[0].name(), idx, val)
        },
        schema::select_genes,
    )
}

/// A published layout's (gene ids, values) as the layout's cells: a struct
/// `cells{gene_idx, values}`. `tokens`: the vocabulary's token ids in gene
/// order (Tahoe's `gene_metadata.token_id`); `None`: the ids are gene
/// indices, below `n_genes` if given.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// // Tahoe's layout: token ids led by a marker token that is no gene.
/// let cells = df!(
///     "genes" => [Series::new("".into(), [99i64, 30, 10])],
///     "expressions" => [Series::new("".into(), [-1f32, 4.0, 2.0])],
/// )?;
/// let tokens: Arc<[i64]> = Arc::from([10i64, 20, 30]); // gene_metadata.token_id, gene order
/// let out = cells
///     .lazy()
///     .select([to_cells(col("genes"), col("expressions"), Some(tokens), None).struct_().field_by_names(["*"])])
///     .collect()?;
/// let genes = out.column("gene_idx")?.list()?.get_as_series(0).unwrap();
/// assert_eq!(genes.u32()?.to_vec(), [Some(0), Some(2)]); // sorted; the marker dropped
/// let values = out.column("values")?.list()?.get_as_series(0).unwrap();
/// assert_eq!(values.f32()?.to_vec(), [Some(2.0), Some(4.0)]);
/// # Ok(()) }
/// ```
pub fn to_cells(genes: Expr, values: Expr, tokens: Option<Arc<[i64]>>, n_genes: Option<usize>) -> Expr {
    udf(
        "to_cells",
        vec![genes, values],
        FunctionOptions::elementwise(),
        move |s| {
            use crate::kernels::cells::{Genes, TokenMap};
            let map = tokens.as_deref().map(TokenMap::new).transpose()?;
            let how = match &map {
                Some(m) => Genes::Vocabulary(m),
                None => Genes::Indices(n_genes),
            };
            let (idx, val) = expressions::to_cells(&s[0], &s[1], &how)?;
            expressions::pair_struct(&"cells".into(), idx, val)
        },
        schema::to_cells,
    )
    .alias("cells")
}

/// Cells projected on a PCA model's axes: `Array(Float32, n_comps)` named `X_pca`.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// let options = FitPcaOptions { n_comps: 2, ..Default::default() };
/// let model = fit_pca(cells.clone().lazy(), 6, &options)?;
/// let projector = model.projector()?; // built once, shared by every record batch
/// let out = cells.lazy().select([pca_project(col("gene_idx"), col("values"), projector, Device::Cpu)]).collect()?;
/// assert_eq!(out.column("X_pca")?.dtype(), &DataType::Array(Box::new(DataType::Float32), 2));
/// assert_eq!(out.height(), 40);
/// # Ok(()) }
/// ```
pub fn pca_project(gene_idx: Expr, values: Expr, model: Arc<PcaProjector>, device: Device) -> Expr {
    let n_comps = model.n_comps;
    udf(
        "pca_project",
        vec![gene_idx, values],
        FunctionOptions::elementwise(),
        move |s| expressions::pca_project(&s[0], &s[1], &model, device),
        move |f| schema::pca_project(f, n_comps),
    )
    .alias("X_pca")
}

// ---------------------------------------------------------------- k-means

/// The column name of `e` when it is a plain `col(name)`: inside
/// `group_by().agg` Polars hands each group unnamed, and errors name it.
fn column_name(e: &Expr) -> Option<PlSmallStr> {
    match e {
        Expr::Column(name) => Some(name.clone()),
        _ => None,
    }
}

/// k-means centroids of an `Array(Float32, d)` column and their masses: an
/// aggregation (one row: `centroids{centroid: List(Array), mass: List(Float64)}`),
/// for `group_by(batch).agg([...])` or `select`. `KMeansParams::new(k)`
/// holds Python's defaults (`max_iter=300`, `tol=1e-4`, `random_state=0`).
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let rows: Vec<Series> = (0..60u32).map(|i| Series::new("".into(), [(i % 3) as f32 * 10.0 + (i % 2) as f32 * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])).collect();
/// # let batch: Vec<&str> = (0..60).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let x_pca = Series::new("X_pca".into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))?;
/// # let emb = DataFrame::new_infer_height(vec![x_pca.into(), Series::new("batch".into(), batch).into()])?;
/// let out = emb
///     .lazy()
///     .group_by([col("batch")])
///     .agg([kmeans_centroids(col("X_pca"), None, KMeansParams::new(3))])
///     .sort(["batch"], Default::default())
///     .select([col("batch"), col("centroids").struct_().field_by_name("mass")])
///     .collect()?;
/// // One row per batch: its 3 centroids and the number of cells each holds.
/// let masses = out.column("mass")?.list()?.get_as_series(0).unwrap();
/// assert_eq!(masses.f64()?.sum(), Some(30.0));
/// # Ok(()) }
/// ```
pub fn kmeans_centroids(embedding: Expr, weights: Option<Expr>, params: KMeansParams) -> Expr {
    let names: Vec<Option<PlSmallStr>> = std::iter::once(&embedding).chain(weights.as_ref()).map(column_name).collect();
    let inputs = std::iter::once(embedding).chain(weights).collect();
    udf(
        "kmeans_centroids",
        inputs,
        FunctionOptions::aggregation(),
        move |s| {
            let names: Vec<Option<&str>> = names.iter().map(|n| n.as_deref()).collect();
            expressions::kmeans_centroids_of_group(s, &names, &params)
        },
        schema::kmeans_centroids,
    )
    .alias("centroids")
}

// ------------------------------------------------------ knn, knn_interpolate

/// Which centroids a cell's neighbours come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Its own batch's (Python's `mode="own_batch"`).
    #[default]
    OwnBatch,
    /// Every batch's (`mode="pooled"`).
    Pooled,
}

/// [`knn_interpolate`]'s options; `Default` is Python's.
#[derive(Debug, Clone, Copy)]
pub struct InterpolateOptions {
    /// Centroids each cell is moved by (8).
    pub k: usize,
    /// Whose centroids: the cell's own batch's (default) or all.
    pub mode: Mode,
    /// A cell whose batch the model lacks: an error (`false`, Python's
    /// `unknown_batch="error"`) or pooled neighbours (`true`).
    pub unknown_pooled: bool,
    /// Where the search runs; `Device::Cuda` needs the `cuda` feature. Same results.
    pub device: Device,
}

impl Default for InterpolateOptions {
    fn default() -> Self {
        InterpolateOptions { k: 8, mode: Mode::OwnBatch, unknown_pooled: false, device: Device::Cpu }
    }
}

/// Each cell moved by the weighted displacement of its `k` nearest
/// centroids: `Array(Float32, d)` named `X_ot`. `batch` is the cells'
/// batch column (ignored with `Mode::Pooled`).
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let rows: Vec<Series> = (0..60u32).map(|i| Series::new("".into(), [(i % 3) as f32 * 10.0 + (i % 2) as f32 * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])).collect();
/// # let batch: Vec<&str> = (0..60).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let x_pca = Series::new("X_pca".into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))?;
/// # let emb = DataFrame::new_infer_height(vec![x_pca.into(), Series::new("batch".into(), batch).into()])?;
/// # let options = FitCentroidsOptions { n_centroids: 3, ..Default::default() };
/// # let (centroids, _) = fit_centroids(emb.clone().lazy(), &options)?;
/// # let model = fit_integration(&centroids, "batch", None, &IntegrationParams::default())?;
/// let interpolation = model.interpolation()?; // built once
/// let options = InterpolateOptions { k: 2, ..Default::default() };
/// let out = emb
///     .lazy()
///     .with_columns([knn_interpolate(col("X_pca"), col("batch"), interpolation, options)])
///     .collect()?;
/// assert_eq!(out.column("X_ot")?.dtype(), &DataType::Array(Box::new(DataType::Float32), 2));
/// assert_eq!(out.column("X_ot")?.null_count(), 0);
/// # Ok(()) }
/// ```
pub fn knn_interpolate(embedding: Expr, batch: Expr, model: Arc<InterpolationModel>, options: InterpolateOptions) -> Expr {
    let d = model.d();
    let InterpolateOptions { k, mode, unknown_pooled, device } = options;
    let inputs = match mode {
        Mode::OwnBatch => vec![embedding, batch],
        Mode::Pooled => vec![embedding],
    };
    udf(
        "knn_interpolate",
        inputs,
        FunctionOptions::elementwise(),
        move |s| expressions::knn_interpolate(&s[0], s.get(1), &model, k, unknown_pooled, device),
        move |f| schema::knn_interpolate(f, d),
    )
    .alias("X_ot")
}

/// Exact k nearest neighbours among `index`'s points
/// ([`IntegrationModel::index`]): `Struct{indices: Array(UInt32, k),
/// distances: Array(Float32, k)}` named `knn`.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let rows: Vec<Series> = (0..60u32).map(|i| Series::new("".into(), [(i % 3) as f32 * 10.0 + (i % 2) as f32 * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])).collect();
/// # let batch: Vec<&str> = (0..60).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let x_pca = Series::new("X_pca".into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))?;
/// # let emb = DataFrame::new_infer_height(vec![x_pca.into(), Series::new("batch".into(), batch).into()])?;
/// # let options = FitCentroidsOptions { n_centroids: 3, ..Default::default() };
/// # let (centroids, _) = fit_centroids(emb.clone().lazy(), &options)?;
/// # let model = fit_integration(&centroids, "batch", None, &IntegrationParams::default())?;
/// let out = emb.lazy().select([knn(col("X_pca"), model.index()?, 2, Device::Cpu).struct_().field_by_names(["*"])]).collect()?;
/// assert_eq!(out.column("indices")?.dtype(), &DataType::Array(Box::new(DataType::UInt32), 2));
/// // Sorted nearest first.
/// let d = out.column("distances")?.array()?.get_as_series(0).unwrap();
/// assert!(d.f32()?.get(0) <= d.f32()?.get(1));
/// # Ok(()) }
/// ```
pub fn knn(embedding: Expr, index: Arc<InterpolationModel>, k: usize, device: Device) -> Expr {
    let d = index.d();
    udf(
        "knn",
        vec![embedding],
        FunctionOptions::elementwise(),
        move |s| expressions::knn(&s[0], &index, k, device),
        move |f| schema::knn(f, d, k),
    )
    .alias("knn")
}

// ---------------------------------------------------------------- files

/// A Parquet file, or a folder's `*.parquet` files in name order (as
/// `psc.datasets.write_synthetic_counts` writes cells), to scan lazily.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let dir = std::env::temp_dir().join(format!("psc-doc-scan-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// for (name, n) in [("part-0.parquet", 3), ("part-1.parquet", 2)] {
///     let part = df!("total_counts" => vec![1f32; n])?;
///     sink_parquet(part.lazy(), dir.join(name))?;
/// }
/// let all = scan_parquet(&dir)?.collect()?; // both files, in name order
/// assert_eq!(all.height(), 5);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
pub fn scan_parquet(path: impl AsRef<Path>) -> PolarsResult<LazyFrame> {
    let p = path.as_ref();
    polars_ensure!(p.exists(), ComputeError: "no file or folder at {}", p.display());
    let files: Vec<PlRefPath> = if p.is_dir() {
        let mut found: Vec<_> = std::fs::read_dir(p)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "parquet") && !f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        found.sort();
        polars_ensure!(!found.is_empty(), ComputeError: "no .parquet files in the folder {}", p.display());
        found.iter().map(|f| PlRefPath::new(f.to_string_lossy().as_ref())).collect()
    } else {
        vec![PlRefPath::new(p.to_string_lossy().as_ref())]
    };
    LazyFrame::scan_parquet_files(files.into_iter().collect(), Default::default())
}

/// Run `f` with Polars' Parquet source reading one row group ahead
/// (Python's `sink_bounded`): by default it decodes up to 16 row groups
/// ahead of a slow consumer (the projection, the interpolation, a fit's
/// update), which holds them all in memory. The variable is set for this
/// call only, between queries; a value the user set is left as it is.
fn one_row_group_ahead<R>(f: impl FnOnce() -> R) -> R {
    const VAR: &str = "POLARS_ROW_GROUP_PREFETCH_SIZE";
    if std::env::var_os(VAR).is_some() {
        return f();
    }
    std::env::set_var(VAR, "1");
    let out = f();
    std::env::remove_var(VAR);
    out
}

/// Run `lf` in the streaming engine (bounded memory) into `path`: a
/// temporary file beside it, renamed when complete, so a failed or killed
/// run leaves no half-written output (Python's `io.sink_parquet`). The
/// Parquet source reads one row group ahead of the query.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let path = std::env::temp_dir().join(format!("psc-doc-sink-{}.parquet", std::process::id()));
/// let cells = df!("batch" => ["plate1", "plate2"], "total_counts" => [4f32, 5.0])?;
/// sink_parquet(cells.lazy(), &path)?;
/// assert_eq!(scan_parquet(&path)?.collect()?.height(), 2);
/// # std::fs::remove_file(&path)?;
/// # Ok(()) }
/// ```
pub fn sink_parquet(lf: LazyFrame, path: impl AsRef<Path>) -> PolarsResult<()> {
    let path = path.as_ref();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let target = SinkTarget::Path(PlRefPath::new(tmp.to_string_lossy().as_ref()));
    let format = FileWriteFormat::Parquet(Arc::new(ParquetWriteOptions::default()));
    let run = lf
        .sink(SinkDestination::File { target }, format, UnifiedSinkArgs::default())
        .and_then(|q| one_row_group_ahead(|| q.collect_with_engine(Engine::Streaming)))
        .and_then(|_| Ok(std::fs::rename(&tmp, path)?));
    if run.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    run.map_err(|e| polars_err!(ComputeError: "cannot write {}: {e}", path.display()))
}

// ---------------------------------------------------------------- fits

/// Stream `columns` of `lf` in row order through `fit`: the streaming
/// engine hands each record batch to `update`, one at a time, the Parquet
/// source reading one row group ahead. The first error stops the query and
/// is returned.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// use polars_singlecell::expressions::fit::{CovarianceFit, PcaOptions};
///
/// // The state of an out-of-core PCA over 6 genes, fed record batch by record batch.
/// let fit = stream_fit(cells.lazy(), &["gene_idx", "values"], CovarianceFit::new(6, Device::Cpu, None)?)?;
/// let pca = fit.finish(&PcaOptions { n_comps: 2, scale: false })?;
/// assert_eq!(pca.n_cells, 40);
/// # Ok(()) }
/// ```
pub fn stream_fit<T: StreamingFit + Send + 'static>(lf: LazyFrame, columns: &[&str], fit: T) -> PolarsResult<T> {
    stream_batches(lf, columns, fit, |fit, batch| fit.update(batch))
}

/// [`stream_fit`] for any state: `update(&mut state, columns)` per record batch.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// // Count the non-zeros, one record batch at a time.
/// let nnz = stream_batches(cells.lazy(), &["values"], 0usize, |n, batch| {
///     *n += batch[0].list()?.get_inner().len();
///     Ok(())
/// })?;
/// assert_eq!(nnz, 180);
/// # Ok(()) }
/// ```
pub fn stream_batches<S, F>(lf: LazyFrame, columns: &[&str], state: S, update: F) -> PolarsResult<S>
where
    S: Send + 'static,
    F: Fn(&mut S, &[Series]) -> PolarsResult<()> + Send + Sync + 'static,
{
    let poisoned = || polars_err!(ComputeError: "a fit's state is poisoned by an earlier panic");
    // The callback lives in the plan; the state comes back out through the
    // shared slot whether or not the engine has dropped the plan yet.
    let slot = Arc::new(Mutex::new((Some(state), None::<PolarsError>)));
    let shared = slot.clone();
    let names: Vec<PlSmallStr> = columns.iter().map(|c| PlSmallStr::from(*c)).collect();
    let sink = PlanCallback::new(move |df: DataFrame| {
        let mut guard = shared.lock().map_err(|_| poisoned())?;
        let (state, failed) = &mut *guard;
        let Some(state) = state.as_mut() else { return Ok(true) };
        let batch: PolarsResult<Vec<Series>> = names.iter().map(|n| Ok(df.column(n)?.as_materialized_series().clone())).collect();
        if let Err(e) = batch.and_then(|b| update(state, &b)) {
            *failed = Some(e);
            return Ok(true); // stop the query
        }
        Ok(false)
    });
    let cols: Vec<Expr> = columns.iter().map(|c| col(*c)).collect();
    let query = lf.select(cols).sink_batches(sink, true, None)?;
    one_row_group_ahead(|| query.collect_with_engine(Engine::Streaming))?;
    let mut guard = slot.lock().map_err(|_| poisoned())?;
    if let Some(e) = guard.1.take() {
        return Err(e);
    }
    guard.0.take().ok_or_else(|| polars_err!(ComputeError: "a fit's state was taken twice"))
}

/// A fit's partition at most, in rows (whole row groups): Python's
/// `PARTITION_ROWS`. See [`fold_fit`].
pub const PARTITION_ROWS: u64 = 100_000;

/// [`stream_fit`] one partition at a time: a fresh state from `make` for
/// each partition of `lf`'s Parquet scan (consecutive whole row groups, up
/// to `partition_rows` rows, from the files' footers), merged in row order.
/// A float64 sum depends on how its terms are grouped; this grouping is
/// fixed by the data, and Python's fits (locally and on a Dask cluster)
/// group the same way, so the models agree bit for bit. A plan whose row
/// slices do not reach one Parquet scan (an in-memory frame, a filter or a
/// join first) is one stream into one state.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
/// use polars_singlecell::expressions::fit::{GeneStatsFit, StreamingFit};
/// use polars_singlecell::kernels::hvg::Transform;
///
/// # fn main() -> PolarsResult<()> {
/// let path = std::env::temp_dir().join(format!("psc-doc-fold-{}.parquet", std::process::id()));
/// let gene_idx: Vec<Series> = (0..10u32).map(|i| Series::new("".into(), [i % 3])).collect();
/// let values: Vec<Series> = (0..10u32).map(|i| Series::new("".into(), [0.1 * i as f32])).collect();
/// let mut cells = df!("gene_idx" => gene_idx, "values" => values)?;
/// let mut file = std::fs::File::create(&path)?;
/// ParquetWriter::new(&mut file).with_row_group_size(Some(4)).finish(&mut cells)?; // groups of 4, 4, 2
/// let cols = ["gene_idx", "values"];
/// let make = || GeneStatsFit::new(3, Transform::Exact);
/// let one = fold_fit(scan_parquet(&path)?, &cols, PARTITION_ROWS, make)?.finish(&())?;
/// let parts = fold_fit(scan_parquet(&path)?, &cols, 4, make)?.finish(&())?; // 3 partitions
/// // The same statistics up to the grouping of the float sums.
/// let (a, b) = (one.column("mean")?.f64()?, parts.column("mean")?.f64()?);
/// assert!(a.into_no_null_iter().zip(b.into_no_null_iter()).all(|(x, y)| (x - y).abs() <= 1e-15 * x.abs()));
/// # std::fs::remove_file(&path)?;
/// # Ok(()) }
/// ```
pub fn fold_fit<T, F>(lf: LazyFrame, columns: &[&str], partition_rows: u64, make: F) -> PolarsResult<T>
where
    T: StreamingFit + Send + 'static,
    F: Fn() -> PolarsResult<T>,
{
    polars_ensure!(partition_rows > 0, ComputeError: "partition_rows must be at least 1");
    let Some(parts) = partitions(&lf, columns, partition_rows)? else {
        return stream_fit(lf, columns, make()?);
    };
    let mut total: Option<T> = None;
    for &(first, n) in &parts {
        let fit = stream_fit(lf.clone().slice(first as i64, n as IdxSize), columns, make()?)?;
        match total.as_mut() {
            None => total = Some(fit),
            Some(t) => t.merge(&fit)?,
        }
    }
    let end = parts.last().map_or(0, |&(first, n)| first + n);
    let cols: Vec<Expr> = columns.iter().map(|c| col(*c)).collect();
    let rest = lf.select(cols).slice(end as i64, 1).collect()?;
    polars_ensure!(rest.height() == 0, ComputeError:
        "the data has more rows than its Parquet footers said when the fit started; was a file changed while the fit ran? run it again");
    match total {
        Some(t) => Ok(t),
        None => make(),
    }
}

/// `lf`'s partitions as (first row, rows), or `None` where a row slice does
/// not reach its one Parquet scan or the footers cannot be read. The same
/// partitions as Python's `_frames.scan_partitions`.
fn partitions(lf: &LazyFrame, columns: &[&str], partition_rows: u64) -> PolarsResult<Option<Vec<(u64, u64)>>> {
    let cols: Vec<Expr> = columns.iter().map(|c| col(*c)).collect();
    let q = lf.clone().select(cols);
    if !slice_reaches_scan(&q) {
        return Ok(None);
    }
    let Some(paths) = scan_paths(&q) else { return Ok(None) };
    let names: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let Ok(groups) = crate::footers::row_groups(&paths, &names) else { return Ok(None) };
    let (mut out, mut first, mut rows) = (vec![], 0u64, 0u64);
    for (n, _) in groups.into_iter().filter(|&(n, _)| n > 0) {
        if rows > 0 && rows + n > partition_rows {
            out.push((first, rows));
            (first, rows) = (first + rows, 0);
        }
        rows += n;
    }
    if rows > 0 {
        out.push((first, rows));
    }
    Ok(Some(out))
}

/// Whether the optimiser pushes a row slice of `q` into its one Parquet
/// scan (Python's `slice_reaches_scan`, on the same plan text).
fn slice_reaches_scan(q: &LazyFrame) -> bool {
    let Ok(plan) = q.clone().slice(1, 1).explain(true) else { return false };
    let lines: Vec<&str> = plan.lines().map(str::trim).collect();
    let scans: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.contains("Parquet SCAN")).map(|(i, _)| i).collect();
    const OTHERS: [&str; 8] = ["FILTER", "JOIN", "AGGREGATE", "UNION", "SORT", "UNIQUE", "HCONCAT", "DF ["];
    scans.len() == 1
        && lines[scans[0]..].iter().any(|l| l.starts_with("SLICE: Positive { offset: 1, len: 1 }"))
        && !lines.iter().any(|l| OTHERS.iter().any(|o| l.starts_with(o)))
}

/// The local files of `q`'s one Parquet scan, from its optimised plan (a
/// glob or a folder expanded, as Polars reads them), or `None` (a remote
/// source, a join, another plan): Python's `scan_paths`, on the same plan.
fn scan_paths(q: &LazyFrame) -> Option<Vec<String>> {
    let plan = q.clone().to_alp_optimized().ok()?;
    let mut node = plan.lp_top;
    loop {
        let ir = plan.lp_arena.get(node);
        if let IR::Scan { sources, .. } = ir {
            let paths: Vec<String> = sources.as_paths()?.iter().map(|p| p.as_str().to_string()).collect();
            return (!paths.is_empty() && paths.iter().all(|p| Path::new(p).is_file())).then_some(paths);
        }
        let inputs = ir.get_inputs();
        if inputs.len() != 1 {
            return None;
        }
        node = inputs[0];
    }
}

/// scanpy's HVG flavors.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Flavor {
    /// Log-normalised values (after [`normalize`]), one pass.
    #[default]
    Seurat,
    /// Raw counts, two passes; `span` is the loess' (scanpy's 0.3).
    SeuratV3 {
        /// The loess' span, in (0, 1].
        span: f64,
    },
}

/// [`highly_variable_genes`]' options; `Default` is Python's.
#[derive(Debug, Clone)]
pub struct HvgOptions {
    /// `None`: flavor seurat's cut-offs; seurat_v3 takes 2000.
    pub n_top_genes: Option<usize>,
    /// Rank within each batch of this column, then across batches.
    pub batch_key: Option<String>,
    /// scanpy's `flavor`: which statistics rank the genes.
    pub flavor: Flavor,
    /// Flavor seurat's cut-offs and bins.
    pub cutoffs: Cutoffs,
    /// Flavor seurat: genes are binned by mean expression into this many bins (20).
    pub n_bins: usize,
    /// The cells' gene index column (`List(UInt32)`).
    pub gene_idx: String,
    /// The cells' value column (`List(Float32)`).
    pub values: String,
    /// Rows of a partition at most (see [`fold_fit`]; [`PARTITION_ROWS`]).
    pub partition_rows: u64,
}

impl Default for HvgOptions {
    fn default() -> Self {
        HvgOptions {
            n_top_genes: Some(2000),
            batch_key: None,
            flavor: Flavor::Seurat,
            cutoffs: Cutoffs::default(),
            n_bins: 20,
            gene_idx: "gene_idx".into(),
            values: "values".into(),
            partition_rows: PARTITION_ROWS,
        }
    }
}

/// Highly variable genes: Python's `highly_variable_genes`, scanpy's, on
/// the same Rust ranking (`kernels::seurat`). Flavor seurat streams
/// log-normalised cells once; seurat_v3 streams raw counts twice. One row
/// per gene, the columns of Python's table.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// let lognorm = cells.clone().lazy().with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())]);
/// let options = HvgOptions { n_top_genes: Some(3), batch_key: Some("batch".into()), ..Default::default() };
/// let table = highly_variable_genes(lognorm, 6, &options)?;
/// assert_eq!(table.height(), 6); // one row per gene
/// assert_eq!(highly_variable(&table)?.len(), 3);
///
/// // scanpy's seurat_v3 ranks the raw counts (read twice).
/// // (span 1: the loess sees only 6 genes here; scanpy's 0.3 is for thousands.)
/// let options = HvgOptions { n_top_genes: Some(3), flavor: Flavor::SeuratV3 { span: 1.0 }, ..Default::default() };
/// let table = highly_variable_genes(cells.lazy(), 6, &options)?;
/// assert_eq!(highly_variable(&table)?.len(), 3);
/// # Ok(()) }
/// ```
pub fn highly_variable_genes(lf: LazyFrame, n_genes: usize, options: &HvgOptions) -> PolarsResult<DataFrame> {
    // The options are checked before any data is read, as in Python.
    polars_ensure!(n_genes > 0 && options.n_bins > 0 && options.n_top_genes != Some(0), ComputeError:
        "n_genes, n_bins and n_top_genes must be at least 1, got {n_genes}, {} and {:?}", options.n_bins, options.n_top_genes);
    if let Flavor::SeuratV3 { span } = options.flavor {
        polars_ensure!(span > 0.0 && span <= 1.0, ComputeError: "span must be in (0, 1], got {span}");
    }
    let mut cols = vec![options.gene_idx.as_str(), options.values.as_str()];
    cols.extend(options.batch_key.as_deref());
    let batched = options.batch_key.is_some();
    match options.flavor {
        Flavor::Seurat => {
            let stats = fold_fit(lf, &cols, options.partition_rows, || GeneStatsFit::new(n_genes, Transform::Expm1))?;
            stats.seurat(batched, options.n_bins, options.n_top_genes, &options.cutoffs)
        },
        Flavor::SeuratV3 { span } => {
            let stats = fold_fit(lf.clone(), &cols, options.partition_rows, || GeneStatsFit::new(n_genes, Transform::Counts))?;
            let reg_std = stats.seurat_v3_loess(span, batched)?;
            let clips = stats.seurat_v3_clips(&reg_std)?;
            let sums = fold_fit(lf, &cols, options.partition_rows, || ClippedSumsFit::new(clips.clone()))?;
            stats.seurat_v3(&sums, &reg_std, options.n_top_genes.unwrap_or(2000), batched)
        },
    }
}

/// The genes a [`highly_variable_genes`] table marks, for [`select_genes`].
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// let lognorm = cells.lazy().with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())]);
/// let table = highly_variable_genes(lognorm.clone(), 6, &HvgOptions { n_top_genes: Some(4), ..Default::default() })?;
/// let genes = highly_variable(&table)?;
/// let selected = lognorm
///     .with_columns([select_genes(col("gene_idx"), col("values"), genes).struct_().field_by_names(["*"])])
///     .collect()?;
/// let max = selected.column("gene_idx")?.list()?.get_inner().u32()?.max();
/// assert!(max < Some(4)); // renumbered 0..4
/// # Ok(()) }
/// ```
pub fn highly_variable(table: &DataFrame) -> PolarsResult<Arc<[u32]>> {
    let hv = table.filter(table.column("highly_variable")?.bool()?)?;
    Ok(hv.column("gene_idx")?.u32()?.into_no_null_iter().collect())
}

/// [`fit_pca`]'s options; `Default` is Python's.
#[derive(Debug, Clone)]
pub struct FitPcaOptions {
    /// Principal axes to keep (50, as scanpy's).
    pub n_comps: usize,
    /// The cells' gene index column (`List(UInt32)`, already [`select_genes`]'d).
    pub gene_idx: String,
    /// The cells' value column (`List(Float32)`, log-normalised).
    pub values: String,
    /// Where the covariance is accumulated; the same bits on either.
    pub device: Device,
    /// `sc.pp.scale` first (unit variance; the model keeps `std`).
    pub scale: bool,
    /// With `scale`: the scaled values clipped to `±max_value` (two passes).
    pub max_value: Option<f64>,
    /// With `scale` and `max_value`: `false` scales the non-zeros without
    /// centring them and clips them above (`sc.pp.scale(zero_center=False)`).
    pub zero_center: bool,
    /// Rows of a partition at most (see [`fold_fit`]; [`PARTITION_ROWS`]).
    pub partition_rows: u64,
}

impl Default for FitPcaOptions {
    fn default() -> Self {
        FitPcaOptions {
            n_comps: 50,
            gene_idx: "gene_idx".into(),
            values: "values".into(),
            device: Device::Cpu,
            scale: false,
            max_value: None,
            zero_center: true,
            partition_rows: PARTITION_ROWS,
        }
    }
}

/// PCA of the cells of `lf` over `n_genes` genes, out of core: Python's
/// `fit_pca` (the exact float64 covariance, then its eigendecomposition;
/// bit-identical for any batching and thread count). With `max_value`, a
/// first pass takes the genes' exact moments and a second the covariance
/// of the scaled, clipped cells, without the dense scaled matrix.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let gene_idx: Vec<Series> = (0..40u32).map(|i| Series::new("".into(), (0..6u32).filter(|g| (i + g) % 4 != 0).collect::<Vec<_>>())).collect();
/// # let values: Vec<Series> = gene_idx.iter().zip(0u32..).map(|(g, i)| Series::new("".into(), g.u32().unwrap().into_no_null_iter().map(|g| ((i * g + g * g) % 7 + 1) as f32).collect::<Vec<_>>())).collect();
/// # let batch: Vec<&str> = (0..40).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let cells = df!("gene_idx" => gene_idx, "values" => values, "batch" => batch)?;
/// // sc.pp.scale(max_value=10) then PCA, without the dense scaled matrix.
/// let options = FitPcaOptions { n_comps: 3, scale: true, max_value: Some(10.0), ..Default::default() };
/// let model = fit_pca(cells.lazy(), 6, &options)?;
/// assert_eq!((model.n_comps, model.n_genes(), model.n_cells), (3, 6, 40));
/// assert!(model.explained_variance.windows(2).all(|w| w[0] >= w[1]));
/// # Ok(()) }
/// ```
pub fn fit_pca(lf: LazyFrame, n_genes: usize, options: &FitPcaOptions) -> PolarsResult<PcaModel> {
    let FitPcaOptions { n_comps, device, scale, max_value, zero_center, .. } = options.clone();
    polars_ensure!(n_comps >= 1 && n_comps <= n_genes, ComputeError: "n_comps must be between 1 and n_genes={n_genes}, got {n_comps}");
    polars_ensure!(scale || (max_value.is_none() && zero_center), ComputeError:
        "max_value and zero_center=false are options of the scaling (sc.pp.scale's): set scale=true with them (PCA itself always centres)");
    polars_ensure!(max_value.is_none_or(|m| m > 0.0 && m.is_finite()), ComputeError: "max_value must be a finite number > 0 (sc.pp.scale's), got {max_value:?}");
    polars_ensure!(n_genes.saturating_mul(n_genes) <= (16 << 30) / 8, ComputeError:
        "n_genes={n_genes} needs a {:.0} GiB covariance; select highly variable genes first (select_genes)", (n_genes * n_genes * 8) as f64 / (1u64 << 30) as f64);
    let cols = [options.gene_idx.as_str(), options.values.as_str()];
    let Some(max_value) = max_value else {
        let acc = fold_fit(lf, &cols, options.partition_rows, || CovarianceFit::new(n_genes, device, None))?;
        return Ok(PcaModel::from_fit(&acc.finish(&PcaOptions { n_comps, scale })?));
    };
    let stats = fold_fit(lf.clone(), &cols, options.partition_rows, || GeneStatsFit::new(n_genes, Transform::Exact))?.finish(&())?;
    polars_ensure!(stats.height() > 0, ComputeError: "no cells: fit_pca needs at least 2");
    let moment = |name: &str| crate::expressions::convert::f64_values(stats.column(name)?.as_materialized_series());
    let (mean, std) = (moment("mean")?, moment("std")?);
    let clip = Clip::new(mean.clone(), std.clone(), max_value, zero_center)?;
    let acc = fold_fit(lf, &cols, options.partition_rows, || CovarianceFit::new(n_genes, device, Some(clip.clone())))?;
    let fit = acc.finish(&PcaOptions { n_comps, scale: false })?;
    Ok(PcaModel {
        mean,
        std: Some(std),
        max_value: Some(max_value),
        zero_center,
        scaled_mean: Some(fit.mean.clone()),
        ..PcaModel::from_fit(&fit)
    })
}

/// [`fit_centroids`]'s options; `Default` is Python's.
#[derive(Debug, Clone)]
pub struct FitCentroidsOptions {
    /// The cells' embedding column (`Array(Float32, d)`).
    pub embedding: String,
    /// The column whose values are the batches (plates).
    pub batch_key: String,
    /// Centroids per batch (2048).
    pub n_centroids: usize,
    /// At most one centroid per this many sampled cells of a batch, never
    /// fewer than 64 (or `n_centroids`); 1 gives `n_centroids`.
    pub min_cells_per_centroid: usize,
    /// Cells sampled per batch (seeded, uniform, without replacement) for its k-means.
    pub max_samples_per_batch: usize,
    /// Lloyd passes over each sample (3: see `benches/bench_kmeans.py`).
    pub max_iter: usize,
    /// k-means stops when the centres move at most this, relative to the
    /// sample's mean per-feature variance (scikit-learn's `tol`).
    pub tol: f64,
    /// Seeds the samples and the k-means initialisation.
    pub random_state: u64,
    /// A batch sample larger than this is seeded on a random subset of this
    /// size (`None`: max(3·n_centroids, 10,000)).
    pub init_size: Option<usize>,
    /// Where the k-means assignment steps run; the same centroids on either.
    pub device: Device,
    /// Python's `low_memory`: two reads, one batch's sample in memory, the
    /// others in a hidden folder under `temp_dir` (the system's temporary
    /// folder if `None`), removed at the end. The same centroids.
    pub low_memory: bool,
    /// Where `low_memory` spills the samples (`None`: the system's temporary folder).
    pub temp_dir: Option<std::path::PathBuf>,
}

impl Default for FitCentroidsOptions {
    fn default() -> Self {
        FitCentroidsOptions {
            embedding: "X_pca".into(),
            batch_key: "batch".into(),
            n_centroids: 2048,
            min_cells_per_centroid: 1,
            max_samples_per_batch: 500_000,
            max_iter: 3,
            tol: 1e-4,
            random_state: 0,
            init_size: None,
            device: Device::Cpu,
            low_memory: false,
            temp_dir: None,
        }
    }
}

/// Per-batch centroids of an embedding of any size, streaming: Python's
/// `fit_centroids` (seeded bottom-k samples per batch, then k-means on
/// each). Returns the centroid table (`batch_key`, `centroid_id`,
/// `centroid`, `mass`) and the per-batch summary.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let rows: Vec<Series> = (0..60u32).map(|i| Series::new("".into(), [(i % 3) as f32 * 10.0 + (i % 2) as f32 * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])).collect();
/// # let batch: Vec<&str> = (0..60).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let x_pca = Series::new("X_pca".into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))?;
/// # let emb = DataFrame::new_infer_height(vec![x_pca.into(), Series::new("batch".into(), batch).into()])?;
/// let options = FitCentroidsOptions { n_centroids: 3, ..Default::default() };
/// let (centroids, summary) = fit_centroids(emb.lazy(), &options)?;
/// assert_eq!(centroids.height(), 6); // 3 per batch
/// assert_eq!(summary.height(), 2);
/// assert_eq!(centroids.column("mass")?.f64()?.sum(), Some(60.0));
/// # Ok(()) }
/// ```
pub fn fit_centroids(lf: LazyFrame, options: &FitCentroidsOptions) -> PolarsResult<(DataFrame, DataFrame)> {
    let schema = lf.clone().collect_schema()?;
    let field = schema
        .get_field(&options.embedding)
        .ok_or_else(|| polars_err!(ColumnNotFound: "no column '{}' (columns: {:?})", options.embedding, schema.iter_names().collect::<Vec<_>>()))?;
    let d = crate::expressions::convert::check_embedding_field(&field)?;
    let mut params = KMeansParams::new(options.n_centroids);
    params.max_iter = options.max_iter;
    params.tol = options.tol;
    params.seed = options.random_state;
    params.init_size = options.init_size;
    params.device = options.device;
    let finish = CentroidOptions { params, min_cells_per_centroid: options.min_cells_per_centroid };
    let (emb, key) = (options.embedding.as_str(), options.batch_key.as_str());
    let no_cells = || polars_err!(ComputeError: "no cells: column '{emb}' has no rows, so there is nothing to fit centroids to");
    let fits = if options.low_memory {
        let fit = SpillSampleFit::new(d, options.max_samples_per_batch, options.random_state)?;
        let mut fit = stream_batches(lf.clone(), &[key], fit, |f, b| f.update(b))?;
        if fit.n_rows() == 0 {
            return Err(no_cells());
        }
        // Hidden and ending in ".tmp", as Python's: removed when done or failed.
        let parent = options.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let spill = TempDir::new(parent.join(format!(".centroid-sample.{}.tmp", std::process::id())))?;
        fit.next_pass(spill.0.clone())?;
        let mut fit = stream_batches(lf, &[emb, key], fit, |f, b| f.update(b))?;
        fit.finish(&finish)?
    } else {
        let fit = stream_fit(lf, &[emb, key], CentroidSampleFit::new(d, options.max_samples_per_batch, options.random_state, 0)?)?;
        if fit.n_rows() == 0 {
            return Err(no_cells());
        }
        fit.finish(&finish)?
    };
    let (centroids, summary) = expressions::fit::centroid_tables(d, &fits)?;
    // Back to the key's own name, dtype and order (the sampler keys batches
    // by their text), as Python does.
    let key = options.batch_key.as_str();
    let key_dtype = schema.get(key).cloned().unwrap_or(DataType::String);
    let restore = |mut t: DataFrame| -> PolarsResult<DataFrame> {
        t.rename("batch", key.into())?;
        let typed = t.column(key)?.cast(&key_dtype)?;
        t.with_column(typed)?;
        t.sort([key], SortMultipleOptions::default().with_maintain_order(true))
    };
    Ok((restore(centroids)?, restore(summary)?))
}

/// A folder removed with everything in it when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(path: std::path::PathBuf) -> PolarsResult<Self> {
        std::fs::create_dir_all(&path).map_err(|e| polars_err!(ComputeError: "cannot make the folder {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The integration of a centroid table (`batch_key`, `centroid`, `mass`
/// columns, as [`fit_centroids`] returns): Python's `fit_integration`, onto
/// the barycentre of the batches (`None` or `Some("barycenter")`) or onto
/// the batch `reference` names.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// # let rows: Vec<Series> = (0..60u32).map(|i| Series::new("".into(), [(i % 3) as f32 * 10.0 + (i % 2) as f32 * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])).collect();
/// # let batch: Vec<&str> = (0..60).map(|i| if i % 2 == 0 { "plate1" } else { "plate2" }).collect();
/// # let x_pca = Series::new("X_pca".into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))?;
/// # let emb = DataFrame::new_infer_height(vec![x_pca.into(), Series::new("batch".into(), batch).into()])?;
/// let (centroids, _) = fit_centroids(emb.lazy(), &FitCentroidsOptions { n_centroids: 3, ..Default::default() })?;
/// let model = fit_integration(&centroids, "batch", None, &IntegrationParams::default())?;
/// assert_eq!(model.table.height(), 6);
/// assert_eq!(model.d, 2);
/// // Onto plate1 instead of the barycentre: plate1 stays where it is.
/// let onto = fit_integration(&centroids, "batch", Some("plate1"), &IntegrationParams::default())?;
/// assert_eq!(onto.table.height(), 6);
/// # Ok(()) }
/// ```
pub fn fit_integration(centroids: &DataFrame, batch_key: &str, reference: Option<&str>, params: &IntegrationParams) -> PolarsResult<IntegrationModel> {
    let reference = reference.filter(|r| *r != "barycenter");
    let get = |n: &str| -> PolarsResult<&Series> {
        Ok(centroids
            .column(n)
            .map_err(|_| polars_err!(ColumnNotFound: "the centroid table has no column '{n}' (columns: {:?})", centroids.get_column_names()))?
            .as_materialized_series())
    };
    let mass = centroids.column("mass").ok().map(|c| c.as_materialized_series());
    let out = expressions::fit_integration(get("centroid")?, get(batch_key)?, mass, reference, params)?;
    IntegrationModel::from_fit(centroids, batch_key, "centroid", &out)
}
