//! The CUDA backend (`--features cuda`), written so the two devices give the
//! same answers.
//!
//! - knn / knn_interpolate / k-means assignment: a float32 cuBLAS GEMM of a
//!   block of rows against all centres, then one warp per row keeps the
//!   `cap` smallest ‖c‖² − 2x·c (the CPU's ranking key). Those candidates are
//!   re-ranked by exact float64 distance as the CPU's own search does: on
//!   the GPU for knn_interpolate (`GATHER_SOURCE`, which also gathers), on
//!   the CPU for knn. Results differ from the CPU path only where the two
//!   GEMMs' rounding puts a different set of candidates in front (more than
//!   `RERANK_EXTRA` centres inside the rounding band).
//! - pca_project: one warp per row, the same float32 sum in the same order
//!   with contraction disabled (`__fmul_rn`/`__fadd_rn`): bit-identical.
//! - fit_pca's Gram matrix: rows scattered into a dense float64 block, then
//!   a float64 GEMM accumulates XᵀX on the device. Products of float32 values
//!   are exact in float64; only the order of the sums differs from the CPU.
//!
//! Reached through [`super`]'s free functions, never directly by a kernel.
//!
//! cudarc loads libcuda, libcublas and libnvrtc at run time, so this builds
//! without a CUDA toolkit. `gpu()` probes for the driver before touching it
//! (cudarc panics without one) and turns any failure, panics included, into
//! an error that says what is missing. One process-wide context and stream;
//! callers take turns (a mutex), as Polars may call from many threads.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::Block;
use crate::error::KernelError;
use crate::kernels::SparseRow;

/// Candidates per row the top-k kernel can keep (registers/local memory per
/// lane); `knn` asks for k + RERANK_EXTRA.
pub const MAX_CAP: usize = 64;

/// Bytes of GEMM output (rows × centres float32) per block of rows: large
/// blocks keep the GEMM efficient against tens of thousands of centres.
const DOTS_BYTES: usize = 1 << 30;
/// Rows per block at most (pinned staging: 65536 × d × 4 bytes, twice).
const MAX_BLOCK: usize = 65_536;
/// Bytes of the dense float64 block the Gram accumulation scatters into.
const DENSE_BYTES: usize = 256 << 20;

const SOURCE: &str = r#"
#define MAX_CAP 64
// One warp per row of `dots` (row-major, n_rows x m): the `cap` smallest
// norms[j] - 2*dots[j], ascending, ties to the lower j. Each lane keeps a
// sorted list of its strided share; the warp then merges the 32 lists.
extern "C" __global__ void topk_rows(const float* dots, const float* norms, int n_rows, int m, int cap,
                                     unsigned int* out) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n_rows) return;  // whole warps exit together
    float vals[MAX_CAP];
    unsigned int idx[MAX_CAP];
    int len = 0;
    const float* d = dots + (size_t)row * m;
    for (int j = lane; j < m; j += 32) {
        float v = __fsub_rn(norms[j], __fmul_rn(2.0f, d[j]));
        if (v != v) v = __int_as_float(0x7f800000);  // NaN (inf - inf) ranks last, never breaks the merge
        if (len < cap || v < vals[cap - 1]) {
            int p = len < cap ? len++ : cap - 1;
            while (p > 0 && vals[p - 1] > v) { vals[p] = vals[p - 1]; idx[p] = idx[p - 1]; p--; }
            vals[p] = v; idx[p] = (unsigned int)j;
        }
    }
    int ptr = 0;
    for (int t = 0; t < cap; t++) {
        float v = ptr < len ? vals[ptr] : __int_as_float(0x7f800000);
        unsigned int j = ptr < len ? idx[ptr] : 0xffffffffu;
        float bv = v; unsigned int bj = j;
        for (int off = 16; off > 0; off >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, off);
            unsigned int oj = __shfl_xor_sync(0xffffffffu, bj, off);
            if (ov < bv || (ov == bv && oj < bj)) { bv = ov; bj = oj; }
        }
        if (ptr < len && j == bj) ptr++;
        if (lane == 0) out[(size_t)row * cap + t] = bj;
    }
}

// One warp per sparse row: y = sum_p v_p * W[g_p, :] - offset, in the CPU's
// order and rounding (no FMA contraction).
extern "C" __global__ void project_rows(const unsigned long long* indptr, const unsigned int* gidx,
                                        const float* vals, const float* w, const float* offset,
                                        int n_rows, int k, float* out) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    unsigned long long a = indptr[row], b = indptr[row + 1];
    for (int c = lane; c < k; c += 32) {
        float y = 0.0f;
        for (unsigned long long p = a; p < b; p++) y = __fadd_rn(y, __fmul_rn(vals[p], w[(size_t)gidx[p] * k + c]));
        out[(size_t)row * k + c] = __fsub_rn(y, offset[c]);
    }
}

// One warp per sparse row: scatter it into a zeroed dense float64 row.
extern "C" __global__ void densify_rows(const unsigned long long* indptr, const unsigned int* gidx,
                                        const float* vals, int n_rows, int g, double* dense) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    for (unsigned long long p = indptr[row] + lane; p < indptr[row + 1]; p += 32)
        dense[(size_t)row * g + gidx[p]] = (double)vals[p];
}
"#;

/// The exact half of `knn_interpolate` on the GPU, written to give the CPU's
/// bits: `sq_dist_f64`'s four float64 partial sums in the same order, the
/// candidates ranked by (distance, index), the weights with float64 sqrt and
/// divisions (IEEE on the GPU), the gather as float32 multiply-then-add per
/// neighbour in rank order. Compiled apart from `SOURCE`: if it fails, the
/// CPU does this part and nothing else changes.
const GATHER_SOURCE: &str = r#"
#define MAX_CAP 64
#define WARPS 8
extern "C" __global__ void rerank_gather(const float* x, const float* cen, const float* disp, const unsigned int* cand,
                                         int n_rows, int d, int cap, int k, double min_dist, float* y) {
    __shared__ double part[WARPS][MAX_CAP * 4];
    __shared__ double dist[WARPS][MAX_CAP];
    __shared__ unsigned int idx[WARPS][MAX_CAP];
    __shared__ double sd[WARPS][MAX_CAP];
    __shared__ unsigned int si[WARPS][MAX_CAP];
    __shared__ float w[WARPS][MAX_CAP];
    int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long long row = (long long)blockIdx.x * WARPS + wid;
    if (row >= n_rows) return;  // whole warps exit together
    const float* xr = x + (size_t)row * d;
    const unsigned int* cr = cand + (size_t)row * cap;
    int d4 = d & ~3;
    // Partial sum l of candidate t: dimensions l, l+4, l+8, ... in order.
    for (int p = lane; p < cap * 4; p += 32) {
        int t = p >> 2, l = p & 3;
        const float* c = cen + (size_t)cr[t] * d;
        double acc = 0.0;
        for (int q = l; q < d4; q += 4) {
            double u = __dsub_rn((double)xr[q], (double)c[q]);
            acc = __dadd_rn(acc, __dmul_rn(u, u));
        }
        part[wid][p] = acc;
    }
    __syncwarp();
    for (int t = lane; t < cap; t += 32) {
        const double* pp = &part[wid][t * 4];
        double s = __dadd_rn(__dadd_rn(__dadd_rn(pp[0], pp[1]), pp[2]), pp[3]);
        const float* c = cen + (size_t)cr[t] * d;
        double tail = 0.0;
        for (int q = d4; q < d; q++) {
            double u = __dsub_rn((double)xr[q], (double)c[q]);
            double uu = __dmul_rn(u, u);
            tail = q == d4 ? uu : __dadd_rn(tail, uu);
        }
        if (d4 < d) s = __dadd_rn(s, tail);
        dist[wid][t] = s;
        idx[wid][t] = cr[t];
    }
    __syncwarp();
    // Rank of each candidate by (distance, index): indices are distinct, so
    // the ranks are a permutation.
    for (int t = lane; t < cap; t += 32) {
        double dt = dist[wid][t];
        unsigned int it = idx[wid][t];
        int r = 0;
        for (int u = 0; u < cap; u++) {
            double du = dist[wid][u];
            unsigned int iu = idx[wid][u];
            r += (du < dt) || (du == dt && iu < it);
        }
        sd[wid][r] = dt;
        si[wid][r] = it;
    }
    __syncwarp();
    if (lane == 0) {
        double inv = 0.0;
        for (int t = 0; t < k; t++) {
            double a = __ddiv_rn(1.0, fmax(__dsqrt_rn(sd[wid][t]), min_dist));
            inv = t == 0 ? a : __dadd_rn(inv, a);
        }
        for (int t = 0; t < k; t++)
            w[wid][t] = __double2float_rn(__ddiv_rn(__ddiv_rn(1.0, fmax(__dsqrt_rn(sd[wid][t]), min_dist)), inv));
    }
    __syncwarp();
    float* yr = y + (size_t)row * d;
    for (int q = lane; q < d; q += 32) {
        float v = xr[q];
        for (int t = 0; t < k; t++) v = __fadd_rn(v, __fmul_rn(w[wid][t], disp[(size_t)si[wid][t] * d + q]));
        yr[q] = v;
    }
}
"#;

pub struct Gpu {
    description: String,
    inner: Mutex<Inner>,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    topk: CudaFunction,
    project: CudaFunction,
    densify: CudaFunction,
    /// `rerank_gather`, or why it did not compile (then the CPU gathers).
    gather: Result<CudaFunction, String>,
    /// Buffers of the search, kept between calls (pinned allocations are slow).
    search: Option<SearchBuffers>,
}

/// The gather's moved rows on the device and pinned on the host, double-buffered.
type MovedRows = ([CudaSlice<f32>; 2], [PinnedHostSlice<f32>; 2]);

/// Double-buffered staging for `candidates_each`: rows go host → pinned →
/// device, candidates device → pinned → host, two blocks in flight.
struct SearchBuffers {
    rows: usize,
    d: usize,
    m: usize,
    cap: usize,
    pin_x: [PinnedHostSlice<f32>; 2],
    pin_o: [PinnedHostSlice<u32>; 2],
    xb: [CudaSlice<f32>; 2],
    ob: [CudaSlice<u32>; 2],
    dots: CudaSlice<f32>,
    /// For the gather on the GPU: moved rows, device and pinned (made on first use).
    moved: Option<MovedRows>,
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// The process's GPU, started on first use; the same error every time when
/// it cannot start.
pub fn gpu() -> Result<&'static Gpu, KernelError> {
    GPU.get_or_init(start).as_ref().map_err(|e| KernelError::Invalid(format!("device='cuda' is not available: {e}")))
}

fn start() -> Result<Gpu, String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda.so) could be loaded; use device='cpu'".into());
    }
    match std::panic::catch_unwind(start_unchecked) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("the CUDA runtime failed to start: {}", msg.unwrap_or_else(|| "unknown panic".into())))
        },
    }
}

fn start_unchecked() -> Result<Gpu, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: &dyn std::fmt::Debug| format!("{what}: {err:?}")
    };
    let n = CudaContext::device_count().map_err(|x| e("the driver loaded but cuInit failed")(&x))?;
    if n < 1 {
        return Err("the driver loaded but sees no GPU".into());
    }
    // SAFETY: only try to dlopen the libraries, so a missing one is an error
    // here rather than a panic inside cudarc later.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas (CUDA 12 or 13) is not on the library path; install the CUDA runtime libraries \
                    or add their folder to LD_LIBRARY_PATH"
            .into());
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc (CUDA 12 or 13) is not on the library path; install the CUDA runtime libraries \
                    or add their folder to LD_LIBRARY_PATH"
            .into());
    }
    let ctx = CudaContext::new(0).map_err(|x| e("could not create a context on GPU 0")(&x))?;
    let stream = ctx.new_stream().map_err(|x| e("could not create a stream")(&x))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|x| e("cuBLAS failed to start")(&x))?;
    // fmad off: the kernels' arithmetic must round like the CPU's.
    let opts = CompileOptions { fmad: Some(false), ..Default::default() };
    let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|x| e("NVRTC could not compile the kernels")(&x))?;
    let module = ctx.load_module(ptx).map_err(|x| e("could not load the kernels")(&x))?;
    let f = |name: &str| module.load_function(name).map_err(|x| e(name)(&x));
    let (topk, project, densify) = (f("topk_rows")?, f("project_rows")?, f("densify_rows")?);
    let gather = compile_ptx_with_opts(GATHER_SOURCE, CompileOptions { fmad: Some(false), ..Default::default() })
        .map_err(|x| format!("NVRTC: {x:?}"))
        .and_then(|ptx| ctx.load_module(ptx).map_err(|x| format!("{x:?}")))
        .and_then(|m| m.load_function("rerank_gather").map_err(|x| format!("{x:?}")));
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    let mem = ctx.total_mem().unwrap_or(0) >> 20;
    let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
    Ok(Gpu {
        description: format!(
            "{name} (compute capability {major}.{minor}, {mem} MiB){}",
            match &gather {
                Ok(_) => String::new(),
                Err(e) => format!("; exact re-rank and gather on the CPU (the GPU kernel failed: {e})"),
            }
        ),
        inner: Mutex::new(Inner { ctx, stream, blas, topk, project, densify, gather, search: None }),
    })
}

fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Invalid(format!("CUDA {what} failed: {e:?}"))
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> KernelError {
    KernelError::Invalid(format!("cuBLAS GEMM failed: {e:?}"))
}

/// One warp per row, 8 warps per block.
fn warps(n_rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n_rows as u32).div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn int(n: usize, what: &str) -> Result<i32, KernelError> {
    i32::try_from(n).map_err(|_| KernelError::Invalid(format!("{what} = {n} is too large for one GPU call")))
}

/// Centres on the device, uploaded once per index and kept with it.
pub struct DeviceCentres {
    m: usize,
    d: usize,
    centres: CudaSlice<f32>,
    norms: CudaSlice<f32>,
    displacement: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for DeviceCentres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceCentres({} × {})", self.m, self.d)
    }
}

impl Gpu {
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, KernelError> {
        // A panic under the lock (a bug) must not disable the GPU for the rest
        // of the process: drop the buffers it may have left half-used.
        let g = self.inner.lock().unwrap_or_else(|poisoned| {
            let mut g = poisoned.into_inner();
            g.search = None;
            g
        });
        g.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        Ok(g)
    }

    pub fn upload_centres(
        &self,
        centres: &[f32],
        norms: &[f32],
        displacement: Option<&[f32]>,
        d: usize,
    ) -> Result<DeviceCentres, KernelError> {
        let g = self.lock()?;
        let up = |v: &[f32]| g.stream.clone_htod(v).map_err(driver_err("upload"));
        Ok(DeviceCentres {
            m: norms.len(),
            d,
            centres: up(centres)?,
            norms: up(norms)?,
            displacement: displacement.map(up).transpose()?,
        })
    }

    /// Whether `search_each` can gather on the GPU (its kernel compiled).
    pub fn gathers(&self) -> bool {
        self.inner.lock().is_ok_and(|g| g.gather.is_ok())
    }

    /// For each row of `x` (row-major, `c.d` wide): the `cap` centres with the
    /// smallest float32 ‖c‖² − 2x·c, ascending (ties to the lower index).
    /// Returns n × cap indices.
    pub fn candidates(&self, x: &[f32], c: &DeviceCentres, cap: usize) -> Result<Vec<u32>, KernelError> {
        let mut out = vec![0u32; (x.len() / c.d) * cap];
        self.search_each(x, c, cap, None, |row0, block| {
            if let Block::Candidates(cand) = block {
                out[row0 * cap..row0 * cap + cand.len()].copy_from_slice(cand);
            }
        })?;
        Ok(out)
    }

    /// `candidates` block by block: `each(first_row, block)` runs on the CPU
    /// while the GPU searches the next block, and the next block's rows are
    /// staged into pinned memory while the GPU searches this one. Blocks come
    /// in row order. With `gather = Some(k)` (centres uploaded with their
    /// displacements, `gathers()` true) the GPU also re-ranks and gathers, and
    /// each block is the moved rows (`Block::Moved`), as `knn::interpolate`
    /// would write them.
    pub fn search_each(
        &self,
        x: &[f32],
        c: &DeviceCentres,
        cap: usize,
        gather: Option<usize>,
        mut each: impl FnMut(usize, Block<'_>),
    ) -> Result<(), KernelError> {
        let (d, m) = (c.d, c.m);
        if cap == 0 || cap > MAX_CAP || cap > m {
            return Err(KernelError::Invalid(format!(
                "device='cuda' keeps at most {MAX_CAP} candidates per row (and no more than the {m} centres); \
                 asked for {cap}: lower k or use device='cpu'"
            )));
        }
        let n = x.len() / d;
        if n == 0 {
            return Ok(());
        }
        let block = (DOTS_BYTES / (4 * m)).clamp(1, MAX_BLOCK).min(n);
        let (m_i, d_i, cap_i) = (int(m, "centres")?, int(d, "width")?, cap as i32);
        let mut guard = self.lock()?;
        let g = &mut *guard;
        let fits = |b: &SearchBuffers| b.rows >= block && b.d == d && b.m >= m && b.cap >= cap;
        if !g.search.as_ref().is_some_and(fits) {
            g.search = None; // free the old buffers first
            g.search = Some(SearchBuffers::new(&g.ctx, &g.stream, block, d, m, cap)?);
        }
        let buf = g.search.as_mut().expect("just made");
        let (s, blas, topk) = (&g.stream, &g.blas, &g.topk);
        let gather = match gather {
            None => None,
            Some(k) => {
                let f = g.gather.as_ref().map_err(|e| KernelError::Invalid(format!("the GPU gather is unavailable: {e}")))?;
                let disp = c.displacement.as_ref().ok_or_else(|| KernelError::Invalid("these centres have no displacements".into()))?;
                if k == 0 || k > cap {
                    return Err(KernelError::Invalid(format!("k = {k} must be between 1 and the {cap} candidates")));
                }
                if buf.moved.is_none() {
                    let err = driver_err("allocation");
                    // Sized for the buffers' rows, not this call's block: a
                    // later call may use larger blocks of the same buffers.
                    let len = buf.rows * buf.d;
                    // SAFETY: written by the kernel / the download before any read.
                    let dev = |_| unsafe { s.alloc::<f32>(len) }.map_err(&err);
                    let pin = |_| unsafe { g.ctx.alloc_pinned_with_flags::<f32>(len, 0) }.map_err(&err);
                    buf.moved = Some(([dev(0)?, dev(1)?], [pin(0)?, pin(1)?]));
                }
                Some((f, disp, k as i32))
            },
        };
        let blocks: Vec<&[f32]> = x.chunks(block * d).collect();
        // Stage block i's rows into pinned buffer i % 2 (waits until that
        // buffer's previous copy to the device has finished).
        let stage = |buf: &mut SearchBuffers, i: usize| -> Result<(), KernelError> {
            let dst = buf.pin_x[i % 2].as_mut_slice().map_err(driver_err("pinned staging"))?;
            // Scoped threads, not rayon: see `kernels::scoped_for_each`.
            let pieces: Vec<_> = dst[..blocks[i].len()].chunks_mut(1 << 18).zip(blocks[i].chunks(1 << 18)).collect();
            crate::kernels::scoped_for_each(pieces, |(a, b)| a.copy_from_slice(b));
            Ok(())
        };
        let enqueue = |buf: &mut SearchBuffers, i: usize| -> Result<(), KernelError> {
            let j = i % 2;
            let b = blocks[i].len() / d;
            s.memcpy_htod(&buf.pin_x[j], &mut buf.xb[j]).map_err(driver_err("upload"))?;
            // Column-major view: dots(m × b) = C(d × m)ᵀ · X(d × b), i.e.
            // row-major dots[i·m + j] = x_i · c_j.
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: m_i,
                n: b as i32,
                k: d_i,
                alpha: 1.0f32,
                lda: d_i,
                ldb: d_i,
                beta: 0.0f32,
                ldc: m_i,
            };
            // SAFETY: the buffers hold m·d, block·d and block·m elements, b ≤ block.
            unsafe { blas.gemm(cfg, &c.centres, &buf.xb[j], &mut buf.dots) }.map_err(blas_err)?;
            let mut launch = s.launch_builder(topk);
            let b_i = b as i32;
            launch.arg(&buf.dots).arg(&c.norms).arg(&b_i).arg(&m_i).arg(&cap_i).arg(&mut buf.ob[j]);
            // SAFETY: the kernel's arguments match its signature; it reads
            // b·m dots and m norms and writes b·cap indices.
            unsafe { launch.launch(warps(b)) }.map_err(driver_err("top-k kernel"))?;
            match (&gather, &mut buf.moved) {
                (Some((f, disp, k)), Some((yb, pin_y))) => {
                    let mut launch = s.launch_builder(f);
                    launch
                        .arg(&buf.xb[j])
                        .arg(&c.centres)
                        .arg(*disp)
                        .arg(&buf.ob[j])
                        .arg(&b_i)
                        .arg(&d_i)
                        .arg(&cap_i)
                        .arg(k)
                        .arg(&crate::kernels::distance::MIN_DIST)
                        .arg(&mut yb[j]);
                    // SAFETY: arguments match the kernel; candidates are < m,
                    // so every centre/displacement read is inside m × d.
                    unsafe { launch.launch(warps(b)) }.map_err(driver_err("gather kernel"))?;
                    s.memcpy_dtoh(&yb[j], &mut pin_y[j]).map_err(driver_err("download"))?;
                },
                _ => s.memcpy_dtoh(&buf.ob[j], &mut buf.pin_o[j]).map_err(driver_err("download"))?,
            }
            Ok(())
        };
        stage(buf, 0)?;
        enqueue(buf, 0)?;
        for i in 0..blocks.len() {
            if i + 1 < blocks.len() {
                stage(buf, i + 1)?;
                enqueue(buf, i + 1)?;
            }
            let b = blocks[i].len() / d;
            // Waits for block i's download only; block i + 1 runs meanwhile.
            match (&gather, &buf.moved) {
                (Some(_), Some((_, pin_y))) => {
                    let y = pin_y[i % 2].as_slice().map_err(driver_err("download"))?;
                    each(i * block, Block::Moved(&y[..b * d]));
                },
                _ => {
                    let cand = buf.pin_o[i % 2].as_slice().map_err(driver_err("download"))?;
                    each(i * block, Block::Candidates(&cand[..b * cap]));
                },
            }
        }
        Ok(())
    }

    /// `pca_project` on the GPU: rows validated against `n_genes`,
    /// `loadings` (n_genes × k) and `offset` (k) as the CPU projector holds them.
    /// A PCA model's loadings (n_genes × k, gene-major) and offset (k,) on
    /// the device, kept with the model.
    pub fn upload_loadings(&self, loadings: &[f32], offset: &[f32], k: usize) -> Result<DeviceLoadings, KernelError> {
        let g = self.lock()?;
        let up = |v: &[f32]| g.stream.clone_htod(v).map_err(driver_err("upload"));
        Ok(DeviceLoadings { k, loadings: up(loadings)?, offset: up(offset)? })
    }

    pub fn project(&self, rows: &[SparseRow<'_>], m: &DeviceLoadings) -> Result<Vec<f32>, KernelError> {
        let k = m.k;
        let n = rows.len();
        let mut out = vec![0f32; n * k];
        if n == 0 {
            return Ok(out);
        }
        let (indptr, gidx, vals) = csr(rows);
        let g = self.lock()?;
        let s = &g.stream;
        let up = |e| driver_err("upload")(e);
        let (ip, gi, va) = (s.clone_htod(&indptr).map_err(up)?, s.clone_htod(&gidx).map_err(up)?, s.clone_htod(&vals).map_err(up)?);
        let mut y = unsafe { s.alloc::<f32>(n * k) }.map_err(driver_err("allocation"))?;
        let (n_i, k_i) = (int(n, "rows")?, int(k, "n_comps")?);
        let mut launch = s.launch_builder(&g.project);
        launch.arg(&ip).arg(&gi).arg(&va).arg(&m.loadings).arg(&m.offset).arg(&n_i).arg(&k_i).arg(&mut y);
        // SAFETY: arguments match the kernel; indptr has n + 1 entries bounding gidx/vals.
        unsafe { launch.launch(warps(n)) }.map_err(driver_err("projection kernel"))?;
        s.memcpy_dtoh(&y, &mut out[..]).map_err(driver_err("download"))?;
        Ok(out)
    }

    pub fn new_gram(&self, n_genes: usize) -> Result<DeviceGram, KernelError> {
        let g = self.lock()?;
        let gram = g.stream.alloc_zeros::<f64>(n_genes * n_genes).map_err(driver_err("allocation"))?;
        Ok(DeviceGram { n_genes, gram })
    }

    /// gram += XᵀX for validated rows (indices < n_genes).
    pub fn add_gram(&self, acc: &mut DeviceGram, rows: &[SparseRow<'_>]) -> Result<(), KernelError> {
        let ng = acc.n_genes;
        let block = (DENSE_BYTES / (8 * ng)).clamp(1, 65_536).min(rows.len().max(1));
        let g_i = int(ng, "n_genes")?;
        let g = self.lock()?;
        let s = &g.stream;
        let mut dense = unsafe { s.alloc::<f64>(block * ng) }.map_err(driver_err("allocation"))?;
        for chunk in rows.chunks(block) {
            let b = chunk.len();
            let (indptr, gidx, vals) = csr(chunk);
            let up = |e| driver_err("upload")(e);
            let (ip, gi, va) = (s.clone_htod(&indptr).map_err(up)?, s.clone_htod(&gidx).map_err(up)?, s.clone_htod(&vals).map_err(up)?);
            s.memset_zeros(&mut dense).map_err(driver_err("memset"))?;
            let b_i = b as i32;
            let mut launch = s.launch_builder(&g.densify);
            launch.arg(&ip).arg(&gi).arg(&va).arg(&b_i).arg(&g_i).arg(&mut dense);
            // SAFETY: arguments match the kernel; rows are validated, so every
            // index is < n_genes and the writes stay inside b × n_genes.
            unsafe { launch.launch(warps(b)) }.map_err(driver_err("densify kernel"))?;
            // Column-major: dense is A (n_genes × b); gram += A·Aᵀ.
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: g_i,
                n: g_i,
                k: b_i,
                alpha: 1.0f64,
                lda: g_i,
                ldb: g_i,
                beta: 1.0f64,
                ldc: g_i,
            };
            // SAFETY: dense holds ≥ b·n_genes elements, gram n_genes².
            unsafe { g.blas.gemm(cfg, &dense, &dense, &mut acc.gram) }.map_err(blas_err)?;
        }
        s.synchronize().map_err(driver_err("synchronize"))?;
        Ok(())
    }

    /// The accumulated XᵀX, row-major (symmetric).
    pub fn read_gram(&self, acc: &DeviceGram) -> Result<Vec<f64>, KernelError> {
        let g = self.lock()?;
        g.stream.clone_dtoh(&acc.gram).map_err(driver_err("download"))
    }
}

impl SearchBuffers {
    fn new(ctx: &Arc<CudaContext>, s: &Arc<CudaStream>, rows: usize, d: usize, m: usize, cap: usize) -> Result<Self, KernelError> {
        let err = driver_err("allocation");
        // SAFETY: every buffer is written before it is read (staging, GEMM,
        // kernel, download), and only the written prefix is used.
        unsafe {
            // Write-combined for the rows (the host only writes them); plain
            // pinned for the candidates (the host reads them).
            let px = |_| ctx.alloc_pinned::<f32>(rows * d).map_err(&err);
            let po = |_| ctx.alloc_pinned_with_flags::<u32>(rows * cap, 0).map_err(&err);
            let xb = |_| s.alloc::<f32>(rows * d).map_err(&err);
            let ob = |_| s.alloc::<u32>(rows * cap).map_err(&err);
            Ok(SearchBuffers {
                rows,
                d,
                m,
                cap,
                pin_x: [px(0)?, px(1)?],
                pin_o: [po(0)?, po(1)?],
                xb: [xb(0)?, xb(1)?],
                ob: [ob(0)?, ob(1)?],
                dots: s.alloc::<f32>(rows * m).map_err(&err)?,
                moved: None,
            })
        }
    }
}

/// A PCA model's projection operands on the device.
pub struct DeviceLoadings {
    k: usize,
    loadings: CudaSlice<f32>,
    offset: CudaSlice<f32>,
}

impl std::fmt::Debug for DeviceLoadings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceLoadings({} components)", self.k)
    }
}

/// XᵀX accumulated on the device.
pub struct DeviceGram {
    n_genes: usize,
    gram: CudaSlice<f64>,
}

/// Rows as CSR arrays (u64 offsets: a block may hold more than 4G entries).
fn csr(rows: &[SparseRow<'_>]) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    let nnz: usize = rows.iter().map(|r| r.gene_idx.len()).sum();
    let mut indptr = Vec::with_capacity(rows.len() + 1);
    let (mut gidx, mut vals) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
    indptr.push(0u64);
    for r in rows {
        gidx.extend_from_slice(r.gene_idx);
        vals.extend_from_slice(r.values);
        indptr.push(gidx.len() as u64);
    }
    // cudarc cannot upload an empty slice; one padding entry is never read.
    if gidx.is_empty() {
        gidx.push(0);
        vals.push(0.0);
    }
    (indptr, gidx, vals)
}

// The seam's functions (`super` re-exports them; `stub.rs` has the same).

/// A description of the GPU, or why CUDA cannot be used.
pub fn status() -> Result<String, KernelError> {
    gpu().map(|g| g.describe())
}

/// Upload an index's centres (m × d, row-major), their squared norms ‖c‖²
/// (m) and, for `knn_interpolate`, their displacements (m × d); the handle
/// is kept with the index.
pub fn upload_centres(centres: &[f32], norms: &[f32], displacement: Option<&[f32]>, d: usize) -> Result<DeviceCentres, KernelError> {
    gpu()?.upload_centres(centres, norms, displacement, d)
}

/// Whether [`search_each`] can also re-rank and gather on the GPU (CUDA
/// started and the gather kernel compiled).
pub fn gathers() -> bool {
    gpu().is_ok_and(|g| g.gathers())
}

/// For each row of `x` (row-major, as wide as the centres): the `cap`
/// (at most 64) centres with the smallest float32 ‖c‖² − 2x·c, ascending
/// (ties to the lower index). Returns n × cap indices.
pub fn candidates(x: &[f32], c: &DeviceCentres, cap: usize) -> Result<Vec<u32>, KernelError> {
    gpu()?.candidates(x, c, cap)
}

/// [`candidates`] block by block: `each(first_row, block)` runs on the CPU,
/// in row order, while the GPU searches the next block. With
/// `gather = Some(k)` (centres uploaded with displacements, [`gathers`]
/// true) each block is the moved rows ([`Block::Moved`]) instead.
pub fn search_each(x: &[f32], c: &DeviceCentres, cap: usize, gather: Option<usize>, each: impl FnMut(usize, Block<'_>)) -> Result<(), KernelError> {
    gpu()?.search_each(x, c, cap, gather, each)
}

/// Upload a PCA model's loadings (n_genes × k, gene-major) and offset (k)
/// for [`project`]; the handle is kept with the model.
pub fn upload_loadings(loadings: &[f32], offset: &[f32], k: usize) -> Result<DeviceLoadings, KernelError> {
    gpu()?.upload_loadings(loadings, offset, k)
}

/// `pca_project` on the GPU: each row (validated against the model's genes)
/// times the loadings, minus the offset; n × k row-major, bit-identical to
/// the CPU.
pub fn project(rows: &[SparseRow<'_>], m: &DeviceLoadings) -> Result<Vec<f32>, KernelError> {
    gpu()?.project(rows, m)
}

/// A zeroed n_genes × n_genes XᵀX accumulator on the device (`fit_pca`).
pub fn new_gram(n_genes: usize) -> Result<DeviceGram, KernelError> {
    gpu()?.new_gram(n_genes)
}

/// `acc += XᵀX` for validated rows (gene indices < n_genes).
pub fn add_gram(acc: &mut DeviceGram, rows: &[SparseRow<'_>]) -> Result<(), KernelError> {
    gpu()?.add_gram(acc, rows)
}

/// The accumulated XᵀX, row-major n_genes × n_genes (symmetric).
pub fn read_gram(acc: &DeviceGram) -> Result<Vec<f64>, KernelError> {
    gpu()?.read_gram(acc)
}
