//! Numerical kernels. They take slices and matrices, never a Series: the
//! expression glue (`crate::expressions`) converts and validates.

pub mod cells;
pub mod device;
pub mod distance;
pub mod gpu;
pub mod hvg;
pub mod integrate;
pub mod kmeans;
pub mod loess;
pub mod knn;
pub mod metrics;
pub mod normalize;
pub mod ot;
pub mod pca;
pub mod rng;
pub mod sample;
pub mod select_genes;
pub mod seurat;

use rayon::prelude::*;

use crate::error::{KernelError, Part};

pub use device::{cuda_available, cuda_status, Device};

/// Rows per parallel task. A call with fewer than `4 * PAR_BLOCK` rows stays
/// serial: streaming morsels (≤100k rows) arrive in parallel already, so only
/// large eager calls split their rows across the current rayon pool. Every
/// row-wise kernel gives the same bits either way.
pub const PAR_BLOCK: usize = 65_536;

pub(crate) fn parallel(n_rows: usize) -> bool {
    n_rows >= 4 * PAR_BLOCK && rayon::current_num_threads() > 1
}

/// Run `f(block, out_block)` over consecutive blocks of rows, where each row
/// owns `width(row)` consecutive entries of `out`: serial for small calls,
/// parallel over disjoint output slices for large ones.
pub fn for_row_blocks<T: Send>(
    rows: &[SparseRow<'_>],
    out: &mut [T],
    width: impl Fn(&SparseRow<'_>) -> usize,
    f: impl Fn(&[SparseRow<'_>], &mut [T]) + Sync,
) {
    if !parallel(rows.len()) {
        return f(rows, out);
    }
    let mut tasks = Vec::with_capacity(rows.len() / PAR_BLOCK + 1);
    let mut rest = out;
    for block in rows.chunks(PAR_BLOCK) {
        let n = block.iter().map(&width).sum();
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
        tasks.push((block, head));
        rest = tail;
    }
    tasks.into_par_iter().for_each(|(block, dst)| f(block, dst));
}

/// Run `f` on every item over plain scoped threads (as many as the current
/// rayon pool has), items dealt round-robin. For CPU work done while a lock
/// is held: rayon's work stealing could re-enter the locking code on the
/// same thread. `f`'s result per item must not depend on the split.
pub fn scoped_for_each<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let threads = rayon::current_num_threads().clamp(1, items.len().max(1));
    if threads == 1 {
        return items.into_iter().for_each(f);
    }
    let mut groups: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, t) in items.into_iter().enumerate() {
        groups[i % threads].push(t);
    }
    let f = &f;
    std::thread::scope(|s| {
        for g in groups {
            s.spawn(move || g.into_iter().for_each(f));
        }
    });
}

/// One cell's sparse counts: sorted 0-based gene indices and matching values.
#[derive(Debug, Clone, Copy, Default)]
pub struct SparseRow<'a> {
    /// The cell's gene indices, 0-based and strictly increasing.
    pub gene_idx: &'a [u32],
    /// The value of each gene, in the same order.
    pub values: &'a [f32],
}

/// Check the data contract of `../shared/DATA.md` for every row: equal lengths,
/// strictly increasing gene indices below `n_genes` (when known), finite values.
/// Done once here so each kernel can index without re-checking.
pub fn validate_rows(rows: &[SparseRow<'_>], n_genes: Option<usize>) -> Result<(), KernelError> {
    if parallel(rows.len()) {
        // The first bad row in row order, whichever block finds it first.
        let found: Vec<Result<(), KernelError>> = rows
            .par_chunks(PAR_BLOCK)
            .enumerate()
            .map(|(b, block)| {
                validate_block(block, n_genes).map_err(|mut e| {
                    if let KernelError::Row { row, .. } = &mut e {
                        *row += b * PAR_BLOCK;
                    }
                    e
                })
            })
            .collect();
        return found.into_iter().collect();
    }
    validate_block(rows, n_genes)
}

fn validate_block(rows: &[SparseRow<'_>], n_genes: Option<usize>) -> Result<(), KernelError> {
    for (row, r) in rows.iter().enumerate() {
        if r.gene_idx.len() != r.values.len() {
            return Err(KernelError::Row {
                part: Part::Values,
                row,
                problem: format!(
                    "the cell has {} gene indices but {} values",
                    r.gene_idx.len(),
                    r.values.len()
                ),
                fix: "gene_idx and values must be parallel lists of the same length",
            });
        }
        for w in r.gene_idx.windows(2) {
            if w[1] <= w[0] {
                return Err(KernelError::Row {
                    part: Part::GeneIdx,
                    row,
                    problem: format!(
                        "gene index {} follows {} (indices must be strictly increasing)",
                        w[1], w[0]
                    ),
                    fix: "sort each cell's gene_idx (with its values) and merge duplicates before calling",
                });
            }
        }
        if let (Some(n), Some(&last)) = (n_genes, r.gene_idx.last()) {
            if last as usize >= n {
                return Err(KernelError::Row {
                    part: Part::GeneIdx,
                    row,
                    problem: format!("gene index {last} is out of range for n_genes={n}"),
                    fix: "pass the right n_genes, or restrict the cells to the model's genes with psc.select_genes",
                });
            }
        }
        if let Some(v) = r.values.iter().find(|v| !v.is_finite()) {
            return Err(KernelError::Row {
                part: Part::Values,
                row,
                problem: format!("non-finite value {v}"),
                fix: "remove or repair NaN/Inf entries before calling (e.g. filter the cells out)",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testing {
    use super::SparseRow;

    /// Owned sparse rows for tests.
    pub struct Rows(pub Vec<(Vec<u32>, Vec<f32>)>);

    impl Rows {
        pub fn view(&self) -> Vec<SparseRow<'_>> {
            self.0
                .iter()
                .map(|(i, v)| SparseRow { gene_idx: i, values: v })
                .collect()
        }

        /// A deterministic pseudo-random sparse matrix (xorshift; no rand dependency).
        pub fn random(n_cells: usize, n_genes: usize, density: f64, seed: u64) -> Rows {
            let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64
            };
            let rows = (0..n_cells)
                .map(|_| {
                    let mut idx = Vec::new();
                    let mut val = Vec::new();
                    for g in 0..n_genes {
                        if next() < density {
                            idx.push(g as u32);
                            val.push((1.0 + (next() * 20.0).floor()) as f32);
                        }
                    }
                    (idx, val)
                })
                .collect();
            Rows(rows)
        }

        /// The same rows as a dense row-major matrix.
        pub fn dense(&self, n_genes: usize) -> Vec<f64> {
            let mut d = vec![0.0; self.0.len() * n_genes];
            for (r, (i, v)) in self.0.iter().enumerate() {
                for (&g, &x) in i.iter().zip(v) {
                    d[r * n_genes + g as usize] = x as f64;
                }
            }
            d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(rows: &[SparseRow<'_>], n: Option<usize>) -> String {
        validate_rows(rows, n).unwrap_err().to_string()
    }

    #[test]
    fn rejects_each_contract_violation_with_row_and_value() {
        let ok = SparseRow { gene_idx: &[0, 2], values: &[1.0, 2.0] };
        assert!(validate_rows(&[ok], Some(3)).is_ok());
        let unsorted = SparseRow { gene_idx: &[2, 1], values: &[1.0, 2.0] };
        let e = err(&[ok, unsorted], None);
        assert!(e.contains("gene index 1 follows 2") && e.contains("at row 1"), "{e}");
        let dup = SparseRow { gene_idx: &[1, 1], values: &[1.0, 2.0] };
        assert!(err(&[dup], None).contains("follows 1"));
        let ragged = SparseRow { gene_idx: &[1], values: &[1.0, 2.0] };
        assert!(err(&[ragged], None).contains("1 gene indices but 2 values"));
        assert!(err(&[ok], Some(2)).contains("gene index 2 is out of range for n_genes=2"));
        let nan = SparseRow { gene_idx: &[1], values: &[f32::NAN] };
        assert!(err(&[nan], None).contains("non-finite value NaN"));
    }
}
