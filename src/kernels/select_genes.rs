//! `select_genes`: keep a subset of genes and renumber them 0..len(genes)-1,
//! keeping each row sparse and sorted.

use super::SparseRow;
use crate::error::KernelError;

/// Old gene indices up to this use a lookup table (4 bytes each: 16 MB at
/// most; 0.25 MB for Tahoe's 62,710 genes), larger ones a binary search.
const TABLE_MAX: u32 = 1 << 22;

/// Old gene index → new index.
pub struct GeneMap {
    /// (old, new) sorted by old: a binary search per entry, memory O(len(genes))
    /// whatever the indices are.
    pairs: Vec<(u32, u32)>,
    /// `table[old]` = new index or `u32::MAX`, where every old index is at
    /// most `TABLE_MAX`: one load per entry instead of a binary search (the
    /// search was most of `select_genes`' time at Tahoe's density).
    table: Option<Vec<u32>>,
    monotonic: bool,
}

impl GeneMap {
    /// `genes[k]` is the old index that becomes gene `k`.
    pub fn new(genes: &[u32]) -> Result<Self, KernelError> {
        let mut pairs: Vec<(u32, u32)> = genes.iter().enumerate().map(|(k, &g)| (g, k as u32)).collect();
        pairs.sort_unstable();
        if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(KernelError::Invalid(format!("genes lists gene {} twice; pass each gene once", w[0].0)));
        }
        let table = match pairs.last() {
            Some(&(max, _)) if max <= TABLE_MAX => {
                let mut t = vec![u32::MAX; max as usize + 1];
                for &(old, new) in &pairs {
                    t[old as usize] = new;
                }
                Some(t)
            },
            _ => None,
        };
        Ok(GeneMap { pairs, table, monotonic: genes.windows(2).all(|w| w[0] < w[1]) })
    }

    #[inline]
    fn get(&self, old: u32) -> Option<u32> {
        match &self.table {
            Some(t) => t.get(old as usize).copied().filter(|&k| k != u32::MAX),
            None => self.pairs.binary_search_by_key(&old, |p| p.0).ok().map(|i| self.pairs[i].1),
        }
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
            if let Some(k) = map.get(g) {
                pairs.push((k, v));
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
        // Indices past the table's reach take the binary search: same result.
        let (_, i, _) = select_genes(&rows.view(), &GeneMap::new(&[u32::MAX, 9]).unwrap());
        assert_eq!(i, vec![1]);
        let wide = GeneMap::new(&[TABLE_MAX + 1, 5, 2]).unwrap();
        assert!(wide.table.is_none() && GeneMap::new(&[5, 2]).unwrap().table.is_some());
        let (l, i, v) = select_genes(&rows.view(), &wide);
        assert_eq!((l, i, v), (vec![2, 0], vec![1, 2], vec![5.0, 2.0]));
    }
}
