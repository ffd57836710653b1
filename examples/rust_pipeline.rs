//! Using the crate from a Rust Polars pipeline (polars 0.55.x).
//! Run: cargo run --example rust_pipeline
use polars::prelude::*;
use polars_singlecell::expressions::{fit_integration, kmeans_centroids, normalize, pca_project};
use polars_singlecell::expressions::convert::array_f32;
use polars_singlecell::expressions::fit::{CovarianceFit, PcaOptions, StreamingFit};
use polars_singlecell::kernels::integrate::IntegrationParams;
use polars_singlecell::kernels::kmeans::KMeansParams;
use polars_singlecell::kernels::Device;
use polars_singlecell::kernels::pca::PcaProjector;

fn main() -> PolarsResult<()> {
    // Three cells over three genes, in the project's sparse layout.
    let gene_idx = Series::new("gene_idx".into(), [
        Series::new("".into(), [0u32, 2]),
        Series::new("".into(), [1u32]),
        Series::new("".into(), [0u32, 1, 2]),
    ]);
    let values = Series::new("values".into(), [
        Series::new("".into(), [1f32, 3.0]),
        Series::new("".into(), [5f32]),
        Series::new("".into(), [2f32, 2.0, 2.0]),
    ]);
    let lognorm = normalize(&gene_idx, &values, Some(1e4), true)?;

    // Fit PCA: `update` once per record batch. Here two partitions (rows
    // 0..2 and 2..3), each fitted on its own as a worker would, the second
    // sent as bytes, merged in row order.
    let part = |s: &Series, a: i64, n: usize| s.slice(a, n);
    let mut pca = CovarianceFit::new(3, Device::Cpu, None)?;
    pca.update(&[part(&gene_idx, 0, 2), part(&lognorm, 0, 2)])?;
    let mut rest = CovarianceFit::new(3, Device::Cpu, None)?;
    rest.update(&[part(&gene_idx, 2, 1), part(&lognorm, 2, 1)])?;
    pca.merge(&CovarianceFit::from_bytes(&rest.to_bytes()?)?)?;
    let fit = pca.finish(&PcaOptions { n_comps: 2, scale: false })?;
    assert_eq!(fit.n_cells, 3);
    let model = PcaProjector::from_fit(&fit)?;

    let x_pca = pca_project(&gene_idx, &lognorm, &model, Device::Cpu)?;
    let df = DataFrame::new_infer_height(vec![x_pca.clone().into()])?;
    println!("{df}");
    assert_eq!(df.column("X_pca")?.dtype(), &DataType::Array(Box::new(DataType::Float32), 2));

    // Two centroids of the embedding with their masses (an aggregation: one row).
    let mut params = KMeansParams::new(2);
    params.seed = 0;
    let centroids = kmeans_centroids(&x_pca, None, &params)?;
    println!("{centroids}");
    let mass = centroids.struct_()?.field_by_name("mass")?;
    assert_eq!(mass.list()?.get_as_series(0).unwrap().sum::<f64>()?, 3.0);

    // Integration of a centroid table: two batches of the same two
    // populations, batch "b" shifted by 5 along the first axis.
    let x: Vec<f32> = [0.0f32, 0.1, 3.0, 3.1].iter().flat_map(|&v| [v, v * 0.5]).collect();
    let both: Vec<f32> = x.iter().copied().chain(x.chunks(2).flat_map(|r| [r[0] + 5.0, r[1]])).collect();
    let centroid = array_f32("centroid", 2, both, None)?;
    let batch = Series::new("batch".into(), ["a", "a", "a", "a", "b", "b", "b", "b"]);
    let out = fit_integration(&centroid, &batch, None, None, &IntegrationParams::default())?;
    println!("{}: passes {:?}", out.displacement, out.fit.passes);
    let dx: Vec<f32> = out.fit.displacement.chunks(2).map(|r| r[0]).collect();
    assert!(dx[..4].iter().all(|&v| v > 1.0) && dx[4..].iter().all(|&v| v < -1.0)); // they meet near the middle
    Ok(())
}
