//! Events a training run emits, in order. Units are in the field names or documented here:
//! seconds, tokens, FLOPs (floating-point operations), nats (natural-log loss).

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Something that happened in a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The run started (fresh or resumed) with this plan.
    Started {
        plan: Plan,
        /// The step it starts after: 0 for a fresh run, the checkpoint's step on resume.
        from_step: u64,
        resumed: bool,
        device: String,
        /// Peak FLOP/s used for MFU, and where that number came from.
        peak_flops_per_second: f64,
        peak_source: String,
    },
    /// One optimizer step.
    Step(StepMetrics),
    /// Loss on one held-out set.
    Eval {
        step: u64,
        set: String,
        /// Mean nats per predicted token.
        #[serde(deserialize_with = "non_finite_as_null")]
        loss: f64,
        #[serde(deserialize_with = "non_finite_as_null")]
        perplexity: f64,
        tokens: u64,
        /// Bits per UTF-8 byte of the text the predicted tokens decode to: unlike perplexity,
        /// comparable across tokenizers (an extended vocabulary, another model family).
        #[serde(default = "not_measured", deserialize_with = "non_finite_as_null")]
        bits_per_byte: f64,
        /// Those bytes (special tokens excluded).
        #[serde(default)]
        bytes: u64,
        /// The perplexity's change relative to step 0 of the run (0.05 is +5%): forgetting on a
        /// general set, learning (negative) on a domain set.
        #[serde(default = "not_measured", deserialize_with = "non_finite_as_null")]
        perplexity_change: f64,
    },
    /// A loss spike at `step` rolled the run back to `to_step` (its newest scheduled checkpoint,
    /// or 0): the steps in between are undone, their data skipped, and the learning rate scaled
    /// by `lr_scale` up to step `cooldown_until`.
    Rollback {
        step: u64,
        to_step: u64,
        #[serde(deserialize_with = "non_finite_as_null")]
        loss: f64,
        average: f64,
        skipped_tokens: u64,
        lr_scale: f64,
        cooldown_until: u64,
        /// Rollbacks of this run so far, this one included.
        rollbacks: u32,
    },
    /// An eval set's perplexity rose past its forgetting budget; `action` is what the run does.
    ForgettingBudget {
        step: u64,
        set: String,
        #[serde(deserialize_with = "non_finite_as_null")]
        perplexity: f64,
        /// Its perplexity at step 0.
        baseline: f64,
        /// `perplexity / baseline - 1`, and the bound it crossed.
        #[serde(deserialize_with = "non_finite_as_null")]
        rise: f64,
        max_rise: f64,
        action: crate::budget::BudgetAction,
    },
    /// A checkpoint was written and is complete.
    Checkpoint { step: u64, path: String, tokens_total: u64 },
    /// A continuation of a configured prompt.
    Sample { step: u64, prompt: String, continuation: String },
    /// Something a user should look at that did not stop training.
    Warning { step: u64, code: WarningCode, message: String },
    /// The run ended: `succeeded`, or `stopped` (interrupted with a checkpoint, resumable).
    Finished { step: u64, tokens_total: u64, outcome: String },
    /// A dataset preparation finished: where the dataset is and its manifest (counts, checksums
    /// and the cleaning report, as `cpt-data` writes it).
    Prepared { path: String, manifest: serde_json::Value },
    /// A vocabulary extension finished: the extended model directory and its report (added
    /// tokens, fertility before and after), as `cpt-worker extend-vocab` prints it.
    VocabularyExtended { path: String, report: serde_json::Value },
}

/// Per-step training metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    /// Mean next-token loss over the step's micro-batches, nats per token.
    #[serde(deserialize_with = "non_finite_as_null")]
    pub loss: f64,
    /// Learning rate applied at this step.
    #[serde(deserialize_with = "non_finite_as_null")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "non_finite_as_null")]
    pub grad_norm: f64,
    /// Whether the update was skipped (non-finite loss or gradient).
    pub skipped: bool,
    /// Tokens in this step and in the whole run so far.
    pub tokens: u64,
    pub tokens_total: u64,
    /// Throughput of this step, tokens per wall-clock second.
    #[serde(deserialize_with = "non_finite_as_null")]
    pub tokens_per_second: f64,
    /// Model FLOPs of this step and of the run so far (see `plan::flops_per_token`).
    #[serde(deserialize_with = "non_finite_as_null")]
    pub flops: f64,
    #[serde(deserialize_with = "non_finite_as_null")]
    pub flops_total: f64,
    /// Achieved model FLOP/s and its ratio to the device's peak (model FLOPs utilisation).
    #[serde(deserialize_with = "non_finite_as_null")]
    pub flops_per_second: f64,
    #[serde(deserialize_with = "non_finite_as_null")]
    pub mfu: f64,
    /// Wall time of the step, split into waiting for data and computing.
    #[serde(deserialize_with = "non_finite_as_null")]
    pub step_seconds: f64,
    #[serde(deserialize_with = "non_finite_as_null")]
    pub data_seconds: f64,
    #[serde(deserialize_with = "non_finite_as_null")]
    pub compute_seconds: f64,
}

/// Events from before a field existed read it as not measured.
fn not_measured() -> f64 {
    f64::NAN
}

/// JSON has no NaN or infinity: serde_json writes them as `null`, read back here as NaN (a skipped
/// step's loss is NaN, and it must not make its event unreadable).
fn non_finite_as_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Stable codes of warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarningCode {
    /// The loss or gradient was NaN/Inf; the update was skipped.
    NonFiniteStep,
    /// The loss jumped far above its moving average.
    LossSpike,
    /// A checkpoint failed verification and an older one was used.
    CorruptCheckpoint,
    /// A dataset was tokenized with a different tokenizer.json than the model's.
    TokenizerMismatch,
    /// `lr: "auto"` scaled the rate from a batch far from this job's (see the plan's `lr.warning`).
    LrExtrapolated,
}

impl Event {
    /// The optimizer step the event belongs to, where it has one.
    pub fn step(&self) -> Option<u64> {
        match self {
            Event::Started { from_step, .. } => Some(*from_step),
            Event::Step(metrics) => Some(metrics.step),
            Event::Eval { step, .. }
            | Event::Checkpoint { step, .. }
            | Event::Sample { step, .. }
            | Event::Warning { step, .. }
            | Event::ForgettingBudget { step, .. }
            | Event::Rollback { step, .. }
            | Event::Finished { step, .. } => Some(*step),
            Event::Prepared { .. } | Event::VocabularyExtended { .. } => None,
        }
    }

    /// The event's `kind` as serialised.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Step(_) => "step",
            Event::Eval { .. } => "eval",
            Event::Checkpoint { .. } => "checkpoint",
            Event::Sample { .. } => "sample",
            Event::Warning { .. } => "warning",
            Event::ForgettingBudget { .. } => "forgetting_budget",
            Event::Rollback { .. } => "rollback",
            Event::Finished { .. } => "finished",
            Event::Prepared { .. } => "prepared",
            Event::VocabularyExtended { .. } => "vocabulary_extended",
        }
    }

    /// What a preparation or a vocabulary extension made: its directory and its report.
    pub fn product(&self) -> Option<(&str, &serde_json::Value)> {
        match self {
            Event::Prepared { path, manifest } => Some((path, manifest)),
            Event::VocabularyExtended { path, report } => Some((path, report)),
            _ => None,
        }
    }
}
