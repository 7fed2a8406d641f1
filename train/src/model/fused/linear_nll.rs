//! The output projection and the cross-entropy as one op. The logits are the largest tensor of a
//! step (tokens × vocabulary); as an op output they would need a gradient of the same size, zeroed
//! and summed by the backward pass, then fed to the projection's backward. Here the op keeps
//! `exp(logit − max)` (computed for the log-sum-exp anyway) between forward and backward, scales it
//! into `d logits` in place, and hands that straight to gemm for the input and weight gradients.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::target_indices;
use super::{by_rows, data, reduce, Real};
use crate::model::linear;

/// Negative log-likelihood `(n,)` of `targets: (n,)` under `hidden: (n, h) · weightᵀ: (h, vocab)`.
pub fn linear_nll(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let op = LinearNll { kept: Mutex::new(None) };
    hidden.contiguous()?.apply_op3(&weight.contiguous()?, &targets.contiguous()?, op)
}

/// What the forward pass leaves for the backward pass.
struct Kept {
    /// `exp(logit − row max)`, `(n, vocab)`.
    exps: CpuStorage,
    /// `1 / Σ_row exp(logit − row max)`, `(n,)`.
    inv_sum: CpuStorage,
    targets: Vec<usize>,
    vocab: usize,
}

struct LinearNll {
    /// Set by the forward pass and taken by the backward pass (once per graph).
    kept: Mutex<Option<Kept>>,
}

/// Per row: the target's negative log-likelihood, and `1 / Σ exp(logit − max)`; the row itself
/// becomes `exp(logit − max)`, the softmax up to that factor, so the backward pass needs no
/// exponentials of its own.
pub(crate) fn nll<T: Real>(logits: &mut [T], vocab: usize, targets: &[usize]) -> (Vec<T>, Vec<T>) {
    let (mut nll, mut inv_sum) = (vec![T::zero(); targets.len()], vec![T::zero(); targets.len()]);
    logits.par_chunks_mut(vocab).zip(nll.par_iter_mut().zip(inv_sum.par_iter_mut())).zip(targets).for_each(
        |((row, (nll, inv_sum)), &target)| {
            let max = reduce::max(row);
            let logit = row[target];
            let sum = T::exp_shifted_in_place(row, T::one(), max, T::one());
            *nll = max + sum.ln() - logit;
            *inv_sum = sum.recip();
        },
    );
    (nll, inv_sum)
}

/// `row ← g · (softmax(logits) − one_hot(target))` in place, from the forward's `exp(logit − max)`.
pub(crate) fn to_gradient<T: Real>(exps: &mut [T], vocab: usize, targets: &[usize], inv_sum: &[T], g: &[T]) {
    by_rows(exps, vocab, |r, row| {
        let scale = g[r] * inv_sum[r];
        row.iter_mut().for_each(|p| *p *= scale);
        row[targets[r]] -= g[r];
    });
}

impl CustomOp3 for LinearNll {
    fn name(&self) -> &'static str {
        "linear-nll"
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
        let (mut logits, shape) = linear::forward_storage((s1, l1), (s2, l2))?;
        let (n, vocab) = shape.dims2()?;
        let targets = target_indices(data::<u32>(s3, l3, "linear-nll targets")?, vocab)?;
        if targets.len() != n {
            bail!("linear-nll: {n} rows but {} targets", targets.len());
        }
        let (out, inv_sum) = match &mut logits {
            CpuStorage::F32(x) => {
                let (nll, inv_sum) = nll(x, vocab, &targets);
                (CpuStorage::F32(nll), CpuStorage::F32(inv_sum))
            }
            CpuStorage::F64(x) => {
                let (nll, inv_sum) = nll(x, vocab, &targets);
                (CpuStorage::F64(nll), CpuStorage::F64(inv_sum))
            }
            _ => bail!("linear-nll: f32 or f64"),
        };
        *self.kept.lock().expect("linear-nll lock") = Some(Kept { exps: logits, inv_sum, targets, vocab });
        Ok((out, Shape::from(n)))
    }
    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(Kept { exps, inv_sum, targets, vocab }) = self.kept.lock().expect("linear-nll lock").take() else {
            bail!("linear-nll: a second backward pass through the same graph");
        };
        let n = targets.len();
        let d_logits = match (exps, inv_sum, grad.dtype()) {
            (CpuStorage::F32(mut x), CpuStorage::F32(inv_sum), DType::F32) => {
                to_gradient(&mut x, vocab, &targets, &inv_sum, &grad.to_vec1::<f32>()?);
                Tensor::from_vec(x, (n, vocab), &Device::Cpu)?
            }
            (CpuStorage::F64(mut x), CpuStorage::F64(inv_sum), DType::F64) => {
                to_gradient(&mut x, vocab, &targets, &inv_sum, &grad.to_vec1::<f64>()?);
                Tensor::from_vec(x, (n, vocab), &Device::Cpu)?
            }
            _ => bail!("linear-nll: the gradient's dtype differs from the logits'"),
        };
        let (d_hidden, d_weight) = linear::gradients(&d_logits, hidden, weight)?;
        Ok((Some(d_hidden), d_weight, None))
    }
}
