//! The Python extension `polars_singlecell._internal`. Glue only: convert,
//! validate options, call `crate::expressions` / `crate::kernels`; no
//! arithmetic and no file I/O here. One file per concern:
//!
//! - [`expressions`]: the `#[polars_expr]` plugin functions;
//! - [`registry`]: the fitted models plugins look up by key;
//! - [`fits`]: the streaming fits (one verb set: `update`, `merge`,
//!   `finish`, `to_bytes` / `from_bytes`, pickling);
//! - [`numpy`]: whole-array functions for the Python side's small tables.

mod expressions;
mod fits;
mod numpy;
mod registry;

use polars::prelude::*;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3_polars::PolarsAllocator;

use crate::kernels::Device;

#[global_allocator]
static ALLOC: PolarsAllocator = PolarsAllocator::new();

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The `device` option of an expression or fit ("cpu" or "cuda"), checked
/// to be usable now.
fn device(name: &str) -> Result<Device, crate::error::KernelError> {
    let d: Device = name.parse()?;
    d.check()?;
    Ok(d)
}

/// A flat numeric Series without nulls as a Vec (`expected` names its dtype
/// in the error).
pub(super) fn flat_values<T: PolarsNumericType>(s: &Series, expected: &str) -> PyResult<Vec<T::Native>> {
    Ok(flat_slice::<T>(s, expected)?.into_owned())
}

/// [`flat_values`], borrowed where the data is one chunk (a NumPy array's
/// always is): a 2048 × 4096 cost matrix copied element by element took 9%
/// of a Sinkhorn solve.
pub(super) fn flat_slice<'a, T: PolarsNumericType>(s: &'a Series, expected: &str) -> PyResult<std::borrow::Cow<'a, [T::Native]>> {
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

/// A rayon pool for the single-call fits (never the global pool: inside a
/// plugin process that would fight Polars' own).
fn fit_pool(n_threads: usize) -> PyResult<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(n_threads.max(1)).build().map_err(value_error)
}

#[pymodule]
fn _internal(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The Rust polars the plugin was built against, for the version check.
    m.add("POLARS_CRATE_VERSION", "0.55.2")?;
    m.add("CUDA_BUILD", cfg!(feature = "cuda"))?;
    fits::register(m)?;
    registry::register(m)?;
    numpy::register(m)?;
    Ok(())
}
