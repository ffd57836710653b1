//! The pipeline a Rust Polars user writes (feature `lazy`): scan Parquet →
//! normalize → HVG → select genes → PCA → project → centroids → integration →
//! interpolate → sink Parquet, lazily and streaming.
//!
//!     cargo run --features lazy --example rust_pipeline                 # generated cells
//!     cargo run --features lazy --example rust_pipeline -- CELLS PSC OUT [PARTITION_ROWS]
//!
//! With arguments it runs on `CELLS` (a folder of the layout's Parquet:
//! `gene_idx`, `values`, `batch`, its genes table beside it) with
//! `psc.integrate`'s defaults, writing to `OUT`: `genes.parquet` (the HVG
//! table; `genes_v3.parquet`: flavor seurat_v3), `pca.parquet` (and
//! `pca_clipped.parquet`: `scale`, `max_value=10`), `centroids.parquet`, `integration.parquet` (its
//! own fits, in the files Python reads) and `cells.parquet` (`X_pca`,
//! `X_ot`), and `cells_psc_models.parquet`: the cells projected and moved
//! with the models and genes Python wrote in `PSC` (`psc.integrate`'s output).
//! `tests/test_rust_pipeline.py` runs it and compares every file with
//! `psc.integrate`'s. `PARTITION_ROWS` (default [`PARTITION_ROWS`]): the
//! HVG and PCA fits' partitions, to compare with Python's at another size.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;
use polars_singlecell::prelude::*;

/// `psc.integrate`'s settings.
const TARGET_SUM: f64 = 1e4;
const N_COMPS: usize = 50;
const MIN_CELLS_PER_CENTROID: usize = 16;
const K: usize = 8;

fn main() -> PolarsResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => generated(),
        [cells, psc, out, rest @ ..] if rest.len() <= 1 => {
            let partition_rows = match rest.first() {
                Some(r) => r.parse().map_err(|_| polars_err!(InvalidOperation: "PARTITION_ROWS must be a whole number, got {r}"))?,
                None => PARTITION_ROWS,
            };
            std::fs::create_dir_all(out)?;
            let n_genes = n_genes_of(Path::new(cells))?;
            let hvg_options = HvgOptions { batch_key: Some("batch".into()), partition_rows, ..Default::default() };
            let hvg = highly_variable_genes(counts(Path::new(cells))?, n_genes, &hvg_options)?;
            write(hvg.clone(), &Path::new(out).join("genes.parquet"))?;
            // flavor seurat_v3 on the raw counts (two passes), as psc.highly_variable_genes(n_top_genes=100, flavor="seurat_v3").
            let v3 = HvgOptions { n_top_genes: Some(100), flavor: Flavor::SeuratV3 { span: 0.3 }, ..hvg_options };
            write(highly_variable_genes(scan_parquet(cells)?, n_genes, &v3)?, &Path::new(out).join("genes_v3.parquet"))?;
            let genes = highly_variable(&hvg)?;
            // psc.fit_pca(scale=True, max_value=10) on the same cells: the clipped fit's two passes.
            let clipped = FitPcaOptions { n_comps: N_COMPS.min(genes.len()), scale: true, max_value: Some(10.0), partition_rows, ..Default::default() };
            fit_pca(selected(Path::new(cells), genes.clone())?, genes.len(), &clipped)?.write_parquet(Path::new(out).join("pca_clipped.parquet"))?;
            pipeline(Path::new(cells), genes, Path::new(out), partition_rows)?;
            with_models(Path::new(cells), Path::new(psc), Path::new(out))
        },
        _ => polars_bail!(InvalidOperation: "usage: rust_pipeline [CELLS PSC_OUT OUT [PARTITION_ROWS]]"),
    }
}

/// The genes table beside a folder of cells (`psc.datasets`' `<folder>_genes.parquet`): its rows.
fn n_genes_of(cells: &Path) -> PolarsResult<usize> {
    let name = format!("{}_genes.parquet", cells.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    Ok(scan_parquet(cells.with_file_name(name))?.collect()?.height())
}

fn write(mut df: DataFrame, path: &Path) -> PolarsResult<()> {
    ParquetWriter::new(std::fs::File::create(path)?).finish(&mut df)?;
    Ok(())
}

fn counts(cells: &Path) -> PolarsResult<LazyFrame> {
    let norm = NormalizeOptions { target_sum: Some(TARGET_SUM), log1p: true };
    Ok(scan_parquet(cells)?.with_columns([normalize(col("gene_idx"), col("values"), norm)]))
}

/// Normalised, selected counts: the input of the PCA.
fn selected(cells: &Path, genes: Arc<[u32]>) -> PolarsResult<LazyFrame> {
    Ok(counts(cells)?
        .with_columns([select_genes(col("gene_idx"), col("values"), genes).struct_().field_by_names(["*"])]))
}

fn pipeline(cells: &Path, genes: Arc<[u32]>, out: &Path, partition_rows: u64) -> PolarsResult<()> {
    let n_genes = genes.len();
    let lf = selected(cells, genes)?;
    let pca = fit_pca(lf.clone(), n_genes, &FitPcaOptions { n_comps: N_COMPS.min(n_genes), partition_rows, ..Default::default() })?;
    pca.write_parquet(out.join("pca.parquet"))?;

    let x_pca = out.join("cells_pca.parquet");
    let projector = pca.projector()?; // built once for every record batch
    sink_parquet(lf.select([col("batch"), pca_project(col("gene_idx"), col("values"), projector, Device::Cpu)]), &x_pca)?;

    // As psc.integrate: one batch's sample in memory, the others spilled beside the outputs.
    let options = FitCentroidsOptions { min_cells_per_centroid: MIN_CELLS_PER_CENTROID, low_memory: true, temp_dir: Some(out.to_path_buf()), ..Default::default() };
    let (centroids, _) = fit_centroids(scan_parquet(&x_pca)?, &options)?;
    write(centroids.clone(), &out.join("centroids.parquet"))?;

    let model = fit_integration(&centroids, "batch", None, &IntegrationParams::default())?;
    model.write_parquet(out.join("integration.parquet"))?;
    let interpolation = model.interpolation()?;
    let moved = scan_parquet(&x_pca)?.with_columns([knn_interpolate(
        col("X_pca"),
        col("batch"),
        interpolation,
        InterpolateOptions { k: K, ..Default::default() },
    )]);
    sink_parquet(moved, out.join("cells.parquet"))
}

/// The cells projected and moved with the models Python wrote.
fn with_models(cells: &Path, psc: &Path, out: &Path) -> PolarsResult<()> {
    let pca = PcaModel::read_parquet(psc.join("pca.parquet"))?;
    let model = IntegrationModel::read_parquet(psc.join("integration.parquet"))?;
    let genes = highly_variable(&scan_parquet(psc.join("genes.parquet"))?.collect()?)?;
    let lf = selected(cells, genes)?
        .select([col("batch"), pca_project(col("gene_idx"), col("values"), pca.projector()?, Device::Cpu)])
        .with_columns([knn_interpolate(col("X_pca"), col("batch"), model.interpolation()?, InterpolateOptions { k: K, ..Default::default() })]);
    sink_parquet(lf, out.join("cells_psc_models.parquet"))
}

/// Without arguments: generated cells (three batches, the third shifted),
/// every gene kept, in a temporary folder.
fn generated() -> PolarsResult<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("psc-rust-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (n, g) = (3000usize, 60u32);
    let mut state = 42u64;
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let (mut idx, mut val, mut batch) = (vec![], vec![], vec![]);
    for i in 0..n {
        let (pop, b) = (i % 2, i % 3);
        // Two populations with their own genes; batch 2 has extra counts on genes 0..10.
        let genes: Vec<u32> = (0..g).filter(|&j| (j as usize % 2 == pop || next() % 4 == 0) && next() % 3 != 0).collect();
        let counts: Vec<f32> = genes.iter().map(|&j| (1 + next() % 3 + if b == 2 && j < 10 { 6 } else { 0 }) as f32).collect();
        idx.push(Series::new("".into(), genes));
        val.push(Series::new("".into(), counts));
        batch.push(["a", "b", "c"][b]);
    }
    let mut df = df!("gene_idx" => idx, "values" => val, "batch" => batch)?;
    let cells = dir.join("cells.parquet");
    ParquetWriter::new(std::fs::File::create(&cells)?).with_row_group_size(Some(500)).finish(&mut df)?;

    pipeline(&cells, (0..g).collect(), &dir, PARTITION_ROWS)?;
    let out = scan_parquet(dir.join("cells.parquet"))?.collect()?;
    println!("{} cells with X_pca and X_ot ({} dimensions)", out.height(), N_COMPS);
    assert_eq!(out.height(), n);
    assert_eq!(out.column("X_ot")?.dtype(), &DataType::Array(Box::new(DataType::Float32), N_COMPS));
    let back = PcaModel::read_parquet(dir.join("pca.parquet"))?;
    assert_eq!(back.n_cells, n as u64);
    let model = IntegrationModel::read_parquet(dir.join("integration.parquet"))?;
    let batches = model.table.column("batch")?.n_unique()?;
    println!("{} centroids in {batches} batches; fit {:?}", model.table.height(), model.metrics.get("params"));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
