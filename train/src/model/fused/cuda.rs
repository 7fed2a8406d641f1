//! CUDA versions of the fused ops whose candle counterparts have no fast differentiable path:
//! RMSNorm, SwiGLU, RoPE, the causal softmax and the cross-entropy, each forward and backward.
//! The kernels are `train/kernels/fused.cu`, compiled to PTX by `build.rs` with nvcc; storage may be
//! f32 or bf16, arithmetic is f32. The matrix products around them stay candle's (cuBLAS).
//!
//! Each function here is the `cuda_fwd` of the op of the same name in the sibling modules and takes
//! the same inputs as its `cpu_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "cpt-fused";

/// Threads per block: row kernels reduce over a row with one block; wide rows get more threads.
fn row_threads(width: usize) -> u32 {
    if width >= 8192 {
        1024
    } else {
        256
    }
}

fn per_row(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(width), 1, 1), shared_mem_bytes: 0 }
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Runs `$body` with `$t` as the Rust type of `$dtype`'s storage.
macro_rules! by_dtype {
    ($dtype:expr, $name:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            dtype => bail!("{}: no CUDA kernel for {dtype:?}", $name),
        }
    };
}

/// Launches kernel `name` (for `dtype`'s storage) with `args` pushed in order.
macro_rules! launch {
    ($dev:expr, $name:expr, $dtype:expr, $config:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func(&kernel_name($name, $dtype)?, MODULE, PTX)?;
        // One statement, so that temporary arguments live until the launch.
        // SAFETY: the argument list matches the kernel's signature in fused.cu, and every buffer
        // holds the elements the kernel indexes (checked by the callers' shapes).
        unsafe { func.builder()$(.arg($arg))+.launch($config) }.w()?;
    }};
}

/// The kernel `name` for `dtype`'s storage, as fused.cu instantiates it.
fn kernel_name(name: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        dtype => bail!("{name}: no CUDA kernel for {dtype:?}"),
    };
    Ok(format!("{name}_{suffix}"))
}

/// The contiguous elements behind `layout` as `T`.
fn view<'a, T: CudaDType + DeviceRepr>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("fused CUDA ops take contiguous inputs"),
    }
}

/// An output buffer of `n` elements; the kernels write every one.
fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: uninitialised device memory, fully written by the kernel before anyone reads it.
    unsafe { dev.alloc::<T>(n) }
}

fn width(layout: &Layout) -> usize {
    layout.dims().last().copied().unwrap_or(1)
}

fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} of {n} is too large for the CUDA kernels")))
}

/// RMSNorm forward: `(x, weight)` → `x · r · w`.
pub(super) fn rms_norm(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (h, n) = (width(lx), lx.shape().elem_count());
    let storage = by_dtype!(x.dtype(), "rms-norm", T => {
        let (xs, ws) = (view::<T>(x, lx)?, view::<T>(w, lw)?);
        let mut out = output::<T>(dev, n)?;
        launch!(dev, "rms_norm_fwd", x.dtype(), per_row(n / h, h), &xs, &ws, &mut out, &int(h, "row")?, &(eps as f32));
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, lx.shape().clone()))
}

/// RMSNorm's input gradient, or (`weight`) its weight gradient, from `(x, weight, grad)`.
pub(super) fn rms_norm_grad(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    eps: f64,
    weight: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (h, n) = (width(lx), lx.shape().elem_count());
    let rows = n / h;
    let (hi, eps) = (int(h, "row")?, eps as f32);
    let storage = by_dtype!(x.dtype(), "rms-norm-grad", T => {
        let (xs, ws, gs) = (view::<T>(x, lx)?, view::<T>(w, lw)?, view::<T>(g, lg)?);
        if weight {
            // Per-block partial sums, then a fixed-order column sum: deterministic, no atomics.
            let rows_per_block = 64;
            let blocks = rows.div_ceil(rows_per_block).max(1);
            let mut partial = output::<f32>(dev, blocks * h)?;
            let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), ..per_row(1, h) };
            launch!(dev, "rms_norm_bwd_w", x.dtype(), config, &xs, &gs, &mut partial, &int(rows, "rows")?, &hi, &eps,
                &(rows_per_block as i32));
            let mut out = output::<T>(dev, h)?;
            launch!(dev, "column_sum", x.dtype(), elementwise(h), &partial, &mut out, &(blocks as i32), &hi);
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        } else {
            let mut out = output::<T>(dev, n)?;
            launch!(dev, "rms_norm_bwd_x", x.dtype(), per_row(rows, h), &xs, &ws, &gs, &mut out, &hi, &eps);
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }
    });
    Ok((storage, if weight { lw.shape().clone() } else { lx.shape().clone() }))
}

/// SwiGLU of packed `[gate | up]` rows → `(.., inter)`.
pub(super) fn swiglu(x: &CudaStorage, lx: &Layout, shape: Shape) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (inter, n) = (width(lx) / 2, shape.elem_count());
    let storage = by_dtype!(x.dtype(), "swiglu", T => {
        let xs = view::<T>(x, lx)?;
        let mut out = output::<T>(dev, n)?;
        launch!(dev, "swiglu_fwd", x.dtype(), elementwise(n), &xs, &mut out, &(n as i64), &int(inter, "inter")?);
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, shape))
}

/// The packed SwiGLU input's gradient from `(x, grad)`.
pub(super) fn swiglu_grad(x: &CudaStorage, lx: &Layout, g: &CudaStorage, lg: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (inter, n) = (width(lx) / 2, lg.shape().elem_count());
    let storage = by_dtype!(x.dtype(), "swiglu-grad", T => {
        let (xs, gs) = (view::<T>(x, lx)?, view::<T>(g, lg)?);
        let mut out = output::<T>(dev, 2 * n)?;
        launch!(dev, "swiglu_bwd", x.dtype(), elementwise(n), &xs, &gs, &mut out, &(n as i64), &int(inter, "inter")?);
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, lx.shape().clone()))
}

/// The rotary embedding of `x: (.., seq, d)`, or (`transposed`) its inverse, from `(x, cos, sin)`.
pub(super) fn rope(
    (x, lx): (&CudaStorage, &Layout),
    (cos, lc): (&CudaStorage, &Layout),
    (sin, ls): (&CudaStorage, &Layout),
    transposed: bool,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (d, n) = (width(lx), lx.shape().elem_count());
    let seq = lc.shape().elem_count() / d.max(1);
    let storage = by_dtype!(x.dtype(), "rope", T => {
        let (xs, cs, ss) = (view::<T>(x, lx)?, view::<T>(cos, lc)?, view::<T>(sin, ls)?);
        let mut out = output::<T>(dev, n)?;
        launch!(dev, "rope", x.dtype(), elementwise(n / 2), &xs, &cs, &ss, &mut out, &((n / d) as i64),
            &int(seq, "seq")?, &int(d, "head dim")?, &(transposed as i32));
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, lx.shape().clone()))
}

/// The window as the kernels take it: at most the row length.
fn window(window: usize, s: usize) -> Result<i32> {
    int(window.min(s), "window")
}

/// The causal softmax of scaled scores `(.., s, s)`.
pub(super) fn causal_softmax(x: &CudaStorage, lx: &Layout, scale: f64, w: usize) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (s, n) = (width(lx), lx.shape().elem_count());
    let storage = by_dtype!(x.dtype(), "causal-softmax", T => {
        let xs = view::<T>(x, lx)?;
        let mut out = output::<T>(dev, n)?;
        launch!(dev, "causal_softmax_fwd", x.dtype(), per_row(n / s, s), &xs, &mut out, &int(s, "keys")?,
            &(scale as f32), &window(w, s)?);
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, lx.shape().clone()))
}

/// The score gradient from `(probabilities, output gradient)`.
pub(super) fn causal_softmax_grad(
    (p, lp): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    scale: f64,
    w: usize,
) -> Result<(CudaStorage, Shape)> {
    let dev = p.device();
    let (s, n) = (width(lp), lp.shape().elem_count());
    let storage = by_dtype!(p.dtype(), "causal-softmax-grad", T => {
        let (ps, gs) = (view::<T>(p, lp)?, view::<T>(g, lg)?);
        let mut out = output::<T>(dev, n)?;
        launch!(dev, "causal_softmax_bwd", p.dtype(), per_row(n / s, s), &ps, &gs, &mut out, &int(s, "keys")?,
            &(scale as f32), &window(w, s)?);
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, lp.shape().clone()))
}

/// Rows of `[nll, log-sum-exp]` (f32) for `(logits: (n, vocab), targets: (n,) u32)`.
pub(super) fn token_nll(l: &CudaStorage, ll: &Layout, t: &CudaStorage, lt: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = l.device();
    let (n, vocab) = ll.shape().dims2()?;
    if lt.shape().elem_count() != n {
        bail!("token-nll: {n} rows of logits but {} targets", lt.shape().elem_count());
    }
    let targets = view::<u32>(t, lt)?;
    let mut out = output::<f32>(dev, 2 * n)?;
    by_dtype!(l.dtype(), "token-nll", T => {
        let logits = view::<T>(l, ll)?;
        launch!(dev, "token_nll_fwd", l.dtype(), per_row(n, vocab), &logits, &targets, &mut out, &int(vocab, "vocab")?);
    });
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((n, 2))))
}

/// `d logits` from `(logits, targets, rows of [g, lse] (f32))`.
pub(super) fn token_nll_grad(
    (l, ll): (&CudaStorage, &Layout),
    (t, lt): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let dev = l.device();
    let (n, vocab) = ll.shape().dims2()?;
    let (targets, g_lse) = (view::<u32>(t, lt)?, view::<f32>(g, lg)?);
    let storage = by_dtype!(l.dtype(), "token-nll-grad", T => {
        let logits = view::<T>(l, ll)?;
        let mut out = output::<T>(dev, n * vocab)?;
        launch!(dev, "token_nll_bwd", l.dtype(), per_row(n, vocab), &logits, &targets, &g_lse, &mut out,
            &int(vocab, "vocab")?);
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((storage, ll.shape().clone()))
}
