//! Moving between the projections' layout `(batch, seq, heads · head_dim)` and attention's
//! `(batch, heads, seq, head_dim)` in one pass, with the rotary embedding applied on the way in for
//! queries and keys. Composed, this is a reshape, a transpose, a copy and the rotation, each a node
//! with its own full-size gradient in the backward pass.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::elementwise::rotate;
use super::{by_rows, cpu, Kernel, Real};

/// `(b, s, n·d)` → `(b, n, s, d)`, rotated by `cos`, `sin: (s, d)` when `rotate`.
pub fn split_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor, rotate: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3(cos, sin, Heads { heads, rotate, split: true })
}

/// `(b, n, s, d)` → `(b, s, n·d)`.
pub fn merge_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let heads = x.dim(1)?;
    x.contiguous()?.apply_op3(cos, sin, Heads { heads, rotate: false, split: false })
}

#[derive(Clone, Copy)]
struct Heads {
    heads: usize,
    rotate: bool,
    /// Split (forward for inputs) or merge; a rotating merge applies the transposed rotation.
    split: bool,
}

impl Kernel for Heads {
    const NAME: &'static str = "heads";
    fn run<T: Real>(&self, inputs: &[&[T]], dims: &[&[usize]]) -> Result<Vec<T>> {
        let (x, cos, sin) = (inputs[0], inputs[1], inputs[2]);
        let n = self.heads;
        let (b, s, d) = if self.split {
            let &[b, s, width] = dims[0] else { candle_core::bail!("heads: (batch, seq, width) expected") };
            (b, s, width / n)
        } else {
            let &[b, _, s, d] = dims[0] else { candle_core::bail!("heads: (batch, heads, seq, dim) expected") };
            (b, s, d)
        };
        if self.rotate && (cos.len() != s * d || d % 2 != 0) {
            candle_core::bail!("heads: rotary tables of {} for {s} positions of {d}", cos.len());
        }
        let mut out = vec![T::zero(); b * s * n * d];
        // One output row of `d` at a time, with the input row it comes from.
        by_rows(&mut out, d, |row, out| {
            let (batch, head, position) = if self.split {
                (row / (n * s), (row / s) % n, row % s)
            } else {
                (row / (s * n), row % n, (row / n) % s)
            };
            let source = if self.split {
                ((batch * s + position) * n + head) * d
            } else {
                ((batch * n + head) * s + position) * d
            };
            let x = &x[source..source + d];
            if !self.rotate {
                out.copy_from_slice(x);
                return;
            }
            let (c, sn) = (&cos[position * d..(position + 1) * d], &sin[position * d..(position + 1) * d]);
            // Splitting rotates; merging (the split's backward) applies the inverse rotation.
            rotate(x, c, sn, !self.split, out);
        });
        Ok(out)
    }
}

impl CustomOp3 for Heads {
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
        let dims = l1.dims();
        let shape = if self.split {
            let width = dims[2];
            Shape::from((dims[0], self.heads, dims[1], width / self.heads))
        } else {
            Shape::from((dims[0], dims[2], dims[1] * dims[3]))
        };
        cpu(self, &[(s1, l1), (s2, l2), (s3, l3)], shape)
    }
    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Heads { split: !self.split, ..*self };
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?), None, None))
    }
}
