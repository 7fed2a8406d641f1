//! The resolved plan of a job: what a dry run returns and what training follows.

use serde::{Deserialize, Serialize};

use crate::adapter::AdapterSpec;
use crate::model_config::ModelConfig;
use crate::spec::{JobSpec, LearningRate, Precision};

/// Pretraining peak learning rate assumed for `lr: "auto"` when `base_lr` is absent (LLaMA-7B's).
pub const DEFAULT_BASE_LR: f64 = 3e-4;
/// Pretraining batch assumed for `lr: "auto"` when `base_batch_tokens` is absent (LLaMA's 4M tokens).
pub const DEFAULT_BASE_BATCH_TOKENS: u64 = 4 * 1024 * 1024;
/// CPT starts from this fraction of the pretraining peak (Gupta et al. 2023; Ibrahim et al. 2024).
pub const CPT_LR_FRACTION: f64 = 0.1;

/// `lr: "auto"` warns when its batch is further than this factor from the pretraining batch (the
/// square-root rule then scales the rate by more than √64 = 8× either way).
pub const AUTO_LR_BATCH_RATIO_LIMIT: f64 = 64.0;

/// The learning rate a job will use and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedLr {
    pub peak: f64,
    pub min: f64,
    pub reasoning: String,
    /// Why the automatic choice may be wrong for this job (see [`AUTO_LR_BATCH_RATIO_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// Resolves `lr`: a fixed value as given, or `"auto"` = 10% of the pretraining peak scaled by the
/// square root of the batch ratio (4× the batch → 2× the rate).
pub fn resolve_lr(spec: &JobSpec) -> ResolvedLr {
    let (peak, reasoning, warning) = match spec.lr {
        LearningRate::Fixed(lr) => (lr, format!("lr {lr:e} as given"), None),
        LearningRate::Auto(_) => {
            let base = spec.base_lr.unwrap_or(DEFAULT_BASE_LR);
            let base_batch = spec.base_batch_tokens.unwrap_or(DEFAULT_BASE_BATCH_TOKENS);
            let ratio = spec.tokens_per_step() as f64 / base_batch as f64;
            let peak = CPT_LR_FRACTION * base * ratio.sqrt();
            let base_source = if spec.base_lr.is_some() { "given" } else { "default" };
            let batch_source = if spec.base_batch_tokens.is_some() { "given" } else { "default" };
            let reasoning = format!(
                "auto: {CPT_LR_FRACTION} × pretraining peak {base:e} ({base_source}) × sqrt(batch {} / pretraining batch {base_batch} ({batch_source}) tokens) = {peak:e}",
                spec.tokens_per_step()
            );
            let far = !(1.0 / AUTO_LR_BATCH_RATIO_LIMIT..=AUTO_LR_BATCH_RATIO_LIMIT).contains(&ratio);
            let warning = far.then(|| {
                format!(
                    "lr \"auto\" extrapolated the square-root rule from a pretraining batch of {base_batch} tokens to {} \
                     ({ratio:.2e}×), giving {peak:.2e}: the rule is a fit for Adam near the batch a rate was tuned at, \
                     and this far from it the rate {}. Give lr explicitly (CPT at small batches typically uses \
                     1e-5 to 1e-4; sweep it) or base_lr/base_batch_tokens that match your model",
                    spec.tokens_per_step(),
                    if ratio < 1.0 { "may barely move the model" } else { "may diverge" }
                )
            });
            (peak, reasoning, warning)
        }
    };
    ResolvedLr { peak, min: peak * spec.min_lr_ratio, reasoning, warning }
}

/// Model FLOPs per trained token (forward + backward): `6·N + 12·L·(heads·head_dim)·seq_len`, where
/// `N` counts non-embedding parameters plus the lm_head (PaLM's formula; the second term is
/// attention's score and value matmuls, which have no parameters).
pub fn flops_per_token(config: &ModelConfig, seq_len: usize) -> f64 {
    let n = config.non_embedding_parameters() as f64;
    let attention = (config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len) as f64;
    6.0 * n + 12.0 * attention
}

/// [`flops_per_token`] of a job: a frozen matrix costs `4·N` (forward and input gradient, no weight
/// gradient), adapters `6·` their own size, a trained output layer its weight gradient on top.
pub fn job_flops_per_token(config: &ModelConfig, spec: &JobSpec) -> f64 {
    let full = flops_per_token(config, spec.seq_len);
    let Some(adapter) = &spec.adapter else { return full };
    let n = config.non_embedding_parameters() as f64;
    let output = (config.vocab_size * config.hidden_size) as f64;
    let output_trained = adapter.trains_output(config.tie_word_embeddings);
    full - 2.0 * n + 6.0 * lora_parameters(config, adapter) as f64 + if output_trained { 2.0 * output } else { 0.0 }
}

/// The (out, in) shape of each LoRA-adaptable projection of one layer, by module name.
fn projection_shapes(config: &ModelConfig) -> [(&'static str, usize, usize); 7] {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let q = config.num_attention_heads * config.head_dim;
    let kv = config.num_key_value_heads * config.head_dim;
    [
        ("q_proj", q, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, q),
        ("gate_proj", i, h),
        ("up_proj", i, h),
        ("down_proj", h, i),
    ]
}

/// Scalars in the LoRA adapters of `adapter` on a model of shape `config`.
pub fn lora_parameters(config: &ModelConfig, adapter: &AdapterSpec) -> u64 {
    let Some(lora) = &adapter.lora else { return 0 };
    let per_layer: usize = projection_shapes(config)
        .iter()
        .filter(|(name, _, _)| adapter.adapts(name))
        .map(|(_, out, inp)| lora.rank * (out + inp))
        .sum();
    (per_layer * config.num_hidden_layers) as u64
}

/// Scalars a job trains: every parameter, or the adapters and the modules saved in full.
pub fn trainable_parameters(config: &ModelConfig, spec: &JobSpec) -> u64 {
    let Some(adapter) = &spec.adapter else { return config.total_parameters() as u64 };
    let (embedding, tied) = ((config.vocab_size * config.hidden_size) as u64, config.tie_word_embeddings);
    // Tied, the two modules are one table.
    let tables = adapter.trains_embedding(tied) as u64 + (!tied && adapter.trains_output(tied)) as u64;
    lora_parameters(config, adapter) + tables * embedding
}

/// How a job's training step runs on a worker; the memory it needs depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPath {
    /// The explicit step (train::step): full f32 training on a CPU.
    Explicit,
    /// candle's autograd: adapter jobs, bf16, CUDA.
    Autograd,
}

impl StepPath {
    /// The path `spec` takes on a worker whose device is a CPU (`cpu`) or a GPU.
    pub fn of(spec: &JobSpec, cpu: bool) -> Self {
        if cpu && spec.adapter.is_none() && spec.precision == Precision::F32 {
            StepPath::Explicit
        } else {
            StepPath::Autograd
        }
    }
}

/// A rough upper bound of training memory in bytes on any worker: the larger of the estimates on
/// the paths the job can take (with `recompute_every` only the explicit step runs it).
pub fn memory_estimate_bytes(config: &ModelConfig, spec: &JobSpec) -> u64 {
    let explicit = memory_estimate_bytes_on(config, spec, StepPath::Explicit);
    match (spec.recompute_every, StepPath::of(spec, true)) {
        (Some(_), _) => explicit,
        (None, StepPath::Explicit) => explicit.max(memory_estimate_bytes_on(config, spec, StepPath::Autograd)),
        (None, StepPath::Autograd) => memory_estimate_bytes_on(config, spec, StepPath::Autograd),
    }
}

/// A rough upper bound of training memory in bytes on `path`: trained tensors in f32 with their
/// gradients and two AdamW moments (16 bytes each), frozen ones in the adapter's base dtype, plus
/// what the forward and backward passes hold: candle's autograd graph, or the explicit step's kept
/// activations (every layer's, or with `recompute_every` the segment inputs and one segment).
pub fn memory_estimate_bytes_on(config: &ModelConfig, spec: &JobSpec, path: StepPath) -> u64 {
    let trainable = trainable_parameters(config, spec) as f64;
    let frozen = match &spec.adapter {
        None => 0.0,
        Some(adapter) => {
            let frozen = config.total_parameters() as f64 - (trainable - lora_parameters(config, adapter) as f64);
            // One frozen matrix at a time is widened to f32 for its product: the output layer at most.
            let widened =
                if adapter.base_dtype.size() < 4 { 4.0 * (config.vocab_size * config.hidden_size) as f64 } else { 0.0 };
            frozen * adapter.base_dtype.size() as f64 + widened
        }
    };
    let state = trainable * 4.0 * 4.0 + frozen;
    let work = match path {
        StepPath::Explicit => explicit_step_bytes(config, spec, spec.recompute_every),
        StepPath::Autograd => autograd_bytes(config, spec),
    };
    (state + work) as u64
}

/// What a step through candle's autograd holds beyond the parameters' state.
fn autograd_bytes(config: &ModelConfig, spec: &JobSpec) -> f64 {
    // A trained embedding's gradient is built by candle as a zero-filled table plus the gathered
    // rows (and, tied, summed with the output layer's): two more tables exist for a moment.
    let embedding_trained = spec.adapter.as_ref().is_none_or(|a| a.trains_embedding(config.tie_word_embeddings));
    let transients = if embedding_trained { 2.0 * 4.0 * (config.vocab_size * config.hidden_size) as f64 } else { 0.0 };
    let act_bytes = match spec.precision {
        Precision::F32 => 4.0,
        Precision::Bf16 => 2.0,
    };
    let (b, s, h) = (spec.micro_batch_size as f64, spec.seq_len as f64, config.hidden_size as f64);
    let heads = config.num_attention_heads as f64;
    let inter = config.intermediate_size as f64;
    // Per layer: norms, q/k/v/o inputs and outputs, MLP intermediates, scores and probabilities.
    let per_layer = b * s * (12.0 * h + 4.0 * inter) + 3.0 * b * heads * s * s;
    let activations = per_layer * config.num_hidden_layers as f64 * act_bytes;
    // Logits, log-probabilities and their gradient, in f32.
    let logits = 3.0 * b * s * config.vocab_size as f64 * 4.0;
    transients + activations + logits
}

/// Logits per chunk of the explicit step's output layer (16 MiB of f32: the chunk stays in a
/// server CPU's last-level cache between the products and the softmax), but at least 64 rows.
pub const EXPLICIT_LOGITS_PER_CHUNK: usize = 1 << 22;

/// Query positions per block of the explicit step's attention: each task holds one block's score
/// rows, and no probabilities outlive a block (the backward pass recomputes them).
pub const EXPLICIT_ATTENTION_BLOCK: usize = 64;

/// What the explicit step (f32) holds beyond the parameters' state: every layer's activations, or
/// when it recomputes segments of `every` layers every segment's input and one segment's
/// activations; one layer's backward buffers, and the output layer's work on one chunk of logits.
fn explicit_step_bytes(config: &ModelConfig, spec: &JobSpec, every: Option<usize>) -> f64 {
    let (b, s, h) = (spec.micro_batch_size as f64, spec.seq_len as f64, config.hidden_size as f64);
    let (heads, kv_heads, d) =
        (config.num_attention_heads as f64, config.num_key_value_heads as f64, config.head_dim as f64);
    let inter = config.intermediate_size as f64;
    let layers = config.num_hidden_layers as f64;
    let k = every.map_or(layers, |every| every.clamp(1, config.num_hidden_layers.max(1)) as f64);
    let qkv = (heads + 2.0 * kv_heads) * d;
    // Kept per layer: input, normed input, attention output, mid stream, normed mid, output, packed
    // gate/up and the gated product, the rotated q/k/v and each query row's log-sum-exp.
    let layer = b * s * (5.0 * h + heads * d + 3.0 * inter + qkv + heads);
    // A layer's backward adds the widest input gradients, and attention's per query head: dq, its
    // shares of dk and dv, and two blocks of scores (as if every head's task ran at once).
    let attention = b * heads * (3.0 * s * d + 2.0 * EXPLICIT_ATTENTION_BLOCK as f64 * s);
    let backward = b * s * (2.0 * inter + 2.0 * qkv + 2.0 * h) + attention;
    let inputs = if every.is_some() { (layers / k).ceil() * b * s * h } else { 0.0 };
    // The final norm's input, output and gradients, its scaled chunk, and one chunk of logits.
    let chunk = (b * s).min((EXPLICIT_LOGITS_PER_CHUNK / config.vocab_size.max(1)).max(64) as f64);
    let head = 3.0 * b * s * h + chunk * (config.vocab_size as f64 + h);
    // Measured, not derived: bench/recompute_memory.sh found ~0.9 GiB of resident memory beyond
    // the tensors counted here on an 8-layer 1B Llama at seq 2048 (the allocator keeps freed
    // pages, the binary, thread stacks).
    let runtime = (1u64 << 30) as f64;
    4.0 * (inputs + k * layer + backward + head) + runtime
}

/// Everything a dry run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub total_steps: u64,
    pub tokens_per_step: u64,
    pub total_tokens: u64,
    pub warmup_steps: u64,
    pub lr: ResolvedLr,
    pub flops_per_token: f64,
    pub total_flops: f64,
    pub parameters: u64,
    /// Scalars trained (all of `parameters` unless the job trains an adapter).
    #[serde(default)]
    pub trainable_parameters: u64,
    pub memory_estimate_bytes: u64,
}

impl Plan {
    /// The plan of `spec` on a model of shape `config`.
    pub fn new(spec: &JobSpec, config: &ModelConfig) -> Self {
        let flops_per_token = job_flops_per_token(config, spec);
        let total_tokens = spec.total_steps() * spec.tokens_per_step();
        Plan {
            total_steps: spec.total_steps(),
            tokens_per_step: spec.tokens_per_step(),
            total_tokens,
            warmup_steps: spec.warmup_steps(),
            lr: resolve_lr(spec),
            flops_per_token,
            total_flops: flops_per_token * total_tokens as f64,
            parameters: config.total_parameters() as u64,
            trainable_parameters: trainable_parameters(config, spec),
            memory_estimate_bytes: memory_estimate_bytes(config, spec),
        }
    }
}
