//! The LLaMA-family decoder (Llama, Mistral, Qwen2) as a trainable candle graph.

mod fastexp;
pub mod fused;
mod kernels;
pub mod linear;
pub mod ops;
mod projection;

use candle_core::{DType, Result, Tensor};

use crate::config::ModelConfig;
use crate::params::Params;
pub use kernels::Kernels;
pub use projection::LoraSettings;
use projection::{get, Projection};

struct Attention {
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    /// q, k and v concatenated once, when all three are frozen.
    qkv: Option<Tensor>,
}

struct Layer {
    input_norm: Tensor,
    attention: Attention,
    post_attention_norm: Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    /// gate and up concatenated once, when both are frozen.
    gate_up: Option<Tensor>,
}

/// A decoder whose weights are the tensors of a [`Params`]: a backward pass through
/// [`Llama::forward`] reaches every trained parameter (every weight, or an adapter job's adapters
/// and saved modules) and computes no gradient for a frozen one.
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
    lora: LoraSettings,
    /// Seeds the adapters' dropout of the next forward pass; `None` applies none (evaluation).
    dropout_pass: Option<u64>,
}

/// Dropout sites per layer: one per adaptable projection.
const SITES_PER_LAYER: usize = 7;

impl Llama {
    /// Builds the graph over `params`, which must match `config` (see [`Params::from_tensors`]);
    /// the LoRA adapters it holds are applied with `scale` 1 until [`Llama::set_lora`].
    pub fn new(config: &ModelConfig, params: &Params) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let a = format!("{p}.self_attn");
                let project = |name: &str, bias: bool| Projection::load(params, name, bias);
                Ok(Layer {
                    input_norm: get(params, &format!("{p}.input_layernorm.weight"))?,
                    attention: Attention {
                        q: project(&format!("{a}.q_proj"), config.qkv_bias)?,
                        k: project(&format!("{a}.k_proj"), config.qkv_bias)?,
                        v: project(&format!("{a}.v_proj"), config.qkv_bias)?,
                        o: project(&format!("{a}.o_proj"), config.o_bias)?,
                        qkv: params.packed(&format!("{a}.qkv_proj.weight")),
                    },
                    post_attention_norm: get(params, &format!("{p}.post_attention_layernorm.weight"))?,
                    gate: project(&format!("{p}.mlp.gate_proj"), false)?,
                    up: project(&format!("{p}.mlp.up_proj"), false)?,
                    down: project(&format!("{p}.mlp.down_proj"), false)?,
                    gate_up: params.packed(&format!("{p}.mlp.gate_up_proj.weight")),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = get(params, "model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings { embed.clone() } else { get(params, "lm_head.weight")? };
        // The trained weights' dtype; a frozen half-precision base computes in f32.
        let compute = if projection::is_frozen_half(&embed) { DType::F32 } else { embed.dtype() };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm: get(params, "model.norm.weight")?,
            lm_head,
            inv_freq: config.rope_inv_freq(),
            kernels: Kernels::Best,
            compute,
            lora: LoraSettings { scale: 1.0, dropout: 0.0 },
            dropout_pass: None,
        })
    }

    /// The same model over detached views of its weights: forward passes record no backward graph
    /// and apply no dropout, and later in-place updates of the variables are still seen.
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
                        q: l.attention.q.detach(),
                        k: l.attention.k.detach(),
                        v: l.attention.v.detach(),
                        o: l.attention.o.detach(),
                        qkv: o(&l.attention.qkv),
                    },
                    post_attention_norm: d(&l.post_attention_norm),
                    gate: l.gate.detach(),
                    up: l.up.detach(),
                    down: l.down.detach(),
                    gate_up: o(&l.gate_up),
                })
                .collect(),
            norm: d(&self.norm),
            lm_head: d(&self.lm_head),
            inv_freq: self.inv_freq.clone(),
            kernels: self.kernels,
            compute: self.compute,
            lora: self.lora,
            dropout_pass: None,
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

    /// How the adapters apply (scale and dropout).
    pub fn set_lora(&mut self, settings: LoraSettings) {
        self.lora = settings;
    }

    /// Seeds the adapters' dropout masks of the forward passes that follow (one seed per micro-batch
    /// keeps a resumed run exact); `None` turns dropout off.
    pub fn set_dropout_pass(&mut self, pass: Option<u64>) {
        self.dropout_pass = pass;
    }

    /// A weight in the compute dtype (differentiable: the gradient returns in the weight's dtype).
    fn w(&self, weight: &Tensor) -> Result<Tensor> {
        weight.to_dtype(self.compute)
    }

    /// A weight as the CPU kernels take it: a frozen half-precision one as it is (the kernel widens
    /// it one product at a time), any other in the compute dtype.
    fn cpu_w(&self, weight: &Tensor) -> Result<Tensor> {
        if projection::is_frozen_half(weight) && self.compute == DType::F32 {
            Ok(weight.clone())
        } else {
            self.w(weight)
        }
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
            Kernels::Cpu => fused::linear_nll(&hidden, &self.cpu_w(&self.lm_head)?, &targets),
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
        // Rows first, then the dtype: a frozen embedding is never widened whole.
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.to_dtype(dtype)?;
        x = x.reshape((batch, seq, c.hidden_size))?;
        let k = self.kernels.resolve(&x);
        let (cos, sin) = ops::rope_tables(&self.inv_freq, seq, dtype, device)?;
        // Only the composed ops take an additive mask; the fused ones mask inside.
        let mask = match k {
            Kernels::Composed => Some(ops::causal_mask(seq, c.sliding_window, dtype, device)?),
            _ => None,
        };
        for (index, layer) in self.layers.iter().enumerate() {
            let site = index * SITES_PER_LAYER;
            let a = &layer.attention;
            let h = self.rms_norm(k, &x, &layer.input_norm)?;
            let y = match (&mask, k) {
                (Some(mask), _) => self.composed_attention(a, &h, (&cos, &sin), mask, site)?,
                (None, Kernels::Cpu) => self.packed_attention(a, &h, (&cos, &sin), site)?,
                (None, _) => self.portable_attention(a, &h, (&cos, &sin), site)?,
            };
            x = (x + self.project(k, &y, &a.o, site + 3)?)?;
            let h = self.rms_norm(k, &x, &layer.post_attention_norm)?;
            let gated = if k == Kernels::Composed {
                ops::swiglu(&self.project(k, &h, &layer.gate, site + 4)?, &self.project(k, &h, &layer.up, site + 5)?)?
            } else {
                // One matrix product for both projections; the gate reads the packed rows.
                let parts = [&layer.gate, &layer.up];
                fused::swiglu_packed(&self.packed(k, &h, &parts, layer.gate_up.as_ref(), site + 4)?)?
            };
            x = (x + self.project(k, &gated, &layer.down, site + 6)?)?;
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
        let b = self.wo(b)?;
        if k != Kernels::Cpu {
            return ops::linear(x, &self.w(w)?, b.as_ref());
        }
        let y = linear::linear(x, &self.cpu_w(w)?)?;
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
    fn qkv(&self, k: Kernels, a: &Attention, h: &Tensor, site: usize) -> Result<Tensor> {
        self.packed(k, h, &[&a.q, &a.k, &a.v], a.qkv.as_ref(), site)
    }

    /// Attention from the composed ops: three projections, head split, RoPE, masked softmax.
    fn composed_attention(
        &self,
        a: &Attention,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: &Tensor,
        site: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, _) = h.dims3()?;
        let project = |p: &Projection, i: usize| self.project(Kernels::Composed, h, p, site + i);
        let heads = |x: Tensor, n: usize| x.reshape((batch, seq, n, c.head_dim))?.transpose(1, 2)?.contiguous();
        let q = ops::rope(&heads(project(&a.q, 0)?, c.num_attention_heads)?, cos, sin)?;
        let k = ops::rope(&heads(project(&a.k, 1)?, c.num_key_value_heads)?, cos, sin)?;
        let v = heads(project(&a.v, 2)?, c.num_key_value_heads)?;
        let y = ops::attention(&q, &k, &v, mask)?;
        y.transpose(1, 2)?.reshape((batch, seq, c.num_attention_heads * c.head_dim))
    }

    /// Attention from the whole-block CPU kernels: packed projections, then one op for RoPE and
    /// attention.
    fn packed_attention(
        &self,
        a: &Attention,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        site: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let qkv = self.qkv(Kernels::Cpu, a, h, site)?;
        fused::self_attention(&qkv, cos, sin, c.num_attention_heads, c.num_key_value_heads, c.sliding_window)
    }

    /// Attention from the ops with CPU and CUDA kernels around candle's matrix products: packed
    /// projections, RoPE, scores, causal softmax (scale and mask inside), values.
    fn portable_attention(
        &self,
        a: &Attention,
        h: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        site: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = h.dims3()?;
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qkv = self.qkv(Kernels::Portable, a, h, site)?;
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
