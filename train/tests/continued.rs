//! A job that continues another's checkpoint takes over its weights, optimizer state, data
//! position and step-0 perplexities: continuing a 10-step run for 6 steps gives, bit for bit, the
//! steps 11–16 of one 16-step run.

mod common;

use common::runs::{fixture, run, spec};
use cpt_protocol::Event;
use serde_json::json;

fn losses(events: &[Event]) -> Vec<u64> {
    events.iter().filter_map(|e| if let Event::Step(m) = e { Some(m.loss.to_bits()) } else { None }).collect()
}

fn evals(events: &[Event], of: &str) -> Vec<(u64, f64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { step, set, loss, perplexity_change, .. } if set == of => {
                Some((*step, *loss, *perplexity_change))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_continued_run_is_the_rest_of_one_longer_run() {
    let f = fixture(false);
    let constant = |steps: u64| {
        spec(&f.root, json!({"schedule": "constant", "warmup_steps": 0, "max_steps": steps, "sample_prompts": []}))
    };
    let (parent, parent_events) = run(&constant(10), &f.root.join("parent"), false, None);
    let parent = parent.unwrap();
    let (_, straight) = run(&constant(16), &f.root.join("straight"), false, None);

    let mut child = constant(6);
    let datasets: Vec<String> = child.train_data.iter().map(|s| s.dataset.clone()).collect();
    child.continue_from = Some(cpt_protocol::spec::ContinueFrom {
        checkpoint: parent.checkpoint.display().to_string(),
        train_data: datasets,
    });
    let (outcome, child_events) = run(&child, &f.root.join("child"), false, None);
    assert_eq!(outcome.unwrap().step, 6);
    assert_eq!(losses(&child_events), losses(&straight)[10..], "weights, AdamW state and data all carried over");

    // Its step 0 is the parent's end, measured against the parent's step 0.
    let (parent_domain, child_domain) = (evals(&parent_events, "domain"), evals(&child_events, "domain"));
    let (end, start) = (parent_domain.last().unwrap(), child_domain[0]);
    assert_eq!((start.0, start.1.to_bits(), start.2.to_bits()), (0, end.1.to_bits(), end.2.to_bits()));
    assert!(start.2 < 0.0, "the parent learned the domain: {parent_domain:?}");

    // A source on another dataset (or position) starts from its beginning instead.
    let mut reordered = child.clone();
    reordered.train_data.reverse();
    let (_, events) = run(&reordered, &f.root.join("reordered"), false, None);
    assert_ne!(losses(&events), losses(&straight)[10..]);
}
