//! Parquet footers: each row group's rows and entries, read without the
//! data. Python's `record_batches` aligns its row slices to row groups: a
//! slice that starts inside a row group makes Polars decode that group from
//! its first row.

use polars_parquet::parquet::metadata::ColumnChunkMetadata;

/// Each row group of the Parquet files `paths`, in order, as (rows,
/// entries): entries is the largest leaf value count among the columns named
/// in `columns` (a list column's entries, plus a slot for each empty or null
/// list) or, where none of them is in the file (columns computed from others,
/// as `to_cells` makes `gene_idx` from Tahoe's `genes`), among all its
/// columns: an upper bound, never 0 for rows with entries. An unreadable
/// file or footer is an error naming the file.
pub fn row_groups(paths: &[String], columns: &[String]) -> Result<Vec<(u64, u64)>, String> {
    let count = |m: &ColumnChunkMetadata| m.num_values().max(0) as u64;
    let mut out = vec![];
    for path in paths {
        let mut file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        let meta = polars_parquet::read::read_metadata(&mut file).map_err(|e| format!("{path}: {e}"))?;
        for rg in &meta.row_groups {
            let entries = columns
                .iter()
                .filter_map(|c| rg.columns_under_root_iter(c))
                .flat_map(|leaves| leaves.map(count))
                .max()
                .unwrap_or_else(|| rg.parquet_columns().iter().map(count).max().unwrap_or(0));
            out.push((rg.num_rows() as u64, entries));
        }
    }
    Ok(out)
}
