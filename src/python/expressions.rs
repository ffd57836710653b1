//! The `#[polars_expr]` plugin functions: schema checks at plan time, then
//! the Series-level operation of `crate::expressions`.

use polars::prelude::*;
use pyo3_polars::derive::polars_expr;
use serde::Deserialize;

use super::registry;
use crate::expressions::{self, schema};
use crate::kernels;
use crate::kernels::kmeans::KMeansParams;

fn cpu() -> String {
    "cpu".into()
}

/// The `device` option, parsed and checked to be usable now.
fn device(name: &str) -> PolarsResult<kernels::Device> {
    Ok(super::device(name)?)
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
    schema::normalize(fields)
}

#[polars_expr(output_type_func = normalize_output)]
fn normalize(inputs: &[Series], kwargs: NormalizeKwargs) -> PolarsResult<Series> {
    expressions::normalize(&inputs[1], &inputs[0], kwargs.target_sum, kwargs.log1p)
}

fn total_counts_output(fields: &[Field]) -> PolarsResult<Field> {
    schema::total_counts(fields)
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
    schema::select_genes(fields)
}

#[polars_expr(output_type_func = select_genes_output)]
fn select_genes(inputs: &[Series], kwargs: SelectGenesKwargs) -> PolarsResult<Series> {
    let (idx, val) = expressions::select_genes(&inputs[0], &inputs[1], &kwargs.genes)?;
    expressions::pair_struct(inputs[0].name(), idx, val)
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
    schema::to_cells(fields)
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
    expressions::pair_struct(&"cells".into(), idx, val)
}

// -------------------------------------------------------------- pca_project

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PcaProjectKwargs {
    /// The registry key of a PCA model (`register_pca_model`).
    model: String,
    n_comps: usize,
    #[serde(default = "cpu")]
    device: String,
}

fn pca_project_output(fields: &[Field], kwargs: PcaProjectKwargs) -> PolarsResult<Field> {
    schema::pca_project(fields, kwargs.n_comps)
}

#[polars_expr(output_type_func_with_kwargs = pca_project_output)]
fn pca_project(inputs: &[Series], kwargs: PcaProjectKwargs) -> PolarsResult<Series> {
    let model = registry::pca(&kwargs.model)?;
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
    fn params(&self) -> PolarsResult<KMeansParams> {
        kmeans_params(self.n_centroids, self.max_iter, self.tol, self.random_state, self.init_size, &self.device)
    }
}

/// k-means settings from the keyword arguments Python passes (the
/// expression's and the centroid fits').
pub(super) fn kmeans_params(n_centroids: usize, max_iter: usize, tol: f64, random_state: u64, init_size: Option<usize>, dev: &str) -> PolarsResult<KMeansParams> {
    let mut p = KMeansParams::new(n_centroids);
    p.max_iter = max_iter;
    p.tol = tol;
    p.seed = random_state;
    p.init_size = init_size;
    p.device = device(dev)?;
    Ok(p)
}

fn kmeans_centroids_output(fields: &[Field]) -> PolarsResult<Field> {
    schema::kmeans_centroids(fields)
}

#[polars_expr(output_type_func = kmeans_centroids_output)]
fn kmeans_centroids(inputs: &[Series], kwargs: KMeansKwargs) -> PolarsResult<Series> {
    let names: Vec<Option<&str>> = kwargs.names.iter().map(|n| Some(n.as_str())).collect();
    expressions::kmeans_centroids_of_group(inputs, &names, &kwargs.params()?)
}

// ------------------------------------------------------ knn, knn_interpolate

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

fn knn_interpolate_output(fields: &[Field], kwargs: KnnInterpolateKwargs) -> PolarsResult<Field> {
    schema::knn_interpolate(fields, kwargs.d)
}

#[polars_expr(output_type_func_with_kwargs = knn_interpolate_output)]
fn knn_interpolate(inputs: &[Series], kwargs: KnnInterpolateKwargs) -> PolarsResult<Series> {
    let model = registry::points(&kwargs.model)?;
    expressions::knn_interpolate(&inputs[0], inputs.get(1), &model, kwargs.k, kwargs.unknown_pooled, device(&kwargs.device)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KnnKwargs {
    /// The registry key of the points searched (`register_model`).
    model: String,
    d: usize,
    k: usize,
    #[serde(default = "cpu")]
    device: String,
}

fn knn_output(fields: &[Field], kwargs: KnnKwargs) -> PolarsResult<Field> {
    schema::knn(fields, kwargs.d, kwargs.k)
}

#[polars_expr(output_type_func_with_kwargs = knn_output)]
fn knn(inputs: &[Series], kwargs: KnnKwargs) -> PolarsResult<Series> {
    let model = registry::points(&kwargs.model)?;
    expressions::knn(&inputs[0], &model, kwargs.k, device(&kwargs.device)?)
}

