//! Training-speed benchmark: full optimizer steps (forward, backward, AdamW) of a randomly
//! initialised model on random tokens, timed after warmup. `cpt-worker bench` prints the report;
//! `bench/train_speed.sh` runs the same model in PyTorch in the same session for the ratio.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use cpt_protocol::adapter::AdapterSpec;
use cpt_protocol::plan::{self, StepPath};
use cpt_protocol::JobSpec;

use crate::adapter;
use crate::model::Kernels;
use crate::optim::{AdamW, AdamWConfig};
use crate::step;
use crate::{Llama, ModelConfig, Params};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub seq_len: usize,
    pub batch: usize,
    /// Timed steps, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// The implementation of the model's operations.
    pub kernels: Kernels,
    pub device: Device,
    /// The compute dtype (f32, or bf16 over f32 master weights).
    pub compute: DType,
    /// Train this adapter over a frozen base instead of every weight.
    pub adapter: Option<AdapterSpec>,
    /// Take gradients through candle's autograd even where the explicit step runs.
    pub autograd: bool,
    /// The explicit step's activation recomputation (the spec's `recompute_every`).
    pub recompute_every: Option<usize>,
    /// Run even when the plan's estimate (an upper bound) exceeds the machine's memory.
    pub ignore_estimate: bool,
}

impl BenchOptions {
    /// A job spec of the benchmark's shape, for the plan's estimates.
    fn job_spec(&self) -> JobSpec {
        let spec = serde_json::json!({
            "name": "bench", "base_model": "random", "train_data": [{"dataset": "random"}],
            "seq_len": self.seq_len, "micro_batch_size": self.batch, "max_steps": self.steps + self.warmup,
            "precision": if self.compute == DType::BF16 { "bf16" } else { "f32" },
            "adapter": self.adapter,
            "recompute_every": self.recompute_every,
        });
        serde_json::from_value(spec).expect("the benchmark's spec is valid")
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The kernels that ran (the choice resolved for the device and dtype), or `explicit` for the
    /// explicit step.
    pub kernels: String,
    pub parameters: u64,
    pub trainable_parameters: u64,
    pub tokens_per_step: usize,
    /// Median over the timed steps.
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    /// Model FLOPs (6N + attention, as MFU counts them) per second.
    pub gflops_per_second: f64,
    /// The device's peak f32 (or bf16) FLOP/s that MFU divides by, and where it came from.
    pub peak_gflops_per_second: f64,
    pub peak_source: String,
    /// `gflops_per_second / peak_gflops_per_second`.
    pub mfu: f64,
    /// Peak resident memory of the process so far (VmHWM).
    pub peak_rss_mib: f64,
    /// What the plan estimates a job of this shape needs, for comparison with `peak_rss_mib`.
    pub memory_estimate_mib: f64,
    pub losses: Vec<f64>,
}

/// Trains `config` from a fixed random initialisation on fixed random tokens and times it.
pub fn bench(config: &ModelConfig, options: &BenchOptions) -> Result<BenchReport> {
    let device = &options.device;
    let spec = options.job_spec();
    let path = if options.autograd { StepPath::Autograd } else { StepPath::of(&spec, device.is_cpu()) };
    let estimate = plan::memory_estimate_bytes_on(config, &spec, path);
    if let Some(memory) = crate::device::memory_bytes(device).filter(|_| !options.ignore_estimate) {
        if estimate > memory {
            anyhow::bail!(
                "does not fit: the plan estimates {:.1} GiB and this machine has {:.1} GiB",
                estimate as f64 / (1u64 << 30) as f64,
                memory as f64 / (1u64 << 30) as f64
            );
        }
    }
    let mut params = match &options.adapter {
        Some(adapter) => {
            Params::init_random_freezing(config, 0, DType::F32, device, adapter::frozen_dtype(config, adapter))?
        }
        None => Params::init_random(config, 0, DType::F32, device)?,
    };
    if let Some(adapter) = &options.adapter {
        adapter::add_adapters(&mut params, config, adapter, adapter::Start::Fresh, 0, device)?;
    }
    let params = &params;
    let mut model = Llama::new(config, params)?;
    model.set_kernels(options.kernels);
    model.set_compute_dtype(options.compute);
    if let Some(adapter) = &options.adapter {
        model.set_lora(adapter::settings(adapter));
    }
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut optimizer = AdamW::new(params, adamw)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    // seq_len + 1 tokens per row: seq_len predicted positions, as in training.
    let ids: Vec<u32> =
        (0..options.batch * (options.seq_len + 1)).map(|_| rng.random_range(0..config.vocab_size as u32)).collect();
    let ids = Tensor::from_vec(ids, (options.batch, options.seq_len + 1), device)?;
    let resolved = options.kernels.resolve(&Tensor::zeros(1, options.compute, device)?);
    let explicit = !options.autograd
        && resolved == Kernels::Cpu
        && options.compute == DType::F32
        && step::supported(params, device, options.adapter.is_some());
    if options.recompute_every.is_some() && !explicit {
        anyhow::bail!("--recompute-every needs the explicit step (full f32 training on the CPU)");
    }
    let mut seconds = Vec::new();
    let mut losses = Vec::new();
    for step in 0..options.warmup + options.steps {
        let started = Instant::now();
        model.set_dropout_pass(Some(step as u64));
        let (loss, grads) = if explicit {
            let mut grads = step::Gradients::<f32>::default();
            let loss = step::accumulate(config, params, &ids, None, 1.0, options.recompute_every, &mut grads)?;
            (loss, grads.into_tensors(params)?)
        } else {
            let loss = model.loss(&ids)?;
            let store = loss.backward()?;
            let grads = params
                .iter()
                .map(|(name, var)| {
                    Ok((name.to_string(), store.get(var).context("a parameter without gradient")?.clone()))
                })
                .collect::<Result<BTreeMap<String, Tensor>>>()?;
            (loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads)
        };
        // As a job does by default: the global norm, clipped to 1.
        let norm = crate::optim::global_norm(&grads)?;
        optimizer.step(params, &grads, crate::optim::clip_scale(norm, 1.0), |_| 1e-3)?;
        losses.push(loss);
        if step >= options.warmup {
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    seconds.sort_by(f64::total_cmp);
    let step_seconds = seconds[seconds.len() / 2];
    let tokens = options.batch * options.seq_len;
    let flops = plan::job_flops_per_token(config, &spec) * tokens as f64;
    let (peak, peak_source) = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => crate::peak::cuda_peak(gpu_id, options.compute == DType::BF16),
        _ => crate::peak::cpu_peak(),
    };
    Ok(BenchReport {
        kernels: if explicit { "explicit".to_string() } else { resolved.to_string() },
        parameters: config.total_parameters() as u64,
        trainable_parameters: params.count() as u64,
        memory_estimate_mib: estimate as f64 / (1u64 << 20) as f64,
        tokens_per_step: tokens,
        step_seconds,
        tokens_per_second: tokens as f64 / step_seconds,
        gflops_per_second: flops / step_seconds / 1e9,
        peak_gflops_per_second: peak / 1e9,
        peak_source,
        mfu: flops / step_seconds / peak,
        peak_rss_mib: peak_rss_mib(),
        losses,
    })
}

/// The process's peak resident set size in MiB (0 where /proc is unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
