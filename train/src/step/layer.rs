//! One decoder layer of the explicit step: its forward pass, keeping what its backward pass needs,
//! and its backward pass, which adds each weight's gradient into that weight's buffer and turns the
//! residual stream's gradient into the layer input's in place.

use candle_core::Result;

use super::products::{add_projection, input_gradient, projections};
use super::{Gradients, Shapes};
use crate::model::fused::rows;
use crate::model::fused::Real;

/// One layer's weights, borrowed from the parameters, and their names for the gradients.
pub(super) struct LayerWeights<'a, T> {
    /// `model.layers.{i}`.
    pub prefix: String,
    pub input_norm: &'a [T],
    /// q, k and v, each `(out, hidden)`; their outputs are the packed `qkv` rows' column blocks.
    pub qkv: [&'a [T]; 3],
    pub qkv_bias: Option<[&'a [T]; 3]>,
    pub o: &'a [T],
    pub o_bias: Option<&'a [T]>,
    pub post_norm: &'a [T],
    pub gate: &'a [T],
    pub up: &'a [T],
    pub down: &'a [T],
}

impl<T> LayerWeights<'_, T> {
    fn name(&self, module: &str) -> String {
        format!("{}.{module}", self.prefix)
    }
}

const QKV: [&str; 3] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];

/// What a layer keeps between its forward and backward passes.
pub(super) struct Acts<T> {
    input: Vec<T>,
    /// The normalised input, which q, k and v read.
    h1: Vec<T>,
    attention: rows::Saved<T>,
    /// Attention's output, which o reads.
    y: Vec<T>,
    /// The residual stream after attention.
    mid: Vec<T>,
    h2: Vec<T>,
    /// Packed `[gate | up]` rows.
    gate_up: Vec<T>,
    /// `silu(gate) · up`, which down reads.
    gated: Vec<T>,
}

/// Adds `bias` to columns `col..` of every row of `y`.
fn add_bias<T: Real>(y: &mut [T], width: usize, col: usize, bias: &[T]) {
    for row in y.chunks_mut(width) {
        row[col..col + bias.len()].iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
    }
}

/// `db += Σ_rows g[:, col..col + db.len()]`: a bias's gradient.
fn bias_grad<T: Real>(g: &[T], width: usize, col: usize, db: &mut [T]) {
    for row in g.chunks(width) {
        db.iter_mut().zip(&row[col..]).for_each(|(d, &g)| *d += g);
    }
}

/// The layer's output for `input`, and what its backward pass needs.
pub(super) fn forward<T: Real>(
    w: &LayerWeights<T>,
    n: &Shapes,
    rope: (&[T], &[T]),
    input: Vec<T>,
) -> Result<(Vec<T>, Acts<T>)> {
    let h = n.hidden;
    let (q_width, qkv_width, inter) = (n.q_width(), n.qkv_width(), n.inter);
    let h1 = rows::rms_norm(&input, w.input_norm, n.eps)?;
    let mut qkv = projections(&h1, &w.qkv, h);
    if let Some(biases) = &w.qkv_bias {
        for (bias, col) in biases.iter().zip(n.qkv_columns()) {
            add_bias(&mut qkv, qkv_width, col, bias);
        }
    }
    let (y, attention) = rows::attention(qkv, (n.batch, n.seq), rope, n.heads, n.kv_heads, n.window)?;
    // The residual adds are the projections' own accumulation.
    let mut mid = input.clone();
    add_projection(&y, w.o, q_width, &mut mid);
    if let Some(bias) = w.o_bias {
        add_bias(&mut mid, h, 0, bias);
    }
    let h2 = rows::rms_norm(&mid, w.post_norm, n.eps)?;
    let gate_up = projections(&h2, &[w.gate, w.up], h);
    let gated = rows::swiglu(&gate_up, 2 * inter)?;
    let mut output = mid.clone();
    add_projection(&gated, w.down, inter, &mut output);
    Ok((output, Acts { input, h1, attention, y, mid, h2, gate_up, gated }))
}

/// The backward pass: `d` holds the gradient of the layer's output and leaves holding its input's;
/// every weight's gradient is added into `grads`.
pub(super) fn backward<T: Real>(
    w: &LayerWeights<T>,
    n: &Shapes,
    rope: (&[T], &[T]),
    acts: Acts<T>,
    d: &mut [T],
    grads: &mut Gradients<T>,
) -> Result<()> {
    let Acts { input, h1, attention, y, mid, h2, gate_up, gated } = acts;
    let (h, inter) = (n.hidden, n.inter);
    let (q_width, qkv_width) = (n.q_width(), n.qkv_width());

    let d_gated = input_gradient(d, h, &[w.down], inter);
    grads.add_weight_product(&w.name("mlp.down_proj.weight"), (d, h, 0), &gated, h);
    drop(gated);
    let d_gate_up = rows::swiglu_backward(&gate_up, &d_gated, 2 * inter)?;
    drop((gate_up, d_gated));
    let dh2 = input_gradient(&d_gate_up, 2 * inter, &[w.gate, w.up], h);
    grads.add_weight_product(&w.name("mlp.gate_proj.weight"), (&d_gate_up, 2 * inter, 0), &h2, inter);
    grads.add_weight_product(&w.name("mlp.up_proj.weight"), (&d_gate_up, 2 * inter, inter), &h2, inter);
    drop((d_gate_up, h2));
    let d_post_norm = grads.slot(&w.name("post_attention_layernorm.weight"), h);
    rows::rms_norm_backward(&mid, w.post_norm, &dh2, n.eps, d, d_post_norm);
    drop((mid, dh2));

    let dy = input_gradient(d, h, &[w.o], q_width);
    grads.add_weight_product(&w.name("self_attn.o_proj.weight"), (d, h, 0), &y, h);
    if w.o_bias.is_some() {
        bias_grad(d, h, 0, grads.slot(&w.name("self_attn.o_proj.bias"), h));
    }
    drop(y);
    let dqkv = rows::attention_backward(&attention, &dy, rope);
    drop((attention, dy));
    let dh1 = input_gradient(&dqkv, qkv_width, &w.qkv, h);
    for ((part, col), module) in w.qkv.iter().zip(n.qkv_columns()).zip(QKV) {
        let out = part.len() / h;
        grads.add_weight_product(&w.name(&format!("{module}.weight")), (&dqkv, qkv_width, col), &h1, out);
        if w.qkv_bias.is_some() {
            bias_grad(&dqkv, qkv_width, col, grads.slot(&w.name(&format!("{module}.bias")), out));
        }
    }
    drop((dqkv, h1));
    let d_input_norm = grads.slot(&w.name("input_layernorm.weight"), h);
    rows::rms_norm_backward(&input, w.input_norm, &dh1, n.eps, d, d_input_norm);
    Ok(())
}
