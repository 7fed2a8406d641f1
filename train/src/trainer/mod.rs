//! The training loop: continued pretraining that reads top to bottom.
//!
//! `train` loads the base model (or the newest valid checkpoint when resuming), evaluates at step 0,
//! then runs optimizer steps of `grad_accum_steps` micro-batches each, with clipping, a NaN guard,
//! loss-spike warnings, periodic evaluation, samples and checkpoints, until the planned steps are
//! done or it is asked to stop (then it checkpoints first).

pub mod data;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use cpt_protocol::spec::Precision;
use cpt_protocol::{Event, JobSpec, Plan, StepMetrics, WarningCode};
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, TrainerState};
use crate::hf::{passthrough_files, ModelDir, ModelFiles};
use crate::model::Llama;
use crate::optim::{clip, global_norm, AdamW, AdamWConfig};
use crate::schedule::LrSchedule;
use crate::text::{self, Decoding};
use data::TrainData;

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
    /// True when it stopped early (asked to, or `stop_after_steps`); resumable from `checkpoint`.
    pub stopped: bool,
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

/// Mean loss of each eval set, without a backward graph.
fn evaluate(
    model: &Llama,
    data: &TrainData,
    spec: &JobSpec,
    step: u64,
    device: &Device,
    on_event: &mut impl FnMut(Event),
) -> Result<()> {
    let model = model.detached();
    for set in &data.eval_sets {
        let (mut total, mut tokens) = (0.0f64, 0u64);
        for chunk in set.blocks.chunks(spec.micro_batch_size) {
            let batch = data::batch(chunk, device)?;
            total += batch_loss(&model, &batch)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * batch.predicted as f64;
            tokens += batch.predicted;
        }
        let loss = total / tokens as f64;
        on_event(Event::Eval { step, set: set.name.clone(), loss, perplexity: loss.exp(), tokens });
    }
    Ok(())
}

/// Runs (or resumes) the job `spec` in `run_dir`, reporting progress through `on_event`.
pub fn train(
    spec: &JobSpec,
    run_dir: &Path,
    options: &RunOptions,
    stop: &StopFlag,
    mut on_event: impl FnMut(Event),
) -> Result<Outcome> {
    spec.validate()?;
    if spec.precision == Precision::Bf16 && options.device.is_cpu() {
        bail!("`precision`: bf16 training needs a CUDA device; use f32 on the CPU");
    }
    // bf16 compute over f32 master weights and optimizer state.
    let compute = if spec.precision == Precision::Bf16 { DType::BF16 } else { DType::F32 };
    let device = &options.device;
    let base = ModelDir::open(Path::new(&spec.base_model)).context("base_model")?;
    let config = base.config.clone();
    let tokenizer = base.tokenizer()?;
    let tokenizer_sha256 = cpt_data::sha256_file(&base.tokenizer_path())?;
    let plan = Plan::new(spec, &config);
    // Refuse before allocating: a spec too large for this machine would otherwise grow the process
    // until the kernel kills it (and every worker that leases it after).
    if let Some(memory) = crate::device::memory_bytes(device) {
        if plan.memory_estimate_bytes > memory {
            bail!(
                "`micro_batch_size`: the plan needs about {:.1} GiB of memory and this machine has {:.1} GiB; \
                 lower micro_batch_size or seq_len (grad_accum_steps keeps the batch)",
                plan.memory_estimate_bytes as f64 / (1u64 << 30) as f64,
                memory as f64 / (1u64 << 30) as f64
            );
        }
    }
    let spec_hash = spec_sha256(spec);
    let adamw =
        AdamWConfig { beta1: spec.betas[0], beta2: spec.betas[1], eps: spec.eps, weight_decay: spec.weight_decay };

    let mut warnings = Vec::new();
    let resumed = if options.resume {
        checkpoint::latest_valid(run_dir, device, |dir, error| {
            warnings.push(format!("skipping checkpoint {}: {error:#}", dir.display()));
        })?
    } else {
        None
    };
    let (params, mut optimizer, mut state) = match resumed {
        Some(loaded) => {
            if loaded.state.spec_sha256 != spec_hash {
                bail!(
                    "the spec differs from the one {} was trained with; start a new run to continue from it",
                    loaded.dir.display()
                );
            }
            let params = ModelDir::open(&loaded.dir)?.load_params(DType::F32, device)?;
            let optimizer = AdamW::restore(&params, adamw, loaded.optimizer_tensors, loaded.state.optimizer_updates)?;
            (params, optimizer, loaded.state)
        }
        None => {
            let params = base.load_params(DType::F32, device)?;
            let optimizer = AdamW::new(&params, adamw)?;
            let schedule = LrSchedule {
                kind: spec.schedule,
                peak: plan.lr.peak,
                min: plan.lr.min,
                warmup_steps: plan.warmup_steps,
                total_steps: plan.total_steps,
                decay_steps: ((spec.decay_ratio * plan.total_steps as f64).round() as u64).max(1),
            };
            let state = TrainerState {
                step: 0,
                optimizer_updates: 0,
                tokens_total: 0,
                flops_total: 0.0,
                data: Default::default(),
                schedule,
                loss_average: None,
                consecutive_bad_steps: 0,
                spec_sha256: spec_hash.clone(),
                elapsed_seconds: 0.0,
            };
            (params, optimizer, state)
        }
    };
    let from_step = state.step;
    let data_state = (from_step > 0).then(|| state.data.clone());
    let mut data = TrainData::open(spec, &config, &tokenizer_sha256, data_state.as_ref())?;
    let mut model = Llama::new(&config, &params)?;
    model.set_compute_dtype(compute);
    let (peak, peak_source) = match device {
        Device::Cpu => crate::peak::cpu_peak(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => crate::peak::cuda_peak(gpu_id, compute == DType::BF16),
            _ => (f64::NAN, "unknown device".to_string()),
        },
        _ => (f64::NAN, "unknown device".to_string()),
    };
    on_event(Event::Started {
        plan: plan.clone(),
        from_step,
        resumed: from_step > 0,
        device: crate::device::name(device),
        peak_flops_per_second: peak,
        peak_source,
    });
    for message in warnings.drain(..).chain(data.notes.drain(..)) {
        let code = if message.starts_with("skipping checkpoint") {
            WarningCode::CorruptCheckpoint
        } else {
            WarningCode::TokenizerMismatch
        };
        on_event(Event::Warning { step: from_step, code, message });
    }

    let extra = passthrough_files(&base.path)?;
    let save = |state: &TrainerState, optimizer: &AdamW, on_event: &mut dyn FnMut(Event)| -> Result<PathBuf> {
        let files = ModelFiles {
            config_json: base.config_json.clone(),
            params: &params,
            dtype: DType::F32,
            tokenizer: &tokenizer,
            extra: extra.clone(),
        };
        let path = checkpoint::save(run_dir, files, optimizer, state, spec.keep_checkpoints)?;
        on_event(Event::Checkpoint {
            step: state.step,
            path: path.display().to_string(),
            tokens_total: state.tokens_total,
        });
        Ok(path)
    };
    let sample = |step: u64, on_event: &mut dyn FnMut(Event)| -> Result<()> {
        let model = model.detached();
        for prompt in &spec.sample_prompts {
            let continuation =
                text::generate(&model, &tokenizer, prompt, spec.sample_tokens, Decoding::Greedy, device)?;
            on_event(Event::Sample { step, prompt: prompt.clone(), continuation });
        }
        Ok(())
    };
    let due = |every: u64, step: u64| every > 0 && step.is_multiple_of(every);

    if from_step == 0 {
        evaluate(&model, &data, spec, 0, device, &mut on_event)?;
    }
    let flops_per_step = plan.flops_per_token * plan.tokens_per_step as f64;
    let mut last_checkpoint = None;
    while state.step < plan.total_steps {
        if stop.is_stopped() {
            let path = save(&state, &optimizer, &mut on_event)?;
            on_event(Event::Finished { step: state.step, tokens_total: state.tokens_total, outcome: "stopped".into() });
            return Ok(Outcome { step: state.step, tokens_total: state.tokens_total, stopped: true, checkpoint: path });
        }
        let step = state.step + 1;
        let started = Instant::now();
        let (mut data_seconds, mut loss_sum) = (0.0, 0.0f64);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        for _ in 0..spec.grad_accum_steps {
            let fetch = Instant::now();
            let batch = data.next_batch(spec.micro_batch_size, device)?;
            data_seconds += fetch.elapsed().as_secs_f64();
            let loss = batch_loss(&model, &batch)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let store = (loss / spec.grad_accum_steps as f64)?.backward()?;
            for (name, var) in params.iter() {
                let grad = store.get(var).with_context(|| format!("`{name}` received no gradient"))?;
                let summed = match grads.remove(name) {
                    Some(previous) => (previous + grad)?,
                    None => grad.clone(),
                };
                grads.insert(name.to_string(), summed);
            }
        }
        let loss = loss_sum / spec.grad_accum_steps as f64;
        let grad_norm = global_norm(&grads)?;
        let lr = state.schedule.lr_at(step);
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if skipped {
            state.consecutive_bad_steps += 1;
            let message = format!("step {step}: loss {loss}, gradient norm {grad_norm}; update skipped");
            on_event(Event::Warning { step, code: WarningCode::NonFiniteStep, message });
            if state.consecutive_bad_steps >= spec.max_bad_steps {
                bail!(
                    "{} consecutive steps had a non-finite loss or gradient (max_bad_steps)",
                    state.consecutive_bad_steps
                );
            }
        } else {
            state.consecutive_bad_steps = 0;
            if let Some(max_norm) = spec.grad_clip {
                clip(&mut grads, grad_norm, max_norm)?;
            }
            optimizer.step(&params, &grads, lr)?;
            state.optimizer_updates = optimizer.updates;
            if let Some(average) = state.loss_average.filter(|_| step > 10) {
                if loss > spec.spike_factor * average {
                    let message = format!(
                        "step {step}: loss {loss:.4} is {:.1}× its moving average {average:.4}",
                        loss / average
                    );
                    on_event(Event::Warning { step, code: WarningCode::LossSpike, message });
                }
            }
            state.loss_average = Some(state.loss_average.map_or(loss, |a| 0.9 * a + 0.1 * loss));
        }
        let step_seconds = started.elapsed().as_secs_f64();
        state.step = step;
        state.tokens_total += plan.tokens_per_step;
        state.flops_total += flops_per_step;
        state.elapsed_seconds += step_seconds;
        state.data = data.mixture.state();
        let flops_per_second = flops_per_step / step_seconds;
        on_event(Event::Step(StepMetrics {
            step,
            loss,
            lr,
            grad_norm,
            skipped,
            tokens: plan.tokens_per_step,
            tokens_total: state.tokens_total,
            tokens_per_second: plan.tokens_per_step as f64 / step_seconds,
            flops: flops_per_step,
            flops_total: state.flops_total,
            flops_per_second,
            mfu: flops_per_second / peak,
            step_seconds,
            data_seconds,
            compute_seconds: step_seconds - data_seconds,
        }));
        let last = step == plan.total_steps;
        if last || due(spec.eval_every, step) {
            evaluate(&model, &data, spec, step, device, &mut on_event)?;
        }
        if !spec.sample_prompts.is_empty() && (last || due(spec.sample_every, step)) {
            sample(step, &mut on_event)?;
        }
        let stop_here = options.stop_after_steps == Some(step) && !last;
        if last || stop_here || due(spec.checkpoint_every, step) {
            last_checkpoint = Some(save(&state, &optimizer, &mut on_event)?);
        }
        if stop_here {
            on_event(Event::Finished { step, tokens_total: state.tokens_total, outcome: "stopped".into() });
            let checkpoint = last_checkpoint.expect("saved above");
            return Ok(Outcome { step, tokens_total: state.tokens_total, stopped: true, checkpoint });
        }
    }
    let checkpoint = match last_checkpoint {
        Some(path) => path,
        // Resumed a run whose last step was already checkpointed.
        None => checkpoint::checkpoints_dir(run_dir).join(format!("step-{}", state.step)),
    };
    on_event(Event::Finished { step: state.step, tokens_total: state.tokens_total, outcome: "succeeded".into() });
    Ok(Outcome { step: state.step, tokens_total: state.tokens_total, stopped: false, checkpoint })
}
