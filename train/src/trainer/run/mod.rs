//! One run's state and its named steps: open (fresh or resumed), one optimizer step, and what
//! follows a step (evaluation, samples, checkpoints). `train` strings them together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use cpt_protocol::budget::BudgetAction;
use cpt_protocol::plan::{self, StepPath};
use cpt_protocol::spec::Precision;
use cpt_protocol::{Event, JobSpec, Plan, StepMetrics, WarningCode};
use tokenizers::Tokenizer;

use super::data::TrainData;
use super::{budget, continued, evaluate, spec_sha256, Outcome};
use crate::adapter::{self, Start};
use crate::checkpoint::{self, TrainerState};
use crate::hf::{passthrough_files, ModelDir};
use crate::model::Llama;
use crate::optim::{clip_scale, global_norm, AdamW, AdamWConfig};
use crate::params::Params;
use crate::schedule::LrSchedule;

mod gradients;
mod outputs;
mod rollback;

use rollback::rollback_target;

/// Where [`Run::open_at`] starts.
enum Reopen {
    Fresh,
    /// The newest valid checkpoint, if any.
    Latest,
    Step(u64),
}

/// What one optimizer step did.
pub(super) enum Stepped {
    Done(StepMetrics),
    /// The loss spiked past `spike_factor` × its moving average and `spike_rollback` is on: nothing
    /// was applied.
    Spiked {
        step: u64,
        loss: f64,
        average: f64,
    },
}

/// Everything a run holds between steps.
pub(super) struct Run<'a> {
    spec: &'a JobSpec,
    run_dir: &'a Path,
    device: Device,
    base: ModelDir,
    tokenizer: Tokenizer,
    pub plan: Plan,
    params: Params,
    optimizer: AdamW,
    pub state: TrainerState,
    data: TrainData,
    model: Llama,
    /// Whether gradients come from the explicit step (full f32 training on the CPU) rather than
    /// candle's autograd.
    explicit: bool,
    /// Peak FLOP/s of the device for MFU, and where that number came from.
    peak: (f64, String),
    /// Files of the base model directory that every checkpoint carries along.
    extra: Vec<(String, String)>,
    /// Found while opening, reported once the run has started.
    warnings: Vec<(WarningCode, String)>,
    last_checkpoint: Option<PathBuf>,
}

impl<'a> Run<'a> {
    /// Loads the base model, or the newest valid checkpoint in `run_dir` when resuming, and opens
    /// the data where that checkpoint left it.
    pub fn open(spec: &'a JobSpec, run_dir: &'a Path, resume: bool, device: &Device) -> Result<Self> {
        Self::open_at(spec, run_dir, if resume { Reopen::Latest } else { Reopen::Fresh }, device)
    }

    /// [`Run::open`] from the checkpoint `at` says.
    fn open_at(spec: &'a JobSpec, run_dir: &'a Path, at: Reopen, device: &Device) -> Result<Self> {
        spec.validate()?;
        if spec.precision == Precision::Bf16 && device.is_cpu() {
            bail!("`precision`: bf16 training needs a CUDA device; use f32 on the CPU");
        }
        // bf16 compute over f32 master weights and optimizer state.
        let compute = if spec.precision == Precision::Bf16 { DType::BF16 } else { DType::F32 };
        let base = ModelDir::open(Path::new(&spec.base_model)).context("base_model")?;
        let config = base.config.clone();
        let tokenizer = base.tokenizer()?;
        let tokenizer_sha256 = cpt_data::sha256_file(&base.tokenizer_path())?;
        let plan = Plan::new(spec, &config);
        // Refuse before allocating: a spec too large for this machine would otherwise grow the
        // process until the kernel kills it (and every worker that leases it after).
        if let Some(memory) = crate::device::memory_bytes(device) {
            let estimate = plan::memory_estimate_bytes_on(&config, spec, StepPath::of(spec, device.is_cpu()));
            if estimate > memory {
                bail!(
                    "`micro_batch_size`: the plan needs about {:.1} GiB of memory and this machine has {:.1} GiB; \
                     lower micro_batch_size or seq_len (grad_accum_steps keeps the batch)",
                    estimate as f64 / (1u64 << 30) as f64,
                    memory as f64 / (1u64 << 30) as f64
                );
            }
        }
        if let Some(first) = spec.adapter.as_ref().and_then(|a| a.train_rows_from) {
            if first >= config.vocab_size {
                bail!("`adapter.train_rows_from`: {first} is not below the vocabulary size {}", config.vocab_size);
            }
        }
        let spec_hash = spec_sha256(spec);
        let adamw =
            AdamWConfig { beta1: spec.betas[0], beta2: spec.betas[1], eps: spec.eps, weight_decay: spec.weight_decay };

        let mut warnings = Vec::new();
        if let Some(warning) = &plan.lr.warning {
            warnings.push((WarningCode::LrExtrapolated, warning.clone()));
        }
        let resumed = match at {
            Reopen::Latest => checkpoint::latest_valid(run_dir, device, |dir, error| {
                let message = format!("skipping checkpoint {}: {error:#}", dir.display());
                warnings.push((WarningCode::CorruptCheckpoint, message));
            })?,
            Reopen::Step(step) => Some(checkpoint::load(&checkpoint::dir_of(run_dir, step), device)?),
            Reopen::Fresh => None,
        };
        let (params, optimizer, state) = match resumed {
            Some(loaded) => {
                if loaded.state.spec_sha256 != spec_hash {
                    bail!(
                        "the spec differs from the one {} was trained with; start a new run to continue from it",
                        loaded.dir.display()
                    );
                }
                let params = match &spec.adapter {
                    Some(adapter) => {
                        adapter::open_params(&base, adapter, Start::Exactly(&loaded.dir), spec.seed, device)?
                    }
                    None => ModelDir::open(&loaded.dir)?.load_params(DType::F32, device)?,
                };
                let optimizer =
                    AdamW::restore(&params, adamw, loaded.optimizer_tensors, loaded.state.optimizer_updates)?;
                (params, optimizer, loaded.state)
            }
            None if spec.continue_from.is_some() => {
                let from = spec.continue_from.as_ref().expect("matched");
                continued::open(spec, &base, from, adamw, fresh_state(spec, &plan, spec_hash), device)?
            }
            None => {
                let params = match &spec.adapter {
                    Some(adapter) => {
                        let start =
                            adapter.init_from.as_deref().map_or(Start::Fresh, |dir| Start::From(Path::new(dir)));
                        adapter::open_params(&base, adapter, start, spec.seed, device).context("adapter")?
                    }
                    None => base.load_params(DType::F32, device)?,
                };
                let optimizer = AdamW::new(&params, adamw)?;
                (params, optimizer, fresh_state(spec, &plan, spec_hash))
            }
        };
        let data_state = (state.step > 0 || spec.continue_from.is_some()).then(|| state.data.clone());
        let mut data = TrainData::open(spec, &config, &tokenizer_sha256, data_state.as_ref())?;
        warnings.append(&mut data.notes);
        for set in &mut data.eval_sets {
            set.count_bytes(&tokenizer)?;
        }
        let mut model = Llama::new(&config, &params)?;
        model.set_compute_dtype(compute);
        if let Some(adapter) = &spec.adapter {
            model.set_lora(adapter::settings(adapter));
        }
        let explicit = compute == DType::F32 && crate::step::supported(&params, device, spec.adapter.is_some());
        if spec.recompute_every.is_some() && !explicit {
            bail!("`recompute_every`: activation recomputation runs in the explicit step, which needs full f32 training on the CPU");
        }
        let peak = match device.location() {
            candle_core::DeviceLocation::Cpu => crate::peak::cpu_peak(),
            candle_core::DeviceLocation::Cuda { gpu_id } => crate::peak::cuda_peak(gpu_id, compute == DType::BF16),
            _ => (f64::NAN, "unknown device".to_string()),
        };
        let extra = passthrough_files(&base.path)?;
        Ok(Run {
            spec,
            run_dir,
            device: device.clone(),
            base,
            tokenizer,
            plan,
            params,
            optimizer,
            state,
            data,
            model,
            explicit,
            peak,
            extra,
            warnings,
            last_checkpoint: None,
        })
    }

    /// Reports the start (with the plan) and what opening found worth a warning.
    pub fn announce(&mut self, on_event: &mut impl FnMut(Event)) {
        let from_step = self.state.step;
        on_event(Event::Started {
            plan: self.plan.clone(),
            from_step,
            resumed: from_step > 0,
            device: crate::device::name(&self.device),
            peak_flops_per_second: self.peak.0,
            peak_source: self.peak.1.clone(),
        });
        for (code, message) in self.warnings.drain(..) {
            on_event(Event::Warning { step: from_step, code, message });
        }
    }

    /// The held-out loss of every eval set at `step` (at step 0 the baseline of the sets'
    /// perplexity changes), and the strongest forgetting budget it crossed.
    pub fn evaluate(&mut self, step: u64, on_event: &mut impl FnMut(Event)) -> Result<Option<budget::Crossing>> {
        let baseline = &mut self.state.eval_baseline;
        let perplexities = evaluate(&self.model, &self.data, self.spec, step, baseline, &self.device, on_event)?;
        if step == 0 {
            // A continued job keeps its lineage's step-0 values.
            for (set, perplexity) in perplexities {
                baseline.entry(set).or_insert(perplexity);
            }
            return Ok(None);
        }
        Ok(budget::check(&self.spec.forgetting_budget, baseline, &perplexities, step, on_event))
    }

    /// One optimizer step over `grad_accum_steps` micro-batches: gradients summed, the update
    /// skipped when the loss or gradient is not finite (failing after `max_bad_steps` in a row),
    /// clipped, applied; a loss spike is reported.
    pub fn step(&mut self, on_event: &mut impl FnMut(Event)) -> Result<Stepped> {
        let spec = self.spec;
        let step = self.state.step + 1;
        let started = Instant::now();
        let (loss_sum, data_seconds, mut grads) = self.gradients(step)?;
        let plan = &self.plan;
        let loss = loss_sum / spec.grad_accum_steps as f64;
        if let (Some(_), Some(average)) = (spec.spike_rollback, self.state.loss_average.filter(|_| step > 10)) {
            if loss > spec.spike_factor * average {
                // Nothing of this step is applied: the run rolls back from here.
                return Ok(Stepped::Spiked { step, loss, average });
            }
        }
        if let Some((adapter, first)) = spec.adapter.as_ref().and_then(|a| Some((a, a.train_rows_from?))) {
            // Only the rows from `first` on are trained: the others' gradient neither counts in the
            // norm nor reaches the optimizer.
            for (name, grad) in grads.iter_mut() {
                if adapter::is_saved(&self.base.config, adapter, name) {
                    *grad = grad.narrow(0, first, grad.dim(0)? - first)?.contiguous()?;
                }
            }
        }
        let grad_norm = global_norm(&grads)?;
        let cooling = self.state.rollbacks > 0 && step <= self.state.cooldown_until;
        let lr = self.state.schedule.lr_at(step) * spec.spike_rollback.filter(|_| cooling).map_or(1.0, |r| r.lr_scale);
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        let state = &mut self.state;
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
            let grad_scale = spec.grad_clip.map_or(1.0, |max_norm| clip_scale(grad_norm, max_norm));
            let config = &self.base.config;
            let saved_lr = match &spec.adapter {
                Some(adapter) => lr * adapter.embedding_lr.map_or(1.0, |embedding| embedding / plan.lr.peak),
                None => lr,
            };
            let lr_of = |name: &str| match &spec.adapter {
                Some(adapter) if adapter::is_saved(config, adapter, name) => saved_lr,
                _ => lr,
            };
            self.optimizer.step(&self.params, &grads, grad_scale, lr_of)?;
            state.optimizer_updates = self.optimizer.updates;
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
        let flops_per_step = plan.flops_per_token * plan.tokens_per_step as f64;
        let step_seconds = started.elapsed().as_secs_f64();
        state.step = step;
        state.tokens_total += plan.tokens_per_step;
        state.flops_total += flops_per_step;
        state.elapsed_seconds += step_seconds;
        state.data = self.data.mixture.state();
        let flops_per_second = flops_per_step / step_seconds;
        Ok(Stepped::Done(StepMetrics {
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
            mfu: flops_per_second / self.peak.0,
            step_seconds,
            data_seconds,
            compute_seconds: step_seconds - data_seconds,
        }))
    }

    /// What is due after the step just taken: an evaluation, samples, a checkpoint; `Some` when
    /// the run stops here (`stop_after_steps`).
    pub fn after_step(
        &mut self,
        stop_after_steps: Option<u64>,
        on_event: &mut impl FnMut(Event),
    ) -> Result<Option<Outcome>> {
        let (spec, step) = (self.spec, self.state.step);
        let due = |every: u64| every > 0 && step.is_multiple_of(every);
        let last = step == self.plan.total_steps;
        let crossing = if last || due(spec.eval_every) { self.evaluate(step, on_event)? } else { None };
        if !spec.sample_prompts.is_empty() && (last || due(spec.sample_every)) {
            self.sample(on_event)?;
        }
        let action = crossing.as_ref().map(|c| c.action).filter(|&a| a != BudgetAction::Warn);
        let stop_here = stop_after_steps == Some(step) && !last;
        if last || stop_here || action.is_some() || due(spec.checkpoint_every) {
            self.save(on_event)?;
        }
        let tokens_total = self.state.tokens_total;
        let checkpoint = || self.last_checkpoint.clone().expect("saved above");
        match (action, crossing) {
            (Some(BudgetAction::Stop), Some(crossing)) => {
                bail!("{}; checkpoint {}", crossing.message, checkpoint().display())
            }
            (Some(BudgetAction::Pause), _) => {
                on_event(Event::Finished { step, tokens_total, outcome: "paused".into() });
                Ok(Some(Outcome { step, tokens_total, stopped: true, paused: true, checkpoint: checkpoint() }))
            }
            _ if stop_here => {
                on_event(Event::Finished { step, tokens_total, outcome: "stopped".into() });
                Ok(Some(Outcome { step, tokens_total, stopped: true, paused: false, checkpoint: checkpoint() }))
            }
            _ => Ok(None),
        }
    }

    /// Asked to stop between steps: checkpoint, then report the run as stopped (resumable).
    pub fn stop(&mut self, on_event: &mut impl FnMut(Event)) -> Result<Outcome> {
        let checkpoint = self.save(on_event)?;
        let (step, tokens_total) = (self.state.step, self.state.tokens_total);
        on_event(Event::Finished { step, tokens_total, outcome: "stopped".into() });
        Ok(Outcome { step, tokens_total, stopped: true, paused: false, checkpoint })
    }

    /// Every planned step is done.
    pub fn finish(self, on_event: &mut impl FnMut(Event)) -> Result<Outcome> {
        let checkpoint = match self.last_checkpoint {
            Some(path) => path,
            // Resumed a run whose last step was already checkpointed.
            None => checkpoint::checkpoints_dir(self.run_dir).join(format!("step-{}", self.state.step)),
        };
        let (step, tokens_total) = (self.state.step, self.state.tokens_total);
        on_event(Event::Finished { step, tokens_total, outcome: "succeeded".into() });
        Ok(Outcome { step, tokens_total, stopped: false, paused: false, checkpoint })
    }
}

/// The state of a run that starts at step 0.
fn fresh_state(spec: &JobSpec, plan: &Plan, spec_sha256: String) -> TrainerState {
    let schedule = LrSchedule {
        kind: spec.schedule,
        peak: plan.lr.peak,
        min: plan.lr.min,
        warmup_steps: plan.warmup_steps,
        total_steps: plan.total_steps,
        decay_steps: ((spec.decay_ratio * plan.total_steps as f64).round() as u64).max(1),
    };
    TrainerState {
        step: 0,
        optimizer_updates: 0,
        tokens_total: 0,
        flops_total: 0.0,
        data: Default::default(),
        schedule,
        loss_average: None,
        consecutive_bad_steps: 0,
        spec_sha256,
        elapsed_seconds: 0.0,
        eval_baseline: BTreeMap::new(),
        rollbacks: 0,
        cooldown_until: 0,
    }
}
