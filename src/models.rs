//! The fitted models as files, the same Parquet files Python's `PcaModel`
//! and `IntegrationModel` read and write: a model fitted in one language is
//! used in the other. Each file is a plain table (any Parquet tool reads
//! it) with the rest in the file's key-value metadata as JSON, written to a
//! temporary file and renamed, so a reader never sees half a model.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;
use serde_json::{json, Map, Value};

use crate::expressions::{convert, IntegrationOutput, InterpolationModel};
use crate::kernels::pca::{PcaFit, PcaProjector};

/// Python's `_PCA_KIND`: the metadata key `polars_singlecell` holds
/// `{"kind": PCA_KIND, ...}`.
const PCA_KIND: &str = "polars-singlecell/pca/1";
const PCA_META_KEY: &str = "polars_singlecell";
/// Python's `_META_KEY` and `_FORMAT` of an integration model.
const INTEGRATION_META_KEY: &str = "polars_singlecell.integration_model";
const INTEGRATION_FORMAT: u64 = 1;

/// A fitted PCA in scikit-learn's conventions (Python's `PcaModel`):
/// `components` is `n_comps × n_genes`, row-major.
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// let cells = df!(
///     "gene_idx" => [Series::new("".into(), [0u32, 1]), Series::new("".into(), [1u32, 2]), Series::new("".into(), [0u32, 2])],
///     "values" => [Series::new("".into(), [1f32, 2.0]), Series::new("".into(), [3f32, 1.0]), Series::new("".into(), [2f32, 5.0])],
/// )?;
/// let model = fit_pca(cells.lazy(), 3, &FitPcaOptions { n_comps: 2, ..Default::default() })?;
/// // The file Python's `PcaModel.load` reads, and back: the same numbers, bit for bit.
/// let path = std::env::temp_dir().join(format!("psc-doc-pca-{}.parquet", std::process::id()));
/// model.write_parquet(&path)?;
/// assert_eq!(PcaModel::read_parquet(&path)?, model);
/// # std::fs::remove_file(&path)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PcaModel {
    /// Each gene's mean over the fitted cells (`n_genes`).
    pub mean: Vec<f64>,
    /// The principal axes, `n_comps × n_genes`, row-major (scikit-learn's `components_`).
    pub components: Vec<f64>,
    /// Number of principal axes.
    pub n_comps: usize,
    /// Variance along each axis, largest first (ddof 1, as scikit-learn's).
    pub explained_variance: Vec<f64>,
    /// Each axis' share of the total variance.
    pub explained_variance_ratio: Vec<f64>,
    /// Cells the model was fitted on.
    pub n_cells: u64,
    /// A scaled fit's per-gene standard deviation.
    pub std: Option<Vec<f64>>,
    /// A scaled fit clipped at `±max_value` (then `scaled_mean` is set).
    pub max_value: Option<f64>,
    /// A clipped fit's `sc.pp.scale(zero_center=...)`: `false` scaled the
    /// non-zeros without centring them.
    pub zero_center: bool,
    /// A clipped fit's centre among the scaled, clipped genes.
    pub scaled_mean: Option<Vec<f64>>,
}

impl PcaModel {
    /// The model of an unclipped fit ([`CovarianceFit`](crate::expressions::fit::CovarianceFit)'s `finish`).
    pub fn from_fit(fit: &PcaFit) -> Self {
        PcaModel {
            mean: fit.mean.clone(),
            components: fit.components_row_major(),
            n_comps: fit.components.nrows(),
            explained_variance: fit.explained_variance.clone(),
            explained_variance_ratio: fit.explained_variance_ratio.clone(),
            n_cells: fit.n_cells,
            std: fit.std.clone(),
            max_value: None,
            zero_center: true,
            scaled_mean: None,
        }
    }

    /// Number of genes the model projects (the length of `mean`).
    pub fn n_genes(&self) -> usize {
        self.mean.len()
    }

    /// What `pca_project` uses: built once and shared by every record batch.
    pub fn projector(&self) -> PolarsResult<Arc<PcaProjector>> {
        // As Python's registration: a clipped model centres on the scaled
        // genes' mean and clips with the raw means; any other on `mean`.
        let (centre, clip) = match (self.max_value, &self.scaled_mean) {
            (Some(m), Some(scaled)) => (&scaled[..], Some((&self.mean[..], m, self.zero_center))),
            (Some(_), None) => polars_bail!(ComputeError: "a clipped PCA model (max_value) needs its scaled_mean; reload it with PcaModel::read_parquet"),
            (None, _) => (&self.mean[..], None),
        };
        Ok(Arc::new(PcaProjector::from_parts(centre, &self.components, self.n_comps, self.std.as_deref(), clip)?))
    }

    /// Read a file written by Python's `PcaModel.save` or [`write_parquet`](Self::write_parquet).
    pub fn read_parquet(path: impl AsRef<Path>) -> PolarsResult<Self> {
        let path = path.as_ref();
        let ModelFile { table: df, meta, text } = read_with_meta(path, PCA_META_KEY)?;
        if meta.get("kind").and_then(Value::as_str) != Some(PCA_KIND) {
            polars_bail!(ComputeError: "{} is not a polars-singlecell PCA model (written by PcaModel.save or PcaModel::write_parquet)", path.display());
        }
        let f64s = |name: &str| -> PolarsResult<Option<Vec<f64>>> {
            match df.column(name) {
                Ok(c) => Ok(Some(convert::f64_values(c.as_materialized_series())?)),
                Err(_) => Ok(None),
            }
        };
        let Some(mean) = f64s("mean")? else {
            polars_bail!(ComputeError: "{}: no 'mean' column; not a PCA model file", path.display());
        };
        let loadings = df.column("loadings").map_err(|_| polars_err!(ComputeError: "{}: no 'loadings' column; not a PCA model file", path.display()))?;
        let DataType::Array(_, n_comps) = loadings.dtype() else {
            polars_bail!(ComputeError: "{}: 'loadings' has dtype {}, expected Array(Float64, n_comps)", path.display(), loadings.dtype());
        };
        let n_comps = *n_comps;
        polars_ensure!(loadings.null_count() == 0, ComputeError: "{}: 'loadings' has null rows; the file is damaged, fit the PCA again", path.display());
        // The file is gene-major (one row per gene); the model is axis-major.
        let by_gene = convert::f64_values(&loadings.as_materialized_series().array()?.get_inner())?;
        let g = mean.len();
        polars_ensure!(by_gene.len() == g * n_comps, ComputeError: "{}: 'loadings' holds {} values, expected {g} genes × {n_comps}", path.display(), by_gene.len());
        let components = (0..n_comps).flat_map(|c| by_gene.iter().skip(c).step_by(n_comps).copied().collect::<Vec<_>>()).collect();
        let numbers = |key: &str| -> PolarsResult<Vec<f64>> {
            exact_floats(&text, key).ok_or_else(|| polars_err!(ComputeError: "{}: the metadata has no list of numbers '{key}'", path.display()))
        };
        Ok(PcaModel {
            mean,
            components,
            n_comps,
            explained_variance: numbers("explained_variance")?,
            explained_variance_ratio: numbers("explained_variance_ratio")?,
            n_cells: meta.get("n_cells").and_then(Value::as_u64).ok_or_else(|| polars_err!(ComputeError: "{}: the metadata has no whole number 'n_cells'", path.display()))?,
            std: f64s("std")?,
            max_value: match meta.get("max_value") {
                None | Some(Value::Null) => None,
                Some(_) => Some(exact_floats(&text, "max_value").and_then(|v| v.first().copied()).ok_or_else(|| polars_err!(ComputeError: "{}: the metadata's 'max_value' is not a number", path.display()))?),
            },
            zero_center: meta.get("zero_center").and_then(Value::as_bool).unwrap_or(true),
            scaled_mean: f64s("scaled_mean")?,
        })
    }

    /// Write as Python's `PcaModel.save` does: one row per gene (`gene_idx`,
    /// `mean`, `loadings: Array(Float64, n_comps)`, `std` of a scaled fit,
    /// `scaled_mean` of a clipped one), the rest as JSON metadata.
    pub fn write_parquet(&self, path: impl AsRef<Path>) -> PolarsResult<()> {
        let g = self.n_genes();
        polars_ensure!(self.n_comps >= 1, ComputeError: "PcaModel: n_comps must be at least 1");
        polars_ensure!(self.components.len() == g * self.n_comps, ComputeError: "PcaModel: components hold {} values, expected {} axes × {g} genes", self.components.len(), self.n_comps);
        let by_gene: Vec<f64> = (0..g).flat_map(|j| (0..self.n_comps).map(move |c| (c, j))).map(|(c, j)| self.components[c * g + j]).collect();
        let loadings = convert::array_of("loadings", self.n_comps, by_gene, None)?;
        let mut cols: Vec<Column> = vec![
            Series::new("gene_idx".into(), (0..g as u32).collect::<Vec<_>>()).into(),
            Series::new("mean".into(), &self.mean).into(),
            loadings.into(),
        ];
        if let Some(s) = &self.std {
            cols.push(Series::new("std".into(), s).into());
        }
        if let Some(s) = &self.scaled_mean {
            cols.push(Series::new("scaled_mean".into(), s).into());
        }
        let mut meta = json!({
            "kind": PCA_KIND,
            "n_cells": self.n_cells,
            "explained_variance": self.explained_variance,
            "explained_variance_ratio": self.explained_variance_ratio,
        });
        if let Some(m) = self.max_value {
            meta["max_value"] = json!(m);
            meta["zero_center"] = json!(self.zero_center);
        }
        write_with_meta(DataFrame::new_infer_height(cols)?, path.as_ref(), PCA_META_KEY, &meta)
    }
}

/// A fitted integration, one row per centroid (Python's `IntegrationModel`):
/// the batch column, `centroid` and `displacement` (`Array(Float32, d)`),
/// and any other columns (`mass`, `centroid_id`).
///
/// ```
/// use polars::prelude::*;
/// use polars_singlecell::prelude::*;
///
/// # fn main() -> PolarsResult<()> {
/// // Two centroids of plate2 move by (1, 0); plate1 stays.
/// let vectors = |v: [[f32; 2]; 3], name: &str| -> PolarsResult<Series> {
///     let rows: Vec<Series> = v.iter().map(|r| Series::new("".into(), r)).collect();
///     Series::new(name.into(), rows).cast(&DataType::Array(Box::new(DataType::Float32), 2))
/// };
/// let table = DataFrame::new_infer_height(vec![
///     Series::new("batch".into(), ["plate1", "plate2", "plate2"]).into(),
///     vectors([[0.0, 0.0], [-1.0, 0.0], [-1.0, 1.0]], "centroid")?.into(),
///     vectors([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], "displacement")?.into(),
/// ])?;
/// let model = IntegrationModel::new(table, Some("batch"), Default::default())?;
/// let cells = df!("batch" => ["plate2"])?
///     .lazy()
///     .with_column(lit(Series::new("".into(), [Series::new("".into(), [-1f32, 0.5])])).cast(DataType::Array(Box::new(DataType::Float32), 2)).alias("X_pca"));
/// let out = cells.with_columns([knn_interpolate(col("X_pca"), col("batch"), model.interpolation()?, InterpolateOptions { k: 2, ..Default::default() })]).collect()?;
/// let moved = out.column("X_ot")?.array()?.get_as_series(0).unwrap();
/// assert_eq!(moved.f32()?.to_vec(), [Some(0.0), Some(0.5)]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct IntegrationModel {
    /// One row per centroid: `batch_key`, `centroid`, `displacement`, and any others.
    pub table: DataFrame,
    /// The name of the table's batch column.
    pub batch_key: String,
    /// Free-form fit information, saved with the model.
    pub metrics: Map<String, Value>,
    /// The embedding's width (`centroid`'s and `displacement`'s).
    pub d: usize,
}

impl IntegrationModel {
    /// Check a table as Python's constructor does. `batch_key = None`: the first column.
    pub fn new(table: DataFrame, batch_key: Option<&str>, metrics: Map<String, Value>) -> PolarsResult<Self> {
        polars_ensure!(table.height() > 0, ComputeError: "IntegrationModel: the table has no centroids");
        let batch_key = match batch_key {
            Some(k) => k.to_string(),
            None => table.get_column_names()[0].to_string(),
        };
        let batch = table.column(&batch_key).map_err(|_| {
            polars_err!(ComputeError: "IntegrationModel: batch_key '{batch_key}' is not a column (columns: {:?})", table.get_column_names())
        })?;
        polars_ensure!(!batch.dtype().is_nested(), ComputeError: "IntegrationModel: batch column '{batch_key}' has dtype {}, expected one label per centroid", batch.dtype());
        polars_ensure!(batch.null_count() == 0, ComputeError: "IntegrationModel: batch column '{batch_key}' has nulls; every centroid needs a batch");
        let width = |name: &str| -> PolarsResult<usize> {
            let c = table.column(name).map_err(|_| polars_err!(ComputeError: "IntegrationModel: no '{name}' column (columns: {:?})", table.get_column_names()))?;
            let s = c.as_materialized_series();
            let d = convert::check_embedding_field(s.field().as_ref())?;
            polars_ensure!(s.null_count() == 0, ComputeError: "IntegrationModel: column '{name}' has nulls");
            let (x, _) = convert::embedding_rows(s)?;
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                polars_bail!(ComputeError: "IntegrationModel: column '{name}' holds the non-finite value {} at row {}", x[i], i / d.max(1));
            }
            Ok(d)
        };
        let d = width("centroid")?;
        let d_disp = width("displacement")?;
        polars_ensure!(d_disp == d, ComputeError: "IntegrationModel: 'displacement' has width {d_disp} but 'centroid' has {d}");
        Ok(IntegrationModel { table, batch_key, metrics, d })
    }

    /// The model of a fit on the centroid table `centroids` (its columns
    /// `batch_key`, `centroid` and any others, as `fit_integration` read
    /// them): the table with `displacement`, ordered as Python orders it.
    pub fn from_fit(centroids: &DataFrame, batch_key: &str, centroid: &str, out: &IntegrationOutput) -> PolarsResult<Self> {
        let mut table = centroids.clone();
        table.with_column(out.displacement.clone().into_column())?;
        let mut order = vec![batch_key.to_string(), "centroid".to_string(), "displacement".to_string()];
        table.rename(centroid, "centroid".into())?;
        for name in table.get_column_names() {
            if !order.iter().any(|o| o == name.as_str()) {
                order.push(name.to_string());
            }
        }
        let table = table.select(order)?;
        let mut metrics = Map::new();
        metrics.insert("n_centroids".into(), json!(table.height()));
        metrics.insert("it".into(), json!(out.fit.scales.len()));
        metrics.insert("params".into(), json!({"passes": out.fit.passes.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(), "scales": out.fit.scales}));
        Self::new(table, Some(batch_key), metrics)
    }

    /// Read a file written by Python's `IntegrationModel.write_parquet` or
    /// [`write_parquet`](Self::write_parquet) (or any Parquet file with its
    /// columns; then the first column is the batch key).
    pub fn read_parquet(path: impl AsRef<Path>) -> PolarsResult<Self> {
        let path = path.as_ref();
        let ModelFile { table, meta, .. } = read_with_meta(path, INTEGRATION_META_KEY)?;
        let format = meta.get("format").and_then(Value::as_u64).unwrap_or(INTEGRATION_FORMAT);
        polars_ensure!(format <= INTEGRATION_FORMAT, ComputeError: "{} was written by a newer polars-singlecell (model format {format}); upgrade", path.display());
        let metrics = meta.get("metrics").and_then(Value::as_object).cloned().unwrap_or_default();
        Self::new(table, meta.get("batch_key").and_then(Value::as_str), metrics)
            .map_err(|e| polars_err!(ComputeError: "{}: {e}", path.display()))
    }

    /// Write as Python's `IntegrationModel.write_parquet` does.
    pub fn write_parquet(&self, path: impl AsRef<Path>) -> PolarsResult<()> {
        let meta = json!({"format": INTEGRATION_FORMAT, "batch_key": self.batch_key, "metrics": self.metrics});
        write_with_meta(self.table.clone(), path.as_ref(), INTEGRATION_META_KEY, &meta)
    }

    /// What `knn_interpolate` uses: centroids, displacements and batch
    /// labels (as text, as Python registers them), built once.
    pub fn interpolation(&self) -> PolarsResult<Arc<InterpolationModel>> {
        let labels = self.table.column(&self.batch_key)?.cast(&DataType::String)?;
        let labels: Vec<String> = labels.str()?.iter().map(|l| l.unwrap_or_default().to_string()).collect();
        let rows = |name: &str| -> PolarsResult<Vec<f32>> {
            Ok(convert::embedding_rows(self.table.column(name)?.as_materialized_series())?.0.into_owned())
        };
        let model = InterpolationModel::new(&labels, rows("centroid")?, Some(rows("displacement")?), self.d)?;
        Ok(Arc::new(model))
    }

    /// The centroids alone, as `knn`'s index.
    pub fn index(&self) -> PolarsResult<Arc<InterpolationModel>> {
        let labels = vec![String::new(); self.table.height()];
        let x = convert::embedding_rows(self.table.column("centroid")?.as_materialized_series())?.0.into_owned();
        Ok(Arc::new(InterpolationModel::new(&labels, x, None, self.d)?))
    }
}

/// The numbers of a top-level `"key": [x, ...]` or `"key": x` of a JSON
/// text, parsed by Rust's correctly rounded `str::parse`: serde_json's
/// default float parsing can be an ulp off (its exact mode is a feature that
/// would rebuild every polars crate depending on serde_json), and a model
/// read from Python must carry Python's bits.
fn exact_floats(text: &str, key: &str) -> Option<Vec<f64>> {
    let at = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let body = match rest.strip_prefix('[') {
        Some(list) => &list[..list.find(']')?],
        None => &rest[..rest.find([',', '}']).unwrap_or(rest.len())],
    };
    if body.trim().is_empty() {
        return Some(vec![]);
    }
    body.split(',').map(|x| x.trim().parse::<f64>().ok()).collect()
}

/// Python's `json.dumps` writes non-finite floats as the bare tokens `NaN`,
/// `Infinity` and `-Infinity` (a metric or `reg_m=inf`), which JSON and
/// serde_json refuse: they become `null` here (outside strings; the exact
/// numbers the models need are read by [`exact_floats`]).
fn python_json(text: &str) -> String {
    let (mut out, mut in_string, mut escaped) = (String::with_capacity(text.len()), false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A model file: its table, the JSON object under the model's metadata
/// key (empty when absent), and that JSON's text.
struct ModelFile {
    table: DataFrame,
    meta: Map<String, Value>,
    text: String,
}

/// A Parquet file's table and the JSON under `key` in its metadata.
fn read_with_meta(path: &Path, key: &str) -> PolarsResult<ModelFile> {
    let cannot = |e: &dyn std::fmt::Display| polars_err!(ComputeError: "cannot read the model file {}: {e}", path.display());
    let mut file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => polars_err!(ComputeError: "no model file at {}", path.display()),
        _ => cannot(&e),
    })?;
    let mut reader = ParquetReader::new(&mut file);
    let meta = reader.get_metadata().map_err(|e| cannot(&e))?.clone();
    let text = meta.key_value_metadata().as_ref().and_then(|kv| kv.iter().find(|k| k.key == key)).and_then(|k| k.value.clone());
    let df = reader.finish().map_err(|e| cannot(&e))?;
    let meta = match &text {
        Some(t) => match serde_json::from_str::<Value>(&python_json(t)) {
            Ok(Value::Object(m)) => m,
            Ok(_) | Err(_) => polars_bail!(ComputeError: "{}: the metadata '{key}' is not a JSON object", path.display()),
        },
        None => Map::new(),
    };
    Ok(ModelFile { table: df, meta, text: text.unwrap_or_default() })
}

/// Write `df` to `path` with `meta` under `key`: a temporary file beside
/// it, then a rename (Python's `io.write_parquet`).
fn write_with_meta(mut df: DataFrame, path: &Path, key: &str, meta: &Value) -> PolarsResult<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> PolarsResult<()> {
        let file = File::create(&tmp)?;
        let kv = KeyValueMetadata::from_static(vec![(key.to_string(), meta.to_string())]);
        ParquetWriter::new(file).with_key_value_metadata(Some(kv)).finish(&mut df)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| polars_err!(ComputeError: "cannot write {}: {e}", path.display()))
}
