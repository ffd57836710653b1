//! The low-memory centroid fit (`fit_centroids(low_memory=True)`): the same
//! sample and centroids as [`CentroidSampleFit`](super::fit::CentroidSampleFit),
//! with one batch's sample in memory instead of all. Pass one reads the batch
//! column and fixes each batch's sample ([`KeyCut`]); pass two appends each
//! kept row to its batch's file under a folder; `finish` loads one batch's
//! sample at a time. Its sample lives in files on one machine, so this fit
//! has no `merge` or wire form; the in-memory fit has both.

use std::collections::BTreeMap;
use std::path::PathBuf;

use polars::prelude::*;

use super::fit::{batch_labels, CentroidOptions};
use super::{check_no_null_batch, checked_sample_rows, fit_sample, BatchCentroids};
use crate::kernels::sample::{Cut, KeyCut};

/// The two-pass sampler. Pass one: `update(&[batch])`; then
/// `next_pass(dir)`; pass two: `update(&[embedding, batch])` over the same
/// rows in the same order; then `finish`.
pub struct SpillSampleFit {
    cap: usize,
    d: usize,
    seed: u64,
    n_rows: u64,
    cuts: BTreeMap<String, KeyCut>,
    samples: Option<BTreeMap<String, SpilledSample>>,
    pass_rows: u64,
}

impl SpillSampleFit {
    /// The fit's name in errors.
    pub const KIND: &'static str = "SpillSampleFit";

    /// An empty sampler of at most `max_samples_per_batch` rows per batch of a
    /// `d`-wide embedding, keyed by `random_state` (as `CentroidSampleFit`).
    pub fn new(d: usize, max_samples_per_batch: usize, random_state: u64) -> PolarsResult<Self> {
        polars_ensure!(max_samples_per_batch > 0 && d > 0, ComputeError: "max_samples_per_batch and the embedding width must be at least 1");
        Ok(SpillSampleFit { cap: max_samples_per_batch, d, seed: random_state, n_rows: 0, cuts: BTreeMap::new(), samples: None, pass_rows: 0 })
    }

    /// Rows read in pass one.
    pub fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// The embedding's width.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Pass one: `[batch]`; pass two: `[embedding, batch]`.
    pub fn update(&mut self, columns: &[Series]) -> PolarsResult<()> {
        match (columns, self.samples.as_mut()) {
            ([batch], None) => {
                let labels = batch_labels(batch)?;
                self.n_rows += centroid_cut_update(&mut self.cuts, self.cap, self.seed, self.n_rows, &labels)? as u64;
            },
            ([embedding, batch], Some(samples)) => {
                let labels = batch_labels(batch)?;
                self.pass_rows += centroid_spill_update(samples, self.d, self.pass_rows, embedding, &labels)? as u64;
            },
            ([_], Some(_)) => polars_bail!(ComputeError: "{}: pass two takes (embedding, batch); pass one is over", Self::KIND),
            (_, None) => polars_bail!(ComputeError: "{}: pass one takes the batch column only, got {} columns", Self::KIND, columns.len()),
            (_, Some(_)) => polars_bail!(ComputeError: "{}: pass two takes (embedding, batch), got {} columns", Self::KIND, columns.len()),
        }
        Ok(())
    }

    /// End pass one; pass two writes the batches' samples under `dir`.
    pub fn next_pass(&mut self, dir: PathBuf) -> PolarsResult<()> {
        let begun = self.samples.is_some() || (self.cuts.is_empty() && self.n_rows > 0);
        polars_ensure!(!begun, ComputeError: "{}: next_pass() twice: pass two has begun", Self::KIND);
        // Enough buffer to write in large pieces: 64 MiB in all up to 1024 batches, 64 KiB a batch beyond.
        let flush_at = ((64usize << 20) / self.cuts.len().max(1)).clamp(64 << 10, 1 << 20);
        let cuts = std::mem::take(&mut self.cuts); // the keys' memory goes before pass two's
        self.samples = Some(
            cuts.iter()
                .enumerate()
                .map(|(i, (b, c))| (b.clone(), SpilledSample::new(c.cut(), dir.join(format!("{i}.f32")), flush_at)))
                .collect(),
        );
        self.pass_rows = 0;
        Ok(())
    }

    /// k-means per batch, one batch's sample loaded at a time. Checks that
    /// pass two saw the rows of pass one. The samples are consumed.
    pub fn finish(&mut self, options: &CentroidOptions) -> PolarsResult<Vec<(String, BatchCentroids)>> {
        let Some(mut samples) = self.samples.take() else {
            polars_bail!(ComputeError: "{}: finish() before next_pass(), or finish() twice", Self::KIND);
        };
        polars_ensure!(self.pass_rows == self.n_rows, ComputeError:
            "the data gave {} rows on its first read and {} on its second; low_memory reads the data twice, \
             so it must give the same rows in the same order each time", self.n_rows, self.pass_rows);
        // Same count, other rows (reordered or moved between batches): the
        // kept rows are no longer each batch's sample.
        if let Some((b, s)) = samples.iter().find(|(_, s)| s.n_seen != s.cut.n_seen || s.n_kept != s.cut.n_kept) {
            polars_bail!(ComputeError:
                "batch '{b}' had {} rows ({} sampled) on the data's first read and {} ({} sampled) on its second; \
                 low_memory reads the data twice, so it must give the same rows in the same order each time",
                s.cut.n_seen, s.cut.n_kept, s.n_seen, s.n_kept);
        }
        // Nothing stays buffered while earlier batches' k-means run.
        for s in samples.values_mut() {
            s.flush()?;
        }
        samples
            .into_iter()
            .map(|(b, s)| {
                let n_cells = s.cut.n_seen;
                let x = s.load(self.d)?;
                fit_sample(&x, self.d, n_cells, &options.params, options.min_cells_per_centroid).map(|f| (b, f))
            })
            .collect()
    }
}

/// Pass one of the low-memory centroid sample: offer a record batch's rows
/// (the batch column only) to per-batch key cuts.
fn centroid_cut_update(
    cuts: &mut std::collections::BTreeMap<String, KeyCut>,
    cap: usize,
    seed: u64,
    row0: u64,
    batch: &StringChunked,
) -> PolarsResult<usize> {
    check_no_null_batch(batch, row0)?;
    for (i, b) in batch.iter().enumerate() {
        let b = b.expect("checked: no null batch");
        let c = match cuts.get_mut(b) {
            Some(c) => c,
            None => cuts.entry(b.to_string()).or_insert_with(|| KeyCut::new(cap, seed)),
        };
        c.offer(row0 + i as u64);
    }
    Ok(batch.len())
}

/// One batch's sample in pass two of the low-memory centroid sample: the rows
/// its [`Cut`] keeps, in row order, buffered and appended to a file (raw
/// little-endian float32) so that only one batch's sample is ever in memory.
struct SpilledSample {
    cut: Cut,
    path: std::path::PathBuf,
    buf: Vec<u8>,
    flush_at: usize,
    /// Rows of this batch seen in pass two (must equal `cut.n_seen`).
    n_seen: u64,
    n_kept: usize,
}

impl SpilledSample {
    fn new(cut: Cut, path: std::path::PathBuf, flush_at: usize) -> Self {
        SpilledSample { cut, path, buf: Vec::new(), flush_at, n_seen: 0, n_kept: 0 }
    }

    fn push(&mut self, row: u64, values: &[f32]) -> PolarsResult<()> {
        self.n_seen += 1;
        if self.cut.keeps(row) {
            self.n_kept += 1;
            self.buf.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            if self.buf.len() >= self.flush_at {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> PolarsResult<()> {
        use std::io::Write;
        if self.buf.is_empty() {
            return Ok(());
        }
        // Open, append, close: no file handle per batch stays open.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// The sample back, `n_kept × d` values in row order; the file is removed.
    fn load(mut self, d: usize) -> PolarsResult<Vec<f32>> {
        use std::io::Read;
        self.flush()?;
        let want = self.n_kept * d;
        let mut x = Vec::with_capacity(want);
        if self.n_kept > 0 {
            let mut f = std::fs::File::open(&self.path)?;
            let len = f.metadata()?.len();
            polars_ensure!(len == 4 * want as u64, ComputeError:
                "the centroid sample file {} holds {len} bytes, expected {}; was it changed while the fit ran?",
                self.path.display(), 4 * want);
            // 1 MiB at a time, so the bytes are never held next to the floats.
            let mut chunk = vec![0u8; 1 << 20];
            let mut left = 4 * want;
            while left > 0 {
                let piece = &mut chunk[..left.min(1 << 20)];
                f.read_exact(piece)?;
                x.extend(piece.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                left -= piece.len();
            }
            std::fs::remove_file(&self.path)?;
        }
        Ok(x)
    }
}

/// Pass two of the low-memory centroid sample: each kept row of a record
/// batch goes to its batch's [`SpilledSample`].
fn centroid_spill_update(
    samples: &mut std::collections::BTreeMap<String, SpilledSample>,
    width: usize,
    row0: u64,
    embedding: &Series,
    batch: &StringChunked,
) -> PolarsResult<usize> {
    let (x, d) = checked_sample_rows(width, row0, embedding, batch)?;
    for (i, (b, row)) in batch.iter().zip(x.chunks_exact(d)).enumerate() {
        let b = b.expect("checked: no null batch");
        let Some(s) = samples.get_mut(b) else {
            polars_bail!(ComputeError: "batch '{b}' at row {} was not in the first read of the data; \
                the data must give the same rows each time it is read (low_memory reads it twice)", row0 + i as u64);
        };
        s.push(row0 + i as u64, row)?;
    }
    Ok(batch.len())
}

