//! AdamW with state that can be saved and restored exactly, and global-norm gradient clipping.
//!
//! candle_nn's AdamW keeps its moments private, so it cannot be checkpointed. This one follows
//! `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, eps added after the
//! square root) and is checked against it in `tests/python/test_training_reference.py`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use crate::params::{is_norm_or_bias, Params};

/// AdamW's hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices and embeddings, never to norms or biases.
    pub weight_decay: f64,
}

/// AdamW state: per-parameter first and second moments, and the number of updates taken.
pub struct AdamW {
    config: AdamWConfig,
    /// Updates applied so far (skipped steps do not count).
    pub updates: u64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

const FIRST: &str = "exp_avg.";
const SECOND: &str = "exp_avg_sq.";

impl AdamW {
    /// Fresh state with zero moments for every parameter.
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok((name.to_string(), (zeros.clone(), zeros)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, updates: 0, moments })
    }

    /// Applies one update with learning rate `lr`; `grads` holds every parameter's gradient.
    pub fn step(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        self.updates += 1;
        let t = self.updates as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (name, var) in params.iter() {
            let grad = grads.get(name).with_context(|| format!("no gradient for `{name}`"))?;
            let (m, v) = self.moments.get_mut(name).expect("moments exist for every parameter");
            *m = ((&*m * beta1)? + (grad * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let mut p = var.as_tensor().clone();
            if weight_decay > 0.0 && !is_norm_or_bias(name) {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let denom = ((v.sqrt()? / correction2_sqrt)? + eps)?;
            let updated = (p - (m.div(&denom)? * step_size)?)?;
            var.set(&updated)?;
        }
        Ok(())
    }

    /// Moments as named tensors, for `optimizer.safetensors`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.moments
            .iter()
            .flat_map(|(name, (m, v))| [(format!("{FIRST}{name}"), m.clone()), (format!("{SECOND}{name}"), v.clone())])
            .collect()
    }

    /// State restored from [`AdamW::state_tensors`] and the update count.
    pub fn restore(
        params: &Params,
        config: AdamWConfig,
        mut tensors: std::collections::HashMap<String, Tensor>,
        updates: u64,
    ) -> Result<Self> {
        let mut moments = BTreeMap::new();
        for (name, var) in params.iter() {
            let mut take = |prefix: &str| -> Result<Tensor> {
                let key = format!("{prefix}{name}");
                let t = tensors.remove(&key).with_context(|| format!("optimizer state lacks `{key}`"))?;
                if t.dims() != var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), var.dims());
                }
                Ok(t.to_dtype(var.dtype())?.to_device(var.device())?)
            };
            moments.insert(name.to_string(), (take(FIRST)?, take(SECOND)?));
        }
        if let Some(extra) = tensors.keys().next() {
            bail!("optimizer state has an unexpected tensor `{extra}`");
        }
        Ok(Self { config, updates, moments })
    }
}

/// The global L2 norm of all gradients, accumulated in f64.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0.0f64;
    for grad in grads.values() {
        total += grad.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch's `clip_grad_norm_`).
pub fn clip(grads: &mut BTreeMap<String, Tensor>, norm: f64, max_norm: f64) -> Result<()> {
    let coefficient = max_norm / (norm + 1e-6);
    if coefficient < 1.0 {
        for grad in grads.values_mut() {
            *grad = (&*grad * coefficient)?;
        }
    }
    Ok(())
}
