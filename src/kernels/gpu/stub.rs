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

pub fn status() -> Result<String, KernelError> {
    no_cuda()
}

pub fn upload_centres(_: &[f32], _: &[f32], _: Option<&[f32]>, _: usize) -> Result<DeviceCentres, KernelError> {
    no_cuda()
}

pub fn gathers() -> bool {
    false
}

pub fn candidates(_: &[f32], c: &DeviceCentres, _: usize) -> Result<Vec<u32>, KernelError> {
    match c.0 {}
}

pub fn search_each(_: &[f32], c: &DeviceCentres, _: usize, _: Option<usize>, _: impl FnMut(usize, Block<'_>)) -> Result<(), KernelError> {
    match c.0 {}
}

pub fn upload_loadings(_: &[f32], _: &[f32], _: usize) -> Result<DeviceLoadings, KernelError> {
    no_cuda()
}

pub fn project(_: &[SparseRow<'_>], m: &DeviceLoadings) -> Result<Vec<f32>, KernelError> {
    match m.0 {}
}

pub fn new_gram(_: usize) -> Result<DeviceGram, KernelError> {
    no_cuda()
}

pub fn add_gram(acc: &mut DeviceGram, _: &[SparseRow<'_>]) -> Result<(), KernelError> {
    match acc.0 {}
}

pub fn read_gram(acc: &DeviceGram) -> Result<Vec<f64>, KernelError> {
    match acc.0 {}
}
