//! Forgetting budgets on a tiny model: training on the domain makes the "foreign" set (bytes the
//! domain never uses) less likely; a budget on it warns, pauses (resumably, exactly) or stops.

mod common;

use common::runs::{fixture, run, spec};
use cpt_protocol::budget::BudgetAction;
use cpt_protocol::Event;
use serde_json::{json, Value};

/// The spec: domain data only, "foreign" evaluated every 2 steps under `budget`.
fn budget_spec(root: &std::path::Path, budget: Value) -> cpt_protocol::JobSpec {
    let p = |name: &str| root.join(name).display().to_string();
    spec(
        root,
        json!({"train_data": [{"dataset": p("domain")}], "eval_data": {"domain": p("domain"), "foreign": p("foreign")},
               "lr": 1e-2, "eval_every": 2, "checkpoint_every": 0, "sample_prompts": [],
               "forgetting_budget": {"foreign": budget}}),
    )
}

fn crossings(events: &[Event]) -> Vec<(u64, BudgetAction, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ForgettingBudget { step, action, rise, .. } => Some((*step, *action, *rise)),
            _ => None,
        })
        .collect()
}

fn changes(events: &[Event], of: &str) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { step, set, perplexity_change, .. } if set == of => Some((*step, *perplexity_change)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_warning_budget_reports_every_crossing_and_training_goes_on() {
    let f = fixture(false);
    let (outcome, events) = run(&budget_spec(&f.root, json!({"max_rise": 1e-3})), &f.root.join("run"), false, None);
    let outcome = outcome.unwrap();
    assert!(!outcome.stopped && !outcome.paused && outcome.step == 10);
    let foreign = changes(&events, "foreign");
    assert_eq!(foreign[0], (0, 0.0), "step 0 is the baseline");
    let risen: Vec<u64> = foreign.iter().filter(|(_, c)| *c > 1e-3).map(|(s, _)| *s).collect();
    assert!(!risen.is_empty(), "training on the domain makes foreign bytes less likely: {foreign:?}");
    let crossed: Vec<u64> = crossings(&events).iter().map(|c| c.0).collect();
    assert_eq!(crossed, risen, "one event per eval past the bound");
    assert!(changes(&events, "domain").last().unwrap().1 < 0.0, "the domain is learned");
}

#[test]
fn a_pausing_budget_checkpoints_at_the_first_crossing_and_resumes_exactly() {
    let f = fixture(false);
    let spec = budget_spec(&f.root, json!({"max_rise": 1e-3, "action": "pause"}));
    let (outcome, events) = run(&spec, &f.root.join("run"), false, None);
    let outcome = outcome.unwrap();
    let first = crossings(&events);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(outcome.paused && outcome.stopped && outcome.step == first[0].0);
    assert!(outcome.checkpoint.ends_with(format!("step-{}", outcome.step)));
    assert!(matches!(events.last(), Some(Event::Finished { outcome, .. }) if outcome == "paused"));

    // Resumed, it goes on from the checkpoint with the step-0 baseline it kept, and the next eval
    // past the bound pauses it again.
    let (again, resumed) = run(&spec, &f.root.join("run"), true, None);
    let again = again.unwrap();
    assert!(matches!(resumed[0], Event::Started { from_step, .. } if from_step == outcome.step));
    assert!(again.paused && again.step > outcome.step, "{again:?}");
    // The same steps as one run that never pauses (a warning budget).
    let warned = budget_spec(&f.root, json!({"max_rise": 1e-3}));
    let (_, straight) = run(&warned, &f.root.join("straight"), false, None);
    let losses = |events: &[Event]| -> Vec<u64> {
        events.iter().filter_map(|e| if let Event::Step(m) = e { Some(m.loss.to_bits()) } else { None }).collect()
    };
    let mut paused_run = losses(&events);
    paused_run.extend(losses(&resumed));
    assert_eq!(paused_run[..], losses(&straight)[..paused_run.len()], "pausing changes no step");
}

#[test]
fn a_stopping_budget_fails_the_run_at_the_first_crossing_with_a_checkpoint() {
    let f = fixture(false);
    let spec = budget_spec(&f.root, json!({"max_rise": 1e-3, "action": "stop"}));
    let (outcome, events) = run(&spec, &f.root.join("run"), false, None);
    let error = format!("{:#}", outcome.unwrap_err());
    let step = crossings(&events)[0].0;
    assert!(error.contains(&format!("forgetting budget of `foreign` crossed at step {step}")), "{error}");
    assert!(f.root.join(format!("run/checkpoints/step-{step}")).exists(), "{error}");
    // A generous budget is never crossed.
    let (outcome, events) =
        run(&budget_spec(&f.root, json!({"max_rise": 1e3, "action": "stop"})), &f.root.join("ok"), false, None);
    assert!(outcome.is_ok() && crossings(&events).is_empty());
}
