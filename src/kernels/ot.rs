//! Entropic optimal transport between two weighted point clouds, in the log
//! domain: balanced, or unbalanced with a KL penalty on the marginals
//! (Chizat et al. 2018, "Scaling algorithms for unbalanced transport").
//!
//! The plan is the one POT computes with
//! `ot.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl")` (and, with
//! `reg_m = ∞`, `ot.sinkhorn_log(a, b, M, reg)`):
//!
//!   P_ij = a_i b_j exp(φ_i + ψ_j − M_ij/ε),
//!   φ_i = −λ LSE_j(ψ_j + ln b_j − M_ij/ε),  ψ_j = −λ LSE_i(φ_i + ln a_i − M_ij/ε),
//!
//! with λ = ρ/(ρ + ε) (1 when balanced). POT iterates the scalings
//! u = e^φ, v = e^ψ, which overflow or underflow once M/ε is beyond ~700
//! (far-apart clouds, small ε): the reference method's failure. Log-sum-exp
//! never does.

use rayon::prelude::*;

use crate::error::KernelError;

/// Options of one Sinkhorn solve.
#[derive(Debug, Clone, Copy)]
pub struct SinkhornParams {
    /// Entropic regularisation ε, in the units of the cost.
    pub epsilon: f64,
    /// Marginal relaxation ρ (KL penalty weight); `f64::INFINITY` = balanced.
    pub reg_m: f64,
    /// Iterations at most; the fit says whether `tol` was reached.
    pub max_iter: usize,
    /// Stop when no dual potential (in units of ε) moves by more than this
    /// times the largest potential (or 1, if all are smaller).
    pub tol: f64,
}

/// The dual potentials (in units of ε: φ = ln u, ψ = ln v) and how the solve went.
#[derive(Debug, Clone)]
pub struct SinkhornFit {
    /// Row potentials φ, one per source point (`a.len()`).
    pub phi: Vec<f64>,
    /// Column potentials ψ, one per target point (`b.len()`).
    pub psi: Vec<f64>,
    /// Iterations run.
    pub iterations: usize,
    /// Whether `delta` fell below `tol` within `max_iter` iterations.
    pub converged: bool,
    /// The last iteration's largest potential change, relative to max(1, the largest |potential|).
    pub delta: f64,
}

/// e^x for x ≤ 0, to about 1 ulp; 0 below −708 (where e^x < 1e−307 adds
/// nothing next to the log-sum-exp's largest term, which is 1). Written so
/// LLVM vectorises it (no table, no branch, the 2^k scale built from the bits
/// of a rounded float): `f64::exp` is a scalar libm call; this doubled the
/// Sinkhorn's throughput (criterion bench `sinkhorn`: 184 → 365 M terms/s).
#[inline(always)]
fn exp_nonpos(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 split in two so k·LN2_HI is exact for |k| < 2^11.
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5·2^52 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let xc = if x < -708.0 { -708.0 } else { x };
    let kr = xc * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = (xc - k * LN2_HI) - k * LN2_LO; // |r| ≤ ln2/2
    // Taylor to degree 12: the remainder r^13/13! < 2e−16 on |r| ≤ 0.347.
    let mut p = 1.0 / 479_001_600.0;
    for c in [
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // 2^k for k in [−1022, 0]: (k + 1023) in the exponent field; the shift
    // drops the rounding constant's bits above them.
    let two_k = f64::from_bits(kr.to_bits().wrapping_add(1023) << 52);
    if x < -708.0 {
        0.0
    } else {
        p * two_k
    }
}

/// ln Σ_j exp(w_j − c_j), four lanes at a time in a fixed order (the same
/// bits with or without AVX2, at any thread count).
#[inline(always)]
fn lse_generic(w: &[f64], c: &[f64]) -> f64 {
    let mut mx = [f64::NEG_INFINITY; 4];
    let (mut iw, mut ic) = (w.chunks_exact(4), c.chunks_exact(4));
    for (a, b) in (&mut iw).zip(&mut ic) {
        for l in 0..4 {
            let t = a[l] - b[l];
            mx[l] = if t > mx[l] { t } else { mx[l] };
        }
    }
    let mut m = mx[0].max(mx[1]).max(mx[2].max(mx[3]));
    for (a, b) in iw.remainder().iter().zip(ic.remainder()) {
        m = m.max(a - b);
    }
    if m == f64::NEG_INFINITY {
        return m;
    }
    // The exponentials of a block first, then their sum: independent
    // iterations let the CPU overlap the polynomials' latency (2.5× faster
    // than summing as they come, measured on this machine's EPYC).
    let mut acc = [0f64; 4];
    let mut buf = [0f64; 64];
    let (mut iw, mut ic) = (w.chunks_exact(64), c.chunks_exact(64));
    for (a, b) in (&mut iw).zip(&mut ic) {
        for i in 0..64 {
            buf[i] = exp_nonpos(a[i] - b[i] - m);
        }
        for k in 0..16 {
            for l in 0..4 {
                acc[l] += buf[4 * k + l];
            }
        }
    }
    let tail: f64 = iw.remainder().iter().zip(ic.remainder()).map(|(a, b)| exp_nonpos(a - b - m)).sum();
    m + ((acc[0] + acc[1]) + (acc[2] + acc[3]) + tail).ln()
}

fn lse(w: &[f64], c: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { lse_avx2(w, c) };
    }
    lse_generic(w, c)
}

/// The same loop with 4-wide vectors (no FMA: the same bits as the generic build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lse_avx2(w: &[f64], c: &[f64]) -> f64 {
    lse_generic(w, c)
}

/// ln Σ_i exp(v_i), for the short vectors of the translation step.
fn lse_iter(vals: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = vals.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + vals.map(|v| (v - m).exp()).sum::<f64>().ln()
}

/// e^x for x ≤ 0 in float32, to about 2 ulp (Cephes' `expf` polynomial on
/// the same range reduction as [`exp_nonpos`]); 0 below −87 (e^−87 < 2e−38
/// adds nothing next to the largest term, 1).
#[inline(always)]
fn exp_nonpos_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // exact in 9 bits, so k·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23
    // Fused multiply-adds: half the instructions, and (being exactly
    // rounded) the same bits on every CPU: with FMA hardware one
    // instruction, without it libm's fmaf.
    let xc = if x < -87.0 { -87.0 } else { x };
    let kr = xc.mul_add(LOG2E, ROUND);
    let k = kr - ROUND;
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3f32, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    // 2^k for k in [−126, 0], as in exp_nonpos.
    let two_k = f32::from_bits(kr.to_bits().wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * two_k
    }
}

/// [`lse_generic`] in float32, 64 lanes at a time (four AVX-512 or eight
/// AVX2 registers): twice the lanes and a third of the polynomial. Partial sums
/// go to float64 every 1024 terms, so the sum of n terms is good to ~1e−6
/// relative whatever n; `w − c` is rounded to float32, an error of ~6e−8
/// times |w| + |c|, which the Sinkhorn's stopping rule measures against
/// (potentials relative to the largest). Fixed lane order: the same bits
/// with or without AVX, at any thread count.
#[inline(always)]
fn lse32_generic(w: &[f32], c: &[f32]) -> f64 {
    // 64 lanes = four independent AVX-512 registers: one would wait on its
    // own max / add latency every 16 terms (measured: the max pass alone was
    // a third of the time).
    const L: usize = LANES;
    let mut mx = [f32::NEG_INFINITY; L];
    let (mut iw, mut ic) = (w.chunks_exact(L), c.chunks_exact(L));
    for (a, b) in (&mut iw).zip(&mut ic) {
        for l in 0..L {
            let t = a[l] - b[l];
            mx[l] = if t > mx[l] { t } else { mx[l] };
        }
    }
    let mut m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for (a, b) in iw.remainder().iter().zip(ic.remainder()) {
        m = m.max(a - b);
    }
    if m == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut acc = [0f64; L];
    let (mut bw, mut bc) = (w.chunks_exact(1024), c.chunks_exact(1024));
    for (a, b) in (&mut bw).zip(&mut bc) {
        exp_block(a, b, m, &mut acc);
    }
    let (rw, rc) = (bw.remainder(), bc.remainder());
    let full = rw.len() / L * L;
    exp_block(&rw[..full], &rc[..full], m, &mut acc);
    let tail: f64 = rw[full..].iter().zip(&rc[full..]).map(|(a, b)| exp_nonpos_f32((a - b) - m) as f64).sum();
    let mut s = tail;
    for pair in acc.chunks_exact(2) {
        s += pair[0] + pair[1];
    }
    m as f64 + s.ln()
}

const LANES: usize = 64;

/// acc[l] += Σ exp(w − c − m) over lane l of a block (a multiple of 64
/// terms, at most 1024: 16 float32 additions per lane, exact to ~1e−6).
/// A function, not a closure: a closure is compiled apart from the caller's
/// `target_feature` and would not vectorise.
#[inline(always)]
fn exp_block(w: &[f32], c: &[f32], m: f32, acc: &mut [f64; LANES]) {
    let mut part = [0f32; LANES];
    for (a, b) in w.chunks_exact(LANES).zip(c.chunks_exact(LANES)) {
        for l in 0..LANES {
            part[l] += exp_nonpos_f32((a[l] - b[l]) - m);
        }
    }
    for l in 0..LANES {
        acc[l] += part[l] as f64;
    }
}

fn lse32(w: &[f32], c: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX-512F and FMA (checked just above).
            return unsafe { lse32_avx512(w, c) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { lse32_avx2(w, c) };
        }
    }
    lse32_generic(w, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lse32_avx2(w: &[f32], c: &[f32]) -> f64 {
    lse32_generic(w, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn lse32_avx512(w: &[f32], c: &[f32]) -> f64 {
    lse32_generic(w, c)
}

/// The float type of one phase's cost matrix.
trait Precision: Copy + Send + Sync {
    fn from_f64(v: f64) -> Self;
    fn lse(w: &[Self], c: &[Self]) -> f64;
}

impl Precision for f64 {
    fn from_f64(v: f64) -> Self {
        v
    }
    fn lse(w: &[f64], c: &[f64]) -> f64 {
        lse(w, c)
    }
}

impl Precision for f32 {
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn lse(w: &[f32], c: &[f32]) -> f64 {
        lse32(w, c)
    }
}

/// A cost matrix scaled by 1/ε, row-major and transposed (so the column
/// update also reads contiguous memory), in the precision of one phase.
struct Scaled<T> {
    rows: Vec<T>,
    cols: Vec<T>,
}

impl<T: Precision> Scaled<T> {
    fn new(cost: &[f64], n: usize, m: usize, eps: f64) -> Self {
        let rows: Vec<T> = cost.par_iter().map(|c| T::from_f64(c / eps)).collect();
        let mut cols = vec![T::from_f64(0.0); n * m];
        // In bands of 64 columns, 64 × 64 tiles each: a plain transpose
        // strides a cache line per element. (Made once per solve, it took as
        // long as 20 iterations when serial and untiled.)
        cols.par_chunks_mut(64 * n).enumerate().for_each(|(band, out)| {
            let j0 = band * 64;
            let width = out.len() / n;
            for i0 in (0..n).step_by(64) {
                for dj in 0..width {
                    for i in i0..(i0 + 64).min(n) {
                        out[dj * n + i] = rows[i * m + j0 + dj];
                    }
                }
            }
        });
        Scaled { rows, cols }
    }

    /// −λ LSE_j(pot_j + logm_j − C_ij/ε) for every row i of `mat` (rows of length pot.len()).
    fn update(mat: &[T], pot: &[f64], logm: &[f64], lam: f64) -> Vec<f64> {
        let w: Vec<T> = pot.iter().zip(logm).map(|(s, l)| T::from_f64(s + l)).collect();
        mat.par_chunks(pot.len()).map(|row| -lam * T::lse(&w, row)).collect()
    }
}

/// The cost matrix of the phase running: float32 first, float64 after.
enum Phase {
    F32(Scaled<f32>),
    F64(Scaled<f64>),
}

impl Phase {
    /// New row potentials from the column ones (`logm`: ln of the column masses).
    fn rows(&self, psi: &[f64], logm: &[f64], lam: f64) -> Vec<f64> {
        match self {
            Phase::F32(s) => Scaled::update(&s.rows, psi, logm, lam),
            Phase::F64(s) => Scaled::update(&s.rows, psi, logm, lam),
        }
    }

    /// New column potentials from the row ones (`logm`: ln of the row masses).
    fn cols(&self, phi: &[f64], logm: &[f64], lam: f64) -> Vec<f64> {
        match self {
            Phase::F32(s) => Scaled::update(&s.cols, phi, logm, lam),
            Phase::F64(s) => Scaled::update(&s.cols, phi, logm, lam),
        }
    }
}

/// Iterations run in float32 until every potential has settled to within
/// this (relative, as `tol`), then in float64 until `tol`: float32 has
/// twice the lanes and a third of the polynomial, and its rounding (~1e−7
/// relative to the largest potential) stays 100× under this point. A `tol`
/// at or above it (fit_integration's 1e-4) is reached in float32 alone, in
/// the same iterations as float64 (test below); the pipeline benchmark's
/// integration stage went from 126 to 49 s with it and the other changes
/// of that commit.
const F32_UNTIL: f64 = 1e-5;

fn check_inputs(a: &[f64], b: &[f64], cost: &[f64], p: &SinkhornParams) -> Result<(), KernelError> {
    if a.is_empty() || b.is_empty() {
        return Err(KernelError::Invalid("optimal transport needs at least one point on each side".into()));
    }
    if cost.len() != a.len() * b.len() {
        return Err(KernelError::Shape { what: "cost matrix entries (rows × columns)", expected: a.len() * b.len(), got: cost.len() });
    }
    for (side, w) in [("source", a), ("target", b)] {
        if let Some(&bad) = w.iter().find(|&&x| !(x > 0.0 && x.is_finite())) {
            return Err(KernelError::Invalid(format!("{side} mass {bad} is not a positive finite number")));
        }
    }
    if let Some(&bad) = cost.iter().find(|c| !c.is_finite()) {
        return Err(KernelError::Invalid(format!("cost {bad} is not finite")));
    }
    if p.reg_m.is_infinite() {
        let (sa, sb) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
        if (sa - sb).abs() > 1e-9 * sa.max(sb) {
            return Err(KernelError::Invalid(format!(
                "balanced transport needs equal total masses, got {sa} and {sb}: normalise them or pass a finite reg_m"
            )));
        }
    }
    if !(p.epsilon > 0.0 && p.epsilon.is_finite()) {
        return Err(KernelError::Invalid(format!("epsilon must be a positive number, got {}", p.epsilon)));
    }
    if p.reg_m.is_nan() || p.reg_m <= 0.0 {
        return Err(KernelError::Invalid(format!("reg_m must be positive (or infinite for balanced OT), got {}", p.reg_m)));
    }
    if p.max_iter == 0 {
        return Err(KernelError::Invalid("max_iter must be at least 1".into()));
    }
    Ok(())
}

/// Solve for the potentials. `cost` is row-major (a.len() × b.len()).
/// Rows (and columns) update independently, so the result does not depend
/// on the thread count.
///
/// `init_phi`: the row potentials to start from (a warm start, e.g. the last
/// solve's for the same rows against a target that moved a little); the
/// column potentials are then its c-transform. The fixed point is the same
/// as from zero; only the iterations to reach it differ.
pub fn sinkhorn_log(a: &[f64], b: &[f64], cost: &[f64], p: &SinkhornParams, init_phi: Option<&[f64]>) -> Result<SinkhornFit, KernelError> {
    solve(a, b, cost, p, init_phi, fast_f32().then_some(F32_UNTIL))
}

/// Whether the float32 iterations are the fast ones here: an x86-64 CPU
/// without FMA would run each `mul_add` of the float32 exp through libm's
/// software `fmaf`, slower than float64 throughout (same results either way).
fn fast_f32() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
            && (std::arch::is_x86_feature_detected!("avx2") || std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true // aarch64 always has FMA
    }
}

/// [`sinkhorn_log`], with float32 iterations until `f32_until` (`None`:
/// float64 throughout, which the tests compare against).
fn solve(a: &[f64], b: &[f64], cost: &[f64], p: &SinkhornParams, init_phi: Option<&[f64]>, f32_until: Option<f64>) -> Result<SinkhornFit, KernelError> {
    check_inputs(a, b, cost, p)?;
    if let Some(init) = init_phi {
        if init.len() != a.len() {
            return Err(KernelError::Shape { what: "initial row potentials", expected: a.len(), got: init.len() });
        }
        if let Some(&bad) = init.iter().find(|v| !v.is_finite()) {
            return Err(KernelError::Invalid(format!("initial potential {bad} is not finite")));
        }
    }
    let (n, m) = (a.len(), b.len());
    let eps = p.epsilon;
    let lam = if p.reg_m.is_infinite() { 1.0 } else { p.reg_m / (p.reg_m + eps) };
    let la: Vec<f64> = a.iter().map(|x| x.ln()).collect();
    let lb: Vec<f64> = b.iter().map(|x| x.ln()).collect();
    let mut phase = match f32_until {
        Some(_) => Phase::F32(Scaled::new(cost, n, m, eps)),
        None => Phase::F64(Scaled::new(cost, n, m, eps)),
    };
    let f32_until = f32_until.unwrap_or(0.0);
    let (mut phi, mut psi) = (vec![0.0; n], vec![0.0; m]);
    if let Some(init) = init_phi {
        phi.copy_from_slice(init);
        psi = phase.cols(&phi, &la, lam);
    }
    let (mut iterations, mut converged, mut delta) = (0, false, f64::INFINITY);
    // Over-relaxation (Thibault et al. 2017): near the fixed point plain
    // Sinkhorn contracts by a steady factor κ per iteration (0.97 on
    // integration problems: 70 iterations per decade of `tol`); stepping ω =
    // 2/(1+√(1−κ)) past each update speeds that up. Measured on the
    // Tahoe-design centroids: 252 → 211 iterations on average at tol 1e-6,
    // as the rate there keeps changing and ω often falls back. κ is measured
    // on plain iterations first; any rise of delta falls back to ω = 1. The
    // fixed point, and so the plan, is the same.
    let mut omega = 1.0f64;
    let mut prev_delta = f64::INFINITY;
    let mut ratios: Vec<f64> = Vec::new();
    for it in 0..p.max_iter {
        let mut new_phi = phase.rows(&psi, &lb, lam);
        if omega != 1.0 {
            new_phi.iter_mut().zip(&phi).for_each(|(v, old)| *v = old + omega * (*v - old));
        }
        let mut new_psi = phase.cols(&new_phi, &la, lam);
        if omega != 1.0 {
            new_psi.iter_mut().zip(&psi).for_each(|(v, old)| *v = old + omega * (*v - old));
        }
        if p.reg_m.is_finite() {
            // Translation-invariant step (Séjourné, Vialard & Peyré 2022):
            // the dual is exactly maximised along φ + t, ψ − t. Plain
            // unbalanced Sinkhorn moves that mode by a factor ρ/(ρ+ε) per
            // iteration (0.98 at ρ = 3, ε = 0.05): hundreds of iterations
            // that this closed form does in one. The fixed point is the same.
            let r = eps / p.reg_m;
            let sa = lse_iter(new_phi.iter().zip(&la).map(|(f, l)| l - r * f));
            let sb = lse_iter(new_psi.iter().zip(&lb).map(|(g, l)| l - r * g));
            let t = 0.5 * (sa - sb) / r;
            new_phi.iter_mut().for_each(|f| *f += t);
            new_psi.iter_mut().for_each(|g| *g -= t);
        }
        // Relative to the largest potential (at least 1): far-apart clouds
        // have potentials of ~cost/ε, where float64 resolves no finer.
        let size = new_phi.iter().chain(&new_psi).fold(1.0f64, |m, v| m.max(v.abs()));
        delta = phi
            .iter()
            .zip(&new_phi)
            .chain(psi.iter().zip(&new_psi))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / size;
        phi = new_phi;
        psi = new_psi;
        iterations = it + 1;
        if !delta.is_finite() {
            return Err(KernelError::Invalid(format!(
                "Sinkhorn diverged at iteration {iterations} (epsilon {eps}, reg_m {}); raise epsilon",
                p.reg_m
            )));
        }
        if let (Phase::F32(fast), true) = (&mut phase, p.tol < f32_until) {
            if delta < f32_until {
                *fast = Scaled { rows: Vec::new(), cols: Vec::new() }; // freed before the float64 copies are made
                phase = Phase::F64(Scaled::new(cost, n, m, eps));
            }
        } else if delta < p.tol {
            converged = true;
            break;
        }
        if omega == 1.0 {
            if delta < 1e-2 && prev_delta.is_finite() && prev_delta > 0.0 {
                ratios.push(delta / prev_delta);
                // A steady rate: the last 5 ratios agree to 1%.
                if ratios.len() >= 5 {
                    let r = &ratios[ratios.len() - 5..];
                    let (lo, hi) = r.iter().fold((f64::INFINITY, 0.0f64), |(a, b), &v| (a.min(v), b.max(v)));
                    if hi < 1.0 && hi - lo < 0.01 * hi {
                        omega = 2.0 / (1.0 + (1.0 - hi).sqrt());
                    }
                }
            }
        } else if delta > prev_delta {
            omega = 1.0;
            ratios.clear();
        }
        prev_delta = delta;
    }
    Ok(SinkhornFit { phi, psi, iterations, converged, delta })
}

/// The transport plan of a fit, row-major (a.len() × b.len()).
pub fn plan(a: &[f64], b: &[f64], cost: &[f64], fit: &SinkhornFit, epsilon: f64) -> Vec<f64> {
    let m = b.len();
    let mut out = vec![0.0; a.len() * m];
    out.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
        // The exponent's row maximum factored out, so every term goes
        // through the vectorised exp_nonpos (libm's exp per term cost as
        // much as 10 Sinkhorn iterations).
        let c = &cost[i * m..(i + 1) * m];
        for (j, o) in row.iter_mut().enumerate() {
            *o = fit.phi[i] + fit.psi[j] - c[j] / epsilon;
        }
        let top = row.iter().fold(f64::NEG_INFINITY, |x, &y| x.max(y));
        let scale = (a[i].ln() + top).exp();
        if scale.is_finite() {
            for (o, bj) in row.iter_mut().zip(b) {
                *o = bj * exp_nonpos(*o - top) * scale;
            }
        } else {
            // a_i·e^top overflows (a fit far from converged): term by term,
            // so a negligible entry stays 0 rather than ∞ · 0.
            for (o, bj) in row.iter_mut().zip(b) {
                *o = (a[i].ln() + bj.ln() + *o).exp();
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(x: &[f64], y: &[f64]) -> Vec<f64> {
        x.iter().flat_map(|a| y.iter().map(move |b| (a - b) * (a - b))).collect()
    }

    #[test]
    fn exp_nonpos_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -710.0 * (i as f64 / 200_000.0).powi(3);
            let (got, want) = (exp_nonpos(x), x.exp());
            if x >= -708.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst < 1e-15, "relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        // 71 = one 64-block and a scalar tail; the result equals a plain sum.
        let w: Vec<f64> = (0..71).map(|i| (i % 13) as f64 * 0.3).collect();
        let c: Vec<f64> = (0..71).map(|i| (i * i % 17) as f64 * 0.1).collect();
        let want = w.iter().zip(&c).map(|(a, b)| (a - b).exp()).sum::<f64>().ln();
        assert!((lse(&w, &c) - want).abs() < 1e-13 * want.abs().max(1.0));
    }

    #[test]
    fn float32_exp_and_lse_match_float64() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -90.0 * (i as f64 / 100_000.0).powi(2);
            let (got, want) = (exp_nonpos_f32(x as f32) as f64, (x as f32 as f64).exp());
            if x >= -87.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst < 3e-7, "relative error {worst}"); // ~2 ulp of float32
        // Lengths around the 64-lane blocks, the 1024-term flushes and a tail;
        // potentials of size ~300 (units of ε), as in fit_integration.
        for n in [1usize, 63, 64, 65, 1023, 1024, 1100, 4096 + 37] {
            let w: Vec<f64> = (0..n).map(|i| 300.0 + ((i * 7919) % 101) as f64 * 0.37).collect();
            let c: Vec<f64> = (0..n).map(|i| 310.0 + ((i * 104_729) % 97) as f64 * 0.41).collect();
            let (w32, c32): (Vec<f32>, Vec<f32>) = (w.iter().map(|&v| v as f32).collect(), c.iter().map(|&v| v as f32).collect());
            let (got, want) = (lse32(&w32, &c32), lse(&w, &c));
            // Rounding w and c to float32 moves each term by ≤ 2·300·6e-8.
            assert!((got - want).abs() < 1e-4, "n = {n}: {got} vs {want}");
            assert_eq!(got.to_bits(), lse32_generic(&w32, &c32).to_bits(), "n = {n}: SIMD and generic differ");
        }
    }

    #[test]
    fn tiled_transpose_equals_a_plain_one() {
        // Partial last band (200 = 3·64 + 8 columns) and partial row tile (130 = 2·64 + 2).
        let (n, m) = (130usize, 200usize);
        let cost: Vec<f64> = (0..n * m).map(|k| k as f64).collect();
        let s: Scaled<f64> = Scaled::new(&cost, n, m, 2.0);
        for i in 0..n {
            for j in 0..m {
                assert_eq!(s.rows[i * m + j], cost[i * m + j] / 2.0);
                assert_eq!(s.cols[j * n + i], cost[i * m + j] / 2.0, "({i}, {j})");
            }
        }
    }

    #[test]
    fn float32_iterations_give_the_float64_plan() {
        let x: Vec<f64> = (0..300).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
        let y: Vec<f64> = (0..200).map(|j| (j as f64 * 0.91).cos() * 3.0 + 0.5).collect();
        let (a, b) = (vec![1.0 / 300.0; 300], vec![1.0 / 200.0; 200]);
        let c = costs(&x, &y);
        let top = |pl: &[f64]| pl.iter().cloned().fold(0.0, f64::max);
        let worst = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| (u - v).abs()).fold(0.0, f64::max);
        // fit_integration's tol (≥ F32_UNTIL): float32 alone, against float64
        // alone. The same path to the same stopping point: float32 rounding
        // (~1e−7 relative in a potential) is all that differs.
        let p = SinkhornParams { epsilon: 0.05, reg_m: 3.0, max_iter: 100_000, tol: 1e-4 };
        let (f32s, f64s) = (sinkhorn_log(&a, &b, &c, &p, None).unwrap(), solve(&a, &b, &c, &p, None, None).unwrap());
        assert!(f32s.converged && f64s.converged);
        assert_eq!(f32s.iterations, f64s.iterations);
        let (p32, p64) = (plan(&a, &b, &c, &f32s, 0.05), plan(&a, &b, &c, &f64s, 0.05));
        assert!(worst(&p32, &p64) < 1e-5 * top(&p64), "{:e}", worst(&p32, &p64) / top(&p64));
        if fast_f32() {
            assert!(p32 != p64, "the float32 path was not taken"); // its rounding shows somewhere
        }
        // A tight tol: float32 then float64, to float64's own fixed point.
        let p = SinkhornParams { tol: 1e-12, ..p };
        let (mixed, f64s) = (sinkhorn_log(&a, &b, &c, &p, None).unwrap(), solve(&a, &b, &c, &p, None, None).unwrap());
        assert!(mixed.converged && f64s.converged);
        let (pm, p64) = (plan(&a, &b, &c, &mixed, 0.05), plan(&a, &b, &c, &f64s, 0.05));
        assert!(worst(&pm, &p64) < 1e-9 * top(&p64), "{:e}", worst(&pm, &p64) / top(&p64));
    }

    #[test]
    fn balanced_plan_has_the_marginals() {
        let (x, y) = ([0.0, 1.0, 2.0], [0.5, 1.5]);
        let (a, b) = ([0.2, 0.3, 0.5], [0.6, 0.4]);
        let c = costs(&x, &y);
        let p = SinkhornParams { epsilon: 0.1, reg_m: f64::INFINITY, max_iter: 10_000, tol: 1e-13 };
        let fit = sinkhorn_log(&a, &b, &c, &p, None).unwrap();
        assert!(fit.converged);
        let pl = plan(&a, &b, &c, &fit, 0.1);
        for i in 0..3 {
            assert!((pl[i * 2] + pl[i * 2 + 1] - a[i]).abs() < 1e-10);
        }
        for j in 0..2 {
            assert!(((0..3).map(|i| pl[i * 2 + j]).sum::<f64>() - b[j]).abs() < 1e-10);
        }
    }

    #[test]
    fn far_apart_clouds_do_not_underflow() {
        // M/ε ≈ 1e7: the scaling form gives 0/0; the log form a finite plan.
        // The diagonal saves 2 cost units = 20 ε over the anti-diagonal.
        let (x, y) = ([0.0, 1.0], [1000.0, 1001.0]);
        let c = costs(&x, &y);
        let p = SinkhornParams { epsilon: 0.1, reg_m: f64::INFINITY, max_iter: 1000, tol: 1e-12 };
        let fit = sinkhorn_log(&[0.5, 0.5], &[0.5, 0.5], &c, &p, None).unwrap();
        let pl = plan(&[0.5, 0.5], &[0.5, 0.5], &c, &fit, 0.1);
        assert!(pl.iter().all(|v| v.is_finite()));
        assert!((pl.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(pl[0] > 0.49 && pl[3] > 0.49, "{pl:?}"); // 0→1000, 1→1001
    }

    #[test]
    fn warm_start_reaches_the_same_plan_sooner() {
        // Rows against a target, then against the target moved a little:
        // started from the first solve's row potentials, the second solve
        // ends at the plan a cold start reaches, in fewer iterations.
        let x: Vec<f64> = (0..60).map(|i| (i as f64 * 0.37).sin() * 3.0).collect();
        let y: Vec<f64> = (0..50).map(|j| (j as f64 * 0.91).cos() * 3.0 + 0.5).collect();
        let y2: Vec<f64> = y.iter().map(|v| v + 0.05).collect();
        let a = vec![1.0 / 60.0; 60];
        let b = vec![1.0 / 50.0; 50];
        let p = SinkhornParams { epsilon: 0.05, reg_m: 3.0, max_iter: 100_000, tol: 1e-12 };
        let first = sinkhorn_log(&a, &b, &costs(&x, &y), &p, None).unwrap();
        let c2 = costs(&x, &y2);
        let cold = sinkhorn_log(&a, &b, &c2, &p, None).unwrap();
        let warm = sinkhorn_log(&a, &b, &c2, &p, Some(&first.phi)).unwrap();
        assert!(cold.converged && warm.converged);
        assert!(warm.iterations < cold.iterations, "{} vs {}", warm.iterations, cold.iterations);
        let (pc, pw) = (plan(&a, &b, &c2, &cold, 0.05), plan(&a, &b, &c2, &warm, 0.05));
        let worst = pc.iter().zip(&pw).map(|(u, v)| (u - v).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-9 * pc.iter().cloned().fold(0.0, f64::max), "{worst}");
        // A start of the wrong length or not finite is an error, not a panic.
        assert!(sinkhorn_log(&a, &b, &c2, &p, Some(&first.phi[1..])).is_err());
        let mut bad = first.phi.clone();
        bad[3] = f64::NAN;
        assert!(sinkhorn_log(&a, &b, &c2, &p, Some(&bad)).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = SinkhornParams { epsilon: 0.1, reg_m: 1.0, max_iter: 10, tol: 1e-9 };
        assert!(sinkhorn_log(&[], &[1.0], &[], &p, None).is_err());
        assert!(sinkhorn_log(&[0.0], &[1.0], &[1.0], &p, None).is_err());
        assert!(sinkhorn_log(&[1.0], &[1.0], &[f64::NAN], &p, None).is_err());
        assert!(sinkhorn_log(&[1.0], &[1.0], &[1.0, 2.0], &p, None).is_err());
        assert!(sinkhorn_log(&[1.0], &[1.0], &[1.0], &SinkhornParams { epsilon: 0.0, ..p }, None).is_err());
        assert!(sinkhorn_log(&[1.0], &[2.0], &[1.0], &SinkhornParams { reg_m: f64::INFINITY, ..p }, None).is_err());
    }
}
