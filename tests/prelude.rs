//! The lazy `Expr` builders and the fits over a `LazyFrame`
//! (`polars_singlecell::prelude`): the same values as the Series functions
//! the Python plugin runs, in the in-memory and the streaming engine, the
//! same output names and dtypes at plan time, the same errors, and models
//! that survive their Parquet files bit for bit.
#![cfg(feature = "lazy")]

use std::sync::Arc;

use polars::prelude::*;
use polars_singlecell::expressions::{self, convert};
use polars_singlecell::prelude::*;

/// `n` cells over `g` genes from a seed (a small LCG): sorted gene indices,
/// whole counts, and one of three batches, the third shifted in the
/// embedding the integration tests build from them.
fn cells(n: usize, g: u32, seed: u64) -> DataFrame {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let (mut idx, mut val, mut batch) = (vec![], vec![], vec![]);
    for i in 0..n {
        let genes: Vec<u32> = (0..g).filter(|_| next() % 3 == 0).collect();
        let counts: Vec<f32> = genes.iter().map(|&j| (1 + next() % (4 + j % 5)) as f32).collect();
        idx.push(Series::new("".into(), genes));
        val.push(Series::new("".into(), counts));
        batch.push(["a", "b", "c"][i % 3]);
    }
    df!("gene_idx" => idx, "values" => val, "batch" => batch).unwrap()
}

fn series(df: &DataFrame, name: &str) -> Series {
    df.column(name).unwrap().as_materialized_series().clone()
}

/// The same query collected by the in-memory engine and the streaming one.
fn both_engines(lf: LazyFrame) -> DataFrame {
    let eager = lf.clone().collect().unwrap();
    let streamed = lf.collect_with_engine(Engine::Streaming).unwrap();
    let streamed = match streamed {
        polars_core::query_result::QueryResult::Single(df) => df,
        _ => panic!("one frame expected"),
    };
    assert!(eager.equals_missing(&streamed), "engines differ:\n{eager}\n{streamed}");
    eager
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("psc-prelude-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn expressions_equal_the_series_functions_in_both_engines() {
    let df = cells(300, 40, 1);
    let (g, v) = (series(&df, "gene_idx"), series(&df, "values"));
    let out = both_engines(df.clone().lazy().select([
        normalize(col("gene_idx"), col("values"), NormalizeOptions::default()),
        total_counts(col("gene_idx"), col("values")),
        select_genes(col("gene_idx"), col("values"), Arc::from(vec![3u32, 7, 20])).alias("picked"),
    ]));
    assert_eq!(out.get_column_names(), ["values", "total_counts", "picked"]);
    let want = expressions::normalize(&g, &v, Some(1e4), true).unwrap();
    assert!(series(&out, "values").equals_missing(&want));
    assert!(series(&out, "total_counts").equals_missing(&expressions::total_counts(&g, &v).unwrap()));
    let (pi, pv) = expressions::select_genes(&g, &v, &[3, 7, 20]).unwrap();
    let picked = series(&out, "picked");
    let picked = picked.struct_().unwrap();
    assert!(picked.field_by_name("gene_idx").unwrap().equals_missing(&pi));
    assert!(picked.field_by_name("values").unwrap().equals_missing(&pv));
}

#[test]
fn projection_and_layout_conversion_equal_the_series_functions() {
    let df = cells(200, 30, 9);
    let (g, v) = (series(&df, "gene_idx"), series(&df, "values"));
    let model = fit_pca(df.clone().lazy(), 30, &FitPcaOptions { n_comps: 3, ..Default::default() }).unwrap();
    let projector = model.projector().unwrap();
    // Tahoe's layout: int64 token ids (gene j is token 100 + 2j), values as counts.
    let tokens: Arc<[i64]> = (0..30).map(|j| 100 + 2 * j).collect();
    let published = df
        .clone()
        .lazy()
        .select([col("gene_idx").list().eval(col("").cast(DataType::Int64) * lit(2) + lit(100)).alias("genes"), col("values")]);
    let out = both_engines(published.with_columns([to_cells(col("genes"), col("values"), Some(tokens), None)]).select([
        col("cells"),
    ]));
    let cells_ = series(&out, "cells");
    let back = cells_.struct_().unwrap();
    assert!(back.field_by_name("gene_idx").unwrap().equals_missing(&g));
    assert!(back.field_by_name("values").unwrap().equals_missing(&v));
    let x = both_engines(df.lazy().select([pca_project(col("gene_idx"), col("values"), projector.clone(), Device::Cpu)]));
    assert!(series(&x, "X_pca").equals_missing(&expressions::pca_project(&g, &v, &projector, Device::Cpu).unwrap()));
}

#[test]
fn median_target_sum_sees_the_whole_column() {
    // target_sum = None is the median over every cell: the streaming engine
    // must not take it per record batch.
    let df = cells(500, 30, 2);
    let (g, v) = (series(&df, "gene_idx"), series(&df, "values"));
    let opts = NormalizeOptions { target_sum: None, log1p: false };
    let out = both_engines(df.lazy().select([normalize(col("gene_idx"), col("values"), opts)]));
    assert!(series(&out, "values").equals_missing(&expressions::normalize(&g, &v, None, false).unwrap()));
}

#[test]
fn plan_time_schema_names_and_dtypes() {
    let df = cells(10, 12, 3);
    let fit = fit_pca(df.clone().lazy(), 12, &FitPcaOptions { n_comps: 4, ..Default::default() }).unwrap();
    let schema = df
        .lazy()
        .select([
            normalize(col("gene_idx"), col("values"), NormalizeOptions::default()),
            pca_project(col("gene_idx"), col("values"), fit.projector().unwrap(), Device::Cpu),
        ])
        .collect_schema()
        .unwrap();
    assert_eq!(schema.get("values"), Some(&DataType::List(Box::new(DataType::Float32))));
    assert_eq!(schema.get("X_pca"), Some(&DataType::Array(Box::new(DataType::Float32), 4)));
}

#[test]
fn wrong_dtype_is_a_plan_time_error_naming_the_column() {
    let df = df!("gene_idx" => [1i64, 2], "values" => [1.0f32, 2.0]).unwrap();
    let err = df.lazy().select([total_counts(col("gene_idx"), col("values"))]).collect_schema().unwrap_err().to_string();
    assert!(err.contains("gene_idx"), "{err}");
}

#[test]
fn fit_pca_over_a_lazy_frame_is_the_one_stream_fit_bit_for_bit() {
    let df = cells(400, 25, 4);
    let lognorm = df.clone().lazy().with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())]);
    let model = fit_pca(lognorm.clone(), 25, &FitPcaOptions { n_comps: 5, ..Default::default() }).unwrap();
    // The same rows added in one call.
    let all = lognorm.clone().collect().unwrap();
    let mut acc = polars_singlecell::expressions::fit::CovarianceFit::new(25, Device::Cpu, None).unwrap();
    acc.update(&[series(&all, "gene_idx"), series(&all, "values")]).unwrap();
    let opts = polars_singlecell::expressions::fit::PcaOptions { n_comps: 5, scale: false };
    let want = PcaModel::from_fit(&acc.finish(&opts).unwrap());
    assert_eq!(model, want);
    assert_eq!(model.n_cells, 400);
    // And from a Parquet file in several row groups through the streaming engine.
    let path = temp("lognorm.parquet");
    let mut all = all;
    ParquetWriter::new(std::fs::File::create(&path).unwrap()).with_row_group_size(Some(37)).finish(&mut all).unwrap();
    let scanned = LazyFrame::scan_parquet(PlRefPath::new(path.to_str().unwrap()), Default::default()).unwrap();
    assert_eq!(fit_pca(scanned, 25, &FitPcaOptions { n_comps: 5, ..Default::default() }).unwrap(), want);
}

#[test]
fn a_failing_batch_stops_the_fit_with_its_error() {
    let df = cells(50, 10, 5);
    // 10 genes in the data, 8 in the fit: an index out of range.
    let err = fit_pca(df.lazy(), 8, &FitPcaOptions { n_comps: 2, ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("gene_idx") || err.contains("gene"), "{err}");
    let missing = fit_pca(cells(5, 10, 5).lazy(), 10, &FitPcaOptions { gene_idx: "genes".into(), ..FitPcaOptions { n_comps: 2, ..Default::default() } });
    assert!(missing.unwrap_err().to_string().contains("genes"));
}

#[test]
fn models_survive_their_parquet_files() {
    let df = cells(200, 15, 6);
    let pca = fit_pca(df.clone().lazy(), 15, &FitPcaOptions { n_comps: 3, scale: true, ..Default::default() }).unwrap();
    assert!(pca.std.is_some());
    let path = temp("pca.parquet");
    pca.write_parquet(&path).unwrap();
    assert_eq!(PcaModel::read_parquet(&path).unwrap(), pca);

    let x: Vec<f32> = (0..16).map(|i| (i % 4) as f32 + if i >= 8 { 5.0 } else { 0.0 }).collect();
    let table = df!(
        "plate" => ["p1", "p1", "p1", "p1", "p2", "p2", "p2", "p2"],
        "mass" => [1.0f64; 8]
    )
    .unwrap()
    .hstack(&[convert::array_f32("centroid", 2, x, None).unwrap().into()])
    .unwrap();
    let model = fit_integration(&table, "plate", None, &IntegrationParams::default()).unwrap();
    assert_eq!(model.table.get_column_names(), ["plate", "centroid", "displacement", "mass"]);
    let path = temp("integration.parquet");
    model.write_parquet(&path).unwrap();
    let back = IntegrationModel::read_parquet(&path).unwrap();
    assert!(back.table.equals(&model.table));
    assert_eq!((back.batch_key.as_str(), back.d), ("plate", 2));
    assert_eq!(back.metrics, model.metrics);

    // Python writes a non-finite metric (reg_m=inf) as the bare token Infinity.
    let py = temp("python_metrics.parquet");
    let mut t = model.table.clone();
    let kv = KeyValueMetadata::from_static(vec![(
        "polars_singlecell.integration_model".into(),
        r#"{"format": 1, "batch_key": "plate", "metrics": {"params": {"reg_m": Infinity, "note": "NaN stays text"}, "delta": NaN}}"#.into(),
    )]);
    ParquetWriter::new(std::fs::File::create(&py).unwrap()).with_key_value_metadata(Some(kv)).finish(&mut t).unwrap();
    let read = IntegrationModel::read_parquet(&py).unwrap();
    assert_eq!(read.metrics["params"]["note"], "NaN stays text");
    assert!(read.metrics["params"]["reg_m"].is_null() && read.metrics["delta"].is_null());

    let not_a_model = temp("cells.parquet");
    let mut plain = df!("a" => [1i32]).unwrap();
    ParquetWriter::new(std::fs::File::create(&not_a_model).unwrap()).finish(&mut plain).unwrap();
    let err = PcaModel::read_parquet(&not_a_model).unwrap_err().to_string();
    assert!(err.contains("not a polars-singlecell PCA model"), "{err}");
    let err = PcaModel::read_parquet(temp("absent.parquet")).unwrap_err().to_string();
    assert!(err.contains("no model file"), "{err}");
}

#[test]
fn centroids_integration_and_interpolation_from_a_lazy_frame() {
    // Two spread populations 4 apart in three batches; batch c shifted by 1
    // on the first axis.
    let n = 600;
    let rows: Vec<f32> = (0..n)
        .flat_map(|i| {
            let pop = ((i / 3) % 2) as f32 * 4.0;
            let shift = if i % 3 == 2 { 1.0 } else { 0.0 };
            let (u, v) = (((i * 7919) % 97) as f32 / 97.0, ((i * 104729) % 89) as f32 / 89.0);
            [pop + shift + u, v]
        })
        .collect();
    let batch: Vec<&str> = (0..n).map(|i| ["a", "b", "c"][i % 3]).collect();
    let df = DataFrame::new_infer_height(vec![
        convert::array_f32("X_pca", 2, rows, None).unwrap().into(),
        Column::new("batch".into(), batch),
    ])
    .unwrap();
    let opts = FitCentroidsOptions { n_centroids: 8, ..Default::default() };
    let (centroids, summary) = fit_centroids(df.clone().lazy(), &opts).unwrap();
    // The low-memory fit: the same centroids, its spill folder gone afterwards.
    let spill_parent = temp("spill");
    std::fs::create_dir_all(&spill_parent).unwrap();
    let low = FitCentroidsOptions { low_memory: true, temp_dir: Some(spill_parent.clone()), max_samples_per_batch: 150, ..opts.clone() };
    let capped = FitCentroidsOptions { max_samples_per_batch: 150, ..opts.clone() };
    let (a, _) = fit_centroids(df.clone().lazy(), &low).unwrap();
    let (b, _) = fit_centroids(df.clone().lazy(), &capped).unwrap();
    assert!(a.equals(&b));
    assert_eq!(std::fs::read_dir(&spill_parent).unwrap().count(), 0);
    assert_eq!(summary.column("n_cells").unwrap().u64().unwrap().sum(), Some(n as u64));
    assert_eq!(centroids.get_column_names(), ["batch", "centroid_id", "centroid", "mass"]);

    // The aggregation expression on the same rows: masses sum to each batch's cells.
    let agg = both_engines(
        df.clone()
            .lazy()
            .group_by_stable([col("batch")])
            .agg([kmeans_centroids(col("X_pca"), None, KMeansParams::new(4))]),
    );
    let masses = agg.column("centroids").unwrap().struct_().unwrap().field_by_name("mass").unwrap();
    for i in 0..3 {
        assert_eq!(masses.list().unwrap().get_as_series(i).unwrap().sum::<f64>().unwrap(), 200.0);
    }

    let model = fit_integration(&centroids, "batch", None, &IntegrationParams::default()).unwrap();
    let moved = both_engines(df.clone().lazy().with_columns([knn_interpolate(
        col("X_pca"),
        col("batch"),
        model.interpolation().unwrap(),
        InterpolateOptions::default(),
    )]));
    let want = expressions::knn_interpolate(&series(&df, "X_pca"), Some(&series(&df, "batch")), &model.interpolation().unwrap(), 8, false, Device::Cpu).unwrap();
    assert!(series(&moved, "X_ot").equals_missing(&want));
    // Batch c came towards a and b (partly: the populations overlap by their width).
    let first = |s: &Series, b: usize| -> f32 {
        let (x, _) = convert::embedding_rows(s).unwrap();
        let v: Vec<f32> = x.chunks(2).enumerate().filter(|(i, _)| i % 3 == b).map(|(_, r)| r[0]).collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    let fell = first(&series(&df, "X_pca"), 2) - first(&series(&moved, "X_ot"), 2);
    assert!(fell > 0.05 && fell < 1.0, "batch c moved by {fell}");

    let hits = both_engines(df.lazy().select([knn(col("X_pca"), model.index().unwrap(), 3, Device::Cpu)]));
    assert_eq!(hits.column("knn").unwrap().dtype(), &expressions::knn_dtype(3));
}

#[test]
fn an_unknown_batch_is_an_error_unless_pooled() {
    let x = convert::array_f32("X_pca", 1, vec![0.0, 1.0, 4.0, 5.0], None).unwrap();
    let table = df!("batch" => ["a", "a", "b", "b"]).unwrap().hstack(&[x.clone().with_name("centroid".into()).into()]).unwrap();
    let model = fit_integration(&table, "batch", None, &IntegrationParams::default()).unwrap().interpolation().unwrap();
    let cells = DataFrame::new_infer_height(vec![x.into(), Column::new("batch".into(), ["a", "z", "b", "b"])]).unwrap();
    let q = |unknown_pooled| {
        cells.clone().lazy().select([knn_interpolate(col("X_pca"), col("batch"), model.clone(), InterpolateOptions { k: 2, unknown_pooled, ..Default::default() })]).collect()
    };
    let err = q(false).unwrap_err().to_string();
    assert!(err.contains('z'), "{err}");
    assert_eq!(q(true).unwrap().height(), 4);
}

#[test]
fn clipped_pca_is_two_passes_and_survives_its_file() {
    let df = cells(300, 20, 8);
    let lognorm = df.lazy().with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())]);
    let opts = FitPcaOptions { n_comps: 4, scale: true, max_value: Some(1.5), ..Default::default() };
    let model = fit_pca(lognorm.clone(), 20, &opts).unwrap();
    assert_eq!((model.max_value, model.zero_center, model.n_cells), (Some(1.5), true, 300));
    assert!(model.scaled_mean.is_some() && model.std.is_some());
    // Clipping changes the axes.
    let unclipped = fit_pca(lognorm.clone(), 20, &FitPcaOptions { max_value: None, ..opts.clone() }).unwrap();
    assert_ne!(model.components, unclipped.components);
    let path = temp("clipped.parquet");
    model.write_parquet(&path).unwrap();
    let back = PcaModel::read_parquet(&path).unwrap();
    assert_eq!(back, model);
    // The projector clips as it projects: the same numbers from the saved model.
    let a = lognorm.clone().select([pca_project(col("gene_idx"), col("values"), model.projector().unwrap(), Device::Cpu)]).collect().unwrap();
    let b = lognorm.select([pca_project(col("gene_idx"), col("values"), back.projector().unwrap(), Device::Cpu)]).collect().unwrap();
    assert!(a.equals(&b));
    let err = fit_pca(cells(5, 20, 8).lazy(), 20, &FitPcaOptions { n_comps: 2, max_value: Some(1.0), ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("scale=true"), "{err}");
}

/// Bad input gives a `PolarsError` naming the column and the row (the
/// Python suite's cases that apply to Rust), never a panic.
#[test]
fn bad_input_is_an_error_naming_column_and_row() {
    let x = convert::array_f32("X_pca", 2, vec![0.0, 1.0, f32::NAN, 2.0, 3.0, 4.0], None).unwrap();
    let df = DataFrame::new_infer_height(vec![x.into(), Column::new("batch".into(), ["a", "a", "b"])]).unwrap();
    let err = fit_centroids(df.lazy(), &FitCentroidsOptions::default()).unwrap_err().to_string();
    assert!(err.contains("X_pca") && err.contains("row 1"), "{err}");

    let x = convert::array_f32("X_pca", 2, vec![0.0, 1.0, 2.0, 2.0, 3.0, 4.0], None).unwrap();
    let df = DataFrame::new_infer_height(vec![x.into(), Column::new("batch".into(), [Some("a"), None, Some("b")])]).unwrap();
    let err = fit_centroids(df.clone().lazy(), &FitCentroidsOptions::default()).unwrap_err().to_string();
    assert!(err.contains("batch") && err.contains("row 1"), "{err}");

    // A model of another width: refused when the plan is built.
    let table = df!("batch" => ["a", "a", "b", "b"]).unwrap().hstack(&[convert::array_f32("centroid", 3, vec![0.0; 12], None).unwrap().into()]).unwrap();
    let wide = IntegrationModel::new(table.clone().hstack(&[convert::array_f32("displacement", 3, vec![0.0; 12], None).unwrap().into()]).unwrap(), None, Default::default()).unwrap();
    let err = df
        .clone()
        .lazy()
        .select([knn_interpolate(col("X_pca"), col("batch"), wide.interpolation().unwrap(), InterpolateOptions::default())])
        .collect_schema()
        .unwrap_err()
        .to_string();
    assert!(err.contains("X_pca") && err.contains('3'), "{err}");

    // Null weights in the k-means aggregation.
    let w = Series::new("w".into(), [Some(1.0f64), None, Some(1.0)]);
    let err = df.lazy().with_column(lit(w).alias("w")).select([kmeans_centroids(col("X_pca"), Some(col("w")), KMeansParams::new(2))]).collect().unwrap_err().to_string();
    assert!(err.contains("'w'") && err.contains("row 1"), "{err}");

    // A model table with a non-finite displacement.
    let bad = table.hstack(&[convert::array_f32("displacement", 3, [0.0].repeat(11).into_iter().chain([f32::INFINITY]).collect(), None).unwrap().into()]).unwrap();
    let err = IntegrationModel::new(bad, None, Default::default()).unwrap_err().to_string();
    assert!(err.contains("displacement") && err.contains("row 3"), "{err}");

    // Options refused before any data is read.
    let err = highly_variable_genes(cells(5, 5, 1).lazy(), 5, &HvgOptions { n_bins: 0, ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("n_bins"), "{err}");
    let err = fit_pca(cells(5, 5, 1).lazy(), 70_000, &FitPcaOptions::default()).unwrap_err().to_string();
    assert!(err.contains("GiB covariance"), "{err}");

    // No rows at all.
    let empty = cells(0, 5, 1);
    assert!(fit_pca(empty.lazy(), 5, &FitPcaOptions { n_comps: 2, ..Default::default() }).is_err());
}

#[test]
fn fold_fit_partitions_the_files_whatever_the_scan() {
    use polars_singlecell::expressions::fit::{CovarianceFit, PcaOptions};
    let dir = temp("partitioned");
    std::fs::create_dir_all(&dir).unwrap();
    for k in 0..2 {
        let mut df = cells(150, 20, 10 + k);
        let file = std::fs::File::create(dir.join(format!("part-{k}.parquet"))).unwrap();
        ParquetWriter::new(file).with_row_group_size(Some(40)).finish(&mut df).unwrap(); // Polars evens them: 50, 50, 50
    }
    let lognorm = |lf: LazyFrame| lf.with_columns([normalize(col("gene_idx"), col("values"), NormalizeOptions::default())]);
    let opts = FitPcaOptions { n_comps: 3, partition_rows: 100, ..Default::default() };
    let by_folder = fit_pca(lognorm(scan_parquet(&dir).unwrap()), 20, &opts).unwrap();
    // A glob is expanded by Polars' plan: the same files, the same partitions.
    let glob = PlRefPath::new(format!("{}/*.parquet", dir.display()).as_str());
    let by_glob = fit_pca(lognorm(LazyFrame::scan_parquet(glob, Default::default()).unwrap()), 20, &opts).unwrap();
    assert_eq!(by_folder, by_glob);
    // Whole row groups up to 100 rows, in order, across the files: the second partition is one group of each.
    let all = lognorm(scan_parquet(&dir).unwrap()).collect().unwrap();
    let mut total: Option<CovarianceFit> = None;
    for (first, n) in [(0, 100), (100, 100), (200, 100)] {
        let part = all.slice(first, n);
        let mut fit = CovarianceFit::new(20, Device::Cpu, None).unwrap();
        fit.update(&[series(&part, "gene_idx"), series(&part, "values")]).unwrap();
        match total.as_mut() {
            None => total = Some(fit),
            Some(t) => t.merge(&fit).unwrap(),
        }
    }
    let want = PcaModel::from_fit(&total.unwrap().finish(&PcaOptions { n_comps: 3, scale: false }).unwrap());
    assert_eq!(by_folder, want);
    // One stream groups the sums otherwise: the same model to rounding.
    let one = fit_pca(lognorm(scan_parquet(&dir).unwrap()), 20, &FitPcaOptions { n_comps: 3, ..Default::default() }).unwrap();
    assert_eq!(one.n_cells, 300);
    for (a, b) in one.explained_variance.iter().zip(&want.explained_variance) {
        assert!((a - b).abs() <= 1e-12 * a.abs(), "{a} vs {b}");
    }
}
