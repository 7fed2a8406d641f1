//! The two softmaxes: attention's causal (optionally sliding-window) softmax, and the
//! cross-entropy's log-softmax over the vocabulary.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{by_rows, cpu, data, last_dim, reduce, Kernel, Real};

/// Causal (optionally sliding-window) softmax of attention scores `(.., s, s)` scaled by `scale`:
/// query `i` (the row's index modulo `s`) attends to keys `j ≤ i` with `i − j < window`.
pub fn causal_softmax(scores: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale, window: window.unwrap_or(usize::MAX), backward: false })
}

/// Negative log-likelihood of each target under `logits: (n, vocab)`, shape `(n,)`: log-sum-exp
/// minus the target's logit, in one pass; the backward writes `softmax − one_hot` directly.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    // The op also returns each row's log-sum-exp, which its backward reuses instead of recomputing.
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TokenNll)?.narrow(1, 0, 1)?.squeeze(1)
}

#[derive(Clone, Copy)]
struct CausalSoftmax {
    scale: f64,
    window: usize,
    /// The backward kernel: inputs (probabilities, output gradient) → score gradient.
    backward: bool,
}

/// The keys query `i` sees under a causal mask reaching back `window` positions.
pub(super) fn visible(i: usize, window: usize) -> std::ops::Range<usize> {
    (i + 1).saturating_sub(window)..i + 1
}

/// `row ← softmax(row · scale)`, in place; returns the log-sum-exp of `row · scale`, from which
/// `exp(x · scale − lse)` gives the probabilities back.
pub(super) fn softmax_in_place<T: Real>(row: &mut [T], scale: T) -> T {
    let max = reduce::max(row) * scale;
    let sum = T::exp_shifted_in_place(row, scale, max, T::one());
    let inv = sum.recip();
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// The softmax's backward in place: `g ← scale · p ∘ (g − Σ p·g)` (0 wherever `p` is).
pub(super) fn softmax_grad_in_place<T: Real>(g: &mut [T], p: &[T], scale: T) {
    let dot = reduce::dot(g, p);
    for (g, &p) in g.iter_mut().zip(p) {
        *g = scale * p * (*g - dot);
    }
}

impl Kernel for CausalSoftmax {
    const NAME: &'static str = "causal-softmax";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let s = last_dim(dims[0]);
        let scale = T::from(self.scale).expect("a float scale");
        let mut out = vec![T::zero(); inputs[0].len()];
        by_rows(&mut out, s, |r, out| {
            // Only the visible keys are written; the rest of `out` stays 0.
            let visible = visible(r % s, self.window);
            let out = &mut out[visible.clone()];
            if self.backward {
                // Inputs: the probabilities and the output gradient.
                out.copy_from_slice(&inputs[1][r * s..][visible.clone()]);
                softmax_grad_in_place(out, &inputs[0][r * s..][visible], scale);
            } else {
                out.copy_from_slice(&inputs[0][r * s..][visible]);
                softmax_in_place(out, scale);
            }
        });
        Ok(out)
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu(self, &[(storage, layout)], layout.shape().clone())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::causal_softmax(storage, layout, self.scale, self.window)
    }
    fn bwd(&self, _scores: &Tensor, probs: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let backward = CausalSoftmax { backward: true, ..*self };
        Ok(Some(probs.apply_op2_no_bwd(&grad.contiguous()?, &backward)?))
    }
}

impl CustomOp2 for CausalSoftmax {
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
        super::cuda::causal_softmax_grad((s1, l1), (s2, l2), self.scale, self.window)
    }
}

struct TokenNll;

/// A row's log-sum-exp, using `scratch` (the row's length) for the exponentials.
pub(super) fn log_sum_exp<T: Real>(x: &[T], scratch: &mut [T]) -> T {
    let max = reduce::max(x);
    max + T::exp_shifted(x, T::one(), max, T::one(), scratch).ln()
}

/// The targets as indices, refusing any outside the vocabulary.
pub(crate) fn target_indices(targets: &[u32], vocab: usize) -> Result<Vec<usize>> {
    targets
        .iter()
        .map(
            |&t| {
                if (t as usize) < vocab {
                    Ok(t as usize)
                } else {
                    bail!("target {t} outside a vocabulary of {vocab}")
                }
            },
        )
        .collect()
}

impl CustomOp2 for TokenNll {
    fn name(&self) -> &'static str {
        "token-nll"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn nll<T: Real>(logits: &[T], vocab: usize, targets: &[usize]) -> Vec<T> {
            // Rows of [nll, log-sum-exp].
            let mut out = vec![T::zero(); 2 * targets.len()];
            out.par_chunks_mut(2).enumerate().for_each_init(
                || vec![T::zero(); vocab],
                |scratch, (r, out)| {
                    let x = &logits[r * vocab..(r + 1) * vocab];
                    let lse = log_sum_exp(x, scratch);
                    out[0] = lse - x[targets[r]];
                    out[1] = lse;
                },
            );
            out
        }
        let (n, vocab) = l1.shape().dims2()?;
        let targets = target_indices(data::<u32>(s2, l2, "token-nll targets")?, vocab)?;
        if targets.len() != n {
            bail!("token-nll: {n} rows of logits but {} targets", targets.len());
        }
        let storage = match s1.dtype() {
            DType::F32 => CpuStorage::F32(nll(data::<f32>(s1, l1, "token-nll")?, vocab, &targets)),
            DType::F64 => CpuStorage::F64(nll(data::<f64>(s1, l1, "token-nll")?, vocab, &targets)),
            dtype => bail!("token-nll: {dtype:?} has no CPU kernel"),
        };
        Ok((storage, Shape::from((n, 2))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::token_nll(s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Rows of [d nll, log-sum-exp]; the log-sum-exp column is internal and gets no gradient.
        let grad_and_lse = Tensor::cat(&[&grad.narrow(1, 0, 1)?, &res.narrow(1, 1, 1)?], 1)?.contiguous()?;
        Ok((Some(logits.apply_op3_no_bwd(targets, &grad_and_lse, &TokenNllGrad)?), None))
    }
}

/// `d logits = g · (softmax(logits) − one_hot(target))`, row by row, from rows of `[g, lse]`.
struct TokenNllGrad;

impl CustomOp3 for TokenNllGrad {
    fn name(&self) -> &'static str {
        "token-nll-grad"
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
        fn grad<T: Real>(logits: &[T], vocab: usize, targets: &[usize], g_lse: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); logits.len()];
            by_rows(&mut out, vocab, |r, out| {
                let (g, lse) = (g_lse[2 * r], g_lse[2 * r + 1]);
                T::exp_shifted(&logits[r * vocab..(r + 1) * vocab], T::one(), lse, g, out);
                out[targets[r]] -= g;
            });
            out
        }
        let (_, vocab) = l1.shape().dims2()?;
        let targets = target_indices(data::<u32>(s2, l2, "token-nll-grad targets")?, vocab)?;
        let storage = match s1.dtype() {
            DType::F32 => CpuStorage::F32(grad(data(s1, l1, "")?, vocab, &targets, data(s3, l3, "")?)),
            DType::F64 => CpuStorage::F64(grad(data(s1, l1, "")?, vocab, &targets, data(s3, l3, "")?)),
            dtype => bail!("token-nll-grad: {dtype:?} has no CPU kernel"),
        };
        Ok((storage, l1.shape().clone()))
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
        super::cuda::token_nll_grad((s1, l1), (s2, l2), (s3, l3))
    }
}
