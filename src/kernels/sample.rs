//! A seeded uniform sample of at most `cap` rows from a stream, in memory
//! O(cap): every row gets the key `hash64(seed, row number)` and the sample is
//! the `cap` rows with the smallest keys (a bottom-k sample). The result does
//! not depend on how the stream was cut into batches, only on the row order
//! and the seed.

use std::collections::BinaryHeap;

use super::rng::hash64;

/// A bottom-k sample of at most `cap` rows of `d` values each, kept in
/// memory with their row numbers.
#[derive(Debug, Clone)]
pub struct BottomK {
    cap: usize,
    d: usize,
    seed: u64,
    /// Rows offered so far.
    pub n_seen: u64,
    /// Max-heap of (key, row number, slot) of the kept rows.
    heap: BinaryHeap<(u64, u64, usize)>,
    /// The kept rows' values, `BLOCK` rows a block. One growing Vec would
    /// double its capacity as it fills: up to 2× the sample's bytes held per
    /// batch (at 14 batches × 500k cells × 50 PCs, ~1.4 GB of slack); blocks
    /// waste at most one block per batch.
    blocks: Vec<Vec<f32>>,
}

/// Rows per storage block.
const BLOCK: usize = 8192;

impl BottomK {
    /// An empty sample of at most `cap` rows, each `d` values wide, keyed by `seed`.
    pub fn new(cap: usize, d: usize, seed: u64) -> Self {
        BottomK { cap, d, seed, n_seen: 0, heap: BinaryHeap::new(), blocks: Vec::new() }
    }

    fn row_mut(&mut self, slot: usize) -> &mut [f32] {
        let off = (slot % BLOCK) * self.d;
        &mut self.blocks[slot / BLOCK][off..off + self.d]
    }

    fn row(&self, slot: usize) -> &[f32] {
        let off = (slot % BLOCK) * self.d;
        &self.blocks[slot / BLOCK][off..off + self.d]
    }

    /// Values per row.
    pub fn d(&self) -> usize {
        self.d
    }

    /// The most rows the sample keeps.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The seed the rows' keys are hashed with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Offer one row (`d` values) with its global row number.
    pub fn offer(&mut self, row: u64, values: &[f32]) {
        debug_assert_eq!(values.len(), self.d);
        self.n_seen += 1;
        self.keep_if_small(row, values);
    }

    /// Join the sample of the rows that follow (same cap, width and seed,
    /// checked by the caller): the bottom-k of the union is the bottom-k of
    /// the two bottom-k's, so the result is the one stream's exactly.
    pub fn merge(&mut self, later: &BottomK) {
        let (values, rows) = later.finish();
        for (row, v) in rows.iter().zip(values.chunks_exact(self.d.max(1))) {
            self.keep_if_small(*row, v);
        }
        self.n_seen += later.n_seen;
    }

    /// A sample from its parts ([`BottomK::finish`]'s rows and the count of
    /// rows seen): what a serialised sample is read back into.
    pub fn from_parts(cap: usize, d: usize, seed: u64, n_seen: u64, values: &[f32], rows: &[u64]) -> Self {
        let mut s = BottomK::new(cap, d, seed);
        for (row, v) in rows.iter().zip(values.chunks_exact(d.max(1))) {
            s.keep_if_small(*row, v);
        }
        s.n_seen = n_seen;
        s
    }

    fn keep_if_small(&mut self, row: u64, values: &[f32]) {
        if self.cap == 0 {
            return;
        }
        let key = hash64(self.seed, row);
        if self.heap.len() < self.cap {
            let slot = self.heap.len();
            if slot.is_multiple_of(BLOCK) {
                // Exactly the rows the block can still be asked to hold.
                self.blocks.push(Vec::with_capacity(BLOCK.min(self.cap - slot) * self.d));
            }
            self.blocks[slot / BLOCK].extend_from_slice(values);
            if self.heap.len() == self.heap.capacity() {
                // Grow by a quarter at most, never past the cap (not 2×).
                let more = (self.heap.len() / 4).max(1024).min(self.cap - self.heap.len());
                self.heap.reserve_exact(more);
            }
            self.heap.push((key, row, slot));
        } else if let Some(&(top_key, top_row, slot)) = self.heap.peek() {
            if (key, row) < (top_key, top_row) {
                self.heap.pop();
                self.row_mut(slot).copy_from_slice(values);
                self.heap.push((key, row, slot));
            }
        }
    }

    /// The kept rows in row-number order, row-major, and their row numbers.
    pub fn finish(&self) -> (Vec<f32>, Vec<u64>) {
        let mut kept: Vec<(u64, usize)> = self.heap.iter().map(|&(_, row, slot)| (row, slot)).collect();
        kept.sort_unstable();
        let mut out = Vec::with_capacity(kept.len() * self.d);
        for &(_, slot) in &kept {
            out.extend_from_slice(self.row(slot));
        }
        (out, kept.into_iter().map(|(r, _)| r).collect())
    }
}

/// Pass one of a two-pass sample: the same bottom-k as [`BottomK`], keeping
/// only the keys (16 bytes a kept row instead of `d × 4 + 24`). Its [`Cut`]
/// then picks the very rows `BottomK` would keep, one at a time, in pass two:
/// a caller can write them out as they come instead of holding them all.
#[derive(Debug, Clone)]
pub struct KeyCut {
    cap: usize,
    seed: u64,
    /// Rows offered so far.
    pub n_seen: u64,
    heap: BinaryHeap<(u64, u64)>,
}

impl KeyCut {
    /// An empty cut of at most `cap` rows, keyed by `seed`.
    pub fn new(cap: usize, seed: u64) -> Self {
        KeyCut { cap, seed, n_seen: 0, heap: BinaryHeap::new() }
    }

    /// Offer the row with global row number `row`.
    pub fn offer(&mut self, row: u64) {
        self.n_seen += 1;
        self.keep_if_small(row);
    }

    /// Join the cut of the rows that follow (same cap and seed): as
    /// [`BottomK::merge`].
    pub fn merge(&mut self, later: &KeyCut) {
        for row in later.rows() {
            self.keep_if_small(row);
        }
        self.n_seen += later.n_seen;
    }

    /// The kept rows' numbers, ascending.
    pub fn rows(&self) -> Vec<u64> {
        let mut rows: Vec<u64> = self.heap.iter().map(|&(_, row)| row).collect();
        rows.sort_unstable();
        rows
    }

    fn keep_if_small(&mut self, row: u64) {
        if self.cap == 0 {
            return;
        }
        let key = (hash64(self.seed, row), row);
        if self.heap.len() < self.cap {
            if self.heap.len() == self.heap.capacity() {
                // As BottomK: grow by a quarter at most, never past the cap.
                let more = (self.heap.len() / 4).max(1024).min(self.cap - self.heap.len());
                self.heap.reserve_exact(more);
            }
            self.heap.push(key);
        } else if self.heap.peek().is_some_and(|&top| key < top) {
            self.heap.pop();
            self.heap.push(key);
        }
    }

    /// Finish pass one: the rule that picks the kept rows in pass two.
    pub fn cut(&self) -> Cut {
        // Fewer rows than the cap: every row (cap 0: none, `keeps` checks n_kept).
        let max = match self.heap.peek() {
            Some(&top) if self.heap.len() == self.cap => top,
            _ => (u64::MAX, u64::MAX),
        };
        Cut { seed: self.seed, max, n_kept: self.heap.len(), n_seen: self.n_seen }
    }
}

/// Which rows a finished [`KeyCut`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    seed: u64,
    /// The largest kept (key, row); every row at or below it is kept.
    max: (u64, u64),
    /// Rows the cut keeps (at most the cap).
    pub n_kept: usize,
    /// Rows offered in pass one.
    pub n_seen: u64,
}

impl Cut {
    /// Whether the row with global row number `row` is in the sample.
    pub fn keeps(&self, row: u64) -> bool {
        self.n_kept > 0 && (hash64(self.seed, row), row) <= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_smallest_keys_whatever_the_batching() {
        let rows: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut a = BottomK::new(50, 1, 3);
        for (i, v) in rows.iter().enumerate() {
            a.offer(i as u64, std::slice::from_ref(v));
        }
        let (vals, idx) = a.finish();
        let mut want: Vec<(u64, u64)> = (0..1000u64).map(|i| (hash64(3, i), i)).collect();
        want.sort_unstable();
        let mut want: Vec<u64> = want[..50].iter().map(|p| p.1).collect();
        want.sort_unstable();
        assert_eq!(idx, want);
        assert_eq!(vals, want.iter().map(|&i| i as f32).collect::<Vec<_>>());
        assert_eq!(a.n_seen, 1000);
        // fewer rows than the cap: all of them, in order
        let mut b = BottomK::new(50, 1, 3);
        for i in 0..7u64 {
            b.offer(i, &[i as f32]);
        }
        assert_eq!(b.finish().1, (0..7).collect::<Vec<u64>>());
    }

    #[test]
    fn rows_across_storage_blocks_stay_whole() {
        // More rows than a block holds, with replacements after the cap is
        // reached: every kept row comes back with its own values.
        let (cap, d) = (BLOCK + 77, 3);
        let mut s = BottomK::new(cap, d, 5);
        for i in 0..(3 * cap as u64) {
            s.offer(i, &[i as f32, -(i as f32), 0.5]);
        }
        let (vals, idx) = s.finish();
        assert_eq!(idx.len(), cap);
        for (r, &i) in idx.iter().enumerate() {
            assert_eq!(&vals[r * d..(r + 1) * d], &[i as f32, -(i as f32), 0.5]);
        }
        assert!(s.blocks.iter().all(|b| b.capacity() <= BLOCK * d));
        assert!(s.heap.capacity() <= cap);
    }

    #[test]
    fn sample_is_roughly_uniform() {
        let mut s = BottomK::new(10_000, 1, 11);
        for i in 0..100_000u64 {
            s.offer(i, &[0.0]);
        }
        let (_, idx) = s.finish();
        let first_half = idx.iter().filter(|&&i| i < 50_000).count();
        assert!((4_800..5_200).contains(&first_half), "{first_half}");
    }

    #[test]
    fn a_cut_keeps_the_rows_bottom_k_keeps() {
        // Two batches interleaved, as the centroid fit sees them; one has
        // fewer rows than the cap (all kept), one more.
        let cap = 1000;
        let mut bk = [BottomK::new(cap, 1, 9), BottomK::new(cap, 1, 9)];
        let mut kc = [KeyCut::new(cap, 9), KeyCut::new(cap, 9)];
        let which = |i: u64| usize::from(i.is_multiple_of(7));
        for i in 0..5000u64 {
            bk[which(i)].offer(i, &[i as f32]);
            kc[which(i)].offer(i);
        }
        for b in 0..2 {
            let cut = kc[b].cut();
            let kept: Vec<u64> = (0..5000u64).filter(|&i| which(i) == b && cut.keeps(i)).collect();
            assert_eq!(kept, bk[b].finish().1, "batch {b}");
            assert_eq!(cut.n_kept, kept.len());
            assert_eq!(cut.n_seen, bk[b].n_seen);
        }
        assert_eq!(kc[1].cut().n_kept, 5000 / 7 + 1); // under the cap: every row
        assert_eq!(kc[0].cut().n_kept, cap);
        assert!(!KeyCut::new(0, 9).cut().keeps(0));
    }
}
