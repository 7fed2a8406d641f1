//! Rotary embeddings and the SwiGLU gate, each with its backward.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{by_rows, cpu, last_dim, Kernel, Real};

/// Rotary embedding of `x: (.., seq, head_dim)` with HF's half-split `cos`, `sin: (seq, head_dim)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { backward: false })
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
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
        let mut out = vec![T::zero(); x.len()];
        by_rows(&mut out, d, |r, out| {
            let p = r % seq;
            let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
            rotate(&x[r * d..(r + 1) * d], c, s, self.backward, out);
        });
        Ok(out)
    }
}

/// One row of the rotary embedding in HF's half-split layout: `out = x·cos + rotate_half(x)·sin`,
/// or with `transposed` the inverse rotation (the backward pass).
pub(super) fn rotate<T: Real>(x: &[T], c: &[T], s: &[T], transposed: bool, out: &mut [T]) {
    let half = x.len() / 2;
    for k in 0..half {
        let (x1, x2) = (x[k], x[k + half]);
        if transposed {
            out[k] = x1 * c[k] + x2 * s[k + half];
            out[k + half] = x2 * c[k + half] - x1 * s[k];
        } else {
            out[k] = x1 * c[k] - x2 * s[k];
            out[k + half] = x2 * c[k + half] + x1 * s[k + half];
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

struct Swiglu;

fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

impl Kernel for Swiglu {
    const NAME: &'static str = "swiglu";
    fn run<T: Real>(&self, inputs: &[&[T]], _: &[&[usize]]) -> Result<Vec<T>> {
        let (gate, up) = (inputs[0], inputs[1]);
        if gate.len() != up.len() {
            bail!("swiglu: gate of {} and up of {}", gate.len(), up.len());
        }
        let mut out = vec![T::zero(); gate.len()];
        let row = 4096;
        by_rows(&mut out, row, |r, out| {
            for (i, o) in out.iter_mut().enumerate() {
                let (g, u) = (gate[r * row + i], up[r * row + i]);
                *o = g * sigmoid(g) * u;
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(self, &[(s1, l1), (s2, l2)], l1.shape().clone())
    }
    fn bwd(&self, gate: &Tensor, up: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwigluGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// Both SwiGLU input gradients in one pass, stacked: `[d gate, d up]`.
struct SwigluGrad;

impl Kernel for SwigluGrad {
    const NAME: &'static str = "swiglu-grad";
    fn run<T: Real>(&self, inputs: &[&[T]], _: &[&[usize]]) -> Result<Vec<T>> {
        let (gate, up, grad) = (inputs[0], inputs[1], inputs[2]);
        let n = gate.len();
        let mut out = vec![T::zero(); 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        let row = 4096;
        d_gate.par_chunks_mut(row).zip(d_up.par_chunks_mut(row)).enumerate().for_each(|(r, (d_gate, d_up))| {
            for i in 0..d_gate.len() {
                let (g, u, dy) = (gate[r * row + i], up[r * row + i], grad[r * row + i]);
                let s = sigmoid(g);
                d_up[i] = dy * g * s;
                d_gate[i] = dy * u * s * (T::one() + g * (T::one() - s));
            }
        });
        Ok(out)
    }
}

impl CustomOp3 for SwigluGrad {
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
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        cpu(self, &[(s1, l1), (s2, l2), (s3, l3)], Shape::from(dims))
    }
}
