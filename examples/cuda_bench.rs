//! knn_interpolate throughput on the GPU (device = Cuda) against the CPU, for
//! d = 300 cells against 2048 own-batch and 28,672 pooled centroids (Tahoe:
//! 14 plates × 2048). Prints rows/s, the time 86.8M cells would take, and
//! checks the GPU's output equals the CPU's on the rows both ran.
//!
//!     cargo run --release --features cuda --example cuda_bench -- [rows]
//!
//! Random rows in memory: this measures the kernels (host→device copies
//! included), not reading Parquet from disk.

use std::time::Instant;

use polars_singlecell::kernels::knn::{interpolate, CentroidIndex};
use polars_singlecell::kernels::rng::Rng;
use polars_singlecell::kernels::{cuda_status, gpu, Device};

const TAHOE_CELLS: f64 = 86.8e6;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).map_or(Ok(1_000_000), |a| a.parse())?;
    let (d, k) = (300usize, 8usize);
    println!("GPU: {}", cuda_status()?);
    println!("CPU threads: {}", rayon::current_num_threads());
    println!("exact re-rank and gather on the {}", if gpu::gathers() { "GPU" } else { "CPU" });
    let mut r = Rng::new(1);
    let x: Vec<f32> = (0..n * d).map(|_| (r.uniform() * 2.0 - 1.0) as f32).collect();
    println!("| centroids | rows | GPU search only (rows/s) | device=cuda (rows/s) | device=cpu (rows/s) | 86.8M cells, cuda (s) | same bits |");
    println!("|---|---|---|---|---|---|---|");
    for m in [2048usize, 28_672] {
        let cen: Vec<f32> = (0..m * d).map(|_| (r.uniform() * 2.0 - 1.0) as f32).collect();
        let disp: Vec<f32> = (0..m * d).map(|_| (r.uniform() * 0.2 - 0.1) as f32).collect();
        let index = CentroidIndex::new(cen.clone(), Some(disp), d)?;
        let mut out = vec![0f32; n * d];
        // Warm-up: context, NVRTC, the index's upload.
        interpolate(&x[..1000 * d], &index, k, &mut out[..1000 * d], Device::Cuda)?;

        let norms: Vec<f32> = cen.chunks(d).map(|c| c.iter().map(|v| v * v).sum()).collect();
        let on_gpu = gpu::upload_centres(&cen, &norms, None, d)?;
        let t = Instant::now();
        let cand = gpu::candidates(&x, &on_gpu, k + 4)?;
        let search = t.elapsed().as_secs_f64();
        assert_eq!(cand.len(), n * (k + 4));

        let t = Instant::now();
        interpolate(&x, &index, k, &mut out, Device::Cuda)?;
        let full = t.elapsed().as_secs_f64();

        // A slice of the rows on the CPU (its rate does not depend on how many).
        let n_cpu = if m > 4096 { 20_000 } else { 100_000 }.min(n);
        let mut cpu = vec![0f32; n_cpu * d];
        let t = Instant::now();
        interpolate(&x[..n_cpu * d], &index, k, &mut cpu, Device::Cpu)?;
        let cpu_secs = t.elapsed().as_secs_f64();
        let same = cpu == out[..n_cpu * d];
        println!(
            "| {m} | {n} | {:.3e} | {:.3e} | {:.3e} | {:.1} | {same} |",
            n as f64 / search,
            n as f64 / full,
            n_cpu as f64 / cpu_secs,
            TAHOE_CELLS * full / n as f64,
        );
    }
    Ok(())
}
