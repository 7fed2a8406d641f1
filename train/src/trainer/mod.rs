//! The training loop: continued pretraining that reads top to bottom.
//!
//! `train` opens the run (the base model, or the newest valid checkpoint when resuming), evaluates
//! at step 0, then runs optimizer steps of `grad_accum_steps` micro-batches each, with clipping, a
//! NaN guard, loss-spike warnings, periodic evaluation, samples and checkpoints, until the planned
//! steps are done or it is asked to stop (then it checkpoints first). The steps are `Run`'s
//! methods, in `run.rs`.

mod budget;
mod continued;
pub mod data;
mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use cpt_protocol::{Event, JobSpec};
use sha2::{Digest, Sha256};

use crate::model::Llama;
use data::TrainData;
use run::{Run, Stepped};

/// Asks a run to stop at the next step boundary (it checkpoints first). Cheap to clone and share.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How to run, beyond what the spec says.
#[derive(Clone)]
pub struct RunOptions {
    /// Continue from the newest valid checkpoint in the run directory, if any.
    pub resume: bool,
    /// Checkpoint and return after this step (for testing interruption).
    pub stop_after_steps: Option<u64>,
    pub device: Device,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub step: u64,
    pub tokens_total: u64,
    /// True when it stopped early (asked to, `stop_after_steps`, or paused); resumable from
    /// `checkpoint`.
    pub stopped: bool,
    /// Stopped by a forgetting budget whose action is `pause`: the job waits for a resume.
    pub paused: bool,
    pub checkpoint: PathBuf,
}

/// sha256 of the spec's canonical JSON.
pub fn spec_sha256(spec: &JobSpec) -> String {
    format!("{:x}", Sha256::digest(serde_json::to_vec(spec).expect("a spec serialises")))
}

/// Mean next-token loss of a batch, masking padding when there is any.
fn batch_loss(model: &Llama, batch: &data::Batch) -> Result<Tensor> {
    Ok(match &batch.mask {
        Some(mask) => model.masked_loss(&batch.ids, mask)?,
        None => model.loss(&batch.ids)?,
    })
}

/// Mean loss of each eval set, without a backward graph, reported with the perplexity's change
/// from `baseline`; returns each set's perplexity.
fn evaluate(
    model: &Llama,
    data: &TrainData,
    spec: &JobSpec,
    step: u64,
    baseline: &BTreeMap<String, f64>,
    device: &Device,
    on_event: &mut impl FnMut(Event),
) -> Result<BTreeMap<String, f64>> {
    let model = model.detached();
    let mut perplexities = BTreeMap::new();
    for set in &data.eval_sets {
        let (mut total, mut tokens) = (0.0f64, 0u64);
        for chunk in set.blocks.chunks(spec.micro_batch_size) {
            let batch = data::batch(chunk, device)?;
            total += batch_loss(&model, &batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * batch.predicted as f64;
            tokens += batch.predicted;
        }
        let loss = total / tokens as f64;
        let bits_per_byte = if set.bytes > 0 { total / std::f64::consts::LN_2 / set.bytes as f64 } else { f64::NAN };
        let (name, bytes, perplexity) = (set.name.clone(), set.bytes, loss.exp());
        let perplexity_change = match baseline.get(&name) {
            Some(start) => perplexity / start - 1.0,
            None if step == 0 => 0.0,
            None => f64::NAN,
        };
        perplexities.insert(name.clone(), perplexity);
        on_event(Event::Eval { step, set: name, loss, perplexity, tokens, bits_per_byte, bytes, perplexity_change });
    }
    Ok(perplexities)
}

/// Runs (or resumes) the job `spec` in `run_dir`, reporting progress through `on_event`.
pub fn train(
    spec: &JobSpec,
    run_dir: &Path,
    options: &RunOptions,
    stop: &StopFlag,
    mut on_event: impl FnMut(Event),
) -> Result<Outcome> {
    let mut run = Run::open(spec, run_dir, options.resume, &options.device)?;
    run.announce(&mut on_event);
    if run.state.step == 0 {
        run.evaluate(0, &mut on_event)?;
    }
    while run.state.step < run.plan.total_steps {
        if stop.is_stopped() {
            return run.stop(&mut on_event);
        }
        let metrics = match run.step(&mut on_event)? {
            Stepped::Done(metrics) => metrics,
            Stepped::Spiked { step, loss, average } => {
                run = run.roll_back(step, loss, average, &mut on_event)?;
                continue;
            }
        };
        on_event(Event::Step(metrics));
        if let Some(stopped) = run.after_step(options.stop_after_steps, &mut on_event)? {
            return Ok(stopped);
        }
    }
    run.finish(&mut on_event)
}
