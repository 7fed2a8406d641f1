//! The LLaMA-family decoder (Llama, Mistral, Qwen2) as a trainable candle graph.

mod fastexp;
pub mod fused;
pub mod linear;
pub mod ops;

use candle_core::{DType, Result, Tensor};

use crate::config::ModelConfig;
use crate::params::Params;

struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o_bias: Option<Tensor>,
}

struct Layer {
    input_norm: Tensor,
    attention: Attention,
    post_attention_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A decoder whose weights are the variables of a [`Params`]: a backward pass through
/// [`Llama::forward`] reaches every parameter.
pub struct Llama {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f64>,
    /// Use the fused kernels where the device and dtype have them (the default).
    fused: bool,
    /// The dtype of the forward and backward computation; the weights keep theirs (e.g. bf16
    /// compute over f32 master weights, whose gradients come back in f32).
    compute: DType,
}

fn get(params: &Params, name: &str) -> Result<Tensor> {
    params.tensor(name).map_err(candle_core::Error::wrap)
}

impl Llama {
    /// Builds the graph over `params`, which must match `config` (see [`Params::from_tensors`]).
    pub fn new(config: &ModelConfig, params: &Params) -> Result<Self> {
        let optional = |name: String, present: bool| present.then(|| get(params, &name)).transpose();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let a = format!("{p}.self_attn");
                Ok(Layer {
                    input_norm: get(params, &format!("{p}.input_layernorm.weight"))?,
                    attention: Attention {
                        q: get(params, &format!("{a}.q_proj.weight"))?,
                        k: get(params, &format!("{a}.k_proj.weight"))?,
                        v: get(params, &format!("{a}.v_proj.weight"))?,
                        o: get(params, &format!("{a}.o_proj.weight"))?,
                        q_bias: optional(format!("{a}.q_proj.bias"), config.qkv_bias)?,
                        k_bias: optional(format!("{a}.k_proj.bias"), config.qkv_bias)?,
                        v_bias: optional(format!("{a}.v_proj.bias"), config.qkv_bias)?,
                        o_bias: optional(format!("{a}.o_proj.bias"), config.o_bias)?,
                    },
                    post_attention_norm: get(params, &format!("{p}.post_attention_layernorm.weight"))?,
                    gate: get(params, &format!("{p}.mlp.gate_proj.weight"))?,
                    up: get(params, &format!("{p}.mlp.up_proj.weight"))?,
                    down: get(params, &format!("{p}.mlp.down_proj.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = get(params, "model.embed_tokens.weight")?;
        let embed_dtype = embed.dtype();
        let lm_head = if config.tie_word_embeddings { embed.clone() } else { get(params, "lm_head.weight")? };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm: get(params, "model.norm.weight")?,
            lm_head,
            inv_freq: config.rope_inv_freq(),
            fused: true,
            compute: embed_dtype,
        })
    }

    /// The same model over detached views of its weights: forward passes record no backward graph,
    /// and later in-place updates of the variables are still seen.
    pub fn detached(&self) -> Llama {
        let d = |t: &Tensor| t.detach();
        let o = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
        Llama {
            config: self.config.clone(),
            embed: d(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_norm: d(&l.input_norm),
                    attention: Attention {
                        q: d(&l.attention.q),
                        k: d(&l.attention.k),
                        v: d(&l.attention.v),
                        o: d(&l.attention.o),
                        q_bias: o(&l.attention.q_bias),
                        k_bias: o(&l.attention.k_bias),
                        v_bias: o(&l.attention.v_bias),
                        o_bias: o(&l.attention.o_bias),
                    },
                    post_attention_norm: d(&l.post_attention_norm),
                    gate: d(&l.gate),
                    up: d(&l.up),
                    down: d(&l.down),
                })
                .collect(),
            norm: d(&self.norm),
            lm_head: d(&self.lm_head),
            inv_freq: self.inv_freq.clone(),
            fused: self.fused,
            compute: self.compute,
        }
    }

    /// Chooses the fused kernels (`true`, the default) or the composed reference ops.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Computes in `dtype` (bf16 for mixed precision), keeping the weights' own dtype.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    /// A weight in the compute dtype (differentiable: the gradient returns in the weight's dtype).
    fn w(&self, weight: &Tensor) -> Result<Tensor> {
        weight.to_dtype(self.compute)
    }

    fn wo(&self, weight: Option<&Tensor>) -> Result<Option<Tensor>> {
        weight.map(|w| self.w(w)).transpose()
    }

    /// The kernels this model runs with on `x`'s device and dtype.
    fn kernels(&self, x: &Tensor) -> Kernels {
        Kernels { fused: self.fused && fused::supported(x) }
    }

    /// The config this model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `(batch, seq, vocab)` for every position of `ids: (batch, seq)` (u32 token ids).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden(ids)?;
        self.kernels(&hidden).linear(&hidden, &self.w(&self.lm_head)?, None)
    }

    /// Next-token negative log-likelihood `(batch · (seq − 1),)` of `ids: (batch, seq)`.
    fn token_nll(&self, ids: &Tensor) -> Result<Tensor> {
        let (inputs, targets) = shift(ids)?;
        let hidden = self.hidden(&inputs)?.flatten_to(1)?;
        let targets = targets.flatten_all()?;
        let ops = self.kernels(&hidden);
        let lm_head = self.w(&self.lm_head)?;
        if ops.fused {
            return fused::linear_nll(&hidden, &lm_head, &targets);
        }
        ops::token_nll(&ops.linear(&hidden, &lm_head, None)?, &targets)
    }

    /// The final hidden states `(batch, seq, hidden)`, normalised.
    fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let c = &self.config;
        let dtype = self.compute;
        let device = ids.device();
        let embed = self.w(&self.embed)?;
        let ops = self.kernels(&embed);
        let (cos, sin) = ops::rope_tables(&self.inv_freq, seq, dtype, device)?;
        let mask = if ops.fused { None } else { Some(ops::causal_mask(seq, c.sliding_window, dtype, device)?) };
        let mut x = embed.index_select(&ids.flatten_all()?, 0)?.reshape((batch, seq, c.hidden_size))?;
        for layer in &self.layers {
            let a = &layer.attention;
            let h = ops.rms_norm(&x, &self.w(&layer.input_norm)?, c.rms_norm_eps)?;
            let y = match &mask {
                Some(mask) => self.composed_attention(a, &h, (&cos, &sin), mask)?,
                None => self.fused_attention(a, &h, (&cos, &sin))?,
            };
            x = (x + ops.linear(&y, &self.w(&a.o)?, self.wo(a.o_bias.as_ref())?.as_ref())?)?;
            let h = ops.rms_norm(&x, &self.w(&layer.post_attention_norm)?, c.rms_norm_eps)?;
            let gated = if ops.fused {
                // One gemm for both projections; the gate reads the packed rows.
                let gate_up = self.w(&Tensor::cat(&[&layer.gate, &layer.up], 0)?)?;
                fused::swiglu_packed(&ops.linear(&h, &gate_up, None)?)?
            } else {
                ops::swiglu(&ops.linear(&h, &self.w(&layer.gate)?, None)?, &ops.linear(&h, &self.w(&layer.up)?, None)?)?
            };
            x = (x + ops.linear(&gated, &self.w(&layer.down)?, None)?)?;
        }
        ops.rms_norm(&x, &self.w(&self.norm)?, c.rms_norm_eps)
    }

    /// Mean next-token cross-entropy of `ids: (batch, seq)`: position `t` predicts token `t + 1`.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_nll(ids)?.mean_all()
    }
}

impl Llama {
    /// Attention from the composed ops: three projections, head split, RoPE, masked softmax.
    fn composed_attention(&self, a: &Attention, h: &Tensor, (cos, sin): (&Tensor, &Tensor), mask: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, _) = h.dims3()?;
        let project = |w: &Tensor, b: Option<&Tensor>| ops::linear(h, &self.w(w)?, self.wo(b)?.as_ref());
        let heads = |x: Tensor, n: usize| x.reshape((batch, seq, n, c.head_dim))?.transpose(1, 2)?.contiguous();
        let q = ops::rope(&heads(project(&a.q, a.q_bias.as_ref())?, c.num_attention_heads)?, cos, sin)?;
        let k = ops::rope(&heads(project(&a.k, a.k_bias.as_ref())?, c.num_key_value_heads)?, cos, sin)?;
        let v = heads(project(&a.v, a.v_bias.as_ref())?, c.num_key_value_heads)?;
        let y = ops::attention(&q, &k, &v, mask)?;
        y.transpose(1, 2)?.reshape((batch, seq, c.num_attention_heads * c.head_dim))
    }

    /// Attention from the fused kernels: one gemm for the packed query, key and value projections,
    /// then one op for RoPE and attention.
    fn fused_attention(&self, a: &Attention, h: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> Result<Tensor> {
        let c = &self.config;
        let qkv = self.w(&Tensor::cat(&[&a.q, &a.k, &a.v], 0)?)?;
        let mut qkv = linear::linear(h, &qkv)?;
        if let (Some(q), Some(k), Some(v)) = (&a.q_bias, &a.k_bias, &a.v_bias) {
            qkv = qkv.broadcast_add(&self.w(&Tensor::cat(&[q, k, v], 0)?)?)?;
        }
        fused::self_attention(&qkv, cos, sin, c.num_attention_heads, c.num_key_value_heads, c.sliding_window)
    }
}

/// The fused kernels or the composed ops, chosen once per forward pass.
#[derive(Clone, Copy)]
struct Kernels {
    fused: bool,
}

impl Kernels {
    fn linear(self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if !self.fused {
            return ops::linear(x, weight, bias);
        }
        let y = linear::linear(x, weight)?;
        match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        if self.fused {
            fused::rms_norm(x, weight, eps)
        } else {
            ops::rms_norm(x, weight, eps)
        }
    }
}

impl Llama {
    /// Mean next-token loss over the target positions that `mask: (batch, seq - 1)` marks with 1
    /// (0 for padding).
    pub fn masked_loss(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let nll = self.token_nll(ids)?;
        let mask = mask.flatten_all()?.to_dtype(nll.dtype())?;
        (nll * &mask)?.sum_all()?.broadcast_div(&mask.sum_all()?)
    }
}

/// Splits `(batch, seq)` ids into inputs `[.., :-1]` and next-token targets `[.., 1:]`.
pub fn shift(ids: &Tensor) -> Result<(Tensor, Tensor)> {
    let seq = ids.dim(1)?;
    Ok((ids.narrow(1, 0, seq - 1)?, ids.narrow(1, 1, seq - 1)?))
}
