//! Kernel benches on generated sparse rows (2000 genes, ~10% dense).
//! `cov_accumulate/sparse_tiled` vs `cov_accumulate/dense_faer_gemm` is the
//! measurement behind the choice of a tiled sparse scatter in kernels/pca.rs.
//! `kmeans_assign/*` is the k-means assignment step (blocked GEMM + argmin);
//! its throughput is in floating-point operations (2·n·K·d per pass), so
//! criterion's "elem/s" reads as FLOP/s against this machine's SGEMM peak.
//! `knn_interpolate/*` is the same for the fused kNN + gather of
//! `knn_interpolate`, on all cores and on one.
//! `sinkhorn/*` is 20 iterations of the log-domain unbalanced Sinkhorn of
//! `fit_integration` at Tahoe size (2048 centroids × 4096 reference points);
//! "elem/s" counts log-sum-exp terms (2·n·m per iteration).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use polars_singlecell::kernels::normalize::normalize;
use polars_singlecell::kernels::pca::{pca_project, CovAccumulator};
use polars_singlecell::kernels::distance::{nearest, Centres};
use polars_singlecell::kernels::knn::{interpolate, CentroidIndex};
use polars_singlecell::kernels::ot::{sinkhorn_log, SinkhornParams};
use polars_singlecell::kernels::rng::Rng;
use polars_singlecell::kernels::{Device, SparseRow};

const GENES: usize = 2000;

fn rows(n: usize, density: f64) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let idx: Vec<u32> = (0..GENES as u32).filter(|_| next() < density).collect();
            let val = idx.iter().map(|_| 1.0 + (next() * 5.0).floor() as f32).collect();
            (idx, val)
        })
        .collect()
}

fn view(r: &[(Vec<u32>, Vec<f32>)]) -> Vec<SparseRow<'_>> {
    r.iter().map(|(i, v)| SparseRow { gene_idx: i, values: v }).collect()
}

fn bench(c: &mut Criterion) {
    let owned = rows(4096, 0.1);
    let v = view(&owned);

    let mut g = c.benchmark_group("normalize");
    g.throughput(Throughput::Elements(v.len() as u64));
    g.bench_function("4096_cells", |b| b.iter(|| normalize(&v, Some(1e4), true).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("cov_accumulate");
    g.sample_size(10);
    g.throughput(Throughput::Elements(v.len() as u64));
    g.bench_function("sparse_tiled", |b| {
        let mut acc = CovAccumulator::new(GENES).unwrap();
        b.iter(|| acc.add(&v).unwrap())
    });
    g.bench_function("dense_faer_gemm", |b| {
        let mut gram = Mat::<f64>::zeros(GENES, GENES);
        b.iter(|| {
            let mut x = Mat::<f64>::zeros(v.len(), GENES);
            for (r, row) in v.iter().enumerate() {
                for (&i, &val) in row.gene_idx.iter().zip(row.values) {
                    x[(r, i as usize)] = val as f64;
                }
            }
            matmul(gram.as_mut(), Accum::Add, x.transpose(), x.as_ref(), 1.0, Par::rayon(0));
        })
    });
    g.finish();

    let mut acc = CovAccumulator::new(GENES).unwrap();
    acc.add(&v).unwrap();
    let fit = acc.fit(50).unwrap();
    let p = polars_singlecell::kernels::pca::PcaProjector::from_fit(&fit).unwrap();
    let mut g = c.benchmark_group("pca_project");
    g.throughput(Throughput::Elements(v.len() as u64));
    g.bench_function("4096_cells_50_comps", |b| b.iter(|| pca_project(&v, &p, Device::Cpu).unwrap()));
    g.finish();
}

/// `len` uniform [0, 1) floats.
fn uniform(r: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| r.uniform() as f32).collect()
}

fn bench_assign(c: &mut Criterion) {
    let (n, k) = (65_536, 2048);
    let mut g = c.benchmark_group("kmeans_assign");
    g.sample_size(10);
    for d in [50usize, 300] {
        let mut r = Rng::new(d as u64);
        let (x, cen) = (uniform(&mut r, n * d), uniform(&mut r, k * d));
        let cs = Centres::new(&cen, d);
        let mut labels = vec![0u32; n];
        g.throughput(Throughput::Elements((2 * n * k * d) as u64));
        g.bench_function(format!("65536x{d}_k2048_flops"), |b| b.iter(|| nearest(&x, &cs, &mut labels)));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        g.bench_function(format!("65536x{d}_k2048_1core_flops"), |b| b.iter(|| pool.install(|| nearest(&x, &cs, &mut labels))));
    }
    g.finish();
}

/// The fused kNN + interpolation on all cores and on one (a one-thread
/// pool): FLOP/s of its GEMM part, 2·n·K·d.
fn bench_knn(c: &mut Criterion) {
    let (n, k) = (65_536, 2048);
    let mut g = c.benchmark_group("knn_interpolate");
    g.sample_size(10);
    for d in [50usize, 300] {
        let mut r = Rng::new(d as u64);
        let (x, cen, disp) = (uniform(&mut r, n * d), uniform(&mut r, k * d), uniform(&mut r, k * d));
        let index = CentroidIndex::new(cen, Some(disp), d).unwrap();
        let mut out = vec![0f32; n * d];
        g.throughput(Throughput::Elements((2 * n * k * d) as u64));
        g.bench_function(format!("65536x{d}_k2048_top8_flops"), |b| {
            b.iter(|| interpolate(&x, &index, 8, &mut out, Device::Cpu).unwrap())
        });
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        g.bench_function(format!("65536x{d}_k2048_top8_1core_flops"), |b| {
            b.iter(|| pool.install(|| interpolate(&x, &index, 8, &mut out, Device::Cpu)).unwrap())
        });
    }
    g.finish();
}

/// Fixed 20 iterations (tol 0 never stops early) of a 2048 × 4096 problem.
fn bench_sinkhorn(c: &mut Criterion) {
    let (n, m, d, iters) = (2048usize, 4096usize, 50usize, 20usize);
    let mut r = Rng::new(7);
    let (x, y) = (uniform(&mut r, n * d), uniform(&mut r, m * d));
    let cost: Vec<f64> = (0..n * m)
        .map(|ij| {
            let (i, j) = (ij / m, ij % m);
            (0..d).map(|k| ((x[i * d + k] - y[j * d + k]) as f64).powi(2)).sum::<f64>() / d as f64
        })
        .collect();
    let (a, b) = (vec![1.0 / n as f64; n], vec![1.0 / m as f64; m]);
    let p = SinkhornParams { epsilon: 0.05, reg_m: 3.0, max_iter: iters, tol: 0.0 };
    let mut g = c.benchmark_group("sinkhorn");
    g.sample_size(10);
    g.throughput(Throughput::Elements((2 * n * m * iters) as u64));
    g.bench_function("2048x4096_unbalanced_20iter_lse_terms", |bch| bch.iter(|| sinkhorn_log(&a, &b, &cost, &p, None).unwrap()));
    g.finish();
}

criterion_group!(benches, bench, bench_assign, bench_knn, bench_sinkhorn);
criterion_main!(benches);
