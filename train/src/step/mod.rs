//! The explicit training step: a forward pass that keeps only what the backward pass needs and a
//! hand-written backward pass over the fused CPU kernels, for a model whose every weight trains.
//!
//! Through candle's autograd every graph node gets a zero-filled gradient that the backward pass
//! then adds into, the residual stream's adds each cost a full-size gradient, q/k/v and gate/up are
//! concatenated into packed weights every step and their gradients split back, and every layer's
//! activations live until the backward pass. Here the weights stay in their HuggingFace tensors
//! (each projection writes its column block of the packed output, and reads its block of the
//! packed gradient), each weight's gradient is written by one gemm into its own buffer, the
//! residual adds are gemm accumulations, and with `recompute_every` only every k-th layer's input
//! is kept: a segment's activations are recomputed when the backward pass reaches it.
//!
//! The composed autograd model ([`crate::Llama`]) is the reference: `tests/explicit_step.rs`
//! checks the gradients against it (f64) and 20 optimizer steps of loss against it (f32).

mod layer;
mod products;

use std::collections::BTreeMap;

use candle_core::{bail, DType, Device, Result, Storage, Tensor};

use cpt_protocol::plan::EXPLICIT_LOGITS_PER_CHUNK;

use crate::config::ModelConfig;
use crate::model::fused::{rows, Real};
use crate::model::ops;
use crate::params::Params;
use layer::LayerWeights;

/// Whether a job can take the explicit step: every weight trained (no adapter), f32 on the CPU.
pub fn supported(params: &Params, device: &Device, adapter: bool) -> bool {
    device.is_cpu() && !adapter && params.iter().all(|(_, var)| var.dtype() == DType::F32)
}

/// Gradients named as the parameters, summed over the micro-batches of one optimizer step.
#[derive(Default)]
pub struct Gradients<T> {
    buffers: BTreeMap<String, Vec<T>>,
}

impl<T: Real> Gradients<T> {
    /// The gradient buffer of `name` (`len` elements), zeros on first use: for the gradients that
    /// are sums (norms, biases, the embedding's gathered rows); products write theirs fresh.
    fn slot(&mut self, name: &str, len: usize) -> &mut [T] {
        self.buffers.entry(name.to_string()).or_insert_with(|| vec![T::zero(); len])
    }

    /// The gradients as tensors shaped like their parameters (moved, not copied).
    pub fn into_tensors(self, params: &Params) -> anyhow::Result<BTreeMap<String, Tensor>> {
        let mut buffers = self.buffers;
        params
            .iter()
            .map(|(name, var)| {
                let buffer = buffers.remove(name).ok_or_else(|| anyhow::anyhow!("`{name}` received no gradient"))?;
                Ok((name.to_string(), Tensor::from_vec(buffer, var.shape(), var.device())?))
            })
            .collect()
    }
}

/// The sizes of one micro-batch through one model.
#[derive(Clone, Copy)]
struct Shapes {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    eps: f64,
    window: Option<usize>,
}

impl Shapes {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// The first column of q, k and v in a packed row.
    fn qkv_columns(&self) -> [usize; 3] {
        let (q, kv) = (self.q_width(), self.kv_heads * self.head_dim);
        [0, q, q + kv]
    }
}

/// One micro-batch of the explicit step: the mean next-token loss of `ids: (batch, seq + 1)` over
/// the targets `mask: (batch, seq)` marks (all when `None`), with its gradient times `scale` added
/// into `grads`. With `recompute_every = Some(k)` only every k-th layer's input is kept through the
/// forward pass, and the backward pass recomputes each segment of k layers from it.
pub fn accumulate<T: Real>(
    config: &ModelConfig,
    params: &Params,
    ids: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    recompute_every: Option<usize>,
    grads: &mut Gradients<T>,
) -> Result<f64> {
    let (batch, width) = ids.dims2()?;
    let seq = width - 1;
    let n = Shapes {
        batch,
        seq,
        hidden: config.hidden_size,
        heads: config.num_attention_heads,
        kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        inter: config.intermediate_size,
        eps: config.rms_norm_eps,
        window: config.sliding_window,
    };
    let ids = ids.to_vec2::<u32>()?;
    let inputs: Vec<u32> = ids.iter().flat_map(|row| row[..seq].iter().copied()).collect();
    let targets: Vec<u32> = ids.iter().flat_map(|row| row[1..].iter().copied()).collect();
    let weights: Vec<f64> = match mask {
        Some(mask) => mask.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        None => vec![1.0; targets.len()],
    };
    let (cos, sin) = ops::rope_tables(&config.rope_inv_freq(), seq, T::DTYPE, &Device::Cpu)?;
    let (cos, sin) = (cos.flatten_all()?.to_vec1::<T>()?, sin.flatten_all()?.to_vec1::<T>()?);
    // Each weight is read-locked while its slice is in use (the optimizer's in-place update waits).
    let tensors: Vec<(String, Tensor)> =
        params.iter().map(|(name, var)| (name.to_string(), var.as_tensor().clone())).collect();
    let guards: BTreeMap<&str, _> = tensors.iter().map(|(name, t)| (name.as_str(), t.storage_and_layout())).collect();
    let model = Model::borrow(config, &guards)?;
    let batch = Batch { inputs: &inputs, targets: &targets, weights: &weights, scale };
    model.accumulate(&n, (&cos, &sin), batch, recompute_every, grads)
}

/// One micro-batch's tokens.
struct Batch<'a> {
    inputs: &'a [u32],
    targets: &'a [u32],
    /// Per target: 1, or 0 for padding.
    weights: &'a [f64],
    /// The gradient's factor (1 / micro-batches per step).
    scale: f64,
}

/// The whole model's weights as slices.
struct Model<'a, T> {
    embed: &'a [T],
    /// The output layer: its own, or the embedding when tied.
    lm_head: &'a [T],
    lm_head_name: &'static str,
    norm: &'a [T],
    layers: Vec<LayerWeights<'a, T>>,
    hidden: usize,
    vocab: usize,
}

const EMBED: &str = "model.embed_tokens.weight";

type Guards<'t> = BTreeMap<&'t str, (candle_core::StorageRef<'t>, &'t candle_core::Layout)>;

impl<'a, T: Real> Model<'a, T> {
    fn borrow(config: &ModelConfig, guards: &'a Guards<'_>) -> Result<Self> {
        let get = |name: &str| -> Result<&'a [T]> {
            let Some((storage, layout)) = guards.get(name) else { bail!("explicit step: no parameter `{name}`") };
            let Storage::Cpu(cpu) = &**storage else { bail!("explicit step: `{name}` is not on the CPU") };
            let Some((start, end)) = layout.contiguous_offsets() else { bail!("`{name}` is not contiguous") };
            Ok(&cpu.as_slice::<T>()?[start..end])
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let prefix = format!("model.layers.{i}");
                let a = |module: &str, part: &str| get(&format!("{prefix}.self_attn.{module}_proj.{part}"));
                let m = |module: &str| get(&format!("{prefix}.mlp.{module}_proj.weight"));
                Ok(LayerWeights {
                    input_norm: get(&format!("{prefix}.input_layernorm.weight"))?,
                    qkv: [a("q", "weight")?, a("k", "weight")?, a("v", "weight")?],
                    qkv_bias: config
                        .qkv_bias
                        .then(|| Ok::<_, candle_core::Error>([a("q", "bias")?, a("k", "bias")?, a("v", "bias")?]))
                        .transpose()?,
                    o: a("o", "weight")?,
                    o_bias: config.o_bias.then(|| a("o", "bias")).transpose()?,
                    post_norm: get(&format!("{prefix}.post_attention_layernorm.weight"))?,
                    gate: m("gate")?,
                    up: m("up")?,
                    down: m("down")?,
                    prefix,
                })
            })
            .collect::<Result<_>>()?;
        let embed = get(EMBED)?;
        let (lm_head, lm_head_name) =
            if config.tie_word_embeddings { (embed, EMBED) } else { (get("lm_head.weight")?, "lm_head.weight") };
        Ok(Self {
            embed,
            lm_head,
            lm_head_name,
            norm: get("model.norm.weight")?,
            layers,
            hidden: config.hidden_size,
            vocab: config.vocab_size,
        })
    }

    fn accumulate(
        &self,
        n: &Shapes,
        rope: (&[T], &[T]),
        batch: Batch,
        recompute_every: Option<usize>,
        grads: &mut Gradients<T>,
    ) -> Result<f64> {
        let h = self.hidden;
        let mut x = Vec::with_capacity(n.rows() * h);
        for &id in batch.inputs {
            let id = id as usize;
            if id >= self.vocab {
                bail!("token {id} outside a vocabulary of {}", self.vocab);
            }
            x.extend_from_slice(&self.embed[id * h..(id + 1) * h]);
        }
        // Without recomputation every layer's activations are kept; with it, every k-th input.
        let every = recompute_every.filter(|&k| k > 0);
        let (mut kept, mut inputs) = (Vec::new(), Vec::new());
        for (i, layer) in self.layers.iter().enumerate() {
            if every.is_some_and(|k| i % k == 0) {
                inputs.push(x.clone());
            }
            let (output, acts) = layer::forward(layer, n, rope, x)?;
            if every.is_none() {
                kept.push(acts);
            }
            x = output;
        }
        let (loss, mut d) = self.head(n, &x, &batch, grads)?;
        drop(x);
        for i in (0..self.layers.len()).rev() {
            if let (Some(k), true) = (every, kept.is_empty()) {
                // Entering a segment from its end: its activations again, from its first input.
                let mut x = inputs.pop().expect("one input per segment");
                for layer in &self.layers[i / k * k..=i] {
                    let (output, acts) = layer::forward(layer, n, rope, x)?;
                    kept.push(acts);
                    x = output;
                }
            }
            let acts = kept.pop().expect("one set of activations per layer");
            layer::backward(&self.layers[i], n, rope, acts, &mut d, grads)?;
        }
        let d_embed = grads.slot(EMBED, self.embed.len());
        for (&id, d) in batch.inputs.iter().zip(d.chunks(h)) {
            d_embed[id as usize * h..][..h].iter_mut().zip(d).for_each(|(g, &d)| *g += d);
        }
        Ok(loss)
    }

    /// The final norm, the output layer and the loss: returns the loss and the gradient of the
    /// last layer's output, adding the norm's and the output layer's gradients into `grads`. The
    /// logits (rows × vocabulary, the step's largest tensor) are computed a chunk of rows at a time
    /// in one reused buffer that stays in the last-level cache: turned into `exp(logit − max)` in
    /// place, consumed by both products, overwritten.
    fn head(&self, n: &Shapes, x: &[T], batch: &Batch, grads: &mut Gradients<T>) -> Result<(f64, Vec<T>)> {
        let (h, vocab, rows) = (self.hidden, self.vocab, n.rows());
        let hidden = rows::rms_norm(x, self.norm, n.eps)?;
        let targets = rows::target_indices(batch.targets, vocab)?;
        let count: f64 = batch.weights.iter().sum();
        let chunk = (EXPLICIT_LOGITS_PER_CHUNK / vocab).max(64).min(rows.max(1));
        let (mut loss, mut logits, mut scaled) = (0.0, Vec::new(), Vec::with_capacity(chunk * h));
        let mut d_hidden = vec![T::zero(); rows * h];
        for r0 in (0..rows).step_by(chunk) {
            let r1 = (r0 + chunk).min(rows);
            let (hidden, weights, targets) = (&hidden[r0 * h..r1 * h], &batch.weights[r0..r1], &targets[r0..r1]);
            products::projections_into(&mut logits, hidden, &[self.lm_head], h);
            let (nll, inv_sum) = rows::nll(&mut logits, vocab, targets);
            loss += nll.iter().zip(weights).map(|(l, w)| l.to_f64().unwrap_or(f64::NAN) * w).sum::<f64>() / count;
            // d logits = c·E − g·one_hot(target) per row, E = exp(logit − max), c = g / ΣE: instead
            // of a pass over the logits, c scales the products' narrow sides (dx's rows, the
            // hidden rows that dW reads) and the one-hot part is one row each.
            let g: Vec<T> = weights.iter().map(|w| T::from(w * batch.scale / count).expect("a float")).collect();
            let c: Vec<T> = g.iter().zip(&inv_sum).map(|(&g, &inv_sum)| g * inv_sum).collect();
            let d_rows = &mut d_hidden[r0 * h..r1 * h];
            products::input_gradient_into(d_rows, &logits, vocab, &[self.lm_head]);
            for (((d, &c), &g), &t) in d_rows.chunks_mut(h).zip(&c).zip(&g).zip(targets) {
                d.iter_mut().zip(&self.lm_head[t * h..][..h]).for_each(|(d, &w)| *d = *d * c - g * w);
            }
            scaled.clear();
            scaled.extend(hidden.chunks(h).zip(&c).flat_map(|(x, &c)| x.iter().map(move |&x| x * c)));
            grads.add_weight_product(self.lm_head_name, (&logits, vocab, 0), &scaled, vocab);
            let d_weight = grads.slot(self.lm_head_name, vocab * h);
            for ((x, &g), &t) in hidden.chunks(h).zip(&g).zip(targets) {
                d_weight[t * h..][..h].iter_mut().zip(x).for_each(|(d, &x)| *d -= g * x);
            }
        }
        drop(logits);
        let mut d = vec![T::zero(); n.rows() * h];
        rows::rms_norm_backward(x, self.norm, &d_hidden, n.eps, &mut d, grads.slot("model.norm.weight", h));
        Ok((loss, d))
    }
}
