//! Series-level operations: the same functions back the Python plugin
//! (`crate::python`) and Rust Polars pipelines (`col(..).map_many(..)`).
//! They convert and validate through `convert` and leave arithmetic to the
//! kernels.

pub mod convert;

use polars::prelude::*;
use polars_core::runtime::THREAD_POOL;

use crate::kernels::hvg::GeneStats;
use crate::kernels::pca::{CovAccumulator, PcaProjector};
use crate::kernels::{self, select_genes::GeneMap};

/// `normalize_total` + `log1p` of each cell; `List(Float32)` aligned with `gene_idx`.
/// `target_sum = None`: the median of the non-zero cell totals of this Series.
///
/// Large calls (eager frames) split their rows over Polars' thread pool;
/// streaming batches stay serial (see `kernels::PAR_BLOCK`).
pub fn normalize(gene_idx: &Series, values: &Series, target_sum: Option<f64>, log1p: bool) -> PolarsResult<Series> {
    THREAD_POOL
        .install(|| {
            convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
                let out = kernels::normalize::normalize(rows, target_sum.map(|t| t as f32), log1p)?;
                Ok((rows.iter().map(|r| r.values.len()).collect::<Vec<_>>(), out, validity.cloned()))
            })
        })
        .and_then(|(lens, out, validity)| convert::list_series(values.name(), lens.into_iter(), out, validity.as_ref()))
}

/// Total counts per cell (float64 sum rounded to float32, as scanpy); `Float32`.
pub fn total_counts(gene_idx: &Series, values: &Series) -> PolarsResult<Series> {
    convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
        Ok((kernels::normalize::total_counts(rows), validity.cloned()))
    })
    .and_then(|(t, validity)| convert::column_f32("total_counts", t, validity.as_ref()))
}

/// Keep `genes` (old indices) and renumber them `0..genes.len()`. Returns the
/// new (gene_idx, values) pair.
pub fn select_genes(gene_idx: &Series, values: &Series, genes: &[u32]) -> PolarsResult<(Series, Series)> {
    let map = GeneMap::new(genes)?;
    let (lens, idx, val, validity) = convert::with_sparse_rows(gene_idx, values, None, |rows, validity| {
        let (lens, idx, val) = kernels::select_genes::select_genes(rows, &map);
        Ok((lens, idx, val, validity.cloned()))
    })?;
    Ok((
        convert::list_series(gene_idx.name(), lens.iter().copied(), idx, validity.as_ref())?,
        convert::list_series(values.name(), lens.iter().copied(), val, validity.as_ref())?,
    ))
}

/// Project each cell onto fitted axes; `Array(Float32, n_comps)`, null where the row is null.
pub fn pca_project(gene_idx: &Series, values: &Series, model: &PcaProjector) -> PolarsResult<Series> {
    let (out, validity) = THREAD_POOL.install(|| {
        convert::with_sparse_rows(gene_idx, values, Some(model.n_genes), |rows, validity| {
            Ok((kernels::pca::pca_project(rows, model), validity.cloned()))
        })
    })?;
    convert::array_f32("X_pca", model.n_comps, out, validity.as_ref())
}

/// Add a batch of cells to a streaming PCA fit. Null cells are an error: a fit
/// cannot leave them out silently.
pub fn fit_pca_update(acc: &mut CovAccumulator, gene_idx: &Series, values: &Series) -> PolarsResult<()> {
    convert::with_sparse_rows(gene_idx, values, Some(acc.n_genes()), |rows, validity| {
        convert::reject_null_rows(validity, "fit_pca")?;
        acc.add(rows);
        Ok(())
    })
}

/// Add a batch of log-normalised cells to per-batch gene statistics;
/// `batch[i]` names the batch of row `i` (`None`: one batch).
pub fn gene_stats_update(
    stats: &mut std::collections::BTreeMap<String, GeneStats>,
    n_genes: usize,
    gene_idx: &Series,
    values: &Series,
    batch: Option<&StringChunked>,
) -> PolarsResult<()> {
    if let Some(b) = batch {
        if b.len() != gene_idx.len() {
            polars_bail!(ComputeError: "batch column '{}' has {} rows but the cells have {}", b.name(), b.len(), gene_idx.len());
        }
        if let Some(i) = b.iter().position(|x| x.is_none()) {
            polars_bail!(ComputeError: "batch column '{}' is null at row {i}; fill or drop null batches first", b.name());
        }
    }
    convert::with_sparse_rows(gene_idx, values, Some(n_genes), |rows, validity| {
        convert::reject_null_rows(validity, "highly_variable_genes")?;
        for (i, r) in rows.iter().enumerate() {
            let key = batch.and_then(|b| b.get(i)).unwrap_or("");
            stats.entry(key.to_string()).or_insert_with(|| GeneStats::new(n_genes)).add(*r);
        }
        Ok(())
    })
}
