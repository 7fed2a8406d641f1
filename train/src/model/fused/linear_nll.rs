//! The output projection and the cross-entropy as one op. The logits are the largest tensor of a
//! step (tokens × vocabulary); as an op output they would need a gradient of the same size, zeroed
//! and summed by the backward pass, then fed to the projection's backward. Here the op keeps its
//! logits between forward and backward, turns them into `d logits` in place, and hands them straight
//! to gemm for the input and weight gradients.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::{log_sum_exp, target_indices};
use super::{by_rows, data, exp_shifted_in_place, Real};
use crate::model::linear;

/// Negative log-likelihood `(n,)` of `targets: (n,)` under `hidden: (n, h) · weightᵀ: (h, vocab)`.
pub fn linear_nll(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let op = LinearNll { kept: Mutex::new(None) };
    hidden.contiguous()?.apply_op3(&weight.contiguous()?, &targets.contiguous()?, op)
}

/// What the forward pass leaves for the backward pass.
struct Kept {
    logits: CpuStorage,
    lse: CpuStorage,
    targets: Vec<usize>,
    vocab: usize,
}

struct LinearNll {
    /// Set by the forward pass and taken by the backward pass (once per graph).
    kept: Mutex<Option<Kept>>,
}

fn nll<T: Real>(logits: &[T], vocab: usize, targets: &[usize]) -> (Vec<T>, Vec<T>) {
    let mut lse = vec![T::zero(); targets.len()];
    lse.par_iter_mut().enumerate().for_each_init(
        || vec![T::zero(); vocab],
        |scratch, (r, lse)| *lse = log_sum_exp(&logits[r * vocab..(r + 1) * vocab], scratch),
    );
    let nll = lse.iter().zip(targets).enumerate().map(|(r, (&l, &t))| l - logits[r * vocab + t]).collect();
    (nll, lse)
}

/// `logits ← g · (softmax(logits) − one_hot(target))`, row by row, in place.
fn to_gradient<T: Real>(logits: &mut [T], vocab: usize, targets: &[usize], lse: &[T], g: &[T]) {
    by_rows(logits, vocab, |r, row| {
        exp_shifted_in_place(row, T::one(), lse[r], g[r]);
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
        let (logits, shape) = linear::forward_storage((s1, l1), (s2, l2))?;
        let (n, vocab) = shape.dims2()?;
        let targets = target_indices(data::<u32>(s3, l3, "linear-nll targets")?, vocab)?;
        if targets.len() != n {
            bail!("linear-nll: {n} rows but {} targets", targets.len());
        }
        let (out, lse) = match &logits {
            CpuStorage::F32(x) => {
                let (nll, lse) = nll(x, vocab, &targets);
                (CpuStorage::F32(nll), CpuStorage::F32(lse))
            }
            CpuStorage::F64(x) => {
                let (nll, lse) = nll(x, vocab, &targets);
                (CpuStorage::F64(nll), CpuStorage::F64(lse))
            }
            _ => bail!("linear-nll: f32 or f64"),
        };
        *self.kept.lock().expect("linear-nll lock") = Some(Kept { logits, lse, targets, vocab });
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
        let Some(Kept { logits, lse, targets, vocab }) = self.kept.lock().expect("linear-nll lock").take() else {
            bail!("linear-nll: a second backward pass through the same graph");
        };
        let n = targets.len();
        let d_logits = match (logits, lse, grad.dtype()) {
            (CpuStorage::F32(mut x), CpuStorage::F32(lse), DType::F32) => {
                to_gradient(&mut x, vocab, &targets, &lse, &grad.to_vec1::<f32>()?);
                Tensor::from_vec(x, (n, vocab), &Device::Cpu)?
            }
            (CpuStorage::F64(mut x), CpuStorage::F64(lse), DType::F64) => {
                to_gradient(&mut x, vocab, &targets, &lse, &grad.to_vec1::<f64>()?);
                Tensor::from_vec(x, (n, vocab), &Device::Cpu)?
            }
            _ => bail!("linear-nll: the gradient's dtype differs from the logits'"),
        };
        let (d_hidden, d_weight) = linear::gradients(&d_logits, hidden, weight)?;
        Ok((Some(d_hidden), Some(d_weight), None))
    }
}
