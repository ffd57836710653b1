//! Cells in the project's layout (sorted 0-based `gene_idx`, `values`) from
//! the sparse layouts data is published in:
//!
//! - [`to_cells`]: per-cell lists of integer gene ids, e.g. Tahoe-100M's
//!   Parquet release (`genes`: token ids led by a marker token that is no
//!   gene, in no promised order; `expressions`). With a [`TokenMap`] a cell's
//!   gene index is its token's row in the vocabulary and tokens absent from
//!   it (the marker) are dropped with their values; without one the ids are
//!   the gene indices.
//! - [`from_csr`]: a CSR matrix's `indptr`/`indices`/`data` (an h5ad's `X`),
//!   duplicates summed (in float64; scipy's `sum_duplicates` sums in float32).
//!
//! Both sort each cell's entries by gene index. Rows already in order (the
//! common case: canonical CSR, a vocabulary in token order) are copied
//! without sorting. Values are checked finite here (and, for counts given as
//! token lists, non-negative), so every later kernel can rely on the layout.

use rayon::prelude::*;

use super::{parallel, PAR_BLOCK};
use crate::error::{KernelError, Part};

/// Marks a token without a gene in the dense table.
const ABSENT: u32 = u32::MAX;

/// A vocabulary: token id → gene index (the token's row in the table).
pub struct TokenMap {
    n_genes: usize,
    lookup: Lookup,
}

enum Lookup {
    /// `table[id - lo]`: one load per entry, for vocabularies whose ids are
    /// dense (Tahoe's: 62,710 tokens within a span of ~62,720).
    Dense { lo: i64, table: Vec<u32> },
    /// (id, gene) sorted by id: a binary search per entry, memory O(tokens)
    /// whatever the ids are.
    Sorted(Vec<(i64, u32)>),
}

impl TokenMap {
    /// `tokens[g]` is the id of gene `g`. A token listed twice is an error.
    pub fn new(tokens: &[i64]) -> Result<Self, KernelError> {
        if tokens.len() >= ABSENT as usize {
            return Err(KernelError::Invalid(format!("the vocabulary has {} tokens; at most {} fit UInt32 gene indices", tokens.len(), ABSENT - 1)));
        }
        let mut pairs: Vec<(i64, u32)> = tokens.iter().enumerate().map(|(g, &t)| (t, g as u32)).collect();
        pairs.sort_unstable();
        if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(KernelError::Invalid(format!(
                "the vocabulary lists token {} twice (rows {} and {}); each token must name one gene",
                w[0].0, w[0].1, w[1].1
            )));
        }
        let lookup = match (pairs.first(), pairs.last()) {
            (Some(&(lo, _)), Some(&(hi, _))) if (hi as i128 - lo as i128) < (4 * tokens.len() as i128).max(1 << 16) => {
                let mut table = vec![ABSENT; (hi - lo) as usize + 1];
                for &(t, g) in &pairs {
                    table[(t - lo) as usize] = g;
                }
                Lookup::Dense { lo, table }
            },
            _ => Lookup::Sorted(pairs),
        };
        Ok(TokenMap { n_genes: tokens.len(), lookup })
    }

    /// Number of genes: the vocabulary's length (gene indices run `0..n_genes`).
    pub fn n_genes(&self) -> usize {
        self.n_genes
    }

    #[inline]
    fn get(&self, id: i64) -> Option<u32> {
        match &self.lookup {
            Lookup::Dense { lo, table } => {
                let k = id.wrapping_sub(*lo);
                if (0..table.len() as i64).contains(&k) {
                    let g = table[k as usize];
                    (g != ABSENT).then_some(g)
                } else {
                    None
                }
            },
            Lookup::Sorted(pairs) => pairs.binary_search_by_key(&id, |p| p.0).ok().map(|i| pairs[i].1),
        }
    }
}

/// How a cell's gene ids become gene indices.
pub enum Genes<'a> {
    /// Through a vocabulary; ids it lacks are dropped with their values.
    Vocabulary(&'a TokenMap),
    /// The ids are the indices; with `Some(n)`, each must be in `[0, n)`.
    Indices(Option<usize>),
}

/// One cell as published: gene ids and their values, same length.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenRow<'a> {
    /// The cell's gene ids (token ids or gene indices), in any order.
    pub genes: &'a [i64],
    /// The value of each id, in the same order.
    pub values: &'a [f32],
}

/// Cells in the layout: (row lengths, gene indices, values), rows concatenated.
pub type Cells = (Vec<usize>, Vec<u32>, Vec<f32>);

/// Each row's entries mapped, dropped where the vocabulary lacks the id,
/// checked and sorted. Errors name the row (counted from 0 in `rows`).
pub fn to_cells(rows: &[TokenRow<'_>], genes: &Genes<'_>) -> Result<Cells, KernelError> {
    let cells = by_blocks(rows.len(), |lo, hi| to_cells_block(&rows[lo..hi], lo, genes))?;
    if let Genes::Vocabulary(map) = genes {
        // A subset vocabulary drops some genes on purpose; one that drops
        // every id of cells with more than a marker each is the wrong table
        // (or the wrong column of it), and empty cells would pass silently
        // into every fit.
        let given: usize = rows.iter().map(|r| r.genes.len()).sum();
        if cells.1.is_empty() && given > rows.len() {
            let some: Vec<i64> = rows.iter().flat_map(|r| r.genes.iter().copied()).take(5).collect();
            return Err(KernelError::Invalid(format!(
                "none of the {given} gene ids of these {} cells is in the vocabulary of {} tokens (ids such as {some:?}): \
                 the vocabulary is not the one these cells were written with, or token_column names the wrong column",
                rows.len(),
                map.n_genes()
            )));
        }
    }
    Ok(cells)
}

fn to_cells_block(rows: &[TokenRow<'_>], row0: usize, genes: &Genes<'_>) -> Result<Cells, KernelError> {
    let n_entries: usize = rows.iter().map(|r| r.genes.len()).sum();
    let (mut lens, mut idx, mut val) = (Vec::with_capacity(rows.len()), Vec::with_capacity(n_entries), Vec::with_capacity(n_entries));
    let mut keys = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let row = row0 + i;
        if r.genes.len() != r.values.len() {
            return Err(KernelError::Row {
                part: Part::Values,
                row,
                problem: format!("the cell has {} gene ids but {} values", r.genes.len(), r.values.len()),
                fix: "the gene ids and values must be parallel lists of the same length",
            });
        }
        let start = idx.len();
        let mut sorted = true;
        for (&id, &v) in r.genes.iter().zip(r.values) {
            let g = match genes {
                Genes::Vocabulary(map) => match map.get(id) {
                    Some(g) => g,
                    None => continue, // the marker, or a token of no gene here
                },
                Genes::Indices(n) => {
                    // Indices are UInt32: a bound beyond it must not let ids wrap.
                    if id < 0 || id >= n.map_or(ABSENT as i64, |n| n.min(ABSENT as usize) as i64) {
                        return Err(KernelError::Row {
                            part: Part::GeneIdx,
                            row,
                            problem: format!("gene id {id} is outside [0, {})", n.unwrap_or(ABSENT as usize).min(ABSENT as usize)),
                            fix: "pass the vocabulary the ids come from (vocabulary=...), or the right n_genes",
                        });
                    }
                    id as u32
                },
            };
            if !(v.is_finite() && v >= 0.0) {
                return Err(KernelError::Row {
                    part: Part::Values,
                    row,
                    problem: format!("the value {v} of gene id {id} is not a finite count ≥ 0"),
                    fix: "counts must be finite and non-negative; repair or drop the cell (a marker token's value is dropped only when the vocabulary lacks its token)",
                });
            }
            sorted &= idx.len() == start || idx[idx.len() - 1] < g;
            idx.push(g);
            val.push(v);
        }
        if !sorted {
            sort_row(&mut idx[start..], &mut val[start..], &mut keys);
            if let Some(w) = idx[start..].windows(2).find(|w| w[0] == w[1]) {
                let twice: Vec<i64> = r.genes.iter().copied().filter(|&id| match genes {
                    Genes::Vocabulary(map) => map.get(id) == Some(w[0]),
                    Genes::Indices(_) => id == w[0] as i64,
                }).collect();
                return Err(KernelError::Row {
                    part: Part::GeneIdx,
                    row,
                    problem: format!("gene index {} is given more than once (ids {twice:?})", w[0]),
                    fix: "each gene may appear once per cell; sum or drop the duplicate entries",
                });
            }
        }
        lens.push(idx.len() - start);
    }
    Ok((lens, idx, val))
}

/// Sort one row's (index, value) pairs by index: packed into u64 keys (index
/// high, value bits low) so one `sort_unstable` of plain integers does it.
/// Equal indices keep an order that depends only on their values, so the
/// result does not depend on the input's order.
fn sort_row(idx: &mut [u32], val: &mut [f32], keys: &mut Vec<u64>) {
    keys.clear();
    keys.extend(idx.iter().zip(val.iter()).map(|(&g, &v)| (g as u64) << 32 | v.to_bits() as u64));
    keys.sort_unstable();
    for ((k, g), v) in keys.iter().zip(idx.iter_mut()).zip(val.iter_mut()) {
        *g = (k >> 32) as u32;
        *v = f32::from_bits(*k as u32);
    }
}

/// A CSR matrix's rows in the layout. `indptr` has one entry per row plus one
/// and may start anywhere (a slice of a larger matrix's); `indices` and
/// `data` hold the entries `indptr[0]..indptr[n]`. Entries of a row are
/// sorted and duplicates summed in float64, then rounded to float32 (scipy's
/// `sum_duplicates` sums in float32: the same for two entries of a gene,
/// within an ulp for more).
pub fn from_csr<I: Copy + Into<i64> + Sync>(indptr: &[i64], indices: &[I], data: &[f32], n_genes: usize) -> Result<Cells, KernelError> {
    let n_rows = indptr.len().checked_sub(1).ok_or_else(|| KernelError::Invalid("indptr is empty; a CSR matrix of n rows has n + 1 offsets".into()))?;
    let base = indptr[0];
    if let Some(r) = (0..n_rows).find(|&r| indptr[r + 1] < indptr[r]) {
        return Err(KernelError::Invalid(format!("indptr decreases at row {r} ({} then {}); the matrix is damaged", indptr[r], indptr[r + 1])));
    }
    let n_entries = (indptr[n_rows] - base) as usize;
    if base < 0 || indices.len() != n_entries || data.len() != n_entries {
        return Err(KernelError::Invalid(format!(
            "indptr spans {n_entries} entries from {base} but indices has {} and data {}; the matrix is damaged",
            indices.len(),
            data.len()
        )));
    }
    by_blocks(n_rows, |lo, hi| {
        let (a, b) = ((indptr[lo] - base) as usize, (indptr[hi] - base) as usize);
        from_csr_block(&indptr[lo..=hi], &indices[a..b], &data[a..b], n_genes, lo)
    })
}

fn from_csr_block<I: Copy + Into<i64>>(indptr: &[i64], indices: &[I], data: &[f32], n_genes: usize, row0: usize) -> Result<Cells, KernelError> {
    let base = indptr[0];
    let (mut lens, mut idx, mut val) = (Vec::with_capacity(indptr.len() - 1), Vec::with_capacity(indices.len()), Vec::with_capacity(data.len()));
    let mut keys: Vec<(u32, f32)> = Vec::new();
    for (i, w) in indptr.windows(2).enumerate() {
        let (a, b) = ((w[0] - base) as usize, (w[1] - base) as usize);
        let start = idx.len();
        let mut sorted = true;
        for (&g, &v) in indices[a..b].iter().zip(&data[a..b]) {
            let g: i64 = g.into();
            if g < 0 || g >= n_genes as i64 {
                return Err(KernelError::Row {
                    part: Part::GeneIdx,
                    row: row0 + i,
                    problem: format!("gene index {g} is outside [0, {n_genes})"),
                    fix: "the matrix is damaged, or its shape is wrong",
                });
            }
            if !v.is_finite() {
                return Err(KernelError::Row {
                    part: Part::Values,
                    row: row0 + i,
                    problem: format!("non-finite value {v} of gene {g}"),
                    fix: "repair or drop the cell before importing",
                });
            }
            sorted &= idx.len() == start || idx[idx.len() - 1] < g as u32;
            idx.push(g as u32);
            val.push(v);
        }
        if !sorted {
            // Stable by index so duplicates are summed in stored order, as scipy does.
            keys.clear();
            keys.extend(idx[start..].iter().copied().zip(val[start..].iter().copied()));
            keys.sort_by_key(|p| p.0);
            idx.truncate(start);
            val.truncate(start);
            let mut k = 0;
            while k < keys.len() {
                let g = keys[k].0;
                let mut sum = 0f64;
                while k < keys.len() && keys[k].0 == g {
                    sum += keys[k].1 as f64;
                    k += 1;
                }
                idx.push(g);
                val.push(sum as f32);
            }
        }
        lens.push(idx.len() - start);
    }
    Ok((lens, idx, val))
}

/// `f(lo, hi)` over rows `0..n`: one call for small inputs (streaming
/// batches arrive in parallel already), blocks of `PAR_BLOCK` rows over the
/// rayon pool for large ones, concatenated in row order. The first error in
/// row order wins, so the result does not depend on the split.
fn by_blocks(n: usize, f: impl Fn(usize, usize) -> Result<Cells, KernelError> + Sync) -> Result<Cells, KernelError> {
    if !parallel(n) {
        return f(0, n);
    }
    let parts: Vec<Result<Cells, KernelError>> =
        (0..n.div_ceil(PAR_BLOCK)).into_par_iter().map(|b| f(b * PAR_BLOCK, ((b + 1) * PAR_BLOCK).min(n))).collect();
    let (mut lens, mut idx, mut val) = (Vec::with_capacity(n), Vec::new(), Vec::new());
    for p in parts {
        let (l, i, v) = p?;
        lens.extend(l);
        idx.extend(i);
        val.extend(v);
    }
    Ok((lens, idx, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(genes: &'a [i64], values: &'a [f32]) -> TokenRow<'a> {
        TokenRow { genes, values }
    }

    #[test]
    fn vocabulary_drops_the_marker_and_sorts() {
        // Gene g has token 100 + 7g mod 50 spacing: not in token order.
        let tokens = [105i64, 103, 110, 101];
        let map = TokenMap::new(&tokens).unwrap();
        // Marker token 1 first with a negative value: dropped before any check.
        let rows = [row(&[1, 110, 105, 101], &[-2.0, 3.0, 1.0, 4.0]), row(&[1], &[-2.0]), row(&[1, 103], &[-2.0, 9.0])];
        let (lens, idx, val) = to_cells(&rows, &Genes::Vocabulary(&map)).unwrap();
        assert_eq!(lens, vec![3, 0, 1]);
        assert_eq!(idx, vec![0, 2, 3, 1]);
        assert_eq!(val, vec![1.0, 3.0, 4.0, 9.0]);
    }

    #[test]
    fn sparse_ids_use_the_sorted_lookup_with_the_same_result() {
        let dense = TokenMap::new(&[5, 9, 7]).unwrap();
        let sparse = TokenMap::new(&[5, 9_000_000_000, 7]).unwrap();
        assert!(matches!(dense.lookup, Lookup::Dense { .. }));
        assert!(matches!(sparse.lookup, Lookup::Sorted(_)));
        let a = to_cells(&[row(&[7, 5, 3], &[1.0, 2.0, 3.0])], &Genes::Vocabulary(&dense)).unwrap();
        let b = to_cells(&[row(&[7, 5, 3], &[1.0, 2.0, 3.0])], &Genes::Vocabulary(&sparse)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.1, vec![0, 2]);
    }

    #[test]
    fn errors_name_the_row() {
        let map = TokenMap::new(&[10, 11]).unwrap();
        let dup = to_cells(&[row(&[10], &[1.0]), row(&[11, 10, 11], &[1.0, 1.0, 2.0])], &Genes::Vocabulary(&map)).unwrap_err();
        assert!(matches!(&dup, KernelError::Row { row: 1, part: Part::GeneIdx, .. }), "{dup}");
        assert!(dup.to_string().contains("[11, 11]"), "{dup}");
        let neg = to_cells(&[row(&[10, 11], &[1.0, -1.0])], &Genes::Vocabulary(&map)).unwrap_err();
        assert!(matches!(neg, KernelError::Row { row: 0, part: Part::Values, .. }), "{neg}");
        let nan = to_cells(&[row(&[0], &[f32::NAN])], &Genes::Indices(None)).unwrap_err();
        assert!(matches!(nan, KernelError::Row { part: Part::Values, .. }));
        let out = to_cells(&[row(&[0, 3], &[1.0, 1.0])], &Genes::Indices(Some(3))).unwrap_err();
        assert!(out.to_string().contains("gene id 3 is outside [0, 3)"), "{out}");
        let negid = to_cells(&[row(&[-1], &[1.0])], &Genes::Indices(None)).unwrap_err();
        assert!(matches!(negid, KernelError::Row { part: Part::GeneIdx, .. }));
        let len = to_cells(&[row(&[0, 1], &[1.0])], &Genes::Indices(None)).unwrap_err();
        assert!(matches!(len, KernelError::Row { part: Part::Values, .. }));
        assert!(TokenMap::new(&[4, 5, 4]).is_err());
        // A bound beyond UInt32 does not let ids wrap into small indices.
        let wrap = to_cells(&[row(&[1 << 32], &[1.0])], &Genes::Indices(Some(5_000_000_000))).unwrap_err();
        assert!(wrap.to_string().contains("outside [0, 4294967295)"), "{wrap}");
    }

    #[test]
    fn a_vocabulary_that_matches_no_id_is_an_error() {
        let map = TokenMap::new(&[10, 11]).unwrap();
        // Markers only, or a subset vocabulary: fine, cells may end up empty.
        assert!(to_cells(&[row(&[1], &[-2.0]), row(&[1], &[-2.0])], &Genes::Vocabulary(&map)).is_ok());
        assert!(to_cells(&[row(&[1, 10, 99], &[-2.0, 1.0, 1.0])], &Genes::Vocabulary(&map)).is_ok());
        let e = to_cells(&[row(&[1, 98, 99], &[-2.0, 1.0, 1.0])], &Genes::Vocabulary(&map)).unwrap_err();
        assert!(e.to_string().contains("none of the 3 gene ids of these 1 cells is in the vocabulary of 2 tokens"), "{e}");
    }

    #[test]
    fn large_calls_split_the_same_and_report_the_first_bad_row() {
        let n = 5 * PAR_BLOCK;
        let genes: Vec<[i64; 3]> = (0..n as i64).map(|i| [i % 7 + 3, 1, i % 5 + 20]).collect();
        let values = [1.0f32, 2.0, 3.0];
        let rows: Vec<TokenRow<'_>> = genes.iter().map(|g| row(g, &values)).collect();
        let serial = to_cells_block(&rows, 0, &Genes::Indices(None)).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        assert_eq!(pool.install(|| to_cells(&rows, &Genes::Indices(None))).unwrap(), serial);
        let mut bad = genes.clone();
        bad[3 * PAR_BLOCK + 5] = [1, 1, 2];
        bad[4 * PAR_BLOCK + 1] = [1, 1, 2];
        let rows: Vec<TokenRow<'_>> = bad.iter().map(|g| row(g, &values)).collect();
        let e = pool.install(|| to_cells(&rows, &Genes::Indices(None))).unwrap_err();
        assert!(matches!(e, KernelError::Row { row, .. } if row == 3 * PAR_BLOCK + 5), "{e}");
    }

    #[test]
    fn csr_sorts_and_sums_duplicates_like_scipy() {
        // Rows: [2:1, 0:2, 2:0.5], [], [1:3]; indptr starts at 10 (a slice).
        let indptr = [10i64, 13, 13, 14];
        let indices = [2i32, 0, 2, 1];
        let data = [1.0f32, 2.0, 0.5, 3.0];
        let (lens, idx, val) = from_csr(&indptr, &indices, &data, 3).unwrap();
        assert_eq!(lens, vec![2, 0, 1]);
        assert_eq!(idx, vec![0, 2, 1]);
        assert_eq!(val, vec![2.0, 1.5, 3.0]);
        assert!(from_csr(&indptr, &indices, &data, 2).unwrap_err().to_string().contains("outside [0, 2)"));
        assert!(from_csr(&[0i64, 2, 1], &[0i32, 1], &[1.0, 1.0], 3).is_err());
        assert!(from_csr(&[0i64, 3], &[0i32, 1], &[1.0, 1.0], 3).is_err());
        assert!(from_csr(&[0i64, 1], &[0i64], &[f32::INFINITY], 3).is_err());
    }
}
