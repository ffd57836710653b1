//! polars-singlecell: atlas-scale single-cell preprocessing and integration as
//! Polars expressions. `kernels` hold the numerics on slices; `expressions`
//! is the Series glue shared by the Python plugin and Rust Polars pipelines;
//! `prelude` (feature `lazy`) gives Rust pipelines lazy `Expr`s, fits over a
//! `LazyFrame` and the models' Parquet files.

// Every public item is documented: `make test` runs clippy with `-D warnings`,
// so a missing doc comment fails it.
#![warn(missing_docs)]

pub mod error;
pub mod expressions;
#[cfg(feature = "parquet")]
pub mod footers;
pub mod kernels;
#[cfg(feature = "lazy")]
pub mod models;
#[cfg(feature = "lazy")]
pub mod prelude;

#[cfg(feature = "python")]
mod python;

pub use error::KernelError;
