//! Whole-array functions for the Python side's small tables (metrics,
//! the OT solver, the integration fit, CSR import, the loess, the GPU's
//! status, Parquet footers): NumPy-backed Series in, Series out.

use polars::prelude::*;
use pyo3::prelude::*;
use pyo3_polars::PySeries;

use super::{flat_slice, flat_values, value_error};
use crate::expressions::{self, convert};
use crate::kernels;

/// Degree-2 loess of `y` on `x` with scikit-misc's defaults (interpolate
/// surface): seurat_v3's expected log-variance per gene.
#[pyfunction]
#[pyo3(signature = (x, y, span = 0.3, cell = 0.2))]
fn loess(py: Python<'_>, x: Vec<f64>, y: Vec<f64>, span: f64, cell: f64) -> PyResult<Vec<f64>> {
    py.detach(|| kernels::loess::loess(&x, &y, span, cell)).map_err(value_error)
}

/// Exact `k` nearest rows of `index` for every row of `queries` (both
/// `Array(Float32, d)`), without registering a model: the metrics search a
/// sample once and drop it. Returns (indices `Array(UInt32, k)`, distances
/// `Array(Float32, k)`), ascending, Euclidean, ties to the lower row.
#[pyfunction]
#[pyo3(signature = (queries, index, k, device = "cpu"))]
fn knn_search(py: Python<'_>, queries: PySeries, index: PySeries, k: usize, device: &str) -> PyResult<(PySeries, PySeries)> {
    let dev = super::device(device).map_err(value_error)?;
    let (idx, dist) = py.detach(|| expressions::knn_search(&queries.0, &index.0, k, dev)).map_err(value_error)?;
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

/// Each row group of the Parquet files `paths`, in order, as (rows,
/// entries); see [`crate::footers::row_groups`]. `record_batches` aligns its
/// row slices to these.
#[pyfunction]
fn parquet_row_groups(py: Python<'_>, paths: Vec<String>, columns: Vec<String>) -> PyResult<Vec<(u64, u64)>> {
    py.detach(|| crate::footers::row_groups(&paths, &columns)).map_err(value_error)
}

/// The GPU device="cuda" uses, described; a ValueError saying what is
/// missing when there is none.
#[pyfunction]
fn cuda_device(py: Python<'_>) -> PyResult<String> {
    py.detach(kernels::cuda_status).map_err(value_error)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
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
    Ok(())
}
