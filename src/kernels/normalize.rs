//! `normalize`: per-cell total-count normalisation and log1p, with the
//! semantics of `scanpy.pp.normalize_total` + `scanpy.pp.log1p` on CSR input:
//! the cell total is summed in float64 and rounded to float32, the divisor is
//! `total / target_sum` in float32 and each value is divided by it in float32,
//! so results agree with scanpy to the last bit or one ulp.

use rayon::prelude::*;

use super::SparseRow;
use crate::error::{KernelError, Part};

/// One cell's total: a float64 sum rounded to float32, as scanpy's CSR path.
fn cell_total(values: &[f32]) -> f32 {
    values.iter().map(|&v| v as f64).sum::<f64>() as f32
}

/// Total counts of each cell.
pub fn total_counts(rows: &[SparseRow<'_>]) -> Vec<f32> {
    rows.iter().map(|r| cell_total(r.values)).collect()
}

/// Median of the non-zero cell totals (scanpy's default `target_sum`);
/// `None` when every cell is empty.
pub fn median_nonzero(totals: &[f32]) -> Option<f32> {
    let mut t: Vec<f32> = totals.iter().copied().filter(|&x| x > 0.0).collect();
    if t.is_empty() {
        return None;
    }
    t.sort_by(f32::total_cmp);
    let m = t.len() / 2;
    // numpy.median of float32: the mean of the two middle values, in float32.
    Some(if t.len() % 2 == 1 { t[m] } else { (t[m - 1] + t[m]) / 2.0 })
}

/// The first negative value in row order, with its row. A branch-free test
/// per row (it vectorises) before looking for the value, and large calls
/// split over the current rayon pool as `validate_rows` does.
fn first_negative(rows: &[SparseRow<'_>]) -> Option<(usize, f32)> {
    let scan = |offset: usize, block: &[SparseRow<'_>]| {
        block.iter().enumerate().find_map(|(i, r)| {
            let any = r.values.iter().fold(false, |a, &v| a | (v < 0.0));
            if any { r.values.iter().find(|&&v| v < 0.0).map(|&v| (offset + i, v)) } else { None }
        })
    };
    if !super::parallel(rows.len()) {
        return scan(0, rows);
    }
    let found: Vec<Option<(usize, f32)>> =
        rows.par_chunks(super::PAR_BLOCK).enumerate().map(|(b, block)| scan(b * super::PAR_BLOCK, block)).collect();
    found.into_iter().flatten().next()
}

/// Integer counts below this share one `ln_1p` per cell (see `normalize`).
const MEMO: usize = 64;

/// Normalise every cell to `target_sum` total counts, then `ln(1 + x)` if
/// `log1p`. Returns the new values of all rows concatenated in row order.
///
/// `target_sum = None` uses the median of the non-zero totals of `rows`.
/// A cell with zero total counts keeps its (zero) values, as in scanpy.
/// Negative counts are an error: their totals have no meaning.
pub fn normalize(rows: &[SparseRow<'_>], target_sum: Option<f32>, log1p: bool) -> Result<Vec<f32>, KernelError> {
    if let Some((row, v)) = first_negative(rows) {
        return Err(KernelError::Row {
            part: Part::Values,
            row,
            problem: format!("negative count {v}"),
            fix: "normalize expects raw non-negative counts",
        });
    }
    if let Some(t) = target_sum {
        if !(t.is_finite() && t > 0.0) {
            return Err(KernelError::Invalid(format!(
                "target_sum must be a positive finite number, got {t}"
            )));
        }
    }
    let target = match target_sum {
        Some(t) => t,
        None => median_nonzero(&total_counts(rows)).unwrap_or(1.0),
    };
    let mut out = vec![0f32; rows.iter().map(|r| r.values.len()).sum()];
    super::for_row_blocks(rows, &mut out, |r| r.values.len(), |block, dst| {
        let mut at = 0;
        // UMI counts are small integers and repeat within a cell: memoise
        // ln(1 + c/divisor) per integer count c of the cell. The same input
        // gives the same bits, so this only skips repeated libm calls.
        let mut memo = [f32::NAN; MEMO];
        for r in block {
            let total = cell_total(r.values);
            // scanpy replaces a zero divisor by 1, which leaves the zeros as they are.
            let divisor = if total > 0.0 { total / target } else { 1.0 };
            let dst = &mut dst[at..at + r.values.len()];
            at += r.values.len();
            if !log1p {
                for (o, &v) in dst.iter_mut().zip(r.values) {
                    *o = v / divisor;
                }
                continue;
            }
            memo.fill(f32::NAN);
            for (o, &v) in dst.iter_mut().zip(r.values) {
                let c = v as usize; // v >= 0 was checked
                *o = if c < MEMO && c as f32 == v {
                    if memo[c].is_nan() {
                        memo[c] = (v / divisor).ln_1p();
                    }
                    memo[c]
                } else {
                    (v / divisor).ln_1p()
                };
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::Rows;

    #[test]
    fn each_cell_sums_to_target_before_log() {
        let rows = Rows::random(50, 30, 0.3, 1);
        let out = normalize(&rows.view(), Some(1e4), false).unwrap();
        let mut at = 0;
        for (idx, _) in &rows.0 {
            let s: f64 = out[at..at + idx.len()].iter().map(|&x| x as f64).sum();
            at += idx.len();
            if !idx.is_empty() {
                assert!((s - 1e4).abs() < 1e-2, "cell sums to {s}");
            }
        }
    }

    #[test]
    fn log1p_is_applied_after_scaling() {
        let rows = Rows(vec![(vec![0, 3], vec![1.0, 3.0])]);
        let out = normalize(&rows.view(), Some(4.0), true).unwrap();
        assert_eq!(out, vec![1f32.ln_1p(), 3f32.ln_1p()]);
    }

    #[test]
    fn memoised_log1p_equals_direct_for_integer_and_fractional_counts() {
        let rows = Rows(vec![(vec![0, 1, 2, 3, 4, 5], vec![1.0, 1.0, 2.5, 63.0, 64.0, 1000.0]), (vec![0, 1], vec![1.0, 3.0])]);
        let out = normalize(&rows.view(), Some(1e4), true).unwrap();
        let mut want = Vec::new();
        for (_, v) in &rows.0 {
            let total = v.iter().map(|&x| x as f64).sum::<f64>() as f32;
            want.extend(v.iter().map(|&x| (x / (total / 1e4f32)).ln_1p()));
        }
        assert_eq!(out, want);
    }

    #[test]
    fn zero_cells_stay_zero_and_median_ignores_them() {
        let rows = Rows(vec![
            (vec![0], vec![0.0]),
            (vec![], vec![]),
            (vec![1], vec![2.0]),
            (vec![1], vec![6.0]),
        ]);
        assert_eq!(median_nonzero(&total_counts(&rows.view())), Some(4.0));
        let out = normalize(&rows.view(), None, false).unwrap();
        assert_eq!(out, vec![0.0, 4.0, 4.0]);
    }

    #[test]
    fn parallel_blocks_equal_serial_and_errors_name_the_global_row() {
        let small = Rows::random(97, 40, 0.3, 2);
        let v = small.view();
        let rows: Vec<_> = v.iter().cycle().take(4 * crate::kernels::PAR_BLOCK + 5).copied().collect();
        let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        let one = pool(1).install(|| normalize(&rows, Some(1e4), true).unwrap());
        let two = pool(2).install(|| normalize(&rows, Some(1e4), true).unwrap());
        assert_eq!(one, two);
        let mut bad = rows.clone();
        let last = bad.len() - 1;
        bad[last] = crate::kernels::SparseRow { gene_idx: &[3, 1], values: &[1.0, 1.0] };
        let e = pool(2).install(|| crate::kernels::validate_rows(&bad, None)).unwrap_err().to_string();
        assert!(e.contains(&format!("at row {last}")), "{e}");
    }

    /// Split over threads, the error still names the first bad row.
    #[test]
    fn first_negative_row_in_a_large_call() {
        let n = 4 * crate::kernels::PAR_BLOCK + 1000;
        let mut values = vec![[1.0f32]; n];
        values[3 * crate::kernels::PAR_BLOCK + 17] = [-2.0];
        values[n - 1] = [-1.0];
        let rows: Vec<SparseRow<'_>> = values.iter().map(|v| SparseRow { gene_idx: &[0], values: v }).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let e = pool.install(|| normalize(&rows, Some(1e4), true)).unwrap_err().to_string();
        assert!(e.contains(&format!("negative count -2 at row {}", 3 * crate::kernels::PAR_BLOCK + 17)), "{e}");
    }

    #[test]
    fn negative_counts_and_bad_target_are_errors() {
        let rows = Rows(vec![(vec![0], vec![1.0]), (vec![2], vec![-1.0])]);
        let e = normalize(&rows.view(), Some(1.0), true).unwrap_err().to_string();
        assert!(e.contains("negative count -1 at row 1"), "{e}");
        let ok = Rows(vec![(vec![0], vec![1.0])]);
        assert!(normalize(&ok.view(), Some(0.0), true).is_err());
        assert!(normalize(&ok.view(), Some(f32::NAN), true).is_err());
    }
}
