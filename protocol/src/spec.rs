//! The job spec: what a user asks cpt to train, as submitted to `POST /v1/jobs` or
//! `cpt-worker train --spec`. Field documentation lives in `openapi.yaml` and `examples/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::adapter::AdapterSpec;
use crate::budget::{ForgettingBudget, SpikeRollback};
use crate::sampling::SampleDecoding;

/// A continued-pretraining job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A human label.
    pub name: String,
    /// A HuggingFace model directory or a cpt checkpoint directory to continue from.
    pub base_model: String,
    /// Training sources drawn by weight; replay of general text is just another source.
    pub train_data: Vec<DataSource>,
    /// Named held-out sets (e.g. `domain`, `general`), each a dataset directory whose validation
    /// split is evaluated.
    #[serde(default)]
    pub eval_data: BTreeMap<String, String>,
    pub seq_len: usize,
    #[serde(default = "defaults::one")]
    pub micro_batch_size: usize,
    #[serde(default = "defaults::one")]
    pub grad_accum_steps: usize,
    #[serde(default)]
    pub lr: LearningRate,
    /// The base model's pretraining peak learning rate, for `lr: "auto"`.
    #[serde(default)]
    pub base_lr: Option<f64>,
    /// Tokens per optimizer step of the base model's pretraining, for `lr: "auto"`.
    #[serde(default)]
    pub base_batch_tokens: Option<u64>,
    /// Final learning rate as a fraction of the peak.
    #[serde(default = "defaults::min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// `wsd` only: the fraction of steps spent decaying at the end.
    #[serde(default = "defaults::decay_ratio")]
    pub decay_ratio: f64,
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "defaults::betas")]
    pub betas: [f64; 2],
    #[serde(default = "defaults::eps")]
    pub eps: f64,
    /// Global gradient-norm clipping threshold; `null` disables clipping.
    #[serde(default = "defaults::grad_clip")]
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub seed: u64,
    /// Evaluate every this many steps (and at step 0 and the end); 0 evaluates only at 0 and the end.
    #[serde(default = "defaults::eval_every")]
    pub eval_every: u64,
    /// At most this many blocks of each eval set per evaluation.
    #[serde(default = "defaults::eval_blocks")]
    pub eval_blocks: usize,
    /// Checkpoint every this many steps (and at the end); 0 checkpoints only at the end.
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "defaults::keep_checkpoints")]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Sample continuations every this many steps (and at the end); 0 samples only at the end.
    #[serde(default)]
    pub sample_every: u64,
    #[serde(default = "defaults::sample_tokens")]
    pub sample_tokens: usize,
    /// Fail after this many consecutive steps with a non-finite loss or gradient.
    #[serde(default = "defaults::max_bad_steps")]
    pub max_bad_steps: u32,
    /// Warn when a step's loss exceeds its moving average by this factor.
    #[serde(default = "defaults::spike_factor")]
    pub spike_factor: f64,
    /// Roll back on such a spike instead of only warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spike_rollback: Option<SpikeRollback>,
    /// How sample continuations are decoded (greedy when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_decoding: Option<SampleDecoding>,
    /// Train adapters (and optionally the embeddings) over a frozen base instead of every weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSpec>,
    /// Per eval set, the largest rise of its perplexity over step 0 and what crossing it does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forgetting_budget: BTreeMap<String, ForgettingBudget>,
    /// Activation recomputation: keep only every k-th layer's input through the forward pass and
    /// recompute each segment of k layers in the backward pass (one extra forward pass; activation
    /// memory of about L/k layer inputs plus k layers). Full f32 training on the CPU only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_every: Option<usize>,
    /// Start from another run's checkpoint with its optimizer state and data position (set by
    /// `POST /v1/jobs/{id}/continue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_from: Option<ContinueFrom>,
}

/// Where a continued job starts: a checkpoint of its parent, whose weights, AdamW moments,
/// step-0 perplexities and data cursors it takes over; its own schedule starts afresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinueFrom {
    /// The parent's checkpoint directory.
    pub checkpoint: String,
    /// The parent's `train_data` datasets in order: a source of this job at the same position
    /// and on the same dataset carries its cursor on (no block seen twice), others start afresh.
    #[serde(default)]
    pub train_data: Vec<String>,
}

/// One training source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// A prepared dataset directory.
    pub dataset: String,
    #[serde(default = "defaults::weight")]
    pub weight: f64,
}

/// A fixed peak learning rate, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LearningRate {
    Fixed(f64),
    Auto(AutoTag),
}

/// The literal string `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoTag {
    Auto,
}

impl Default for LearningRate {
    fn default() -> Self {
        LearningRate::Auto(AutoTag::Auto)
    }
}

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
    /// Warmup, a stable plateau, then a linear decay over the last `decay_ratio` of steps.
    Wsd,
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 compute with f32 master weights and optimizer state.
    Bf16,
}

/// Upper bounds of a spec's sizes: far beyond any real job, and low enough that no arithmetic on
/// them overflows and no field can make a worker allocate without bound.
pub mod limits {
    pub const NAME_BYTES: u64 = 200;
    pub const PATH_BYTES: u64 = 4096;
    pub const SOURCES: u64 = 64;
    pub const SEQ_LEN: u64 = 1 << 20;
    pub const MICRO_BATCH: u64 = 1 << 16;
    pub const GRAD_ACCUM: u64 = 1 << 16;
    /// Tokens in one optimizer step.
    pub const TOKENS_PER_STEP: u64 = 1 << 32;
    pub const STEPS: u64 = 1 << 40;
    /// Tokens of a whole job (2^53: exact in f64 and in JSON numbers everywhere).
    pub const TOKENS: u64 = 1 << 53;
    pub const EVAL_BLOCKS: u64 = 1 << 20;
    pub const KEEP_CHECKPOINTS: u64 = 1000;
    pub const PROMPTS: u64 = 32;
    pub const PROMPT_BYTES: u64 = 4096;
    pub const SAMPLE_TOKENS: u64 = 4096;
}

mod defaults {
    pub fn one() -> usize {
        1
    }
    pub fn min_lr_ratio() -> f64 {
        0.1
    }
    pub fn decay_ratio() -> f64 {
        0.2
    }
    pub fn weight_decay() -> f64 {
        0.1
    }
    pub fn betas() -> [f64; 2] {
        [0.9, 0.95]
    }
    pub fn eps() -> f64 {
        1e-8
    }
    pub fn grad_clip() -> Option<f64> {
        Some(1.0)
    }
    pub fn eval_every() -> u64 {
        100
    }
    pub fn eval_blocks() -> usize {
        32
    }
    pub fn checkpoint_every() -> u64 {
        500
    }
    pub fn keep_checkpoints() -> usize {
        3
    }
    pub fn sample_tokens() -> usize {
        32
    }
    pub fn max_bad_steps() -> u32 {
        5
    }
    pub fn spike_factor() -> f64 {
        2.0
    }
    pub fn weight() -> f64 {
        1.0
    }
}

/// A problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// A name shown in lists, pages and charts: 1 to [`limits::NAME_BYTES`] bytes, not blank, without
/// control characters (which no SVG or terminal can show).
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.trim().is_empty() || name.len() as u64 > limits::NAME_BYTES || name.chars().any(char::is_control) {
        let message = format!("must be 1 to {} bytes, not blank, without control characters", limits::NAME_BYTES);
        return Err(problem(field, message));
    }
    Ok(())
}

impl JobSpec {
    /// Parses and validates a spec from JSON text; errors name the offending field's path.
    pub fn from_json_str(text: &str) -> Result<Self, FieldError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let spec: JobSpec = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.to_string();
            // A missing field is not on the path (its parent is); serde names it in the message.
            let missing = message.strip_prefix("missing field `").and_then(|m| m.split('`').next());
            let field = match (inner.classify(), missing, path.as_str()) {
                // Not JSON at all: no field to blame.
                (serde_json::error::Category::Syntax | serde_json::error::Category::Eof, _, _) => String::new(),
                (_, Some(name), ".") => name.to_string(),
                (_, Some(name), parent) => format!("{parent}.{name}"),
                (_, None, ".") => String::new(),
                (_, None, path) => path.to_string(),
            };
            problem(field, message)
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field's range and the fields' consistency; the first problem wins.
    pub fn validate(&self) -> Result<(), FieldError> {
        let positive =
            |value: usize, field: &str| if value == 0 { Err(problem(field, "must be positive")) } else { Ok(()) };
        let at_most = |value: u64, max: u64, field: &str| {
            if value > max {
                Err(problem(field, format!("must be at most {max}")))
            } else {
                Ok(())
            }
        };
        check_name("name", &self.name)?;
        at_most(self.base_model.len() as u64, limits::PATH_BYTES, "base_model")?;
        at_most(self.train_data.len() as u64, limits::SOURCES, "train_data")?;
        at_most(self.eval_data.len() as u64, limits::SOURCES, "eval_data")?;
        at_most(self.seq_len as u64, limits::SEQ_LEN, "seq_len")?;
        at_most(self.micro_batch_size as u64, limits::MICRO_BATCH, "micro_batch_size")?;
        at_most(self.grad_accum_steps as u64, limits::GRAD_ACCUM, "grad_accum_steps")?;
        if let Some(every) = self.recompute_every {
            positive(every, "recompute_every")?;
            if self.adapter.is_some() {
                return Err(problem(
                    "recompute_every",
                    "recomputation runs in the explicit step, which trains every weight; an adapter job cannot use it",
                ));
            }
        }
        at_most(self.max_steps.unwrap_or(0), limits::STEPS, "max_steps")?;
        at_most(self.max_tokens.unwrap_or(0), limits::TOKENS, "max_tokens")?;
        at_most(self.warmup_steps.unwrap_or(0), limits::STEPS, "warmup_steps")?;
        at_most(self.eval_blocks as u64, limits::EVAL_BLOCKS, "eval_blocks")?;
        at_most(self.keep_checkpoints as u64, limits::KEEP_CHECKPOINTS, "keep_checkpoints")?;
        at_most(self.sample_prompts.len() as u64, limits::PROMPTS, "sample_prompts")?;
        at_most(self.sample_tokens as u64, limits::SAMPLE_TOKENS, "sample_tokens")?;
        for (i, prompt) in self.sample_prompts.iter().enumerate() {
            at_most(prompt.len() as u64, limits::PROMPT_BYTES, &format!("sample_prompts[{i}]"))?;
        }
        for (i, source) in self.train_data.iter().enumerate() {
            at_most(source.dataset.len() as u64, limits::PATH_BYTES, &format!("train_data[{i}].dataset"))?;
        }
        for (name, dataset) in &self.eval_data {
            at_most(dataset.len() as u64, limits::PATH_BYTES, &format!("eval_data.{name}"))?;
        }
        if self.base_model.trim().is_empty() {
            return Err(problem("base_model", "must not be empty"));
        }
        if self.train_data.is_empty() {
            return Err(problem("train_data", "needs at least one source"));
        }
        for (i, source) in self.train_data.iter().enumerate() {
            if source.dataset.trim().is_empty() {
                return Err(problem(format!("train_data[{i}].dataset"), "must not be empty"));
            }
            if !(source.weight.is_finite() && source.weight > 0.0) {
                return Err(problem(format!("train_data[{i}].weight"), "must be a positive number"));
            }
        }
        for (name, dataset) in &self.eval_data {
            let valid_name =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name || name.len() > 64 {
                return Err(problem(
                    format!("eval_data.{name}"),
                    "names use letters, digits, '_' and '-' (at most 64)",
                ));
            }
            if dataset.trim().is_empty() {
                return Err(problem(format!("eval_data.{name}"), "must name a dataset"));
            }
        }
        positive(self.seq_len, "seq_len")?;
        positive(self.micro_batch_size, "micro_batch_size")?;
        positive(self.grad_accum_steps, "grad_accum_steps")?;
        if let LearningRate::Fixed(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
                return Err(problem("lr", "must be in (0, 1) or \"auto\""));
            }
        }
        if let Some(base) = self.base_lr {
            if !(base.is_finite() && base > 0.0 && base < 1.0) {
                return Err(problem("base_lr", "must be in (0, 1)"));
            }
        }
        if self.base_batch_tokens == Some(0) {
            return Err(problem("base_batch_tokens", "must be positive"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(problem("min_lr_ratio", "must be in [0, 1]"));
        }
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(_), Some(_)) => return Err(problem("warmup_ratio", "give warmup_steps or warmup_ratio, not both")),
            (None, Some(r)) if !(0.0..1.0).contains(&r) => return Err(problem("warmup_ratio", "must be in [0, 1)")),
            _ => {}
        }
        if !(self.decay_ratio > 0.0 && self.decay_ratio <= 1.0) {
            return Err(problem("decay_ratio", "must be in (0, 1]"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay < 1.0) {
            return Err(problem("weight_decay", "must be in [0, 1)"));
        }
        for (i, beta) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(beta) {
                return Err(problem(format!("betas[{i}]"), "must be in [0, 1)"));
            }
        }
        if !(self.eps > 0.0 && self.eps < 1.0) {
            return Err(problem("eps", "must be in (0, 1)"));
        }
        if matches!(self.grad_clip, Some(c) if !(c.is_finite() && c > 0.0)) {
            return Err(problem("grad_clip", "must be positive or null"));
        }
        match (self.max_steps, self.max_tokens) {
            (None, None) => return Err(problem("max_steps", "give max_steps or max_tokens")),
            (Some(_), Some(_)) => return Err(problem("max_tokens", "give max_steps or max_tokens, not both")),
            (Some(0), _) => return Err(problem("max_steps", "must be positive")),
            (_, Some(0)) => return Err(problem("max_tokens", "must be positive")),
            _ => {}
        }
        positive(self.keep_checkpoints, "keep_checkpoints")?;
        // Each factor is bounded above, so these products cannot overflow.
        at_most(self.tokens_per_step(), limits::TOKENS_PER_STEP, "micro_batch_size")?;
        let total_tokens = self.total_steps().saturating_mul(self.tokens_per_step());
        at_most(total_tokens, limits::TOKENS, if self.max_steps.is_some() { "max_steps" } else { "max_tokens" })?;
        if self.sample_prompts.iter().any(|p| p.is_empty()) {
            return Err(problem("sample_prompts", "prompts must not be empty"));
        }
        positive(self.max_bad_steps as usize, "max_bad_steps")?;
        if !(self.spike_factor > 1.0) {
            return Err(problem("spike_factor", "must be greater than 1"));
        }
        self.sample_decoding.as_ref().map_or(Ok(()), SampleDecoding::validate)?;
        self.spike_rollback.as_ref().map_or(Ok(()), SpikeRollback::validate)?;
        for (set, budget) in &self.forgetting_budget {
            let field = format!("forgetting_budget.{set}");
            if !self.eval_data.contains_key(set) {
                return Err(problem(field, "names no set of eval_data"));
            }
            budget.validate(&field)?;
        }
        if let Some(from) = &self.continue_from {
            if from.checkpoint.trim().is_empty() {
                return Err(problem("continue_from.checkpoint", "must name a checkpoint directory"));
            }
            at_most(from.checkpoint.len() as u64, limits::PATH_BYTES, "continue_from.checkpoint")?;
            at_most(from.train_data.len() as u64, limits::SOURCES, "continue_from.train_data")?;
        }
        self.adapter.as_ref().map_or(Ok(()), AdapterSpec::validate)
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.micro_batch_size as u64).saturating_mul(self.grad_accum_steps as u64).saturating_mul(self.seq_len as u64)
    }

    /// Optimizer steps the job runs.
    pub fn total_steps(&self) -> u64 {
        match (self.max_steps, self.max_tokens) {
            (Some(steps), _) => steps,
            (None, Some(tokens)) => tokens.div_ceil(self.tokens_per_step()).max(1),
            (None, None) => 1,
        }
    }

    /// Warmup length in steps.
    pub fn warmup_steps(&self) -> u64 {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(steps), _) => steps.min(self.total_steps()),
            (None, Some(ratio)) => (ratio * self.total_steps() as f64).round() as u64,
            (None, None) => 0,
        }
    }
}
