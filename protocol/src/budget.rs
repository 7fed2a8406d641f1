//! What a run does when it goes wrong in ways it can measure: forgetting budgets (per eval set, how
//! far its perplexity may rise above its value at step 0 before the job warns, pauses or stops) and
//! loss-spike rollback.

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// The bound on one eval set and what crossing it does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgettingBudget {
    /// The largest allowed rise of the set's perplexity relative to step 0: 0.05 is +5%.
    pub max_rise: f64,
    #[serde(default)]
    pub action: BudgetAction,
}

/// What a job does at the first eval past its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// Report it (an event and a metric) and go on.
    #[default]
    Warn,
    /// Checkpoint and wait in state `paused` until `POST /v1/jobs/{id}/resume`.
    Pause,
    /// Checkpoint and end the job as failed.
    Stop,
}

impl BudgetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetAction::Warn => "warn",
            BudgetAction::Pause => "pause",
            BudgetAction::Stop => "stop",
        }
    }
}

impl ForgettingBudget {
    /// Checks the bound; `field` names it in errors.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if !(self.max_rise.is_finite() && self.max_rise > 0.0 && self.max_rise <= 1e6) {
            let message = "must be a positive fraction (0.05 allows +5%)".to_string();
            return Err(FieldError { field: format!("{field}.max_rise"), message });
        }
        Ok(())
    }

    /// The rise of `perplexity` over `baseline` (0.05 is +5%), and whether it crosses the bound.
    pub fn check(&self, perplexity: f64, baseline: f64) -> (f64, bool) {
        let rise = perplexity / baseline - 1.0;
        // A NaN perplexity (a diverged model) crosses any bound.
        (rise, !(rise <= self.max_rise))
    }
}

/// On a loss spike (`spike_factor` × the moving average), roll back instead of only warning:
/// return to the newest checkpoint (or the start), skip the data window since then, and lower the
/// learning rate for a while.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpikeRollback {
    /// The learning rate is multiplied by this for `cooldown_steps` steps after a rollback.
    #[serde(default = "one")]
    pub lr_scale: f64,
    #[serde(default)]
    pub cooldown_steps: u64,
    /// The run fails after this many rollbacks: a run that keeps spiking needs a person.
    #[serde(default = "five")]
    pub max_rollbacks: u32,
}

fn one() -> f64 {
    1.0
}

fn five() -> u32 {
    5
}

impl SpikeRollback {
    pub fn validate(&self) -> Result<(), FieldError> {
        let problem = |field: &str, message: &str| {
            Err(FieldError { field: format!("spike_rollback.{field}"), message: message.into() })
        };
        if !(self.lr_scale > 0.0 && self.lr_scale <= 1.0) {
            return problem("lr_scale", "must be in (0, 1]");
        }
        if self.cooldown_steps > crate::spec::limits::STEPS {
            return problem("cooldown_steps", "is too large");
        }
        if self.max_rollbacks == 0 {
            return problem("max_rollbacks", "must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rise_past_the_bound_crosses_it_and_so_does_nan() {
        let budget = ForgettingBudget { max_rise: 0.05, action: BudgetAction::Pause };
        assert_eq!(budget.check(10.4, 10.0).1, false);
        let (rise, crossed) = budget.check(10.6, 10.0);
        assert!((rise - 0.06).abs() < 1e-12 && crossed);
        assert!(budget.check(f64::NAN, 10.0).1);
        assert!(BudgetAction::Stop > BudgetAction::Pause && BudgetAction::Pause > BudgetAction::Warn);
        let bad = ForgettingBudget { max_rise: 0.0, action: BudgetAction::Warn };
        assert_eq!(bad.validate("forgetting_budget.general").unwrap_err().field, "forgetting_budget.general.max_rise");
        let parsed: ForgettingBudget = serde_json::from_str(r#"{"max_rise": 0.1}"#).unwrap();
        assert_eq!(parsed.action, BudgetAction::Warn);
    }
}
