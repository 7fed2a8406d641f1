//! The explicit step's matrix products over HuggingFace-layout weights `w: (out, in)`: outputs and
//! input gradients of several projections side by side in packed rows (q/k/v, gate/up) without
//! concatenating their weights, and weight gradients summed into their buffers. Buffers that gemm
//! fills completely are never zeroed first.

use super::Gradients;
use crate::model::fused::Real;
use crate::model::linear::{gemm, gemm_into, parallelism};

/// `[x · w₁ᵀ | x · w₂ᵀ | …]` for `x` rows of `inp`: each projection's output in its column block.
pub(super) fn projections<T: Real>(x: &[T], weights: &[&[T]], inp: usize) -> Vec<T> {
    let mut y = Vec::new();
    projections_into(&mut y, x, weights, inp);
    y
}

/// [`projections`] into `y`, replacing its contents (its allocation is reused).
pub(super) fn projections_into<T: Real>(y: &mut Vec<T>, x: &[T], weights: &[&[T]], inp: usize) {
    let rows = x.len() / inp;
    let width: usize = weights.iter().map(|w| w.len() / inp).sum();
    assert!(x.len() == rows * inp && weights.iter().all(|w| w.len() % inp == 0), "projections: shapes");
    y.clear();
    y.reserve(rows * width);
    let mut col = 0;
    for w in weights {
        let out = w.len() / inp;
        // SAFETY: `y` has room for rows × width elements, of which this writes columns
        // col..col + out of every row; x and w hold rows × inp and out × inp elements.
        unsafe {
            let dst = y.as_mut_ptr().add(col);
            gemm_into((rows, out, inp), (dst, width), (x, inp, 1), (w, 1, inp), false, parallelism());
        }
        col += out;
    }
    // SAFETY: the column blocks cover every element of every row.
    unsafe { y.set_len(rows * width) };
}

/// `y += x · wᵀ`: a projection added onto the residual stream `y` (rows of `out`).
pub(super) fn add_projection<T: Real>(x: &[T], w: &[T], inp: usize, y: &mut [T]) {
    let (rows, out) = (x.len() / inp, w.len() / inp);
    gemm((rows, out, inp), (y, out), (x, inp, 1), (w, 1, inp), true, parallelism());
}

/// `Σ_i g[:, block i] · w_i`: the input gradient of projections whose outputs are the column
/// blocks of `g` (rows of `g_width`), in their order.
pub(super) fn input_gradient<T: Real>(g: &[T], g_width: usize, weights: &[&[T]], inp: usize) -> Vec<T> {
    let rows = g.len() / g_width;
    let mut dx: Vec<T> = Vec::with_capacity(rows * inp);
    // SAFETY: `dx` has room for the rows × inp elements that the first product writes, all of them.
    unsafe {
        input_gradient_raw(dx.as_mut_ptr(), g, g_width, weights, inp);
        dx.set_len(rows * inp);
    }
    dx
}

/// [`input_gradient`] written into `dx`: as many rows as `g`, each of the weights' input features.
pub(super) fn input_gradient_into<T: Real>(dx: &mut [T], g: &[T], g_width: usize, weights: &[&[T]]) {
    let rows = g.len() / g_width;
    let inp = dx.len() / rows.max(1);
    assert!(dx.len() == rows * inp, "input gradient: shapes");
    // SAFETY: `dx` holds rows × inp elements.
    unsafe { input_gradient_raw(dx.as_mut_ptr(), g, g_width, weights, inp) }
}

/// # Safety
/// `dx` must be valid for writes of `g.len() / g_width × inp` elements.
unsafe fn input_gradient_raw<T: Real>(dx: *mut T, g: &[T], g_width: usize, weights: &[&[T]], inp: usize) {
    let rows = g.len() / g_width;
    let widths_add_up = weights.iter().map(|w| w.len() / inp).sum::<usize>() == g_width;
    assert!(
        g.len() == rows * g_width && weights.iter().all(|w| w.len() % inp == 0) && widths_add_up,
        "input gradient: shapes"
    );
    let mut col = 0;
    for (i, w) in weights.iter().enumerate() {
        let out = w.len() / inp;
        // SAFETY: the first product writes all of dx and the others add to it; g and w hold
        // rows × g_width and out × inp elements (asserted above).
        unsafe { gemm_into((rows, inp, out), (dx, inp), (&g[col..], g_width, 1), (w, inp, 1), i > 0, parallelism()) };
        col += out;
    }
}

impl<T: Real> Gradients<T> {
    /// `d name += g[:, col..col + out]ᵀ · x`: a projection's weight gradient `(out, inp)` from its
    /// column block of `g` (rows of `g_width`) and its input `x`, written fresh on first use.
    pub(super) fn add_weight_product(
        &mut self,
        name: &str,
        (g, g_width, col): (&[T], usize, usize),
        x: &[T],
        out: usize,
    ) {
        let rows = g.len() / g_width;
        let inp = x.len() / rows;
        let lhs = (&g[col..], 1, g_width);
        if let Some(dw) = self.buffers.get_mut(name) {
            gemm((out, inp, rows), (dw, inp), lhs, (x, inp, 1), true, parallelism());
            return;
        }
        assert!(col + out <= g_width && x.len() == rows * inp, "weight gradient: shapes");
        let mut dw: Vec<T> = Vec::with_capacity(out * inp);
        // SAFETY: `dw` has room for the out × inp elements that this product writes, all of them.
        unsafe {
            gemm_into((out, inp, rows), (dw.as_mut_ptr(), inp), lhs, (x, inp, 1), false, parallelism());
            dw.set_len(out * inp);
        }
        self.buffers.insert(name.to_string(), dw);
    }
}
