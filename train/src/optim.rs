//! AdamW with state that can be saved and restored exactly, and global-norm gradient clipping.
//!
//! candle_nn's AdamW keeps its moments private, so it cannot be checkpointed. This one follows
//! `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, eps added after the
//! square root) and is checked against it in `tests/python/test_training_reference.py`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;

use crate::model::fused::{self, Real};
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
                // Two tensors, not two handles on one: the moments are updated in place.
                let zeros = || var.as_tensor().zeros_like();
                Ok((name.to_string(), (zeros()?, zeros()?)))
            })
            .collect::<Result<_>>()?;
        Ok(Self { config, updates: 0, moments })
    }

    /// Applies one update, each parameter with its learning rate `lr(name)`; `grads` holds every
    /// trained parameter's gradient. A gradient with fewer rows than its parameter updates only the
    /// parameter's last rows (a table trained from a row on): the others, and their moments, stay.
    /// Every tensor is updated in place, so views of the parameters see the update.
    pub fn step(&mut self, params: &Params, grads: &BTreeMap<String, Tensor>, lr: impl Fn(&str) -> f64) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        self.updates += 1;
        let t = self.updates as i32;
        for (name, var) in params.iter() {
            let grad = grads.get(name).with_context(|| format!("no gradient for `{name}`"))?;
            let (m, v) = self.moments.get(name).expect("moments exist for every parameter");
            // The rows this gradient trains: all, or the last ones (views share the storage).
            let (rows, trained) = (var.dim(0)?, grad.dim(0)?);
            if trained > rows {
                bail!("`{name}`: a gradient of {trained} rows for {rows}");
            }
            let first = rows - trained;
            let (p, m, v) =
                (var.narrow(0, first, trained)?, m.narrow(0, first, trained)?, v.narrow(0, first, trained)?);
            let lr = lr(name);
            let decay = if is_norm_or_bias(name) { 0.0 } else { weight_decay };
            let update = Update {
                eps,
                decay_factor: 1.0 - lr * decay,
                step_size: lr / (1.0 - beta1.powi(t)),
                correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
            };
            if fused::supported(&p) && grad.is_contiguous() {
                // One pass per tensor, in place: no temporaries the size of the model.
                m.inplace_op2(grad, &Moment { beta: beta1, squared: false })?;
                v.inplace_op2(grad, &Moment { beta: beta2, squared: true })?;
                p.inplace_op3(&m, &v, &update)?;
            } else {
                let new_m = ((&m * beta1)? + (grad * (1.0 - beta1))?)?;
                let new_v = ((&v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
                let denom = ((new_v.sqrt()? / update.correction2_sqrt)? + eps)?;
                let new_p = ((&p * update.decay_factor)? - (new_m.div(&denom)? * update.step_size)?)?;
                m.slice_set(&new_m, 0, 0)?;
                v.slice_set(&new_v, 0, 0)?;
                p.slice_set(&new_p, 0, 0)?;
            }
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

/// `m ← β·m + (1 − β)·g`, or with `g²` for the second moment, in place.
struct Moment {
    beta: f64,
    squared: bool,
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        fn run<T: Real>(m: &mut [T], g: &[T], beta: f64, squared: bool) {
            let (beta, rest) = (T::from(beta).expect("a float"), T::from(1.0 - beta).expect("a float"));
            m.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    *m = *m * beta + (if squared { g * g } else { g }) * rest;
                }
            });
        }
        let g = contiguous_range(l2)?;
        let m = contiguous_range(l1)?;
        match (s1, s2) {
            (CpuStorage::F32(m_data), CpuStorage::F32(g_data)) => {
                run(&mut m_data[m], &g_data[g], self.beta, self.squared)
            }
            (CpuStorage::F64(m_data), CpuStorage::F64(g_data)) => {
                run(&mut m_data[m], &g_data[g], self.beta, self.squared)
            }
            _ => candle_core::bail!("adamw-moment: f32 or f64 of one dtype"),
        }
        Ok(())
    }
}

/// `p ← p·(1 − lr·wd) − step_size · m / (√v / √(1 − β₂ᵗ) + ε)`, in place (torch's AdamW order).
struct Update {
    eps: f64,
    decay_factor: f64,
    step_size: f64,
    correction2_sqrt: f64,
}

impl candle_core::InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        fn run<T: Real>(p: &mut [T], m: &[T], v: &[T], u: &Update) {
            let f = |x: f64| T::from(x).expect("a float");
            let (decay, step, c2, eps) = (f(u.decay_factor), f(u.step_size), f(u.correction2_sqrt), f(u.eps));
            p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    *p = *p * decay - step * (m / (v.sqrt() / c2 + eps));
                }
            });
        }
        let (p, m, v) = (contiguous_range(l1)?, contiguous_range(l2)?, contiguous_range(l3)?);
        match (s1, s2, s3) {
            (CpuStorage::F32(pd), CpuStorage::F32(md), CpuStorage::F32(vd)) => run(&mut pd[p], &md[m], &vd[v], self),
            (CpuStorage::F64(pd), CpuStorage::F64(md), CpuStorage::F64(vd)) => run(&mut pd[p], &md[m], &vd[v], self),
            _ => candle_core::bail!("adamw-update: f32 or f64 of one dtype"),
        }
        Ok(())
    }
}

const CHUNK: usize = 64 * 1024;

fn contiguous_range(layout: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => candle_core::bail!("adamw: tensors must be contiguous"),
    }
}

/// The global L2 norm of all gradients, accumulated in f64.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0.0f64;
    for grad in grads.values() {
        total += match squared_sum_in_place(grad) {
            Some(sum) => sum,
            None => grad.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?,
        };
    }
    Ok(total.sqrt())
}

/// `Σ x²` of a contiguous f32 or f64 CPU tensor read where it lies: widening and squaring it as
/// tensors made two f64 copies (4 GiB for a 1B Llama's embedding gradient). Chunks are summed in
/// a fixed order, so the result is the same on every run (a resumed run clips alike).
fn squared_sum_in_place(grad: &Tensor) -> Option<f64> {
    fn sum<T: Copy + Into<f64> + Sync>(x: &[T]) -> f64 {
        let partial: Vec<f64> =
            x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| v.into() * v.into()).sum::<f64>()).collect();
        partial.iter().sum()
    }
    let (storage, layout) = grad.storage_and_layout();
    let range = contiguous_range(layout).ok()?;
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F32(x)) => Some(sum(&x[range])),
        candle_core::Storage::Cpu(CpuStorage::F64(x)) => Some(sum(&x[range])),
        _ => None,
    }
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
