//! `x · Wᵀ` as one op with its own backward, calling gemm directly. Composed from candle's
//! `matmul(w.t())`, the weight gradient comes back transposed and is summed into a zero tensor
//! element by element through strides, the output buffer is zeroed before gemm overwrites it, and
//! the reshapes around it each add a full-size gradient to the backward pass. Here `dW = gᵀ·x` is
//! written in the weight's own layout by gemm, and `x` keeps its leading dimensions.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x: (.., in)`, `weight: (out, in)` → `(.., out)`.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, Linear)
}

/// `y = x · wᵀ` on storages, for ops that fuse the product with what follows.
pub(crate) fn forward_storage(x: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout)) -> Result<(CpuStorage, Shape)> {
    run(Product::Forward, x, w)
}

/// `x · wᵀ` with no backward graph.
pub(crate) fn product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Gradient(Product::Forward))
}

/// gemm's threading: rayon's pool when it has more than one thread.
pub(crate) fn parallelism() -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `(g · w, gᵀ · x)`: the input and weight gradients of `x · wᵀ` for the output gradient `g`; a
/// frozen weight (one that no gradient reaches a variable through) gets none.
pub(crate) fn gradients(g: &Tensor, x: &Tensor, w: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let dx = g.apply_op2_no_bwd(w, &Gradient(Product::InputGrad))?;
    let dw = w.track_op().then(|| g.apply_op2_no_bwd(x, &Gradient(Product::WeightGrad))).transpose()?;
    Ok((dx, dw))
}

/// `dst (m × n, row stride dst_rs) = lhs · rhs` (or `+=` with `accumulate`), operands as (data,
/// row stride, column stride): [`gemm_into`] on slices, checked to stay inside them.
pub(crate) fn gemm<T: 'static + num_traits::Zero + num_traits::One>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [T], usize),
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let covers = |len: usize, rows: usize, cols: usize, rs: usize, cs: usize| {
        rows == 0 || cols == 0 || len > (rows - 1) * rs + (cols - 1) * cs
    };
    assert!(covers(dst.len(), m, n, dst_rs, 1), "gemm: a destination too small");
    assert!(covers(lhs.0.len(), m, k, lhs.1, lhs.2) && covers(rhs.0.len(), k, n, rhs.1, rhs.2));
    // SAFETY: the assertions above: every strided element of dst, lhs and rhs is in its slice.
    unsafe { gemm_into((m, n, k), (dst.as_mut_ptr(), dst_rs), lhs, rhs, accumulate, parallelism) }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`) for an m × k `lhs` and a k × n
/// `rhs`, each given as (data, row stride, column stride) in elements; `dst` is given as (pointer,
/// row stride) with unit column stride, and every one of its m × n elements is written.
///
/// # Safety
/// `dst` must have room for its strided m × n elements, and `lhs` and `rhs` must hold every strided
/// element.
pub(crate) unsafe fn gemm_into<T: 'static + num_traits::Zero + num_traits::One>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // dst = alpha·dst + beta·lhs·rhs; with read_dst false dst is overwritten, never read.
    let alpha = if accumulate { T::one() } else { T::zero() };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.as_ptr(),
        lhs_cs as isize,
        lhs_rs as isize,
        rhs.as_ptr(),
        rhs_cs as isize,
        rhs_rs as isize,
        alpha,
        T::one(),
        false,
        false,
        false,
        parallelism,
    )
}

/// Which product a [`Product`] computes, for `x: (rows, in)`, `w: (out, in)`, `g: (rows, out)`.
#[derive(Clone, Copy)]
enum Product {
    /// `y = x · wᵀ` from (x, w).
    Forward,
    /// `dx = g · w` from (g, w).
    InputGrad,
    /// `dw = gᵀ · x` from (g, x).
    WeightGrad,
}

struct Linear;
struct Gradient(Product);

fn contiguous<'a, T: candle_core::WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<T>()?[start..end]),
        None => bail!("linear: inputs must be contiguous"),
    }
}

/// A contiguous bf16 or f16 tensor's elements as f32.
fn widen(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    Ok(match storage {
        CpuStorage::BF16(_) => contiguous::<half::bf16>(storage, layout)?.par_iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(_) => contiguous::<half::f16>(storage, layout)?.par_iter().map(|x| x.to_f32()).collect(),
        other => bail!("linear: cannot widen {:?}", other.dtype()),
    })
}

/// Runs `product` on row-major `a` and `b`; returns the result and its shape.
fn run(product: Product, a: (&CpuStorage, &Layout), b: (&CpuStorage, &Layout)) -> Result<(CpuStorage, Shape)> {
    let (a_dims, b_dims) = (a.1.dims(), b.1.dims());
    let a_cols = *a_dims.last().unwrap_or(&1);
    let a_rows = a.1.shape().elem_count() / a_cols.max(1);
    let b_cols = *b_dims.last().unwrap_or(&1);
    let b_rows = b.1.shape().elem_count() / b_cols.max(1);
    // (m, n, k) and the (row, column) strides of lhs and rhs, in elements.
    let (m, n, k, lhs, rhs, shape) = match product {
        Product::Forward => {
            if a_cols != b_cols {
                bail!("linear: input of {a_cols} features for a weight of {b_cols}");
            }
            let mut dims = a_dims[..a_dims.len() - 1].to_vec();
            dims.push(b_rows);
            (a_rows, b_rows, a_cols, (a_cols, 1), (1, b_cols), Shape::from(dims))
        }
        Product::InputGrad => {
            if a_cols != b_rows {
                bail!("linear: gradient of {a_cols} features for a weight of {b_rows} outputs");
            }
            let mut dims = a_dims[..a_dims.len() - 1].to_vec();
            dims.push(b_cols);
            (a_rows, b_cols, a_cols, (a_cols, 1), (b_cols, 1), Shape::from(dims))
        }
        Product::WeightGrad if a_rows != b_rows => bail!("linear: {a_rows} gradient rows for {b_rows} inputs"),
        Product::WeightGrad => (a_cols, b_cols, a_rows, (1, a_cols), (b_cols, 1), Shape::from((a_cols, b_cols))),
    };
    fn typed<T: candle_core::WithDType + num_traits::Zero + num_traits::One>(
        (m, n, k): (usize, usize, usize),
        (lhs, lhs_strides): (&[T], (usize, usize)),
        (rhs, rhs_strides): (&[T], (usize, usize)),
    ) -> Vec<T> {
        let mut dst: Vec<T> = Vec::with_capacity(m * n);
        let parallelism = parallelism();
        // SAFETY: dst has room for m·n elements, all of which gemm_into writes; lhs and rhs cover
        // the strided m·k and k·n elements (the caller checked the shapes).
        unsafe {
            gemm_into(
                (m, n, k),
                (dst.as_mut_ptr(), n),
                (lhs, lhs_strides.0, lhs_strides.1),
                (rhs, rhs_strides.0, rhs_strides.1),
                false,
                parallelism,
            );
            dst.set_len(m * n);
        }
        dst
    }
    let sizes = (m, n, k);
    let storage = match (a.0.dtype(), b.0.dtype()) {
        (DType::F32, DType::F32) => {
            CpuStorage::F32(typed(sizes, (contiguous(a.0, a.1)?, lhs), (contiguous(b.0, b.1)?, rhs)))
        }
        (DType::F64, DType::F64) => {
            CpuStorage::F64(typed(sizes, (contiguous(a.0, a.1)?, lhs), (contiguous(b.0, b.1)?, rhs)))
        }
        // A frozen half-precision weight: widened for this product only, so the model keeps 2 bytes
        // per weight and at most one matrix exists in f32 at a time.
        (DType::F32, DType::BF16 | DType::F16) => {
            CpuStorage::F32(typed(sizes, (contiguous(a.0, a.1)?, lhs), (&widen(b.0, b.1)?, rhs)))
        }
        (x, w) => bail!("linear: no CPU kernel for {x:?} inputs and {w:?} weights"),
    };
    Ok((storage, shape))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        run(Product::Forward, (s1, l1), (s2, l2))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = gradients(&grad.contiguous()?, x, w)?;
        Ok((Some(dx), dw))
    }
}

impl CustomOp2 for Gradient {
    fn name(&self) -> &'static str {
        "linear-grad"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        run(self.0, (s1, l1), (s2, l2))
    }
}
