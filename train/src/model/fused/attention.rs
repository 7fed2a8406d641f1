//! Causal grouped-query self-attention as one op on the packed projections: queries, keys and
//! values come in as one `(b, s, (heads + 2·kv_heads)·d)` tensor (one gemm for all three), and the
//! output leaves in the layout of the output projection, `(b, s, heads·d)`. Inside, one task per
//! (batch, key/value head) gathers its rows with the rotary embedding applied, computes scores,
//! masked softmax and values by single-threaded gemm calls on rows that stay in cache, and skips
//! the key blocks that the causal mask hides. Composed, the same work is three projections, head
//! splits, rotations, batched matmuls forked over the threads, a softmax and a head merge, each
//! with a full-size gradient that candle's backward zeroes and sums.
//!
//! The op keeps its rotated queries, keys, values and probabilities for the backward pass.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::elementwise::rotate;
use super::softmax::{softmax_grad_in_place, softmax_in_place, visible};
use super::{by_rows, data, Real};
use crate::model::linear;

/// Query positions per block: each block's scores cover only the keys up to its last position.
const BLOCK: usize = 64;

/// `qkv: (b, s, (heads + 2·kv_heads)·d)` → `(b, s, heads·d)`: rotary embedding (`cos`, `sin:
/// (s, d)`, HF's half-split layout) on queries and keys, then causal attention, optionally limited
/// to a sliding window, with scale `1/√d`; query head `h` reads key/value head
/// `h / (heads / kv_heads)`, as transformers' `repeat_kv` does.
pub fn self_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let op = SelfAttention { heads, kv_heads, window: window.unwrap_or(usize::MAX), kept: Mutex::new(None) };
    qkv.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
}

/// What one layer's attention keeps between the explicit step's forward and backward passes.
pub(crate) struct Saved<T> {
    tasks: Vec<Task<T>>,
    n: Dims,
    op: SelfAttention,
}

/// [`self_attention`] on slices: `qkv` rows of `(heads + 2·kv_heads)·d` for `batch` sequences of
/// `seq`, the rotary tables `(seq, d)`; returns the output rows `(heads·d)` and what the backward needs.
pub(crate) fn forward_rows<T: Real>(
    qkv: &[T],
    (batch, seq): (usize, usize),
    (cos, sin): (&[T], &[T]),
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
) -> Result<(Vec<T>, Saved<T>)> {
    let op = SelfAttention { heads, kv_heads, window: window.unwrap_or(usize::MAX), kept: Mutex::new(None) };
    let n = Dims::new(&op, &[batch, seq, qkv.len() / (batch * seq).max(1)], cos.len())?;
    let (y, tasks) = op.forward(qkv, cos, sin, n);
    Ok((y, Saved { tasks, n, op }))
}

/// The gradient of the packed `qkv` rows from the output gradient `dy`, on slices.
pub(crate) fn backward_rows<T: Real>(saved: &Saved<T>, dy: &[T], (cos, sin): (&[T], &[T])) -> Vec<T> {
    saved.op.backward(&saved.tasks, dy, cos, sin, saved.n)
}

struct SelfAttention {
    heads: usize,
    kv_heads: usize,
    window: usize,
    /// Set by the forward pass and taken by the backward pass (once per graph).
    kept: Mutex<Option<Kept>>,
}

/// One task's rotated queries `(groups·s, d)`, keys and values `(s, d)`, and probabilities
/// `(groups·s, s)`; query row `g·s + p` is position `p` of the task's query head `g`.
struct Task<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
}

enum Kept {
    F32(Vec<Task<f32>>),
    F64(Vec<Task<f64>>),
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    window: usize,
}

impl Dims {
    fn new(op: &SelfAttention, qkv: &[usize], table: usize) -> Result<Self> {
        let &[batch, seq, width] = qkv else { bail!("self-attention: qkv must be (batch, seq, width), got {qkv:?}") };
        let columns = op.heads + 2 * op.kv_heads;
        if op.kv_heads == 0 || !op.heads.is_multiple_of(op.kv_heads) || !width.is_multiple_of(columns) {
            bail!("self-attention: width {width} is not ({} + 2·{}) heads", op.heads, op.kv_heads);
        }
        let head_dim = width / columns;
        if table != seq * head_dim || !head_dim.is_multiple_of(2) {
            bail!("self-attention: rotary tables of {table} for {seq} positions of {head_dim}");
        }
        Ok(Self { batch, seq, head_dim, heads: op.heads, kv_heads: op.kv_heads, window: op.window })
    }
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn tasks(&self) -> usize {
        self.batch * self.kv_heads
    }
    /// `(first row, rows, first key, keys)` of every block of a task's queries.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..self.groups()).flat_map(move |g| {
            (0..self.seq).step_by(BLOCK).map(move |p0| {
                let p1 = (p0 + BLOCK).min(self.seq);
                let first_key = visible(p0, self.window).start;
                (g * self.seq + p0, p1 - p0, first_key, p1 - first_key)
            })
        })
    }
}

/// [`linear::gemm`] on this thread: attention's tasks are the parallel units.
fn gemm<T: Real>(
    sizes: (usize, usize, usize),
    dst: (&mut [T], usize),
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    accumulate: bool,
) {
    linear::gemm(sizes, dst, lhs, rhs, accumulate, gemm::Parallelism::None)
}

/// Copies column head `column` (of `d`) of every position of `batch` from rows of `width` into
/// `out: (s, d)`, rotated by the tables when given, or with the inverse rotation when `inverse`.
fn gather<T: Real>(
    x: &[T],
    width: usize,
    n: Dims,
    batch: usize,
    column: usize,
    rope: Option<(&[T], &[T])>,
    out: &mut [T],
) {
    let d = n.head_dim;
    for (p, out) in out.chunks_mut(d).enumerate() {
        let row = &x[(batch * n.seq + p) * width + column * d..][..d];
        match rope {
            Some((cos, sin)) => rotate(row, &cos[p * d..][..d], &sin[p * d..][..d], false, out),
            None => out.copy_from_slice(row),
        }
    }
}

impl SelfAttention {
    fn forward<T: Real>(&self, qkv: &[T], cos: &[T], sin: &[T], n: Dims) -> (Vec<T>, Vec<Task<T>>) {
        let (s, d, groups) = (n.seq, n.head_dim, n.groups());
        let width = (n.heads + 2 * n.kv_heads) * d;
        let scale = T::from(1.0 / (d as f64).sqrt()).expect("a float scale");
        let tasks: Vec<(Task<T>, Vec<T>)> = (0..n.tasks())
            .into_par_iter()
            .map(|t| {
                let (batch, kv_head) = (t / n.kv_heads, t % n.kv_heads);
                let mut q = vec![T::zero(); groups * s * d];
                for (g, q) in q.chunks_mut(s * d).enumerate() {
                    gather(qkv, width, n, batch, kv_head * groups + g, Some((cos, sin)), q);
                }
                let (mut k, mut v) = (vec![T::zero(); s * d], vec![T::zero(); s * d]);
                gather(qkv, width, n, batch, n.heads + kv_head, Some((cos, sin)), &mut k);
                gather(qkv, width, n, batch, n.heads + n.kv_heads + kv_head, None, &mut v);
                let mut probs = vec![T::zero(); groups * s * s];
                let mut y = vec![T::zero(); groups * s * d];
                for (r0, m, k0, keys) in n.blocks() {
                    let p = &mut probs[r0 * s..][..m * s];
                    gemm((m, keys, d), (&mut p[k0..], s), (&q[r0 * d..], d, 1), (&k[k0 * d..], 1, d), false);
                    for (i, row) in p.chunks_mut(s).enumerate() {
                        let visible = visible((r0 + i) % s, n.window);
                        softmax_in_place(&mut row[visible.clone()], scale);
                        row[k0..visible.start].iter_mut().for_each(|x| *x = T::zero());
                        row[visible.end..k0 + keys].iter_mut().for_each(|x| *x = T::zero());
                    }
                    gemm((m, d, keys), (&mut y[r0 * d..], d), (&p[k0..], s, 1), (&v[k0 * d..], d, 1), false);
                }
                (Task { q, k, v, probs }, y)
            })
            .collect();
        let mut out = vec![T::zero(); n.batch * s * n.heads * d];
        by_rows(&mut out, d, |r, out| {
            let (batch, p, h) = (r / (s * n.heads), (r / n.heads) % s, r % n.heads);
            let y = &tasks[batch * n.kv_heads + h / groups].1;
            out.copy_from_slice(&y[((h % groups) * s + p) * d..][..d]);
        });
        (out, tasks.into_iter().map(|(task, _)| task).collect())
    }

    /// The gradient of the packed `qkv` from the output gradient `dy: (b, s, heads·d)`.
    fn backward<T: Real>(&self, tasks: &[Task<T>], dy: &[T], cos: &[T], sin: &[T], n: Dims) -> Vec<T> {
        let (s, d, groups) = (n.seq, n.head_dim, n.groups());
        let scale = T::from(1.0 / (d as f64).sqrt()).expect("a float scale");
        // Per task: dq (groups·s, d), dk and dv (s, d), before the inverse rotation.
        let grads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = tasks
            .par_iter()
            .enumerate()
            .map(|(t, task)| {
                let (batch, kv_head) = (t / n.kv_heads, t % n.kv_heads);
                let mut dy_rows = vec![T::zero(); groups * s * d];
                for (g, out) in dy_rows.chunks_mut(s * d).enumerate() {
                    gather(dy, n.heads * d, n, batch, kv_head * groups + g, None, out);
                }
                let (q, k, v, probs) = (&task.q, &task.k, &task.v, &task.probs);
                let mut ds = vec![T::zero(); groups * s * s];
                let mut dq = vec![T::zero(); groups * s * d];
                let (mut dk, mut dv) = (vec![T::zero(); s * d], vec![T::zero(); s * d]);
                for (r0, m, k0, keys) in n.blocks() {
                    let (ds, p, dy) = (&mut ds[r0 * s..][..m * s], &probs[r0 * s..][..m * s], &dy_rows[r0 * d..]);
                    // dP = dY · Vᵀ, then dS = scale · P ∘ (dP − Σ_j dP·P) in place.
                    gemm((m, keys, d), (&mut ds[k0..], s), (dy, d, 1), (&v[k0 * d..], 1, d), false);
                    for (ds, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                        softmax_grad_in_place(&mut ds[k0..k0 + keys], &p[k0..k0 + keys], scale);
                    }
                    gemm((m, d, keys), (&mut dq[r0 * d..], d), (&ds[k0..], s, 1), (&k[k0 * d..], d, 1), false);
                    gemm((keys, d, m), (&mut dk[k0 * d..], d), (&ds[k0..], 1, s), (&q[r0 * d..], d, 1), true);
                    gemm((keys, d, m), (&mut dv[k0 * d..], d), (&p[k0..], 1, s), (dy, d, 1), true);
                }
                (dq, dk, dv)
            })
            .collect();
        let columns = n.heads + 2 * n.kv_heads;
        let mut dqkv = vec![T::zero(); n.batch * s * columns * d];
        by_rows(&mut dqkv, d, |r, out| {
            let (batch, p, column) = (r / (s * columns), (r / columns) % s, r % columns);
            let (table_cos, table_sin) = (&cos[p * d..][..d], &sin[p * d..][..d]);
            if column < n.heads {
                let dq = &grads[batch * n.kv_heads + column / groups].0;
                rotate(&dq[((column % groups) * s + p) * d..][..d], table_cos, table_sin, true, out);
            } else if column < n.heads + n.kv_heads {
                let dk = &grads[batch * n.kv_heads + column - n.heads].1;
                rotate(&dk[p * d..][..d], table_cos, table_sin, true, out);
            } else {
                let dv = &grads[batch * n.kv_heads + column - n.heads - n.kv_heads].2;
                out.copy_from_slice(&dv[p * d..][..d]);
            }
        });
        dqkv
    }
}

impl CustomOp3 for SelfAttention {
    fn name(&self) -> &'static str {
        "self-attention"
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
        let n = Dims::new(self, l1.dims(), l2.shape().elem_count())?;
        let shape = Shape::from((n.batch, n.seq, n.heads * n.head_dim));
        let (y, kept) = match s1 {
            CpuStorage::F32(_) => {
                let (y, tasks) =
                    self.forward(data::<f32>(s1, l1, "qkv")?, data(s2, l2, "cos")?, data(s3, l3, "sin")?, n);
                (CpuStorage::F32(y), Kept::F32(tasks))
            }
            CpuStorage::F64(_) => {
                let (y, tasks) =
                    self.forward(data::<f64>(s1, l1, "qkv")?, data(s2, l2, "cos")?, data(s3, l3, "sin")?, n);
                (CpuStorage::F64(y), Kept::F64(tasks))
            }
            _ => bail!("self-attention: f32 or f64"),
        };
        *self.kept.lock().expect("attention lock") = Some(kept);
        Ok((y, shape))
    }
    fn bwd(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(kept) = self.kept.lock().expect("attention lock").take() else {
            bail!("self-attention: a second backward pass through the same graph");
        };
        let n = Dims::new(self, qkv.dims(), cos.elem_count())?;
        let backward = Backward { op: self, kept, n, shape: qkv.shape().clone() };
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &backward)?), None, None))
    }
}

/// The backward pass as an op on (dy, cos, sin), so that it reads candle's buffers in place.
struct Backward<'a> {
    op: &'a SelfAttention,
    kept: Kept,
    n: Dims,
    shape: Shape,
}

impl CustomOp3 for Backward<'_> {
    fn name(&self) -> &'static str {
        "self-attention-grad"
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
        let storage = match &self.kept {
            Kept::F32(tasks) => CpuStorage::F32(self.op.backward(
                tasks,
                data(s1, l1, "grad")?,
                data(s2, l2, "cos")?,
                data(s3, l3, "sin")?,
                self.n,
            )),
            Kept::F64(tasks) => CpuStorage::F64(self.op.backward(
                tasks,
                data(s1, l1, "grad")?,
                data(s2, l2, "cos")?,
                data(s3, l3, "sin")?,
                self.n,
            )),
        };
        Ok((storage, self.shape.clone()))
    }
}
