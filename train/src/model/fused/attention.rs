//! Causal grouped-query attention as one op, forward and backward, one (batch, key/value head) per
//! task: scores, masked softmax and values by single-threaded gemm calls on rows that stay in cache.
//! Composed, the same work is two batched matmuls (each gemm call forked over the threads), a
//! softmax op, and full-size score and probability gradients zeroed and summed by candle's backward.
//! The probabilities are kept by the op for the backward pass.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::softmax::{softmax_grad_in_place, softmax_in_place, visible};
use super::{data, Real};
use crate::model::linear;

/// `q: (b, kv_heads, groups · s, d)` (query head `h` = group `h % groups` of its key/value head),
/// `k`, `v: (b, kv_heads, s, d)` → `(b, kv_heads, groups · s, d)`; row `r` is query position `r % s`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    let op = Attention { scale, window: window.unwrap_or(usize::MAX), probs: Mutex::new(None) };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    scale: f64,
    window: usize,
    /// Softmax probabilities, `(b · kv_heads, rows, s)`, from the forward pass for the backward.
    probs: Mutex<Option<CpuStorage>>,
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)`, operands as (data, row stride, column stride), on
/// this thread.
fn gemm<T: Real>(m: usize, n: usize, k: usize, dst: &mut [T], lhs: (&[T], usize, usize), rhs: (&[T], usize, usize)) {
    assert!(dst.len() >= m * n, "attention: a gemm destination too small");
    // SAFETY: dst holds m·n elements (checked); lhs and rhs cover their strided m·k and k·n
    // elements, as the callers' shapes guarantee.
    unsafe { linear::gemm_into((m, n, k), dst.as_mut_ptr(), lhs, rhs, gemm::Parallelism::None) }
}

/// Sizes: tasks (b · kv_heads), rows per task, keys, head dim.
fn sizes(q: &[usize], k: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let (&[b, kvh, rows, d], &[kb, kkvh, s, kd]) = (q, k) else { bail!("attention: 4-d q, k, v expected") };
    if (b, kvh, d) != (kb, kkvh, kd) || rows % s != 0 {
        bail!("attention: q {q:?} does not match k {k:?}");
    }
    Ok((b * kvh, rows, s, d))
}

impl Attention {
    fn forward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (tasks, rows, s, d): (usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<T>) {
        let scale = T::from(self.scale).expect("a float scale");
        let mut probs = vec![T::zero(); tasks * rows * s];
        let mut y = vec![T::zero(); tasks * rows * d];
        probs.par_chunks_mut(rows * s).zip(y.par_chunks_mut(rows * d)).enumerate().for_each(|(t, (p, y))| {
            let (q, k, v) = (&q[t * rows * d..][..rows * d], &k[t * s * d..][..s * d], &v[t * s * d..][..s * d]);
            gemm(rows, s, d, p, (q, d, 1), (k, 1, d));
            for (r, row) in p.chunks_mut(s).enumerate() {
                let visible = visible(r % s, self.window);
                softmax_in_place(&mut row[visible.clone()], scale);
                row[..visible.start].iter_mut().for_each(|x| *x = T::zero());
                row[visible.end..].iter_mut().for_each(|x| *x = T::zero());
            }
            gemm(rows, d, s, y, (p, s, 1), (v, d, 1));
        });
        (probs, y)
    }

    /// `[dq | dk | dv]` from the output gradient `dy` and the kept probabilities.
    fn backward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        dy: &[T],
        probs: &[T],
        (tasks, rows, s, d): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let scale = T::from(self.scale).expect("a float scale");
        let (nq, nk) = (tasks * rows * d, tasks * s * d);
        let mut out = vec![T::zero(); nq + 2 * nk];
        let (dq, rest) = out.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        dq.par_chunks_mut(rows * d)
            .zip(dk.par_chunks_mut(s * d))
            .zip(dv.par_chunks_mut(s * d))
            .enumerate()
            .for_each_init(
                || vec![T::zero(); rows * s],
                |ds, (t, ((dq, dk), dv))| {
                    let (q, k, v) =
                        (&q[t * rows * d..][..rows * d], &k[t * s * d..][..s * d], &v[t * s * d..][..s * d]);
                    let (dy, p) = (&dy[t * rows * d..][..rows * d], &probs[t * rows * s..][..rows * s]);
                    // dP = dY · Vᵀ, then dS = scale · P ∘ (dP − Σ_j dP·P) in place.
                    gemm(rows, s, d, ds, (dy, d, 1), (v, 1, d));
                    for (ds, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        softmax_grad_in_place(ds, p, scale);
                    }
                    gemm(rows, d, s, dq, (ds, s, 1), (k, d, 1));
                    gemm(s, d, rows, dk, (ds, 1, s), (q, d, 1));
                    gemm(s, d, rows, dv, (p, 1, s), (dy, d, 1));
                },
            );
        out
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
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
        let dims = sizes(l1.dims(), l2.dims())?;
        if l2.dims() != l3.dims() {
            bail!("attention: k {:?} and v {:?} differ", l2.dims(), l3.dims());
        }
        let (probs, y) = match s1 {
            CpuStorage::F32(_) => {
                let (p, y) = self.forward(data::<f32>(s1, l1, "q")?, data(s2, l2, "k")?, data(s3, l3, "v")?, dims);
                (CpuStorage::F32(p), CpuStorage::F32(y))
            }
            CpuStorage::F64(_) => {
                let (p, y) = self.forward(data::<f64>(s1, l1, "q")?, data(s2, l2, "k")?, data(s3, l3, "v")?, dims);
                (CpuStorage::F64(p), CpuStorage::F64(y))
            }
            _ => bail!("attention: f32 or f64"),
        };
        *self.probs.lock().expect("attention lock") = Some(probs);
        Ok((y, l1.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.lock().expect("attention lock").take() else {
            bail!("attention: a second backward pass through the same graph");
        };
        let dims = sizes(q.dims(), k.dims())?;
        let flat = |t: &Tensor| t.flatten_all();
        let all = match probs {
            CpuStorage::F32(p) => {
                let (q, k, v, dy) =
                    (flat(q)?.to_vec1::<f32>()?, flat(k)?.to_vec1()?, flat(v)?.to_vec1()?, flat(grad)?.to_vec1()?);
                Tensor::from_vec(self.backward(&q, &k, &v, &dy, &p, dims), q.len() + 2 * k.len(), grad.device())?
            }
            CpuStorage::F64(p) => {
                let (q, k, v, dy) =
                    (flat(q)?.to_vec1::<f64>()?, flat(k)?.to_vec1()?, flat(v)?.to_vec1()?, flat(grad)?.to_vec1()?);
                Tensor::from_vec(self.backward(&q, &k, &v, &dy, &p, dims), q.len() + 2 * k.len(), grad.device())?
            }
            _ => bail!("attention: f32 or f64"),
        };
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.dims())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.dims())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.dims())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
