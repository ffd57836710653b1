//! `select_genes`: keep a subset of genes and renumber them 0..len(genes)-1,
//! keeping each row sparse and sorted.

use super::SparseRow;
use crate::error::KernelError;

/// Old gene index → new index, `u32::MAX` where a gene is dropped.
pub struct GeneMap {
    new_of_old: Vec<u32>,
    monotonic: bool,
}

impl GeneMap {
    /// `genes[k]` is the old index that becomes gene `k`.
    pub fn new(genes: &[u32]) -> Result<Self, KernelError> {
        let size = genes.iter().map(|&g| g as usize + 1).max().unwrap_or(0);
        let mut new_of_old = vec![u32::MAX; size];
        for (k, &g) in genes.iter().enumerate() {
            if new_of_old[g as usize] != u32::MAX {
                return Err(KernelError::Invalid(format!("genes lists gene {g} twice; pass each gene once")));
            }
            new_of_old[g as usize] = k as u32;
        }
        Ok(GeneMap { new_of_old, monotonic: genes.windows(2).all(|w| w[0] < w[1]) })
    }
}

/// Returns (row lengths, new gene indices, values), rows concatenated.
pub fn select_genes(rows: &[SparseRow<'_>], map: &GeneMap) -> (Vec<usize>, Vec<u32>, Vec<f32>) {
    let mut lens = Vec::with_capacity(rows.len());
    let mut idx = Vec::new();
    let mut val = Vec::new();
    let mut pairs: Vec<(u32, f32)> = Vec::new();
    for r in rows {
        pairs.clear();
        for (&g, &v) in r.gene_idx.iter().zip(r.values) {
            if let Some(&k) = map.new_of_old.get(g as usize) {
                if k != u32::MAX {
                    pairs.push((k, v));
                }
            }
        }
        // A non-monotonic selection reorders genes: sort to keep rows sorted.
        if !map.monotonic {
            pairs.sort_unstable_by_key(|p| p.0);
        }
        lens.push(pairs.len());
        idx.extend(pairs.iter().map(|p| p.0));
        val.extend(pairs.iter().map(|p| p.1));
    }
    (lens, idx, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Rows;

    #[test]
    fn keeps_selected_genes_renumbered_and_sorted() {
        let rows = Rows(vec![(vec![0, 2, 5, 9], vec![1.0, 2.0, 5.0, 9.0]), (vec![], vec![])]);
        let (l, i, v) = select_genes(&rows.view(), &GeneMap::new(&[5, 2, 7]).unwrap());
        assert_eq!((l, i, v), (vec![2, 0], vec![0, 1], vec![5.0, 2.0]));
        let (_, i, v) = select_genes(&rows.view(), &GeneMap::new(&[2, 9]).unwrap());
        assert_eq!((i, v), (vec![0, 1], vec![2.0, 9.0]));
        assert!(GeneMap::new(&[1, 1]).is_err());
    }
}
