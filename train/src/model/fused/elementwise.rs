//! Rotary embeddings and the SwiGLU gate, each with its backward.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{by_rows, cpu, last_dim, Kernel, Real};

/// Rotary embedding of `x: (.., seq, head_dim)` with HF's half-split `cos`, `sin: (seq, head_dim)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { backward: false })
}

/// `silu(gate) * up`, for `gate` and `up` of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    swiglu_packed(&Tensor::cat(&[gate, up], gate.rank().saturating_sub(1))?)
}

/// `silu(gate) * up` for `x: (.., 2·inter)` whose rows hold `[gate | up]`, as the packed
/// gate and up projections produce them.
pub fn swiglu_packed(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Swiglu)
}

/// `silu(gate) · up` of packed `[gate | up]` rows on slices, for the explicit training step.
pub(crate) fn swiglu_rows<T: Real>(packed: &[T], width: usize) -> Result<Vec<T>> {
    Swiglu.run(&[packed], &[&[packed.len() / width.max(1), width]])
}

/// The gradient of packed `[gate | up]` rows from the output gradient `dy`, on slices.
pub(crate) fn swiglu_backward_rows<T: Real>(packed: &[T], dy: &[T], width: usize) -> Result<Vec<T>> {
    let rows = packed.len() / width.max(1);
    SwigluGrad.run(&[packed, dy], &[&[rows, width], &[rows, width / 2]])
}

/// `y = x·cos + rotate_half(x)·sin`; the backward applies the transposed rotation to the gradient.
#[derive(Clone, Copy)]
struct Rope {
    backward: bool,
}

impl Kernel for Rope {
    const NAME: &'static str = "rope";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, cos, sin) = (inputs[0], inputs[1], inputs[2]);
        let d = last_dim(dims[0]);
        let seq = dims[0].get(dims[0].len().wrapping_sub(2)).copied().unwrap_or(1);
        if cos.len() != seq * d || sin.len() != seq * d || !d.is_multiple_of(2) {
            bail!("rope: tables of {} for {seq} positions of {d}", cos.len());
        }
        let mut out = x.to_vec();
        by_rows(&mut out, d, |r, row| {
            let p = r % seq;
            rotate(row, &cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d], self.backward);
        });
        Ok(out)
    }
}

/// One row of the rotary embedding in HF's half-split layout, in place: `x ← x·cos +
/// rotate_half(x)·sin`, or with `transposed` the inverse rotation (the backward pass).
pub(super) fn rotate<T: Real>(x: &mut [T], c: &[T], s: &[T], transposed: bool) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at_mut(half);
    let (c1, c2, s1, s2) = (&c[..half], &c[half..], &s[..half], &s[half..]);
    for k in 0..half {
        let (a, b) = (x1[k], x2[k]);
        if transposed {
            x1[k] = a * c1[k] + b * s2[k];
            x2[k] = b * c2[k] - a * s1[k];
        } else {
            x1[k] = a * c1[k] - b * s1[k];
            x2[k] = b * c2[k] + a * s2[k];
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu(self, &[(s1, l1), (s2, l2), (s3, l3)], l1.shape().clone())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::rope((s1, l1), (s2, l2), (s3, l3), self.backward)
    }
    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { backward: true })?;
        Ok((Some(dx), None, None))
    }
}

/// The SwiGLU gate on packed projections: `x: (.., 2·inter)` holds `[gate | up]` per row (one gemm
/// for both), `out: (.., inter) = silu(gate) · up`.
struct Swiglu;

/// `out[i] = σ(x[i]) = 1 / (1 + e^(−x[i]))` with the vectorised exponential.
fn sigmoid<T: Real>(x: &[T], out: &mut [T]) {
    T::exp_shifted(x, -T::one(), T::zero(), T::one(), out);
    out.iter_mut().for_each(|e| *e = (T::one() + *e).recip());
}

/// The two halves of a packed row.
fn halves<T>(row: &[T]) -> (&[T], &[T]) {
    row.split_at(row.len() / 2)
}

/// `(.., 2·inter)` → `(.., inter)`.
fn swiglu_shape(layout: &Layout) -> Result<Shape> {
    let mut dims = layout.dims().to_vec();
    *dims.last_mut().expect("a packed width") = packed_width(layout.dims())? / 2;
    Ok(Shape::from(dims))
}

fn packed_width(dims: &[usize]) -> Result<usize> {
    match last_dim(dims) {
        w if w % 2 == 0 && w > 0 => Ok(w),
        w => bail!("swiglu: packed [gate | up] rows must have an even width, got {w}"),
    }
}

impl Kernel for Swiglu {
    const NAME: &'static str = "swiglu";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, width) = (inputs[0], packed_width(dims[0])?);
        let mut out = vec![T::zero(); x.len() / 2];
        by_rows(&mut out, width / 2, |r, out| {
            let (gate, up) = halves(&x[r * width..][..width]);
            sigmoid(gate, out);
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o *= g * u;
            }
        });
        Ok(out)
    }
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(self, &[(storage, layout)], swiglu_shape(layout)?)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::swiglu(storage, layout, swiglu_shape(layout)?)
    }
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &SwigluGrad)?))
    }
}

/// The gradient of the packed input, `[d gate | d up]` per row, in one pass.
struct SwigluGrad;

impl Kernel for SwigluGrad {
    const NAME: &'static str = "swiglu-grad";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, grad, width) = (inputs[0], inputs[1], packed_width(dims[0])?);
        let mut out = vec![T::zero(); x.len()];
        by_rows(&mut out, width, |r, out| {
            let (gate, up) = halves(&x[r * width..][..width]);
            let dy = &grad[r * width / 2..][..width / 2];
            let (d_gate, d_up) = out.split_at_mut(width / 2);
            sigmoid(gate, d_gate);
            for i in 0..d_gate.len() {
                let (g, u, s) = (gate[i], up[i], d_gate[i]);
                d_up[i] = dy[i] * g * s;
                d_gate[i] = dy[i] * u * s * (T::one() + g * (T::one() - s));
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for SwigluGrad {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(self, &[(s1, l1), (s2, l2)], l1.shape().clone())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::swiglu_grad(s1, l1, s2, l2)
    }
}
