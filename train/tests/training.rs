//! The training loop on a tiny model: exact resume, schedules, checkpoints, the NaN guard.

mod common;

use common::runs::{fixture, run, spec};

use std::path::Path;

use candle_core::{DType, Device};
use cpt_protocol::spec::Schedule;
use cpt_protocol::{Event, JobSpec, WarningCode};
use cpt_train::checkpoint;
use cpt_train::schedule::LrSchedule;
use cpt_train::Outcome;
use serde_json::json;

fn steps(events: &[Event]) -> Vec<(u64, u64, u64)> {
    // (step, loss bits, lr bits): bit-level comparison.
    events
        .iter()
        .filter_map(|e| match e {
            Event::Step(m) => Some((m.step, m.loss.to_bits(), m.lr.to_bits())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let f = fixture(false);
    let spec = spec(&f.root, json!({}));
    let (whole, whole_events) = run(&spec, &f.root.join("whole"), false, None);
    let whole = whole.unwrap();
    assert!(!whole.stopped && whole.step == 10);

    let (first, first_events) = run(&spec, &f.root.join("split"), false, Some(6));
    let first = first.unwrap();
    assert!(first.stopped && first.step == 6);
    let (second, second_events) = run(&spec, &f.root.join("split"), true, None);
    let second = second.unwrap();
    assert!(!second.stopped && second.step == 10);
    assert!(matches!(second_events[0], Event::Started { from_step: 6, resumed: true, .. }));

    let mut split = steps(&first_events);
    split.extend(steps(&second_events));
    assert_eq!(split, steps(&whole_events), "per-step losses and learning rates must match bit for bit");
    // Right after resume, the learning rate continues the schedule: no second warmup.
    let lr_after_resume = f64::from_bits(steps(&second_events)[0].2);
    assert_eq!(lr_after_resume, spec_schedule(&spec).lr_at(7));
    assert!(lr_after_resume < 3e-3, "step 7 of a cosine decay is below the peak");
    assert_eq!(
        std::fs::read(whole.checkpoint.join("model.safetensors")).unwrap(),
        std::fs::read(second.checkpoint.join("model.safetensors")).unwrap(),
        "final weights must be bit-identical"
    );
    assert_eq!(
        std::fs::read(whole.checkpoint.join("optimizer.safetensors")).unwrap(),
        std::fs::read(second.checkpoint.join("optimizer.safetensors")).unwrap(),
    );
}

fn spec_schedule(spec: &JobSpec) -> LrSchedule {
    LrSchedule { kind: spec.schedule, peak: 3e-3, min: 3e-4, warmup_steps: 3, total_steps: 10, decay_steps: 2 }
}

#[test]
fn a_run_reports_evals_from_step_zero_samples_and_checkpoints_it_can_load() {
    let f = fixture(false);
    let (outcome, events) = run(&spec(&f.root, json!({})), &f.root.join("run"), false, None);
    let outcome = outcome.unwrap();
    let evals: Vec<(u64, &str)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Eval { step, set, .. } => Some((*step, set.as_str())),
            _ => None,
        })
        .collect();
    let expected: Vec<(u64, &str)> = [0, 4, 8, 10].iter().flat_map(|&s| [(s, "domain"), (s, "general")]).collect();
    assert_eq!(evals, expected);
    let samples = events.iter().filter(|e| matches!(e, Event::Sample { .. })).count();
    assert_eq!(samples, 2, "steps 5 and 10");
    // Kept: the newest two of 4, 8, 10.
    assert_eq!(checkpoint::list(&f.root.join("run")).unwrap(), vec![8, 10]);
    checkpoint::verify(&outcome.checkpoint).unwrap();
    let model = cpt_train::ModelDir::open(&outcome.checkpoint).unwrap();
    model.load_params(DType::F32, &Device::Cpu).unwrap();
    let first_loss = events.iter().find_map(|e| if let Event::Step(m) = e { Some(m.loss) } else { None }).unwrap();
    let last_loss = events.iter().rev().find_map(|e| if let Event::Step(m) = e { Some(m.loss) } else { None }).unwrap();
    assert!(last_loss < first_loss, "training lowers the loss: {first_loss} → {last_loss}");
    let Event::Step(m) = events.iter().find(|e| matches!(e, Event::Step(_))).unwrap() else { unreachable!() };
    assert_eq!(m.tokens, 2 * 2 * 16);
    assert!(m.tokens_per_second > 0.0 && m.flops > 0.0 && m.mfu > 0.0 && m.compute_seconds > 0.0);
    assert!(m.mfu < 1.0, "model FLOPs above the CPU's peak: MFU {}", m.mfu);
    // The peak is the cores' arithmetic, and says so (Linux: /proc/cpuinfo).
    let Event::Started { peak_source, .. } = &events[0] else { panic!("the first event is `started`") };
    assert!(peak_source.contains("cores ×") && peak_source.contains("FLOP/cycle"), "{peak_source}");
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one() {
    let f = fixture(false);
    let spec = spec(&f.root, json!({"checkpoint_every": 2, "keep_checkpoints": 3}));
    let run_dir = f.root.join("run");
    run(&spec, &run_dir, false, Some(6)).0.unwrap();
    assert_eq!(checkpoint::list(&run_dir).unwrap(), vec![2, 4, 6]);
    let weights = run_dir.join("checkpoints/step-6/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let (outcome, events) = run(&spec, &run_dir, true, None);
    assert!(matches!(events[0], Event::Started { from_step: 4, .. }), "{:?}", events[0]);
    assert!(events.iter().any(|e| matches!(e, Event::Warning { code: WarningCode::CorruptCheckpoint, .. })));
    assert_eq!(outcome.unwrap().step, 10);
}

#[test]
fn non_finite_steps_are_skipped_with_warnings_then_fail_the_run() {
    let f = fixture(true);
    let (outcome, events) =
        run(&spec(&f.root, json!({"max_bad_steps": 3, "eval_data": {}})), &f.root.join("run"), false, None);
    let error = outcome.unwrap_err().to_string();
    assert!(error.contains("3 consecutive"), "{error}");
    let skipped = events.iter().filter(|e| matches!(e, Event::Step(m) if m.skipped)).count();
    let warnings =
        events.iter().filter(|e| matches!(e, Event::Warning { code: WarningCode::NonFiniteStep, .. })).count();
    assert_eq!((skipped, warnings), (2, 3), "the third bad step fails before its step event");
}

#[test]
fn resuming_under_a_changed_spec_is_refused() {
    let f = fixture(false);
    let run_dir = f.root.join("run");
    run(&spec(&f.root, json!({})), &run_dir, false, Some(4)).0.unwrap();
    let error = run(&spec(&f.root, json!({"lr": 1e-3})), &run_dir, true, None).0.unwrap_err().to_string();
    assert!(error.contains("spec differs"), "{error}");
}

#[test]
fn learning_rate_schedules_match_hand_computed_values() {
    let s = |kind| LrSchedule { kind, peak: 1.0, min: 0.1, warmup_steps: 4, total_steps: 14, decay_steps: 5 };
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    for kind in [Schedule::Constant, Schedule::Linear, Schedule::Cosine, Schedule::Wsd] {
        close(s(kind).lr_at(1), 0.25);
        close(s(kind).lr_at(4), 1.0);
    }
    close(s(Schedule::Constant).lr_at(14), 1.0);
    close(s(Schedule::Linear).lr_at(9), 0.1 + 0.9 * 0.5);
    close(s(Schedule::Linear).lr_at(14), 0.1);
    close(s(Schedule::Cosine).lr_at(9), 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos()));
    close(s(Schedule::Cosine).lr_at(14), 0.1);
    close(s(Schedule::Wsd).lr_at(9), 1.0);
    close(s(Schedule::Wsd).lr_at(11), 1.0 + (0.1 - 1.0) * 2.0 / 5.0);
    close(s(Schedule::Wsd).lr_at(14), 0.1);
}

#[test]
fn retention_keeps_the_newest_checkpoints() {
    assert_eq!(checkpoint::to_delete(&[30, 10, 20, 40], 2), vec![10, 20]);
    assert_eq!(checkpoint::to_delete(&[10], 3), Vec::<u64>::new());
    assert_eq!(checkpoint::to_delete(&[], 1), Vec::<u64>::new());
}

#[test]
fn a_job_too_large_for_the_machine_is_refused_before_it_allocates() {
    let fixture = fixture(false);
    // Attention scores of 4096 sequences of 8192 tokens: terabytes. Allocating any of it would take
    // the test down with it (the refusal comes before the datasets' seq_len is even compared).
    let spec = spec(&fixture.root, json!({"micro_batch_size": 4096, "seq_len": 8192, "grad_accum_steps": 1}));
    let (result, events) = run(&spec, &fixture.root.join("run"), false, None);
    let error = format!("{:#}", result.unwrap_err());
    assert!(error.contains("micro_batch_size") && error.contains("GiB"), "{error}");
    assert!(events.is_empty(), "nothing started");
}

/// Runs `spec` whole and stopped after step 6 then resumed, in `root`, asserts the two agree bit for
/// bit (per-step losses and learning rates, the final adapter and optimizer files) and returns the
/// whole run.
fn resumes_bit_identically(spec: &JobSpec, root: &Path) -> (Outcome, Vec<Event>) {
    let (whole, whole_events) = run(spec, &root.join("whole"), false, None);
    let whole = whole.unwrap();
    let (first, first_events) = run(spec, &root.join("split"), false, Some(6));
    assert!(first.unwrap().stopped);
    let (second, second_events) = run(spec, &root.join("split"), true, None);
    let second = second.unwrap();
    let mut split = steps(&first_events);
    split.extend(steps(&second_events));
    assert_eq!(split, steps(&whole_events), "per-step losses and learning rates must match bit for bit");
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(whole.checkpoint.join(file)).unwrap(),
            std::fs::read(second.checkpoint.join(file)).unwrap(),
            "{file}"
        );
    }
    (whole, whole_events)
}

#[test]
fn an_adapter_run_resumes_bit_identically_and_checkpoints_only_what_it_trains() {
    let f = fixture(false);
    let adapter = json!({
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "modules_to_save": ["embed_tokens", "lm_head"], "embedding_lr": 1e-3, "base_dtype": "bf16",
    });
    let (whole, whole_events) = resumes_bit_identically(&spec(&f.root, json!({ "adapter": adapter })), &f.root);

    assert!(!whole.checkpoint.join("model.safetensors").exists(), "an adapter checkpoint holds no base weights");
    let saved =
        candle_core::safetensors::load(whole.checkpoint.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let saved_scalars: usize = saved.values().map(|t| t.elem_count()).sum();
    let Event::Started { plan, .. } = &whole_events[0] else { panic!("the first event is `started`") };
    assert_eq!(saved_scalars as u64, plan.trainable_parameters);
    assert_eq!(saved.len(), 2 * 3 * 2 + 2, "A and B of 3 projections × 2 layers, embed_tokens and lm_head");
    assert!(saved.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    assert!(saved.contains_key("base_model.model.lm_head.weight"));
    let moments = candle_core::safetensors::load(whole.checkpoint.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(moments.len(), 2 * saved.len(), "two moments per trained tensor, none for the frozen base");
    let losses: Vec<f64> =
        whole_events.iter().filter_map(|e| if let Event::Step(m) = e { Some(m.loss) } else { None }).collect();
    assert!(losses.last().unwrap() < &losses[0], "the adapter learns: {losses:?}");
}

#[test]
fn rows_below_train_rows_from_stay_exactly_as_they_were_and_resume_bit_identically() {
    let f = fixture(false);
    let adapter = json!({"modules_to_save": ["embed_tokens", "lm_head"], "train_rows_from": 250, "base_dtype": "f32"});
    let (outcome, _) = resumes_bit_identically(&spec(&f.root, json!({ "adapter": adapter })), &f.root);
    // Stored as PEFT stores trainable tokens: the trained rows alone.
    let stored =
        candle_core::safetensors::load(outcome.checkpoint.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for name in ["model.embed_tokens", "lm_head"] {
        let rows = &stored[&format!("base_model.model.{name}.trainable_tokens_delta")];
        assert_eq!(rows.dims(), [50, 32], "{name}");
    }
    let base = candle_core::safetensors::load(f.root.join("base/model.safetensors"), &Device::Cpu).unwrap();
    let opened = cpt_train::adapter::open_dir(&outcome.checkpoint, &Device::Cpu).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (before, after) = (&base[name], &opened.params.tensor(name).unwrap());
        let rows = |t: &candle_core::Tensor, from: usize, n: usize| {
            t.narrow(0, from, n).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(rows(before, 0, 250), rows(after, 0, 250), "{name}: rows below 250 changed");
        assert_ne!(rows(before, 250, 50), rows(after, 250, 50), "{name}: rows from 250 on were not trained");
    }
}
