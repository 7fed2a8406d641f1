//! RMSNorm and its input and weight gradients.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{by_rows, cpu, last_dim, reduce, Kernel, Real};

/// RMSNorm over the last dimension, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

/// RMSNorm of `x` (rows of `weight.len()`) on slices, for the explicit training step.
pub(crate) fn rms_norm_rows<T: Real>(x: &[T], weight: &[T], eps: f64) -> Result<Vec<T>> {
    RmsNorm { eps }.run(&[x, weight], &[&[x.len() / weight.len().max(1), weight.len()], &[weight.len()]])
}

/// RMSNorm's backward on slices: `dx += ∂x` (the residual stream's gradient takes it in place) and
/// `dw += ∂w`, for the output gradient `g`.
pub(crate) fn rms_norm_backward_rows<T: Real>(x: &[T], weight: &[T], g: &[T], eps: f64, dx: &mut [T], dw: &mut [T]) {
    assert_eq!(g.len(), x.len(), "rms-norm backward: a gradient per input");
    add_input_gradient(x, weight, g, eps, dx);
    let partial = weight_gradient(x, g, weight.len(), eps);
    dw.iter_mut().zip(partial).for_each(|(d, p)| *d += p);
}

/// `dx += r · (w·g − x̂ · mean(w·g·x̂))` row by row (x̂ = r·x, r = 1/rms): RMSNorm's input gradient.
fn add_input_gradient<T: Real>(x: &[T], weight: &[T], g: &[T], eps: f64, dx: &mut [T]) {
    let h = weight.len();
    let n = T::from(h).expect("a length");
    by_rows(dx, h, |r, dx| {
        let (x, g) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
        let inv = inv_rms(x, eps);
        let dot = reduce::dot3(weight, g, x) * inv / n;
        for (((o, &v), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(weight) {
            *o += inv * (w * g - v * inv * dot);
        }
    });
}

/// Rows whose weight-gradient terms one task sums: the blocks depend on the shape alone.
const WEIGHT_GRADIENT_ROWS: usize = 64;

/// `Σ_rows g · x̂`: partial sums over fixed blocks of rows, added in block order, so the gradient
/// has the same bits at any thread count and under any load (rayon's `fold` splits wherever work
/// stealing happens to, which changed a gradient norm in its 13th digit on a busy machine).
fn weight_gradient<T: Real>(x: &[T], g: &[T], h: usize, eps: f64) -> Vec<T> {
    let mut sum = vec![T::zero(); h];
    if h == 0 {
        return sum;
    }
    let block = WEIGHT_GRADIENT_ROWS * h;
    let partials: Vec<Vec<T>> = x
        .par_chunks(block)
        .zip(g.par_chunks(block))
        .map(|(x, g)| {
            let mut partial = vec![T::zero(); h];
            for (x, g) in x.chunks(h).zip(g.chunks(h)) {
                let inv = inv_rms(x, eps);
                for ((a, &v), &g) in partial.iter_mut().zip(x).zip(g) {
                    *a += g * v * inv;
                }
            }
            partial
        })
        .collect();
    for partial in partials {
        sum.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    sum
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let mean_square = reduce::sum_of_squares(x) / T::from(x.len()).expect("a length");
    (mean_square + T::from(eps).expect("a float eps")).sqrt().recip()
}

impl Kernel for RmsNorm {
    const NAME: &'static str = "rms-norm";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, w) = (inputs[0], inputs[1]);
        let h = last_dim(dims[0]);
        if w.len() != h {
            bail!("rms-norm: weight of {} for rows of {h}", w.len());
        }
        let mut out = vec![T::zero(); x.len()];
        by_rows(&mut out, h, |r, out| {
            let x = &x[r * h..(r + 1) * h];
            let inv = inv_rms(x, self.eps);
            for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                *o = v * inv * w;
            }
        });
        Ok(out)
    }
}

impl CustomOp2 for RmsNorm {
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
        super::cuda::rms_norm(s1, l1, s2, l2, self.eps)
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps, weight: false })?;
        let dw = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps, weight: true })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm's input gradient `r · (w·g − x̂ · mean(w·g·x̂))` (x̂ = r·x, r = 1/rms), or its weight
/// gradient `Σ_rows g · x̂`.
struct RmsNormGrad {
    eps: f64,
    weight: bool,
}

impl Kernel for RmsNormGrad {
    const NAME: &'static str = "rms-norm-grad";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, w, g) = (inputs[0], inputs[1], inputs[2]);
        let h = last_dim(dims[0]);
        let rows = x.len() / h.max(1);
        if w.len() != h || g.len() != x.len() {
            bail!("rms-norm-grad: weight of {} and gradient of {} for {} rows of {h}", w.len(), g.len(), rows);
        }
        if self.weight {
            return Ok(weight_gradient(x, g, h, self.eps));
        }
        let mut out = vec![T::zero(); x.len()];
        add_input_gradient(x, w, g, self.eps, &mut out);
        Ok(out)
    }
}

impl CustomOp3 for RmsNormGrad {
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
        let shape = if self.weight { l2.shape().clone() } else { l1.shape().clone() };
        cpu(self, &[(s1, l1), (s2, l2), (s3, l3)], shape)
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
        super::cuda::rms_norm_grad((s1, l1), (s2, l2), (s3, l3), self.eps, self.weight)
    }
}
