//! A frozen projection with LoRA adapters as one op: `y = x·Wᵀ`, then for each adapted block of
//! output columns `y[:, block] += scale · dropout(x)·Aᵀ·Bᵀ`, accumulated by gemm into `y` itself.
//! Composed from candle's ops, the base output, every update and every sum stay alive until the
//! backward (about twice the projection's activations); here only `y` exists, `x·Aᵀ` and the
//! dropout masks are recomputed in the backward, and the frozen `W` gets no gradient.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rand::{Rng, SeedableRng};

use super::Real;
use crate::model::linear;

/// One block of output columns and whether an adapter writes it.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub columns: usize,
    /// The block's adapter: its dropout seed (`None`: no dropout), or no adapter at all.
    pub adapter: Option<Option<u64>>,
}

/// `x·Wᵀ` plus the adapters' updates; `a`: the adapted blocks' A factors stacked `(n·rank, in)`,
/// `b`: their B factors stacked `(Σ columns, rank)`, in block order.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    blocks: Vec<Block>,
    scale: f64,
    dropout: f64,
) -> Result<Tensor> {
    let op = LoraLinear { weight: weight.contiguous()?, blocks, rank: b.dim(1)?, scale, dropout };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// Keep-and-rescale factors of dropout with probability `p`, `count` of them, from `seed`.
pub(crate) fn dropout_mask(count: usize, p: f64, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..count).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect()
}

struct LoraLinear {
    weight: Tensor,
    blocks: Vec<Block>,
    rank: usize,
    scale: f64,
    dropout: f64,
}

impl LoraLinear {
    /// The adapters' blocks as (first column, columns, index among adapters, dropout seed).
    fn adapted(&self) -> Vec<(usize, usize, usize, Option<u64>)> {
        let (mut column, mut index, mut adapted) = (0, 0, Vec::new());
        for block in &self.blocks {
            if let Some(seed) = block.adapter {
                adapted.push((column, block.columns, index, seed));
                index += 1;
            }
            column += block.columns;
        }
        adapted
    }

    /// `x` as the adapter with dropout seed `seed` reads it.
    fn dropped(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        match seed {
            Some(seed) if self.dropout > 0.0 => {
                let mask = dropout_mask(x.elem_count(), self.dropout, seed);
                x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
            }
            _ => Ok(x.clone()),
        }
    }
}

fn slice<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("lora-linear: inputs must be contiguous"),
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (weight, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else { bail!("lora-linear: the weight is not on the CPU") };
        let (mut y, shape) = linear::forward_storage((xs, xl), (weight, wl))?;
        let out = *shape.dims().last().expect("a feature dimension");
        let input = *xl.dims().last().expect("a feature dimension");
        let rows = xl.shape().elem_count() / input;
        fn add_updates<T: Real + candle_core::WithDType>(
            op: &LoraLinear,
            y: &mut [T],
            (x, a, b): (&[T], &[T], &[T]),
            (rows, input, out): (usize, usize, usize),
        ) {
            let r = op.rank;
            let scale = T::from(op.scale).expect("a float");
            let mut b_row = 0;
            for (column, columns, index, seed) in op.adapted() {
                let dropped: Vec<T>;
                let x = match seed {
                    Some(seed) if op.dropout > 0.0 => {
                        let mask = dropout_mask(x.len(), op.dropout, seed);
                        dropped = x.iter().zip(mask).map(|(&v, m)| v * T::from(m).expect("a float")).collect();
                        &dropped[..]
                    }
                    _ => x,
                };
                // xa = scale · x·Aᵀ (rows × r), then y[:, block] += xa·Bᵀ.
                let mut xa = vec![T::zero(); rows * r];
                let a = &a[index * r * input..(index + 1) * r * input];
                let parallelism = linear::parallelism();
                // SAFETY: xa holds rows·r elements; x is rows × input and a is r × input (strided as
                // its transpose); y has `out` columns per row, of which the block is in range.
                unsafe {
                    linear::gemm_into(
                        (rows, r, input),
                        (xa.as_mut_ptr(), r),
                        (x, input, 1),
                        (a, 1, input),
                        false,
                        parallelism,
                    );
                    for v in xa.iter_mut() {
                        *v = *v * scale;
                    }
                    let b = &b[b_row * r..(b_row + columns) * r];
                    linear::gemm_into(
                        (rows, columns, r),
                        (y.as_mut_ptr().add(column), out),
                        (&xa, r, 1),
                        (b, 1, r),
                        true,
                        parallelism,
                    );
                }
                b_row += columns;
            }
        }
        let sizes = (rows, input, out);
        match (&mut y, xs.dtype()) {
            (CpuStorage::F32(y), DType::F32) => {
                add_updates(self, y, (slice(xs, xl)?, slice(as_, al)?, slice(bs, bl)?), sizes)
            }
            (CpuStorage::F64(y), DType::F64) => {
                add_updates(self, y, (slice(xs, xl)?, slice(as_, al)?, slice(bs, bl)?), sizes)
            }
            (_, dtype) => bail!("lora-linear: {dtype:?} has no CPU kernel"),
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input = x.dim(x.rank() - 1)?;
        let x2 = x.reshape(((), input))?;
        let g = grad.reshape(((), grad.dim(grad.rank() - 1)?))?;
        let (mut dx, _) = linear::gradients(&g, &x2, &self.weight)?;
        let r = self.rank;
        let (mut da, mut db, mut b_row) = (Vec::new(), Vec::new(), 0);
        for (column, columns, index, seed) in self.adapted() {
            let (a_p, b_p) = (a.narrow(0, index * r, r)?, b.narrow(0, b_row, columns)?);
            b_row += columns;
            let g_p = g.narrow(1, column, columns)?.contiguous()?;
            let x_p = self.dropped(&x2, seed)?;
            let xa = (linear::product(&x_p, &a_p)? * self.scale)?;
            // The gradient of x·Aᵀ: scale · g_p·B (rows × r).
            let g_xa = (g_p.matmul(&b_p)? * self.scale)?;
            db.push(g_p.t()?.matmul(&xa)?);
            da.push(g_xa.t()?.matmul(&x_p)?);
            let dx_p = g_xa.matmul(&a_p)?;
            let dx_p = match seed {
                Some(seed) if self.dropout > 0.0 => self.dropped(&dx_p, Some(seed))?,
                _ => dx_p,
            };
            dx = (dx + dx_p)?;
        }
        let dx = dx.reshape(x.shape())?;
        Ok((Some(dx), Some(Tensor::cat(&da, 0)?), Some(Tensor::cat(&db, 0)?)))
    }
}
