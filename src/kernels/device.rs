//! Where a kernel runs. `Cpu` is the default everywhere; `Cuda` is chosen
//! explicitly (`device="cuda"`) and needs a build with the `cuda` feature and
//! an NVIDIA driver at run time. Without either it is an error that says
//! which is missing, never a silent fallback.

use std::str::FromStr;

use crate::error::KernelError;

/// The device a kernel runs on, parsed from `device="cpu"` / `"cuda"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU, over the rayon pool (the default).
    #[default]
    Cpu,
    /// The process's first NVIDIA GPU (GPU 0); needs the `cuda` feature and a driver.
    Cuda,
}

impl FromStr for Device {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, KernelError> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(KernelError::Invalid(format!("device must be 'cpu' or 'cuda', got '{s}'"))),
        }
    }
}

impl Device {
    /// An error unless this device can run kernels now (CPU always can).
    pub fn check(self) -> Result<(), KernelError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda => cuda_status().map(|_| ()),
        }
    }
}

/// Whether `Device::Cuda` works in this process: the crate was built with
/// the `cuda` feature, a driver loads, and a GPU, cuBLAS and NVRTC start.
pub fn cuda_available() -> bool {
    cuda_status().is_ok()
}

/// `Ok(description of the GPU)`, or why CUDA cannot be used.
pub fn cuda_status() -> Result<String, KernelError> {
    super::gpu::status()
}

/// Run `f` once per device this process can use: always `Cpu`, plus `Cuda`
/// when it is available (printed as skipped otherwise). Kernel tests use it so
/// every one of them checks both devices wherever a GPU is present.
#[cfg(test)]
pub fn for_each_device(mut f: impl FnMut(Device)) {
    f(Device::Cpu);
    match cuda_status() {
        Ok(_) => f(Device::Cuda),
        Err(e) => eprintln!("cuda half of the test skipped: {e}"),
    }
}
