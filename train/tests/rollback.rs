//! Loss-spike rollback on a tiny model learning a pattern, with a planted source of garbage tokens: the run returns to
//! its newest checkpoint, skips the data since, cools its learning rate, recovers, and a stop and
//! resume on either side of the spike gives the same bits.

mod common;

use common::runs::{fixture, run, spec};
use cpt_data::format::TailPolicy;
use cpt_data::{DatasetWriter, Split, TokenizerInfo};
use cpt_protocol::{Event, JobSpec};
use serde_json::json;

/// The domain plus a rarely drawn source of random bytes, with rollback on.
fn planted_spec(root: &std::path::Path) -> JobSpec {
    let sha256 = cpt_data::sha256_file(&root.join("base/tokenizer.json")).unwrap();
    let info = TokenizerInfo { sha256, vocab_size: 257, eos_token_id: 256 };
    // A pattern the model learns within a few steps, so that garbage stands out.
    let mut writer = DatasetWriter::create(&root.join("pattern"), 16, info.clone()).unwrap();
    for doc in 0..200u32 {
        let tokens: Vec<u32> = (0..16).map(|i| 10 + (doc % 4 + i) % 8).collect();
        writer.push_document(Split::Train, &tokens).unwrap();
    }
    writer.finish(TailPolicy::Pad, vec![], serde_json::Value::Null).unwrap();
    let mut writer = DatasetWriter::create(&root.join("garbage"), 16, info).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..40 {
        let tokens: Vec<u32> = (0..16)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 256) as u32
            })
            .collect();
        writer.push_document(Split::Train, &tokens).unwrap();
    }
    writer.finish(TailPolicy::Pad, vec![], serde_json::Value::Null).unwrap();
    let p = |name: &str| root.join(name).display().to_string();
    spec(
        root,
        json!({"train_data": [{"dataset": p("pattern")}, {"dataset": p("garbage"), "weight": 0.04}],
               "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
               "max_steps": 40, "eval_every": 0, "checkpoint_every": 5, "keep_checkpoints": 2, "sample_prompts": [],
               "spike_factor": 1.3, "spike_rollback": {"lr_scale": 0.5, "cooldown_steps": 3}}),
    )
}

fn rollbacks(events: &[Event]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rollback { step, to_step, cooldown_until, .. } => Some((*step, *to_step, *cooldown_until)),
            _ => None,
        })
        .collect()
}

/// (step, loss bits, lr bits) of every step event.
fn steps(events: &[Event]) -> Vec<(u64, u64, u64)> {
    events
        .iter()
        .filter_map(|e| if let Event::Step(m) = e { Some((m.step, m.loss.to_bits(), m.lr.to_bits())) } else { None })
        .collect()
}

#[test]
fn a_planted_spike_rolls_back_to_the_checkpoint_cools_down_and_resumes_exactly() {
    let f = fixture(false);
    let spec = planted_spec(&f.root);
    let (outcome, events) = run(&spec, &f.root.join("whole"), false, None);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.step, 40);
    let found = rollbacks(&events);
    let losses: Vec<f64> = steps(&events).iter().map(|s| f64::from_bits(s.1)).collect();
    assert!(!found.is_empty(), "the garbage source makes a spike: {losses:?}");
    let (spike, to, cooled) = found[0];
    assert!(to < spike && to % 5 == 0 && cooled == to + 3, "{found:?}");
    assert!(found.iter().all(|(s, t, _)| *t == (s - 1) / 5 * 5), "the newest scheduled checkpoint: {found:?}");
    // After the rollback, steps start again after the checkpoint, at half the rate while cooling.
    let all = steps(&events);
    let at = events.iter().position(|e| matches!(e, Event::Rollback { .. })).unwrap();
    let after = steps(&events[at..]);
    assert_eq!(after[0].0, to + 1);
    let before = all.iter().find(|s| s.0 == to + 1).unwrap();
    assert_eq!(f64::from_bits(after[0].2), 0.5 * f64::from_bits(before.2), "cooling halves the rate");
    let recovered = after.iter().find(|s| s.0 == cooled + 1).unwrap();
    assert_eq!(recovered.2, before.2, "then the schedule's rate again");

    // Stopped before the spike (the resumed run meets it and rolls back alike) or after it.
    for stop_at in [spike - 1, spike + 2] {
        let dir = f.root.join(format!("split-{stop_at}"));
        let (first, first_events) = run(&spec, &dir, false, Some(stop_at));
        assert!(first.unwrap().stopped);
        let (second, second_events) = run(&spec, &dir, true, None);
        let mut split = steps(&first_events);
        split.extend(steps(&second_events));
        assert_eq!(split, all, "stopped at {stop_at}");
        let file = "model.safetensors";
        let bytes = |dir: &std::path::Path| std::fs::read(dir.join(file)).unwrap();
        assert_eq!(bytes(&second.unwrap().checkpoint), bytes(&outcome.checkpoint), "stopped at {stop_at}");
    }
}
