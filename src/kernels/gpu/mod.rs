//! Every GPU entry point, behind one seam. With the `cuda` feature these
//! functions run on cudarc (`cuda.rs`); without it `stub.rs` has the same
//! functions and handle types, each function returning the typed "built
//! without CUDA" error (as candle's dummy backend does). Kernels reach the
//! GPU only through here, at one `match device` at their entry, and hold its
//! state in handles that exist in both builds: [`DeviceGram`] (fit_pca's
//! XᵀX), [`DeviceCentres`] (an index's centres) and [`DeviceLoadings`] (a
//! PCA model's projection). No `cfg(feature =
//! "cuda")` is needed outside this module.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod stub;

#[cfg(feature = "cuda")]
use cuda as backend;
#[cfg(not(feature = "cuda"))]
use stub as backend;

pub use backend::{
    add_gram, candidates, gathers, new_gram, project, read_gram, search_each, status, upload_centres, upload_loadings, DeviceCentres, DeviceGram,
    DeviceLoadings,
};

/// One block of a [`search_each`]: candidate indices (rows × cap) or the
/// moved rows (rows × d).
pub enum Block<'a> {
    /// Each row's `cap` candidate centre indices, ascending by ‖c‖² − 2x·c
    /// (rows × cap).
    Candidates(&'a [u32]),
    /// Each row moved by its k nearest centres' weighted displacements, as
    /// `knn::interpolate` writes it (rows × d).
    Moved(&'a [f32]),
}
