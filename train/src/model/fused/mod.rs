//! Fused operations with their own backward pass: each reads its inputs once and writes one output,
//! where the composed ops in [`super::ops`] allocate and traverse several intermediates (the
//! unfused softmax and log-softmax were ~70% of a CPU step). Every op has CPU kernels for f32 and
//! f64 (see [`supported`]); RMSNorm, RoPE, the causal softmax, SwiGLU and the cross-entropy also have
//! CUDA kernels for f32 and bf16 (`cuda.rs`, see [`cuda_supported`]). The whole-block ops (attention
//! on the packed projections, the output projection with the loss) are CPU-only.
//!
//! Each op is checked against finite differences and against the composed ops in
//! `tests/fused.rs`; `crate::kernel_check` compares a device's kernels with the composed ops.

mod attention;
#[cfg(feature = "cuda")]
mod cuda;
mod elementwise;
mod linear_nll;
mod lora;
mod norm;
mod reduce;
mod softmax;

pub use attention::self_attention;
pub use elementwise::{rope, swiglu, swiglu_packed};
pub use linear_nll::linear_nll;
pub(crate) use lora::dropout_mask;
pub use lora::{lora_linear, Block};
pub use norm::rms_norm;
pub use softmax::{causal_softmax, token_nll};

/// The CPU kernels on slices, for the explicit training step (`crate::step`), which keeps its
/// own activations instead of candle's graph.
pub(crate) mod rows {
    pub(crate) use super::attention::{backward_rows as attention_backward, forward_rows as attention, Saved};
    pub(crate) use super::elementwise::{swiglu_backward_rows as swiglu_backward, swiglu_rows as swiglu};
    pub(crate) use super::linear_nll::nll;
    pub(crate) use super::norm::{rms_norm_backward_rows as rms_norm_backward, rms_norm_rows as rms_norm};
    pub(crate) use super::softmax::target_indices;
}

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Whether `x` can use the fused CPU kernels (all of them).
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether `x` can use the fused ops that have CUDA kernels: RMSNorm, RoPE, the causal softmax,
/// SwiGLU and the cross-entropy (the `cuda` feature, f32 or bf16).
pub fn cuda_supported(x: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// The float types the CPU kernels, the explicit step and the in-place AdamW run on: f32 and f64
/// (sealed: the kernels are checked for these two only).
pub trait Real:
    sealed::Sealed
    + candle_core::WithDType
    + Float
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Send
    + Sync
{
    /// `out[j] = exp(x[j]·scale − shift) · factor`; returns `Σ exp(x[j]·scale − shift)`.
    fn exp_shifted(x: &[Self], scale: Self, shift: Self, factor: Self, out: &mut [Self]) -> Self;
    /// [`Real::exp_shifted`] with `row` as both input and output.
    fn exp_shifted_in_place(row: &mut [Self], scale: Self, shift: Self, factor: Self) -> Self;
}

impl Real for f32 {
    fn exp_shifted(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
        super::fastexp::exp_shifted_f32(x, scale, shift, factor, out)
    }
    fn exp_shifted_in_place(row: &mut [f32], scale: f32, shift: f32, factor: f32) -> f32 {
        super::fastexp::exp_shifted_in_place_f32(row, scale, shift, factor)
    }
}

impl Real for f64 {
    fn exp_shifted(x: &[f64], scale: f64, shift: f64, factor: f64, out: &mut [f64]) -> f64 {
        let mut sum = 0.0;
        for (o, &v) in out.iter_mut().zip(x) {
            let e = (v * scale - shift).exp();
            sum += e;
            *o = e * factor;
        }
        sum
    }
    fn exp_shifted_in_place(row: &mut [f64], scale: f64, shift: f64, factor: f64) -> f64 {
        let mut sum = 0.0;
        for v in row {
            let e = (*v * scale - shift).exp();
            sum += e;
            *v = e * factor;
        }
        sum
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A kernel over contiguous float inputs of one dtype.
trait Kernel {
    const NAME: &'static str;
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>>;
}

/// The contiguous slice behind `storage` as `T`.
fn data<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("{op}: inputs must be contiguous"),
    }
}

/// Runs `kernel` on float inputs of one dtype, producing `shape`.
fn cpu<K: Kernel>(kernel: &K, inputs: &[(&CpuStorage, &Layout)], shape: Shape) -> Result<(CpuStorage, Shape)> {
    fn typed<T: Real, K: Kernel>(kernel: &K, inputs: &[(&CpuStorage, &Layout)]) -> Result<Vec<T>> {
        let slices = inputs.iter().map(|(s, l)| data::<T>(s, l, K::NAME)).collect::<Result<Vec<_>>>()?;
        let dims: Vec<&[usize]> = inputs.iter().map(|(_, l)| l.dims()).collect();
        kernel.run(&slices, &dims)
    }
    let storage = match inputs[0].0.dtype() {
        DType::F32 => CpuStorage::F32(typed::<f32, K>(kernel, inputs)?),
        DType::F64 => CpuStorage::F64(typed::<f64, K>(kernel, inputs)?),
        dtype => bail!("{}: {dtype:?} has no CPU kernel", K::NAME),
    };
    Ok((storage, shape))
}

/// Fills `out` row by row (rows of `row` elements) in parallel: `f(row_index, row_out)`.
fn by_rows<T: Send>(out: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    // Tasks of ~16K elements: big enough to amortise scheduling, small enough to balance.
    let per_task = (16 * 1024 / row.max(1)).max(1);
    out.par_chunks_mut(row * per_task).enumerate().for_each(|(task, chunk)| {
        for (i, row_out) in chunk.chunks_mut(row).enumerate() {
            f(task * per_task + i, row_out);
        }
    });
}

fn last_dim(dims: &[usize]) -> usize {
    dims.last().copied().unwrap_or(1)
}
