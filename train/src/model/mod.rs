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
    /// Which implementation of the operations forward passes use.
    kernels: Kernels,
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
            kernels: Kernels::Best,
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
            kernels: self.kernels,
            compute: self.compute,
        }
    }

    /// Chooses the implementation of the operations ([`Kernels::Best`] by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
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

    /// The config this model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Logits `(batch, seq, vocab)` for every position of `ids: (batch, seq)` (u32 token ids).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.hidden(ids)?;
        self.linear(self.kernels.resolve(&hidden), &hidden, &self.lm_head, None)
    }

    /// Next-token negative log-likelihood `(batch · (seq − 1),)` of `ids: (batch, seq)`.
    fn token_nll(&self, ids: &Tensor) -> Result<Tensor> {
        let (inputs, targets) = shift(ids)?;
        let hidden = self.hidden(&inputs)?.flatten_to(1)?;
        let targets = targets.flatten_all()?;
        match self.kernels.resolve(&hidden) {
            Kernels::Cpu => fused::linear_nll(&hidden, &self.w(&self.lm_head)?, &targets),
            Kernels::Portable => {
                fused::token_nll(&self.linear(Kernels::Portable, &hidden, &self.lm_head, None)?, &targets)
            }
            _ => ops::token_nll(&self.linear(Kernels::Composed, &hidden, &self.lm_head, None)?, &targets),
        }
    }

    /// The final hidden states `(batch, seq, hidden)`, normalised.
    fn hidden(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let c = &self.config;
        let dtype = self.compute;
        let device = ids.device();
        let embed = self.w(&self.embed)?;
        let k = self.kernels.resolve(&embed);
        let (cos, sin) = ops::rope_tables(&self.inv_freq, seq, dtype, device)?;
        // Only the composed ops take an additive mask; the fused ones mask inside.
        let mask = match k {
            Kernels::Composed => Some(ops::causal_mask(seq, c.sliding_window, dtype, device)?),
            _ => None,
        };
        let mut x = embed.index_select(&ids.flatten_all()?, 0)?.reshape((batch, seq, c.hidden_size))?;
        for layer in &self.layers {
            let a = &layer.attention;
            let h = self.rms_norm(k, &x, &layer.input_norm)?;
            let y = match (&mask, k) {
                (Some(mask), _) => self.composed_attention(a, &h, (&cos, &sin), mask)?,
                (None, Kernels::Cpu) => self.packed_attention(a, &h, (&cos, &sin))?,
                (None, _) => self.portable_attention(a, &h, (&cos, &sin))?,
            };
            x = (x + self.linear(k, &y, &a.o, a.o_bias.as_ref())?)?;
            let h = self.rms_norm(k, &x, &layer.post_attention_norm)?;
            let gated = if k == Kernels::Composed {
                ops::swiglu(&self.linear(k, &h, &layer.gate, None)?, &self.linear(k, &h, &layer.up, None)?)?
            } else {
                // One matrix product for both projections; the gate reads the packed rows.
                fused::swiglu_packed(&self.linear(k, &h, &Tensor::cat(&[&layer.gate, &layer.up], 0)?, None)?)?
            };
            x = (x + self.linear(k, &gated, &layer.down, None)?)?;
        }
        self.rms_norm(k, &x, &self.norm)
    }

    /// Mean next-token cross-entropy of `ids: (batch, seq)`: position `t` predicts token `t + 1`.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_nll(ids)?.mean_all()
    }
}

impl Llama {
    /// `x · wᵀ (+ b)` with the weight in the compute dtype.
    fn linear(&self, k: Kernels, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (w, b) = (self.w(w)?, self.wo(b)?);
        if k != Kernels::Cpu {
            return ops::linear(x, &w, b.as_ref());
        }
        let y = linear::linear(x, &w)?;
        match b {
            Some(b) => y.broadcast_add(&b),
            None => Ok(y),
        }
    }

    fn rms_norm(&self, k: Kernels, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let (weight, eps) = (self.w(weight)?, self.config.rms_norm_eps);
        match k {
            Kernels::Composed => ops::rms_norm(x, &weight, eps),
            _ => fused::rms_norm(x, &weight, eps),
        }
    }

    /// The packed query, key and value projections `(b, s, (heads + 2·kv_heads)·d)`: one matrix
    /// product for all three.
    fn qkv(&self, k: Kernels, a: &Attention, h: &Tensor) -> Result<Tensor> {
        let bias = match (&a.q_bias, &a.k_bias, &a.v_bias) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => None,
        };
        self.linear(k, h, &Tensor::cat(&[&a.q, &a.k, &a.v], 0)?, bias.as_ref())
    }

    /// Attention from the composed ops: three projections, head split, RoPE, masked softmax.
    fn composed_attention(
        &self,
        a: &Attention,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, _) = h.dims3()?;
        let project = |w: &Tensor, b: Option<&Tensor>| self.linear(Kernels::Composed, h, w, b);
        let heads = |x: Tensor, n: usize| x.reshape((batch, seq, n, c.head_dim))?.transpose(1, 2)?.contiguous();
        let q = ops::rope(&heads(project(&a.q, a.q_bias.as_ref())?, c.num_attention_heads)?, cos, sin)?;
        let k = ops::rope(&heads(project(&a.k, a.k_bias.as_ref())?, c.num_key_value_heads)?, cos, sin)?;
        let v = heads(project(&a.v, a.v_bias.as_ref())?, c.num_key_value_heads)?;
        let y = ops::attention(&q, &k, &v, mask)?;
        y.transpose(1, 2)?.reshape((batch, seq, c.num_attention_heads * c.head_dim))
    }

    /// Attention from the whole-block CPU kernels: packed projections, then one op for RoPE and
    /// attention.
    fn packed_attention(&self, a: &Attention, h: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> Result<Tensor> {
        let c = &self.config;
        let qkv = self.qkv(Kernels::Cpu, a, h)?;
        fused::self_attention(&qkv, cos, sin, c.num_attention_heads, c.num_key_value_heads, c.sliding_window)
    }

    /// Attention from the ops with CPU and CUDA kernels around candle's matrix products: packed
    /// projections, RoPE, scores, causal softmax (scale and mask inside), values.
    fn portable_attention(&self, a: &Attention, h: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = h.dims3()?;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qkv = self.qkv(Kernels::Portable, a, h)?;
        let split = |first: usize, n: usize| {
            qkv.narrow(2, first * d, n * d)?.reshape((b, s, n, d))?.transpose(1, 2)?.contiguous()
        };
        // Query head h reads key/value head h / groups: the groups fold into the query rows.
        let q = fused::rope(&split(0, heads)?, cos, sin)?.reshape((b, kv_heads, heads / kv_heads * s, d))?;
        let k = fused::rope(&split(heads, kv_heads)?, cos, sin)?;
        let v = split(heads + kv_heads, kv_heads)?;
        let probs = fused::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (d as f64).sqrt(), c.sliding_window)?;
        let y = probs.matmul(&v)?.reshape((b, heads, s, d))?;
        y.transpose(1, 2)?.reshape((b, s, heads * d))
    }
}

/// Which implementation of the model's operations a forward pass uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fastest that the tensors' device and dtype have (the default): [`Kernels::Cpu`] for
    /// f32/f64 on the CPU, [`Kernels::Portable`] for f32/bf16 on CUDA, [`Kernels::Composed`]
    /// otherwise.
    #[default]
    Best,
    /// Whole-block CPU kernels: packed attention, the output projection fused with the loss, gemm
    /// for every linear layer.
    Cpu,
    /// The fused ops that have both CPU and CUDA kernels (RMSNorm, RoPE, causal softmax, SwiGLU,
    /// cross-entropy) around candle's matrix products.
    Portable,
    /// candle's differentiable ops only: the reference.
    Composed,
}

impl Kernels {
    /// The concrete choice for tensors like `x`.
    pub fn resolve(self, x: &Tensor) -> Kernels {
        match self {
            Kernels::Best if fused::supported(x) => Kernels::Cpu,
            Kernels::Best if fused::cuda_supported(x) => Kernels::Portable,
            Kernels::Best => Kernels::Composed,
            chosen => chosen,
        }
    }
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "best" => Ok(Kernels::Best),
            "cpu" => Ok(Kernels::Cpu),
            "portable" => Ok(Kernels::Portable),
            "composed" => Ok(Kernels::Composed),
            other => Err(format!("unknown kernels {other:?}: best, cpu, portable or composed")),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Best => "best",
            Kernels::Cpu => "cpu",
            Kernels::Portable => "portable",
            Kernels::Composed => "composed",
        })
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
