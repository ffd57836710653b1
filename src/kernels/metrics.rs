//! Neighbourhood metrics of an integration that need a loop NumPy cannot
//! vectorise: the Local Inverse Simpson Index (per cell, a binary search) and
//! connected components (for scib's graph connectivity). The kNN graph itself
//! comes from `kernels::knn`; counting and averaging stay in Python.

use rayon::prelude::*;

use crate::error::KernelError;

/// harmonypy's search budget: the weights are evaluated at most 50 times
/// (harmonypy 2.1's C++ `lisi.hpp`), stopping when the entropy is within
/// `TOL` nats of ln(perplexity).
const TRIES: usize = 50;
const TOL: f64 = 1e-5;

/// Simpson index of one cell's neighbourhood, as harmonypy's `compute_simpson`
/// (Korsunsky et al. 2019): Gaussian weights p_j ∝ exp(−β·dist_j) whose
/// entropy is calibrated to ln(perplexity) by bisection on β, then
/// Σ_c (Σ_{j: label_j = c} p_j)². `mass` is scratch of length ≥ the number of
/// categories, left zeroed.
///
/// A neighbourhood whose weights all underflow gets Simpson index ∞, i.e.
/// LISI 0, as harmonypy 2.1 returns.
pub fn simpson(dist: &[f32], labels: &[u32], perplexity: f64, mass: &mut [f64]) -> f64 {
    let log_u = perplexity.ln();
    // One pass: normalised weights and their entropy at precision beta.
    let weights = |beta: f64, p: &mut Vec<f64>| -> f64 {
        p.clear();
        p.extend(dist.iter().map(|&d| (-(d as f64) * beta).exp()));
        let sum: f64 = p.iter().sum();
        if sum == 0.0 {
            return 0.0; // all weights stay 0
        }
        let h = sum.ln() + beta * dist.iter().zip(p.iter()).map(|(&d, &w)| d as f64 * w).sum::<f64>() / sum;
        p.iter_mut().for_each(|w| *w /= sum);
        h
    };
    let mut p = Vec::with_capacity(dist.len());
    let (mut beta, mut lo, mut hi) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
    let mut h = weights(beta, &mut p);
    for _ in 1..TRIES {
        let diff = h - log_u;
        if diff.abs() < TOL {
            break;
        }
        if diff > 0.0 {
            lo = beta;
            beta = if hi.is_finite() { (beta + hi) / 2.0 } else { beta * 2.0 };
        } else {
            hi = beta;
            beta = if lo.is_finite() { (beta + lo) / 2.0 } else { beta / 2.0 };
        }
        h = weights(beta, &mut p);
    }
    for (&l, &w) in labels.iter().zip(&p) {
        mass[l as usize] += w;
    }
    if p.iter().all(|&w| w == 0.0) {
        return f64::INFINITY;
    }
    let mut s = 0.0;
    for &l in labels {
        let m = std::mem::take(&mut mass[l as usize]);
        s += m * m;
    }
    s
}

/// LISI = 1 / Simpson index for every row of a (n, k) neighbour table:
/// `distances` are Euclidean (self excluded), `labels` the neighbours' category
/// codes (< `n_categories`). Rows are independent, so any split gives the same
/// bits.
pub fn lisi(
    distances: &[f32],
    labels: &[u32],
    k: usize,
    n_categories: usize,
    perplexity: f64,
) -> Result<Vec<f64>, KernelError> {
    if k == 0 || !distances.len().is_multiple_of(k) {
        return Err(KernelError::Shape { what: "neighbour distances per row", expected: k, got: distances.len() });
    }
    if labels.len() != distances.len() {
        return Err(KernelError::Shape { what: "neighbour labels", expected: distances.len(), got: labels.len() });
    }
    if !(perplexity > 0.0 && perplexity.is_finite()) {
        return Err(KernelError::Invalid(format!("perplexity must be a positive number, got {perplexity}")));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= n_categories) {
        return Err(KernelError::Invalid(format!("label code {bad} is not below the {n_categories} categories")));
    }
    if let Some(&bad) = distances.iter().find(|d| !(d.is_finite() && **d >= 0.0)) {
        return Err(KernelError::Invalid(format!("neighbour distance {bad} is not a finite non-negative number")));
    }
    let mut out = vec![0.0; distances.len() / k];
    out.par_chunks_mut(1024).enumerate().for_each(|(t, chunk)| {
        let mut mass = vec![0.0; n_categories];
        for (i, o) in chunk.iter_mut().enumerate() {
            let r = t * 1024 + i;
            *o = 1.0 / simpson(&distances[r * k..(r + 1) * k], &labels[r * k..(r + 1) * k], perplexity, &mut mass);
        }
    });
    Ok(out)
}

/// Connected components of the undirected graph on `n` nodes with edges
/// `(src[e], dst[e])`: each node's component is named by its smallest member,
/// so the labelling is unique whatever the edge order.
pub fn components(n: usize, src: &[u32], dst: &[u32]) -> Result<Vec<u32>, KernelError> {
    if src.len() != dst.len() {
        return Err(KernelError::Shape { what: "edge targets", expected: src.len(), got: dst.len() });
    }
    if let Some(&bad) = src.iter().chain(dst).find(|&&v| v as usize >= n) {
        return Err(KernelError::Invalid(format!("edge endpoint {bad} is not below the {n} nodes")));
    }
    let mut parent: Vec<u32> = (0..n as u32).collect();
    fn find(parent: &mut [u32], mut x: u32) -> u32 {
        while parent[x as usize] != x {
            // Path halving keeps the trees shallow without recursion.
            let g = parent[parent[x as usize] as usize];
            parent[x as usize] = g;
            x = g;
        }
        x
    }
    for (&a, &b) in src.iter().zip(dst) {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra != rb {
            // The smaller root wins, so every root is its component's minimum.
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            parent[hi as usize] = lo;
        }
    }
    for x in 0..n as u32 {
        let r = find(&mut parent, x);
        parent[x as usize] = r;
    }
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simpson_of_one_category_is_one_and_of_two_even_is_half() {
        let d = [1.0f32; 90];
        let mut mass = vec![0.0; 2];
        let one = simpson(&d, &[0; 90], 30.0, &mut mass);
        assert!((one - 1.0).abs() < 1e-12, "{one}");
        let labels: Vec<u32> = (0..90).map(|i| (i % 2) as u32).collect();
        let half = simpson(&d, &labels, 30.0, &mut mass);
        assert!((half - 0.5).abs() < 1e-12, "{half}");
        assert!(mass.iter().all(|&m| m == 0.0), "scratch left dirty");
    }

    #[test]
    fn calibrated_entropy_matches_perplexity() {
        // Spread distances: the bisection must land within TOL of ln(30).
        let d: Vec<f32> = (0..90).map(|i| i as f32 * 0.1).collect();
        let labels: Vec<u32> = (0..90).map(|i| (i % 3) as u32).collect();
        let mut mass = vec![0.0; 3];
        let s = simpson(&d, &labels, 30.0, &mut mass);
        assert!(s > 1.0 / 3.0 - 1e-9 && s < 1.0, "{s}");
    }

    #[test]
    fn components_are_named_by_their_smallest_member() {
        let c = components(6, &[5, 1, 3], &[4, 2, 4]).unwrap();
        assert_eq!(c, vec![0, 1, 1, 3, 3, 3]);
        assert!(components(3, &[0], &[3]).is_err());
        assert!(lisi(&[1.0, f32::NAN], &[0, 0], 2, 1, 30.0).is_err());
        assert!(lisi(&[1.0, 1.0], &[0, 1], 2, 1, 30.0).is_err());
    }
}
