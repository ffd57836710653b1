//! The fitted models that plugin expressions use, one registry for all:
//! Python registers a model once per process under a digest of its contents
//! (`register_pca_model`, `register_model`), an expression's kwargs carry
//! only the key, and each record batch looks the model up (one read lock, no
//! copy). Passing the arrays in kwargs instead would unpickle and rebuild
//! them on every batch (BUILD.md: 2–4 ms per MB).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};

use polars::prelude::*;
use pyo3::prelude::*;
use pyo3_polars::PySeries;

use super::{flat_values, value_error};
use crate::expressions::{convert, InterpolationModel};
use crate::kernels::pca::PcaProjector;

#[derive(Clone)]
enum Model {
    /// A PCA model: `pca_project`'s.
    Pca(Arc<PcaProjector>),
    /// Points with optional displacements: `knn_interpolate`'s integration
    /// model, or `knn`'s plain index.
    Points(Arc<InterpolationModel>),
}

static MODELS: LazyLock<RwLock<HashMap<String, Model>>> = LazyLock::new(Default::default);
/// How many models this process has built (tests check it stays at one).
static MODEL_BUILDS: AtomicU64 = AtomicU64::new(0);

fn lookup(key: &str, kind: &str) -> PolarsResult<Model> {
    let models = MODELS.read().map_err(|_| polars_err!(ComputeError: "the model registry is poisoned by an earlier panic"))?;
    models.get(key).cloned().ok_or_else(|| {
        polars_err!(ComputeError: "model {key} is not loaded in this process (was the query built in another process, or psc.clear_models() called?); build the expression again here with model=<{kind} or Parquet path>")
    })
}

/// The PCA model registered under `key`.
pub(super) fn pca(key: &str) -> PolarsResult<Arc<PcaProjector>> {
    match lookup(key, "PcaModel")? {
        Model::Pca(m) => Ok(m),
        Model::Points(_) => polars_bail!(ComputeError: "model {key} holds points, not a PCA model; pass a PcaModel"),
    }
}

/// The points (integration model or plain index) registered under `key`.
pub(super) fn points(key: &str) -> PolarsResult<Arc<InterpolationModel>> {
    match lookup(key, "IntegrationModel")? {
        Model::Points(m) => Ok(m),
        Model::Pca(_) => polars_bail!(ComputeError: "model {key} is a PCA model; pass an IntegrationModel or an array of points"),
    }
}

/// Whether `key` is registered already (then nothing is built).
fn known(key: &str) -> PyResult<bool> {
    Ok(MODELS.read().map_err(value_error)?.contains_key(key))
}

/// Keep `model` under `key` unless another thread kept one first (then this
/// one is dropped and nothing counts as built).
fn insert(key: String, model: Model) -> PyResult<bool> {
    let mut models = MODELS.write().map_err(value_error)?;
    if models.contains_key(&key) {
        return Ok(false);
    }
    models.insert(key, model);
    MODEL_BUILDS.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// Build and keep points under `key` (a no-op when it is already there):
/// an integration model's centroids and displacements, or a plain index
/// (`displacement=None`). Returns whether it was built now.
#[pyfunction]
#[pyo3(signature = (key, labels, centroids, displacement=None))]
fn register_model(py: Python<'_>, key: String, labels: Vec<String>, centroids: PySeries, displacement: Option<PySeries>) -> PyResult<bool> {
    if known(&key)? {
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
    insert(key, Model::Points(Arc::new(model)))
}

/// Build and keep a PCA model under `key` (a no-op when it is already
/// there). Float64 Series: `mean` (n_genes,), `components` (n_comps ×
/// n_genes, row-major), a scaled fit's `std`; a clipped scaled fit also
/// `clip_mean` (the genes' means before scaling; `mean` is then the scaled
/// genes' mean) and `max_value`. Returns whether it was built now.
#[pyfunction]
#[pyo3(signature = (key, n_comps, mean, components, std=None, clip_mean=None, max_value=None, zero_center=true))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
fn register_pca_model(
    py: Python<'_>,
    key: String,
    n_comps: usize,
    mean: PySeries,
    components: PySeries,
    std: Option<PySeries>,
    clip_mean: Option<PySeries>,
    max_value: Option<f64>,
    zero_center: bool,
) -> PyResult<bool> {
    if known(&key)? {
        return Ok(false);
    }
    let f64s = |s: &PySeries| flat_values::<Float64Type>(&s.0, "Float64");
    let (mean, components) = (f64s(&mean)?, f64s(&components)?);
    let std = std.as_ref().map(f64s).transpose()?;
    let clip_mean = clip_mean.as_ref().map(f64s).transpose()?;
    let model = py
        .detach(|| match (max_value, &clip_mean) {
            (Some(_), None) => Err(crate::KernelError::Invalid("a clipped PCA model needs its std and clip_mean; reload it with PcaModel.load".into())),
            (m, c) => PcaProjector::from_parts(&mean, &components, n_comps, std.as_deref(), m.zip(c.as_deref()).map(|(m, c)| (c, m, zero_center))),
        })
        .map_err(value_error)?;
    insert(key, Model::Pca(Arc::new(model)))
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(register_model, m)?)?;
    m.add_function(wrap_pyfunction!(register_pca_model, m)?)?;
    m.add_function(wrap_pyfunction!(model_builds, m)?)?;
    m.add_function(wrap_pyfunction!(clear_models, m)?)?;
    Ok(())
}
