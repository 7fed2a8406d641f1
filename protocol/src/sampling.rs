//! How a job's sample continuations are decoded: greedy by default, or seeded sampling.

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// The spec's `sample_decoding`: temperature 0 is greedy; otherwise a draw from the `top_k` most
/// likely tokens, then the smallest set of them whose probability reaches `top_p`, seeded by the
/// job's seed and the step, so a run's samples are reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleDecoding {
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Logits of tokens already in the context are divided by this (multiplied when negative).
    #[serde(default = "default_penalty")]
    pub repetition_penalty: f64,
}

fn default_top_k() -> usize {
    50
}
fn default_top_p() -> f64 {
    1.0
}
fn default_penalty() -> f64 {
    1.0
}

fn problem(field: &str, message: &str) -> FieldError {
    FieldError { field: format!("sample_decoding.{field}"), message: message.to_string() }
}

impl SampleDecoding {
    /// Checks the ranges; errors name the field under `sample_decoding.`.
    pub fn validate(&self) -> Result<(), FieldError> {
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(problem("temperature", "must be in [0, 100] (0: greedy)"));
        }
        if self.top_k == 0 || self.top_k > 1 << 20 {
            return Err(problem("top_k", "must be in 1..=1048576"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(problem("top_p", "must be in (0, 1]"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(problem("repetition_penalty", "must be in (0, 10]"));
        }
        Ok(())
    }
}
