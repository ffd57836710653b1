//! One-dimensional loess (Cleveland, Grosse & Shyu 1992) as scanpy's
//! `highly_variable_genes(flavor="seurat_v3")` calls it: scikit-misc's
//! `loess(x, y, span=0.3, degree=2)` with its defaults (gaussian family,
//! `surface="interpolate"`, `cell=0.2`), so that the expected variances, and
//! with them the gene ranking, are scanpy's without scikit-misc.
//!
//! The interpolate surface (netlib `dloess`: ehg126/ehg124 build a k-d tree,
//! ehg139 fits the vertices, ehg128 blends): the x range, widened by 0.5%,
//! is split at the median point of each cell (moved off ties, as ehg124
//! does) until a cell holds at most `floor(n·span·cell)` points; at every
//! vertex a weighted quadratic is fitted to the `floor(n·span)` nearest
//! points (tricube weights) and its value and slope kept; each x is then the
//! cubic Hermite blend of its cell's two vertices. A direct fit at every x
//! gives other numbers (up to 0.1 in log10 variance on the pancreas set) and
//! another top-n selection, so the interpolation is not optional.
//!
//! Each local fit solves its least squares through the SVD of the
//! column-scaled design with dloess' pseudo-inverse tolerance (100·ε·σ₁):
//! values agree with scikit-misc to ~1e-13 on the real sets.

use faer::Mat;

use crate::error::KernelError;

/// Fitted values of `y` on `x` (same length, any order), degree 2.
pub fn loess(x: &[f64], y: &[f64], span: f64, cell: f64) -> Result<Vec<f64>, KernelError> {
    let n = x.len();
    if y.len() != n {
        return Err(KernelError::Shape { what: "loess y", expected: n, got: y.len() });
    }
    if let Some(v) = x.iter().chain(y).find(|v| !v.is_finite()) {
        return Err(KernelError::Invalid(format!("loess needs finite x and y, got {v}")));
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(span) || !positive(cell) {
        return Err(KernelError::Invalid(format!("loess needs span > 0 and cell > 0, got span={span}, cell={cell}")));
    }
    let nf = ((n as f64 * span + 1e-5).floor() as usize).min(n);
    if nf < 3 {
        return Err(KernelError::Invalid(format!(
            "loess with span={span} on {n} points uses {nf} neighbours; a quadratic needs at least 3 (more genes with non-zero variance, or a larger span)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(a.cmp(&b)));
    let xs: Vec<f64> = order.iter().map(|&i| x[i]).collect();
    let ys: Vec<f64> = order.iter().map(|&i| y[i]).collect();
    let fc = (n as f64 * (span * cell)).floor() as usize;
    let tree = Tree::build(&xs, fc);
    let fits: Vec<(f64, f64)> = tree.vertices.iter().map(|&q| local_fit(&xs, &ys, q, nf, span)).collect::<Result<_, _>>()?;
    Ok(x.iter().map(|&z| tree.blend(z, &fits)).collect())
}

/// A 1-D k-d tree: cells `[vertices[lo], vertices[hi]]`, split at `xi`.
struct Tree {
    vertices: Vec<f64>,
    cells: Vec<Cell>,
}

struct Cell {
    lo: usize,
    hi: usize,
    /// (split value, left child, right child); None for a leaf.
    split: Option<(f64, usize, usize)>,
}

impl Tree {
    /// ehg126 (bounding vertices) and ehg124 (splits), cells breadth first.
    fn build(xs: &[f64], fc: usize) -> Tree {
        let n = xs.len();
        let (alpha, beta) = (xs[0], xs[n - 1]);
        let mu = 0.005 * (beta - alpha).max(1e-10 * alpha.abs().max(beta.abs()) + 1e-30);
        let mut vertices = vec![alpha - mu, beta + mu];
        // (l, u) 1-based inclusive ranges of sorted points, per cell.
        let mut ranges = vec![(1usize, n)];
        let mut cells = vec![Cell { lo: 0, hi: 1, split: None }];
        let nvmax = n.max(200);
        let mut p = 0;
        while p < cells.len() {
            let (l, u) = ranges[p];
            let (vl, vu) = (cells[p].lo, cells[p].hi);
            let diam = vertices[vu] - vertices[vl];
            let mut leaf = u + 1 - l <= fc || diam <= 0.0 || nvmax < cells.len() + 2 || nvmax < vertices.len() + 1;
            let mut m = (l + u) / 2;
            if !leaf {
                // Move the split off a run of equal values: offsets 0, +1, -1, +2, -2, ...
                let mut offset: isize = 0;
                loop {
                    let mo = m as isize + offset;
                    if !(l as isize <= mo && mo < u as isize) {
                        break;
                    }
                    let mo = mo as usize;
                    if xs[mo - 1] == xs[mo] {
                        offset = -offset;
                        if offset >= 0 {
                            offset += 1;
                        }
                    } else {
                        m = mo;
                        break;
                    }
                }
                let xi = xs[m - 1];
                leaf = vertices[vl] == xi || vertices[vu] == xi;
                if !leaf {
                    let v = match vertices.iter().position(|&t| t == xi) {
                        Some(v) => v,
                        None => {
                            vertices.push(xi);
                            vertices.len() - 1
                        },
                    };
                    let left = cells.len();
                    cells.push(Cell { lo: vl, hi: v, split: None });
                    ranges.push((l, m));
                    cells.push(Cell { lo: v, hi: vu, split: None });
                    ranges.push((m + 1, u));
                    cells[p].split = Some((xi, left, left + 1));
                }
            }
            p += 1;
        }
        Tree { vertices, cells }
    }

    /// ehg128: the cubic Hermite blend of the leaf's vertex values and slopes.
    fn blend(&self, z: f64, fits: &[(f64, f64)]) -> f64 {
        let mut j = 0;
        while let Some((xi, left, right)) = self.cells[j].split {
            j = if z <= xi { left } else { right };
        }
        let c = &self.cells[j];
        let (v0, v1) = (self.vertices[c.lo], self.vertices[c.hi]);
        let ((g0, d0), (g1, d1)) = (fits[c.lo], fits[c.hi]);
        let h = (z - v0) / (v1 - v0);
        let phi0 = (1.0 - h).powi(2) * (1.0 + 2.0 * h);
        let phi1 = h * h * (3.0 - 2.0 * h);
        let psi0 = h * (1.0 - h).powi(2);
        let psi1 = h * h * (h - 1.0);
        phi0 * g0 + phi1 * g1 + (psi0 * d0 + psi1 * d1) * (v1 - v0)
    }
}

/// ehg127: the weighted quadratic through the `nf` points nearest `q`
/// (`xs` sorted); returns its value and slope at `q`.
fn local_fit(xs: &[f64], ys: &[f64], q: f64, nf: usize, span: f64) -> Result<(f64, f64), KernelError> {
    let n = xs.len();
    // The window [lo, lo + nf) whose farthest point from q is nearest.
    let (mut lo, mut hi) = (0usize, n - nf);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if mid + nf < n && q - xs[mid] > xs[mid + nf] - q {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let window = lo..lo + nf;
    let rho = xs[window.clone()].iter().map(|x| (x - q) * (x - q)).fold(0.0, f64::max) * span.max(1.0);
    let mut b = Mat::<f64>::zeros(nf, 3);
    let mut eta = vec![0.0; nf];
    for (r, i) in window.enumerate() {
        let dx = xs[i] - q;
        let t = if rho > 0.0 { ((dx * dx) / rho).sqrt() } else { 0.0 };
        let w = ((1.0 - t * t * t).powi(3)).max(0.0).sqrt();
        b[(r, 0)] = w;
        b[(r, 1)] = w * dx;
        b[(r, 2)] = w * (dx * dx); // dloess' order of the products
        eta[r] = w * ys[i];
    }
    // Equilibrate the columns (dloess does, before its QR).
    let mut colnor = [1.0; 3];
    for (k, c) in colnor.iter_mut().enumerate() {
        let s = (0..nf).map(|r| b[(r, k)] * b[(r, k)]).sum::<f64>().sqrt();
        if s > 0.0 {
            *c = s;
            (0..nf).for_each(|r| b[(r, k)] /= s);
        }
    }
    let svd = b.thin_svd().map_err(|e| KernelError::Invalid(format!("loess: the local fit at {q} did not converge ({e:?})")))?;
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let s: Vec<f64> = (0..3).map(|k| s[k]).collect();
    let tol = s.iter().copied().fold(0.0, f64::max) * 100.0 * f64::EPSILON;
    let mut coef = [0.0; 3];
    for k in 0..3 {
        if s[k] > tol {
            let g = (0..nf).map(|r| u[(r, k)] * eta[r]).sum::<f64>() / s[k];
            for (j, c) in coef.iter_mut().enumerate() {
                *c += v[(j, k)] * g;
            }
        }
    }
    Ok((coef[0] / colnor[0], coef[1] / colnor[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quadratic_is_reproduced_exactly() {
        // Every local quadratic fit of a quadratic is the quadratic itself,
        // and the Hermite blend of a quadratic's values and slopes is exact.
        let x: Vec<f64> = (0..400).map(|i| ((i * 37) % 400) as f64 / 40.0 - 3.0).collect();
        let y: Vec<f64> = x.iter().map(|x| 0.5 * x * x - 2.0 * x + 1.0).collect();
        let fit = loess(&x, &y, 0.3, 0.2).unwrap();
        for (f, t) in fit.iter().zip(&y) {
            assert!((f - t).abs() < 1e-9, "{f} vs {t}");
        }
    }

    #[test]
    fn ties_share_a_value_and_only_their_order_matters() {
        // Many equal x (as genes of equal mean): the split moves off the tie.
        let x: Vec<f64> = (0..300).map(|i| if i % 3 == 0 { 1.0 } else { (i as f64).ln() }).collect();
        let y: Vec<f64> = x.iter().enumerate().map(|(i, x)| x.sin() + (i % 7) as f64 * 0.01).collect();
        let fit = loess(&x, &y, 0.3, 0.2).unwrap();
        let tied: Vec<f64> = (0..300).filter(|i| i % 3 == 0).map(|i| fit[i]).collect();
        assert!(tied.windows(2).all(|w| w[0] == w[1]));
        // Points are taken in x order, ties in input order (which decides
        // which of them enter a window): any permutation that keeps the tied
        // points' relative order gives the same bits.
        let perm: Vec<usize> = (0..300).rev().filter(|i| i % 3 != 0).chain((0..300).filter(|i| i % 3 == 0)).collect();
        let (xp, yp): (Vec<f64>, Vec<f64>) = perm.iter().map(|&i| (x[i], y[i])).unzip();
        let fit_p = loess(&xp, &yp, 0.3, 0.2).unwrap();
        for (k, &i) in perm.iter().enumerate() {
            assert_eq!(fit_p[k].to_bits(), fit[i].to_bits());
        }
    }

    #[test]
    fn too_few_points_is_an_error() {
        assert!(loess(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], 0.3, 0.2).is_err());
        assert!(loess(&[1.0, f64::NAN], &[1.0, 2.0], 1.0, 0.2).is_err());
    }
}
