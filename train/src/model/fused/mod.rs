//! Fused operations with their own backward pass: each reads its inputs once and writes one output,
//! where the composed ops in [`super::ops`] allocate and traverse several intermediates (the
//! unfused softmax and log-softmax were ~70% of a CPU step). CPU kernels for f32 and f64 here;
//! other devices and dtypes use the composed ops (see [`supported`]) until they have kernels.
//!
//! Each op is checked against finite differences and against the composed ops in
//! `tests/fused.rs`.

mod heads;
mod linear_nll;

pub use heads::{merge_heads, split_heads};
pub use linear_nll::linear_nll;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Whether `x` can use the fused kernels.
pub fn supported(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

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

/// RMSNorm over the last dimension, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// Rotary embedding of `x: (.., seq, head_dim)` with HF's half-split `cos`, `sin: (seq, head_dim)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { backward: false })
}

/// `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)
}

trait Real:
    candle_core::WithDType + Float + std::ops::AddAssign + std::ops::SubAssign + std::ops::MulAssign + Send + Sync
{
    /// `out[j] = exp(x[j]·scale − shift) · factor`; returns `Σ exp(x[j]·scale − shift)`.
    fn exp_shifted(x: &[Self], scale: Self, shift: Self, factor: Self, out: &mut [Self]) -> Self;
}

impl Real for f32 {
    fn exp_shifted(x: &[f32], scale: f32, shift: f32, factor: f32, out: &mut [f32]) -> f32 {
        super::fastexp::exp_shifted_f32(x, scale, shift, factor, out)
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

#[derive(Clone, Copy)]
struct CausalSoftmax {
    scale: f64,
    window: usize,
    /// The backward kernel: inputs (probabilities, output gradient) → score gradient.
    backward: bool,
}

impl CausalSoftmax {
    /// The keys query `i` sees.
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        (i + 1).saturating_sub(self.window)..i + 1
    }
}

impl Kernel for CausalSoftmax {
    const NAME: &'static str = "causal-softmax";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let s = last_dim(dims[0]);
        let scale = T::from(self.scale).expect("a float scale");
        let mut out = vec![T::zero(); inputs[0].len()];
        by_rows(&mut out, s, |r, out| {
            let visible = self.visible(r % s);
            let x = &inputs[0][r * s..(r + 1) * s];
            if self.backward {
                // d score_j = scale · p_j · (g_j − Σ_k p_k g_k); p is 0 outside `visible`.
                let g = &inputs[1][r * s..(r + 1) * s];
                let dot = visible.clone().fold(T::zero(), |acc, j| acc + x[j] * g[j]);
                for j in visible {
                    out[j] = scale * x[j] * (g[j] - dot);
                }
            } else {
                let (x, out) = (&x[visible.clone()], &mut out[visible]);
                let max = x.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v)) * scale;
                let inv = T::exp_shifted(x, scale, max, T::one(), out).recip();
                out.iter_mut().for_each(|o| *o *= inv);
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
}

struct TokenNll;

/// A row's log-sum-exp, using `scratch` (the row's length) for the exponentials.
fn log_sum_exp<T: Real>(x: &[T], scratch: &mut [T]) -> T {
    let max = x.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    max + T::exp_shifted(x, T::one(), max, T::one(), scratch).ln()
}

/// The targets as indices, refusing any outside the vocabulary.
fn target_indices(targets: &[u32], vocab: usize) -> Result<Vec<usize>> {
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
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let mean_square = x.iter().fold(T::zero(), |acc, &v| acc + v * v) / T::from(x.len()).expect("a length");
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
        if self.weight {
            // Partial sums per task, then one reduction: no shared accumulator.
            let partial = (0..rows)
                .into_par_iter()
                .fold(
                    || vec![T::zero(); h],
                    |mut acc, r| {
                        let (x, g) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
                        let inv = inv_rms(x, self.eps);
                        for ((a, &v), &g) in acc.iter_mut().zip(x).zip(g) {
                            *a += g * v * inv;
                        }
                        acc
                    },
                )
                .reduce(|| vec![T::zero(); h], |a, b| a.iter().zip(&b).map(|(&a, &b)| a + b).collect());
            return Ok(partial);
        }
        let mut out = vec![T::zero(); x.len()];
        let n = T::from(h).expect("a length");
        by_rows(&mut out, h, |r, out| {
            let (x, g) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
            let inv = inv_rms(x, self.eps);
            let dot = x.iter().zip(g).zip(w).fold(T::zero(), |acc, ((&v, &g), &w)| acc + w * g * v * inv) / n;
            for (((o, &v), &g), &w) in out.iter_mut().zip(x).zip(g).zip(w) {
                *o = inv * (w * g - v * inv * dot);
            }
        });
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
        let half = d / 2;
        let mut out = vec![T::zero(); x.len()];
        by_rows(&mut out, d, |r, out| {
            let p = r % seq;
            let (x, c, s) = (&x[r * d..(r + 1) * d], &cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
            for k in 0..half {
                let (x1, x2) = (x[k], x[k + half]);
                if self.backward {
                    out[k] = x1 * c[k] + x2 * s[k + half];
                    out[k + half] = x2 * c[k + half] - x1 * s[k];
                } else {
                    out[k] = x1 * c[k] - x2 * s[k];
                    out[k + half] = x2 * c[k + half] + x1 * s[k + half];
                }
            }
        });
        Ok(out)
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
