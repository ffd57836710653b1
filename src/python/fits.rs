//! The streaming fits as Python classes, one per
//! [`StreamingFit`](crate::expressions::fit::StreamingFit), with one verb
//! set: `update(...)` per record batch, `merge(later)` (reads the later
//! state; a failed merge changes nothing), `finish(...)`,
//! `to_bytes()` / `from_bytes(b)`, and pickling through them. The
//! low-memory sampler reads the data twice and spills to files, so it has
//! `update`, `next_pass` and `finish` only.

use polars::prelude::{NamedFrom, Series};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3_polars::{PyDataFrame, PySeries};

use super::expressions::kmeans_params;
use super::{fit_pool, value_error};
use crate::expressions::fit::{self, CentroidOptions, PcaOptions, StreamingFit};
use crate::expressions::spill;
use crate::kernels::hvg::Transform;
use crate::kernels::pca::Clip;
use crate::kernels::seurat::Cutoffs;

/// `mine.merge(later)` for two Python objects of one fit class.
fn merge_objects<T: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::False>, F: StreamingFit>(
    mine: &Bound<'_, T>,
    later: &Bound<'_, T>,
    fit: impl Fn(&T) -> &F,
    fit_mut: impl Fn(&mut T) -> &mut F,
) -> PyResult<()> {
    if mine.as_ptr() == later.as_ptr() {
        return Err(value_error("a fit cannot merge itself; pass the state of the rows that follow"));
    }
    let later = later.borrow();
    fit_mut(&mut mine.borrow_mut()).merge(fit(&later)).map_err(value_error)
}

fn bytes<'py, F: StreamingFit + Sync>(py: Python<'py>, fit: &F) -> PyResult<Bound<'py, PyBytes>> {
    let b = py.detach(|| fit.to_bytes()).map_err(value_error)?;
    Ok(PyBytes::new(py, &b))
}

fn read<F: StreamingFit + Send>(py: Python<'_>, b: &[u8]) -> PyResult<F> {
    py.detach(|| F::from_bytes(b)).map_err(value_error)
}

/// `(cls.from_bytes, (bytes, *extra))` for `__reduce__`.
fn reduce<'py>(slf: &Bound<'py, PyAny>, bytes: Bound<'py, PyBytes>, extra: Option<usize>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let from = slf.get_type().getattr("from_bytes")?;
    let args = match extra {
        Some(n) => (bytes, n).into_pyobject(slf.py())?.into_any(),
        None => (bytes,).into_pyobject(slf.py())?.into_any(),
    };
    Ok((from, args))
}

/// An update's columns as the Rust fit takes them (the batch last, where given).
fn columns(first: &[&PySeries], batch: Option<PySeries>) -> Vec<Series> {
    first.iter().map(|s| s.0.clone()).chain(batch.map(|b| b.0)).collect()
}

/// Per-batch gene statistics for `highly_variable_genes`.
#[pyclass(module = "polars_singlecell._internal")]
struct GeneStatsFit {
    fit: fit::GeneStatsFit,
}

#[pymethods]
impl GeneStatsFit {
    /// `transform`: "expm1" (flavor seurat: log-normalised values),
    /// "counts" (flavor seurat_v3: raw counts, float32 squares as scanpy) or
    /// "exact" (the values, float64 squares).
    #[new]
    #[pyo3(signature = (n_genes, transform = "expm1"))]
    fn new(n_genes: usize, transform: &str) -> PyResult<Self> {
        let transform = match transform {
            "expm1" => Transform::Expm1,
            "counts" => Transform::Counts,
            "exact" => Transform::Exact,
            t => return Err(value_error(format!("transform must be 'expm1', 'counts' or 'exact', got {t:?}"))),
        };
        Ok(GeneStatsFit { fit: fit::GeneStatsFit::new(n_genes, transform).map_err(value_error)? })
    }

    /// Entries seen that are not whole numbers (raw counts are).
    #[getter]
    fn non_integer(&self) -> u64 {
        self.fit.non_integer()
    }

    /// `batch`: a Series of batch labels (or None for one batch).
    #[pyo3(signature = (gene_idx, values, batch=None))]
    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries, batch: Option<PySeries>) -> PyResult<()> {
        let (fit, cols) = (&mut self.fit, columns(&[&gene_idx, &values], batch));
        py.detach(|| fit.update(&cols)).map_err(value_error)
    }

    fn merge(slf: &Bound<'_, Self>, later: &Bound<'_, Self>) -> PyResult<()> {
        merge_objects(slf, later, |o: &Self| &o.fit, |o: &mut Self| &mut o.fit)
    }

    /// One row per (batch, gene): n_cells, mean, var (ddof=1), nnz, sum,
    /// sumsq, and std as `sc.pp.scale` divides by.
    fn finish(&self, py: Python<'_>) -> PyResult<PyDataFrame> {
        let fit = &self.fit;
        py.detach(|| fit.finish(&())).map(PyDataFrame).map_err(value_error)
    }

    /// scanpy's flavor="seurat" ranking of these statistics (see
    /// `fit::GeneStatsFit::seurat`): the HVG table.
    #[pyo3(signature = (batched, n_bins, n_top_genes, min_mean, max_mean, min_disp, max_disp))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
    fn seurat(&self, py: Python<'_>, batched: bool, n_bins: usize, n_top_genes: Option<usize>, min_mean: f64, max_mean: f64, min_disp: f64, max_disp: f64) -> PyResult<PyDataFrame> {
        let (fit, cut) = (&self.fit, Cutoffs { min_mean, max_mean, min_disp, max_disp });
        py.detach(|| fit.seurat(batched, n_bins, n_top_genes, &cut)).map(PyDataFrame).map_err(value_error)
    }

    /// seurat_v3's loess per batch: [(label, expected std per gene)].
    fn seurat_v3_loess(&self, py: Python<'_>, span: f64, batched: bool) -> PyResult<Vec<(String, Vec<f64>)>> {
        let fit = &self.fit;
        py.detach(|| fit.seurat_v3_loess(span, batched)).map_err(value_error)
    }

    /// The clip per batch of seurat_v3's second pass (`ClippedSumsFit`'s argument).
    fn seurat_v3_clips(&self, reg_std: Vec<(String, Vec<f64>)>) -> PyResult<Vec<(String, Vec<f64>)>> {
        self.fit.seurat_v3_clips(&reg_std).map_err(value_error)
    }

    /// seurat_v3's HVG table (see `fit::GeneStatsFit::seurat_v3`).
    fn seurat_v3(&self, py: Python<'_>, clipped: PyRef<'_, ClippedSumsFit>, reg_std: Vec<(String, Vec<f64>)>, n_top_genes: usize, batched: bool) -> PyResult<PyDataFrame> {
        let (fit, sums) = (&self.fit, &clipped.fit);
        py.detach(|| fit.seurat_v3(sums, &reg_std, n_top_genes, batched)).map(PyDataFrame).map_err(value_error)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        bytes(py, &self.fit)
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, b: &[u8]) -> PyResult<Self> {
        Ok(GeneStatsFit { fit: read(py, b)? })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let b = bytes(slf.py(), &slf.borrow().fit)?;
        reduce(slf.as_any(), b, None)
    }
}

/// seurat_v3's second pass: per batch, Σ min(x, clip) and Σ min(x, clip)²
/// per gene.
#[pyclass(module = "polars_singlecell._internal")]
struct ClippedSumsFit {
    fit: fit::ClippedSumsFit,
}

#[pymethods]
impl ClippedSumsFit {
    /// `clip`: (batch label, clip value per gene) for every batch.
    #[new]
    fn new(clip: Vec<(String, Vec<f64>)>) -> PyResult<Self> {
        Ok(ClippedSumsFit { fit: fit::ClippedSumsFit::new(clip).map_err(value_error)? })
    }

    #[pyo3(signature = (gene_idx, values, batch=None))]
    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries, batch: Option<PySeries>) -> PyResult<()> {
        let (fit, cols) = (&mut self.fit, columns(&[&gene_idx, &values], batch));
        py.detach(|| fit.update(&cols)).map_err(value_error)
    }

    fn merge(slf: &Bound<'_, Self>, later: &Bound<'_, Self>) -> PyResult<()> {
        merge_objects(slf, later, |o: &Self| &o.fit, |o: &mut Self| &mut o.fit)
    }

    /// One row per (batch, gene): sum, sumsq.
    fn finish(&self, py: Python<'_>) -> PyResult<PyDataFrame> {
        let fit = &self.fit;
        py.detach(|| fit.finish(&())).map(PyDataFrame).map_err(value_error)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        bytes(py, &self.fit)
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, b: &[u8]) -> PyResult<Self> {
        Ok(ClippedSumsFit { fit: read(py, b)? })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let b = bytes(slf.py(), &slf.borrow().fit)?;
        reduce(slf.as_any(), b, None)
    }
}

/// Exact float64 covariance of sparse cells: `fit_pca`'s state.
#[pyclass(module = "polars_singlecell._internal")]
struct CovarianceFit {
    fit: fit::CovarianceFit,
    pool: rayon::ThreadPool,
}

#[pymethods]
impl CovarianceFit {
    /// `clip`: (mean, std, max_value, zero_center) of a first pass: this
    /// pass then fits the PCA of the scaled genes clipped at `max_value`.
    #[new]
    #[pyo3(signature = (n_genes, n_threads, device = "cpu", clip = None))]
    fn new(n_genes: usize, n_threads: usize, device: &str, clip: Option<(Vec<f64>, Vec<f64>, f64, bool)>) -> PyResult<Self> {
        let dev = super::device(device).map_err(value_error)?;
        let clip = clip.map(|(m, s, v, z)| Clip::new(m, s, v, z)).transpose().map_err(value_error)?;
        Ok(CovarianceFit { fit: fit::CovarianceFit::new(n_genes, dev, clip).map_err(value_error)?, pool: fit_pool(n_threads)? })
    }

    fn update(&mut self, py: Python<'_>, gene_idx: PySeries, values: PySeries) -> PyResult<()> {
        let (fit, pool, cols) = (&mut self.fit, &self.pool, columns(&[&gene_idx, &values], None));
        py.detach(|| pool.install(|| fit.update(&cols))).map_err(value_error)
    }

    fn merge(slf: &Bound<'_, Self>, later: &Bound<'_, Self>) -> PyResult<()> {
        merge_objects(slf, later, |o: &Self| &o.fit, |o: &mut Self| &mut o.fit)
    }

    /// (n_cells, mean, components flattened (n_comps × n_genes), explained
    /// variance, explained variance ratio) as float64 Series, and with
    /// `scale` (the PCA of the genes scaled to unit variance) their `std`
    /// (else None). With a clip, `mean` is the scaled genes' mean.
    #[pyo3(signature = (n_comps, scale = false))]
    #[allow(clippy::type_complexity)]
    fn finish(&self, py: Python<'_>, n_comps: usize, scale: bool) -> PyResult<(u64, PySeries, PySeries, PySeries, PySeries, Option<PySeries>)> {
        let (fit, pool) = (&self.fit, &self.pool);
        let out = py.detach(|| pool.install(|| fit.finish(&PcaOptions { n_comps, scale }))).map_err(value_error)?;
        let comps = out.components_row_major();
        let s = |name: &str, v: Vec<f64>| PySeries(Series::new(name.into(), v));
        Ok((
            out.n_cells,
            s("mean", out.mean),
            s("components", comps),
            s("explained_variance", out.explained_variance),
            s("explained_variance_ratio", out.explained_variance_ratio),
            out.std.map(|v| s("std", v)),
        ))
    }

    #[getter]
    fn n_cells(&self) -> u64 {
        self.fit.n_cells()
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        bytes(py, &self.fit)
    }

    /// A state from `to_bytes`, on the CPU, fitting with `n_threads`.
    #[staticmethod]
    #[pyo3(signature = (b, n_threads = 1))]
    fn from_bytes(py: Python<'_>, b: &[u8], n_threads: usize) -> PyResult<Self> {
        Ok(CovarianceFit { fit: read(py, b)?, pool: fit_pool(n_threads)? })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let me = slf.borrow();
        let b = bytes(slf.py(), &me.fit)?;
        reduce(slf.as_any(), b, Some(me.pool.current_num_threads()))
    }
}

/// A fit's k-means options from Python's keyword arguments.
fn centroid_options(
    n_centroids: usize,
    max_iter: usize,
    tol: f64,
    init_size: Option<usize>,
    device: &str,
    min_cells_per_centroid: usize,
    seed: u64,
) -> PyResult<CentroidOptions> {
    let params = kmeans_params(n_centroids, max_iter, tol, seed, init_size, device).map_err(value_error)?;
    Ok(CentroidOptions { params, min_cells_per_centroid })
}

/// The long and summary tables of a centroid fit.
fn tables(d: usize, fits: &[(String, crate::expressions::BatchCentroids)]) -> PyResult<(PyDataFrame, PyDataFrame)> {
    let (long, summary) = fit::centroid_tables(d, fits).map_err(value_error)?;
    Ok((PyDataFrame(long), PyDataFrame(summary)))
}

/// Per-batch seeded samples of an embedding (bottom-k by a hash of the
/// global row number), then k-means per batch.
#[pyclass(module = "polars_singlecell._internal")]
struct CentroidSampleFit {
    fit: fit::CentroidSampleFit,
    seed: u64,
    pool: rayon::ThreadPool,
}

#[pymethods]
impl CentroidSampleFit {
    /// `first_row`: the global number of this state's first row (a
    /// partition's offset; 0 for the whole data).
    #[new]
    #[pyo3(signature = (d, max_samples_per_batch, random_state, n_threads, first_row = 0))]
    fn new(d: usize, max_samples_per_batch: usize, random_state: u64, n_threads: usize, first_row: u64) -> PyResult<Self> {
        let fit = fit::CentroidSampleFit::new(d, max_samples_per_batch, random_state, first_row).map_err(value_error)?;
        Ok(CentroidSampleFit { fit, seed: random_state, pool: fit_pool(n_threads)? })
    }

    fn update(&mut self, py: Python<'_>, embedding: PySeries, batch: PySeries) -> PyResult<()> {
        let (fit, cols) = (&mut self.fit, columns(&[&embedding], Some(batch)));
        py.detach(|| fit.update(&cols)).map_err(value_error)
    }

    fn merge(slf: &Bound<'_, Self>, later: &Bound<'_, Self>) -> PyResult<()> {
        merge_objects(slf, later, |o: &Self| &o.fit, |o: &mut Self| &mut o.fit)
    }

    #[getter]
    fn n_rows(&self) -> u64 {
        self.fit.n_rows()
    }

    /// k-means per batch (batches in sorted label order). Returns the long
    /// table (batch, centroid_id, centroid, mass) and one summary row per batch.
    #[pyo3(signature = (n_centroids, max_iter, tol, init_size, device = "cpu", min_cells_per_centroid = 1))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
    fn finish(
        &self,
        py: Python<'_>,
        n_centroids: usize,
        max_iter: usize,
        tol: f64,
        init_size: Option<usize>,
        device: &str,
        min_cells_per_centroid: usize,
    ) -> PyResult<(PyDataFrame, PyDataFrame)> {
        let options = centroid_options(n_centroids, max_iter, tol, init_size, device, min_cells_per_centroid, self.seed)?;
        let (fit, pool) = (&self.fit, &self.pool);
        let fits = py.detach(|| pool.install(|| fit.finish(&options))).map_err(value_error)?;
        tables(fit.d(), &fits)
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        bytes(py, &self.fit)
    }

    /// A state from `to_bytes`, fitting with `n_threads`.
    #[staticmethod]
    #[pyo3(signature = (b, n_threads = 1))]
    fn from_bytes(py: Python<'_>, b: &[u8], n_threads: usize) -> PyResult<Self> {
        let fit: fit::CentroidSampleFit = read(py, b)?;
        let seed = fit.seed();
        Ok(CentroidSampleFit { fit, seed, pool: fit_pool(n_threads)? })
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let me = slf.borrow();
        let b = bytes(slf.py(), &me.fit)?;
        reduce(slf.as_any(), b, Some(me.pool.current_num_threads()))
    }
}

/// The low-memory centroid fit (`fit_centroids(low_memory=True)`; see
/// `crate::expressions::spill`): `update(None, batch)` over the data, then
/// `next_pass(dir)`, `update(embedding, batch)` over the same rows, `finish`.
#[pyclass(module = "polars_singlecell._internal")]
struct SpillSampleFit {
    fit: spill::SpillSampleFit,
    seed: u64,
    pool: rayon::ThreadPool,
}

#[pymethods]
impl SpillSampleFit {
    #[new]
    fn new(d: usize, max_samples_per_batch: usize, random_state: u64, n_threads: usize) -> PyResult<Self> {
        let fit = spill::SpillSampleFit::new(d, max_samples_per_batch, random_state).map_err(value_error)?;
        Ok(SpillSampleFit { fit, seed: random_state, pool: fit_pool(n_threads)? })
    }

    /// Pass one: `embedding=None` (the batch column only); pass two: both.
    fn update(&mut self, py: Python<'_>, embedding: Option<PySeries>, batch: PySeries) -> PyResult<()> {
        let first: Vec<&PySeries> = embedding.iter().collect();
        let (fit, cols) = (&mut self.fit, columns(&first, Some(batch)));
        py.detach(|| fit.update(&cols)).map_err(value_error)
    }

    /// End pass one; pass two writes the batches' samples under `dir`.
    fn next_pass(&mut self, dir: std::path::PathBuf) -> PyResult<()> {
        self.fit.next_pass(dir).map_err(value_error)
    }

    #[getter]
    fn n_rows(&self) -> u64 {
        self.fit.n_rows()
    }

    /// k-means per batch, one batch's sample loaded at a time; the tables of
    /// `CentroidSampleFit.finish`.
    #[pyo3(signature = (n_centroids, max_iter, tol, init_size, device = "cpu", min_cells_per_centroid = 1))]
    #[allow(clippy::too_many_arguments)] // Python's keyword arguments, one each
    fn finish(
        &mut self,
        py: Python<'_>,
        n_centroids: usize,
        max_iter: usize,
        tol: f64,
        init_size: Option<usize>,
        device: &str,
        min_cells_per_centroid: usize,
    ) -> PyResult<(PyDataFrame, PyDataFrame)> {
        let options = centroid_options(n_centroids, max_iter, tol, init_size, device, min_cells_per_centroid, self.seed)?;
        let (fit, pool) = (&mut self.fit, &self.pool);
        let fits = py.detach(|| pool.install(|| fit.finish(&options))).map_err(value_error)?;
        tables(self.fit.d(), &fits)
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<GeneStatsFit>()?;
    m.add_class::<ClippedSumsFit>()?;
    m.add_class::<CovarianceFit>()?;
    m.add_class::<CentroidSampleFit>()?;
    m.add_class::<SpillSampleFit>()?;
    Ok(())
}
