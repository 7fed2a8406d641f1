//! Forgetting budgets held at every eval: a set whose perplexity rose past its bound over step 0
//! is reported, and the strongest action among the crossed bounds is what the run does next.

use std::collections::BTreeMap;

use cpt_protocol::budget::{BudgetAction, ForgettingBudget};
use cpt_protocol::Event;

/// The bound an eval crossed that acts most strongly.
#[derive(Debug, Clone)]
pub struct Crossing {
    pub action: BudgetAction,
    pub message: String,
}

/// Reports every crossed budget among `perplexities` (against `baseline`, step 0's) as a
/// `forgetting_budget` event and returns the strongest crossing.
pub fn check(
    budgets: &BTreeMap<String, ForgettingBudget>,
    baseline: &BTreeMap<String, f64>,
    perplexities: &BTreeMap<String, f64>,
    step: u64,
    on_event: &mut impl FnMut(Event),
) -> Option<Crossing> {
    let mut strongest: Option<Crossing> = None;
    for (set, budget) in budgets {
        let (Some(&perplexity), Some(&start)) = (perplexities.get(set), baseline.get(set)) else { continue };
        let (rise, crossed) = budget.check(perplexity, start);
        if !crossed {
            continue;
        }
        let action = budget.action;
        on_event(Event::ForgettingBudget {
            step,
            set: set.clone(),
            perplexity,
            baseline: start,
            rise,
            max_rise: budget.max_rise,
            action,
        });
        if strongest.as_ref().is_none_or(|s| action > s.action) {
            let message = format!(
                "forgetting budget of `{set}` crossed at step {step}: perplexity {perplexity:.4} is {:+.2}% over step 0's \
                 {start:.4} (at most {:+.2}%); {}",
                rise * 100.0,
                budget.max_rise * 100.0,
                match action {
                    BudgetAction::Warn => "warning only",
                    BudgetAction::Pause => "paused",
                    BudgetAction::Stop => "stopped",
                }
            );
            strongest = Some(Crossing { action, message });
        }
    }
    strongest
}
