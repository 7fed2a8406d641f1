//! The model's building blocks, composed only from candle ops that have a backward pass.
//!
//! candle's fast kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rotary_emb::*`) drop the
//! gradient without an error, so none of them appear here. Each function is checked against finite
//! differences in `tests/gradients.rs`.

use candle_core::{DType, Device, Result, Tensor, D};

/// `x · w` for a weight stored as HuggingFace does, `(out, in)`, plus an optional bias.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let leading = &x.dims()[..x.rank() - 1];
    let rows: usize = leading.iter().product();
    let y = x.reshape((rows, in_features))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut shape = leading.to_vec();
    shape.push(out_features);
    y.reshape(shape)
}

/// Half-precision values are widened to f32 for reductions and exponentials; f32 and f64 stay as
/// they are.
fn widened(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Root-mean-square normalisation over the last dimension, widened to f32 as transformers does.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = widened(x)?;
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normalized = x.broadcast_mul(&(mean_square + eps)?.sqrt()?.recip()?)?;
    normalized.to_dtype(dtype)?.broadcast_mul(weight)
}

/// `cos` and `sin` tables of shape `(seq_len, head_dim)` for positions `0..seq_len`, in HF's
/// half-split layout (frequencies repeated, not interleaved).
pub fn rope_tables(inv_freq: &[f64], seq_len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    // transformers computes the angles in f32; doing the same keeps logits within 1e-6 of it.
    let angles: Vec<f32> =
        (0..seq_len).flat_map(|p| (0..2 * half).map(move |i| p as f32 * inv_freq[i % half] as f32)).collect();
    let angles = Tensor::from_vec(angles, (seq_len, 2 * half), device)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// Rotary position embedding of `x: (batch, heads, seq, head_dim)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive mask `(seq, seq)`: 0 where query `i` may see key `j`, −∞ elsewhere.
pub fn causal_mask(seq_len: usize, sliding_window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let window = sliding_window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i || i - j >= window { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)
}

/// Softmax over the last dimension from differentiable ops; the max is detached because the
/// gradient through it is exactly zero.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension from differentiable ops.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Causal self-attention with grouped-query heads.
///
/// `q: (b, heads, s, d)`, `k, v: (b, kv_heads, s, d)`. Query head `h` reads key/value head
/// `h / groups`, as transformers' `repeat_kv` does; folding the groups into the query's sequence
/// axis avoids materialising repeated keys and values.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, heads, s, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let groups = heads / kv_heads;
    let q = q.reshape((b, kv_heads, groups * s, d))?;
    let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let scores = scores.reshape((b, kv_heads, groups, s, s))?.broadcast_add(mask)?;
    let probs = softmax_last_dim(&widened(&scores)?)?.to_dtype(v.dtype())?;
    probs.reshape((b, kv_heads, groups * s, s))?.matmul(v)?.reshape((b, heads, s, d))
}

/// The SwiGLU gate: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Negative log-likelihood of each target under `logits: (n, vocab)`, shape `(n,)`, at least f32.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = log_softmax_last_dim(&widened(logits)?)?;
    log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Mean cross-entropy of `targets: (n,)` under `logits: (n, vocab)`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    token_nll(logits, targets)?.mean_all()
}
