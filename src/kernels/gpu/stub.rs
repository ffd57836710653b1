//! The seam without the `cuda` feature: the same functions and handle types
//! as `cuda.rs`, every function an error that says how to get a CUDA build.
//! The handles hold an uninhabited value, so none can exist in this build
//! and the code that would use one compiles but cannot run.

use std::convert::Infallible;

use super::Block;
use crate::error::KernelError;
use crate::kernels::SparseRow;

fn no_cuda<T>() -> Result<T, KernelError> {
    Err(KernelError::Invalid(
        "device='cuda': this build of polars-singlecell has no CUDA backend; rebuild with the `cuda` feature \
         (make build CUDA=1, or maturin develop --release --features python,cuda) or use device='cpu'"
            .into(),
    ))
}

/// Centres on the device (none in this build).
#[derive(Debug)]
pub struct DeviceCentres(Infallible);

/// A PCA model's loadings on the device (none in this build).
#[derive(Debug)]
pub struct DeviceLoadings(Infallible);

/// XᵀX on the device (none in this build).
#[derive(Debug)]
pub struct DeviceGram(Infallible);

/// A description of the GPU, or why CUDA cannot be used.
pub fn status() -> Result<String, KernelError> {
    no_cuda()
}

/// Upload an index's centres (m × d, row-major), their squared norms ‖c‖²
/// (m) and, for `knn_interpolate`, their displacements (m × d); the handle
/// is kept with the index.
pub fn upload_centres(_: &[f32], _: &[f32], _: Option<&[f32]>, _: usize) -> Result<DeviceCentres, KernelError> {
    no_cuda()
}

/// Whether [`search_each`] can also re-rank and gather on the GPU (CUDA
/// started and the gather kernel compiled).
pub fn gathers() -> bool {
    false
}

/// For each row of `x` (row-major, as wide as the centres): the `cap`
/// (at most 64) centres with the smallest float32 ‖c‖² − 2x·c, ascending
/// (ties to the lower index). Returns n × cap indices.
pub fn candidates(_: &[f32], c: &DeviceCentres, _: usize) -> Result<Vec<u32>, KernelError> {
    match c.0 {}
}

/// [`candidates`] block by block: `each(first_row, block)` runs on the CPU,
/// in row order, while the GPU searches the next block. With
/// `gather = Some(k)` (centres uploaded with displacements, [`gathers`]
/// true) each block is the moved rows ([`Block::Moved`]) instead.
pub fn search_each(_: &[f32], c: &DeviceCentres, _: usize, _: Option<usize>, _: impl FnMut(usize, Block<'_>)) -> Result<(), KernelError> {
    match c.0 {}
}

/// Upload a PCA model's loadings (n_genes × k, gene-major) and offset (k)
/// for [`project`]; the handle is kept with the model.
pub fn upload_loadings(_: &[f32], _: &[f32], _: usize) -> Result<DeviceLoadings, KernelError> {
    no_cuda()
}

/// `pca_project` on the GPU: each row (validated against the model's genes)
/// times the loadings, minus the offset; n × k row-major, bit-identical to
/// the CPU.
pub fn project(_: &[SparseRow<'_>], m: &DeviceLoadings) -> Result<Vec<f32>, KernelError> {
    match m.0 {}
}

/// A zeroed n_genes × n_genes XᵀX accumulator on the device (`fit_pca`).
pub fn new_gram(_: usize) -> Result<DeviceGram, KernelError> {
    no_cuda()
}

/// `acc += XᵀX` for validated rows (gene indices < n_genes).
pub fn add_gram(acc: &mut DeviceGram, _: &[SparseRow<'_>]) -> Result<(), KernelError> {
    match acc.0 {}
}

/// The accumulated XᵀX, row-major n_genes × n_genes (symmetric).
pub fn read_gram(acc: &DeviceGram) -> Result<Vec<f64>, KernelError> {
    match acc.0 {}
}
