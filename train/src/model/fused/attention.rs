//! Causal grouped-query self-attention as one op on the packed projections: queries, keys and
//! values come in as one `(b, s, (heads + 2·kv_heads)·d)` tensor (one gemm for all three), and the
//! output leaves in the layout of the output projection, `(b, s, heads·d)`. The rotary embedding
//! turns the packed rows' queries and keys in place; then each block of query positions of each
//! query head goes through scores, masked softmax and values (one task per block in the forward
//! pass, per head in the backward pass, which sums into the head's key and value gradients) with
//! single-threaded gemm calls that read the packed rows where they lie and skip the key blocks
//! that the causal mask hides.
//!
//! As in FlashAttention, the probabilities are not kept: the forward pass keeps each query row's
//! log-sum-exp, and the backward pass recomputes a block's scores (one more product) to get its
//! probabilities back. A block's rows fit in a small scratch buffer either way; keeping every
//! probability cost batch·heads·s² floats per layer, 4 GiB of an 8-layer 1B Llama's 18 at
//! sequence 2048.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use cpt_protocol::plan::EXPLICIT_ATTENTION_BLOCK as BLOCK;

use super::elementwise::rotate;
use super::softmax::{softmax_grad_in_place, softmax_in_place, visible};
use super::{by_rows, data, Real};
use crate::model::linear;

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

/// What one layer's attention keeps between the forward and backward passes: the packed rows
/// with queries and keys rotated, and every query row's log-sum-exp of its scaled scores,
/// `(batch, heads, s)`.
pub(crate) struct Saved<T> {
    qkv: Vec<T>,
    lse: Vec<T>,
    n: Dims,
}

/// [`self_attention`] on slices: `qkv` rows of `(heads + 2·kv_heads)·d` for `batch` sequences of
/// `seq` (taken: its queries and keys are rotated in place and kept), the rotary tables `(seq,
/// d)`; returns the output rows `(heads·d)` and what the backward pass needs.
pub(crate) fn forward_rows<T: Real>(
    mut qkv: Vec<T>,
    (batch, seq): (usize, usize),
    (cos, sin): (&[T], &[T]),
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
) -> Result<(Vec<T>, Saved<T>)> {
    let width = qkv.len() / (batch * seq).max(1);
    let n = Dims::new(heads, kv_heads, window.unwrap_or(usize::MAX), &[batch, seq, width], cos.len())?;
    let (y, lse) = n.forward(&mut qkv, cos, sin);
    Ok((y, Saved { qkv, lse, n }))
}

/// The gradient of the packed `qkv` rows from the output gradient `dy`, on slices.
pub(crate) fn backward_rows<T: Real>(saved: &Saved<T>, dy: &[T], (cos, sin): (&[T], &[T])) -> Vec<T> {
    saved.n.backward(saved, dy, cos, sin)
}

struct SelfAttention {
    heads: usize,
    kv_heads: usize,
    window: usize,
    /// Set by the forward pass and taken by the backward pass (once per graph).
    kept: Mutex<Option<Kept>>,
}

enum Kept {
    F32(Saved<f32>),
    F64(Saved<f64>),
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
    fn new(heads: usize, kv_heads: usize, window: usize, qkv: &[usize], table: usize) -> Result<Self> {
        let &[batch, seq, width] = qkv else { bail!("self-attention: qkv must be (batch, seq, width), got {qkv:?}") };
        let columns = heads + 2 * kv_heads;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !width.is_multiple_of(columns) {
            bail!("self-attention: width {width} is not ({heads} + 2·{kv_heads}) heads");
        }
        let head_dim = width / columns;
        if table != seq * head_dim || !head_dim.is_multiple_of(2) {
            bail!("self-attention: rotary tables of {table} for {seq} positions of {head_dim}");
        }
        Ok(Self { batch, seq, head_dim, heads, kv_heads, window })
    }
    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Heads in a packed row: queries, keys, values.
    fn columns(&self) -> usize {
        self.heads + 2 * self.kv_heads
    }
    fn width(&self) -> usize {
        self.columns() * self.head_dim
    }
    /// The first element of query head `h`, its key head and its value head in a packed row.
    fn offsets(&self, h: usize) -> [usize; 3] {
        let kv = h / self.groups();
        [h, self.heads + kv, self.heads + self.kv_heads + kv].map(|column| column * self.head_dim)
    }
    /// `(first position, positions, first key, keys)` of every block of query positions.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..self.seq).step_by(BLOCK).map(move |p0| {
            let p1 = (p0 + BLOCK).min(self.seq);
            let first_key = visible(p0, self.window).start;
            (p0, p1 - p0, first_key, p1 - first_key)
        })
    }
    /// The visible keys of the block row of position `p`, relative to the block's first key `k0`.
    fn visible_in_block(&self, p: usize, k0: usize) -> std::ops::Range<usize> {
        let visible = visible(p, self.window);
        visible.start - k0..visible.end - k0
    }
    fn scale<T: Real>(&self) -> T {
        T::from(1.0 / (self.head_dim as f64).sqrt()).expect("a float scale")
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

/// Zeroes `row` outside `keep`: masked keys inside a block take no part in its products.
fn zero_outside<T: Real>(row: &mut [T], keep: &std::ops::Range<usize>) {
    row[..keep.start].fill(T::zero());
    row[keep.end..].fill(T::zero());
}

/// The `(cols, rows)` transpose of `x: (rows, cols)`.
fn transpose<T: Copy>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| x[r * cols + c])).collect()
}

impl Dims {
    /// Rotates the queries and keys of one packed row at position `p` in place (`inverse`: back,
    /// for their gradients).
    fn rotate_row<T: Real>(&self, row: &mut [T], p: usize, (cos, sin): (&[T], &[T]), inverse: bool) {
        let d = self.head_dim;
        let (cos, sin) = (&cos[p * d..][..d], &sin[p * d..][..d]);
        row[..(self.heads + self.kv_heads) * d].chunks_mut(d).for_each(|head| rotate(head, cos, sin, inverse));
    }

    /// Attention over the packed rows `qkv`, whose queries and keys it rotates in place: the
    /// output rows and every query row's log-sum-exp.
    fn forward<T: Real>(&self, qkv: &mut [T], cos: &[T], sin: &[T]) -> (Vec<T>, Vec<T>) {
        by_rows(qkv, self.width(), |r, row| self.rotate_row(row, r % self.seq, (cos, sin), false));
        let qkv = &*qkv;
        let (s, d, width, scale) = (self.seq, self.head_dim, self.width(), self.scale::<T>());
        let blocks: Vec<_> = self.blocks().collect();
        // One task per (batch, query head, block of positions): given the keys and values, blocks
        // are independent, and a batch of one with few heads still gives every thread work.
        let per_block: Vec<(Vec<T>, Vec<T>)> = (0..self.batch * self.heads * blocks.len())
            .into_par_iter()
            .map(|task| {
                let (t, (p0, m, k0, keys)) = (task / blocks.len(), blocks[task % blocks.len()]);
                let rows = &qkv[t / self.heads * s * width..][..s * width];
                let [q, k, v] = self.offsets(t % self.heads).map(|offset| &rows[offset..]);
                let mut p = vec![T::zero(); m * keys];
                let (mut y, mut lse) = (vec![T::zero(); m * d], vec![T::zero(); m]);
                gemm((m, keys, d), (&mut p, keys), (&q[p0 * width..], width, 1), (&k[k0 * width..], 1, width), false);
                for ((i, row), lse) in p.chunks_mut(keys).enumerate().zip(&mut lse) {
                    let visible = self.visible_in_block(p0 + i, k0);
                    *lse = softmax_in_place(&mut row[visible.clone()], scale);
                    zero_outside(row, &visible);
                }
                gemm((m, d, keys), (&mut y, d), (&p, keys, 1), (&v[k0 * width..], width, 1), false);
                (y, lse)
            })
            .collect();
        let mut out = vec![T::zero(); self.batch * s * self.heads * d];
        by_rows(&mut out, d, |r, out| {
            let (row, h) = (r / self.heads, r % self.heads);
            let (batch, position) = (row / s, row % s);
            let y = &per_block[(batch * self.heads + h) * blocks.len() + position / BLOCK].0;
            out.copy_from_slice(&y[position % BLOCK * d..][..d]);
        });
        // In task order, (batch, head, block): the log-sum-exps as (batch, heads, s).
        (out, per_block.into_iter().flat_map(|(_, lse)| lse).collect())
    }

    /// The gradient of the packed rows from the output gradient `dy: (b, s, heads·d)`.
    fn backward<T: Real>(&self, saved: &Saved<T>, dy: &[T], cos: &[T], sin: &[T]) -> Vec<T> {
        let (s, d, width, scale) = (self.seq, self.head_dim, self.width(), self.scale::<T>());
        let dy_width = self.heads * d;
        // Per (batch, query head): its dq, and its share of its key and value heads' dk and dv.
        let per_head: Vec<[Vec<T>; 3]> = (0..self.batch * self.heads)
            .into_par_iter()
            .map(|t| {
                let (batch, h) = (t / self.heads, t % self.heads);
                let rows = &saved.qkv[batch * s * width..][..s * width];
                let [q, k, v] = self.offsets(h).map(|offset| &rows[offset..]);
                let (dy, lse) = (&dy[batch * s * dy_width + h * d..], &saved.lse[t * s..][..s]);
                let (mut probs, mut dscores) = (vec![T::zero(); BLOCK.min(s) * s], vec![T::zero(); BLOCK.min(s) * s]);
                // dk and dv transposed, (d, s): as Qᵀ·dS and dYᵀ·P their products run ~20% faster
                // than as dSᵀ·Q and Pᵀ·dY on long sequences (short sums into a tall gradient).
                let mut dq = vec![T::zero(); s * d];
                let (mut dk_t, mut dv_t) = (vec![T::zero(); d * s], vec![T::zero(); d * s]);
                for (p0, m, k0, keys) in self.blocks() {
                    let (p, ds) = (&mut probs[..m * keys], &mut dscores[..m * keys]);
                    let (q_rows, dy_rows) = ((&q[p0 * width..], width, 1), (&dy[p0 * dy_width..], dy_width, 1));
                    // The block's probabilities again, P = exp(Q·Kᵀ·scale − lse); dP = dY·Vᵀ,
                    // then dS = scale · P ∘ (dP − Σ_j dP·P).
                    gemm((m, keys, d), (p, keys), q_rows, (&k[k0 * width..], 1, width), false);
                    gemm((m, keys, d), (ds, keys), dy_rows, (&v[k0 * width..], 1, width), false);
                    for (i, (p, ds)) in p.chunks_mut(keys).zip(ds.chunks_mut(keys)).enumerate() {
                        let visible = self.visible_in_block(p0 + i, k0);
                        T::exp_shifted_in_place(&mut p[visible.clone()], scale, lse[p0 + i], T::one());
                        softmax_grad_in_place(&mut ds[visible.clone()], &p[visible.clone()], scale);
                        zero_outside(p, &visible);
                        zero_outside(ds, &visible);
                    }
                    gemm((m, d, keys), (&mut dq[p0 * d..], d), (ds, keys, 1), (&k[k0 * width..], width, 1), false);
                    let (q_t, dy_t) = ((&q[p0 * width..], 1, width), (&dy[p0 * dy_width..], 1, dy_width));
                    gemm((d, keys, m), (&mut dk_t[k0..], s), q_t, (ds, keys, 1), true);
                    gemm((d, keys, m), (&mut dv_t[k0..], s), dy_t, (p, keys, 1), true);
                }
                [dq, transpose(&dk_t, d, s), transpose(&dv_t, d, s)]
            })
            .collect();
        // Packed rows again: each query head's dq, each key and value head's sum over the query
        // heads that read it; queries and keys rotated back.
        let (heads, kv_heads, groups) = (self.heads, self.kv_heads, self.groups());
        let mut dqkv = vec![T::zero(); self.batch * s * width];
        by_rows(&mut dqkv, width, |r, row| {
            let (batch, p) = (r / s, r % s);
            for (column, out) in row.chunks_mut(d).enumerate() {
                let (part, readers) = match column {
                    c if c < heads => (0, c..c + 1),
                    c if c < heads + kv_heads => (1, (c - heads) * groups..(c - heads + 1) * groups),
                    c => (2, (c - heads - kv_heads) * groups..(c - heads - kv_heads + 1) * groups),
                };
                for h in readers {
                    let grad = &per_head[batch * heads + h][part][p * d..][..d];
                    out.iter_mut().zip(grad).for_each(|(o, &g)| *o += g);
                }
            }
            self.rotate_row(row, p, (cos, sin), true);
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
        let n = Dims::new(self.heads, self.kv_heads, self.window, l1.dims(), l2.shape().elem_count())?;
        let shape = Shape::from((n.batch, n.seq, n.heads * n.head_dim));
        fn run<T: Real>(n: Dims, qkv: &[T], cos: &[T], sin: &[T]) -> (Vec<T>, Saved<T>) {
            let mut qkv = qkv.to_vec();
            let (y, lse) = n.forward(&mut qkv, cos, sin);
            (y, Saved { qkv, lse, n })
        }
        let (y, kept) = match s1 {
            CpuStorage::F32(_) => {
                let (y, saved) = run(n, data::<f32>(s1, l1, "qkv")?, data(s2, l2, "cos")?, data(s3, l3, "sin")?);
                (CpuStorage::F32(y), Kept::F32(saved))
            }
            CpuStorage::F64(_) => {
                let (y, saved) = run(n, data::<f64>(s1, l1, "qkv")?, data(s2, l2, "cos")?, data(s3, l3, "sin")?);
                (CpuStorage::F64(y), Kept::F64(saved))
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
        let backward = Backward { kept, shape: qkv.shape().clone() };
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &backward)?), None, None))
    }
}

/// The backward pass as an op on (dy, cos, sin), so that it reads candle's buffers in place.
struct Backward {
    kept: Kept,
    shape: Shape,
}

impl CustomOp3 for Backward {
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
            Kept::F32(saved) => CpuStorage::F32(backward_rows(
                saved,
                data(s1, l1, "grad")?,
                (data(s2, l2, "cos")?, data(s3, l3, "sin")?),
            )),
            Kept::F64(saved) => CpuStorage::F64(backward_rows(
                saved,
                data(s1, l1, "grad")?,
                (data(s2, l2, "cos")?, data(s3, l3, "sin")?),
            )),
        };
        Ok((storage, self.shape.clone()))
    }
}
