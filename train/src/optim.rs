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

    /// Applies one update, each parameter with its learning rate `lr(name)`, to the gradients
    /// times `grad_scale` (a clipping coefficient, or 1); `grads` holds every trained parameter's
    /// gradient. A gradient with fewer rows than its parameter updates only the parameter's last
    /// rows (a table trained from a row on): the others, and their moments, stay. Every tensor is
    /// updated in place, so views of the parameters see the update.
    pub fn step(
        &mut self,
        params: &Params,
        grads: &BTreeMap<String, Tensor>,
        grad_scale: f64,
        lr: impl Fn(&str) -> f64,
    ) -> Result<()> {
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
                beta1,
                beta2,
                eps,
                grad_scale,
                decay_factor: 1.0 - lr * decay,
                step_size: lr / (1.0 - beta1.powi(t)),
                correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
            };
            if fused::supported(&p) && grad.is_contiguous() {
                update.in_place(&p, &m, &v, grad)?;
            } else {
                let grad = if grad_scale == 1.0 { grad.clone() } else { (grad * grad_scale)? };
                let new_m = ((&m * beta1)? + (&grad * (1.0 - beta1))?)?;
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

/// One parameter's AdamW update (torch's order: `m ← β₁·m + (1 − β₁)·g`, `v ← β₂·v + (1 − β₂)·g²`,
/// `p ← p·(1 − lr·wd) − step_size · m / (√v / √(1 − β₂ᵗ) + ε)`) for `g` = gradient × `grad_scale`.
struct Update {
    beta1: f64,
    beta2: f64,
    eps: f64,
    grad_scale: f64,
    decay_factor: f64,
    step_size: f64,
    correction2_sqrt: f64,
}

impl Update {
    /// The update in one pass over `p`, `m`, `v` and the gradient, in place: separate passes for
    /// the moments, the parameter and the clipping read and wrote every element 13 times instead
    /// of 7, and clipping made a scaled copy of each gradient. candle lends one mutable storage
    /// per in-place op, so the op on `p` runs the op on `m`, which runs the op on `v`.
    fn in_place(&self, p: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor) -> candle_core::Result<()> {
        lend(p, |p, p_layout| {
            lend(m, |m, m_layout| {
                lend(v, |v, v_layout| {
                    let (g, g_layout) = grad.storage_and_layout();
                    let candle_core::Storage::Cpu(g) = &*g else { candle_core::bail!("adamw: a CPU gradient") };
                    let ranges = [p_layout, m_layout, v_layout, g_layout].map(contiguous_range);
                    let [p_range, m_range, v_range, g_range] = ranges;
                    match (&mut *p, &mut *m, &mut *v, g) {
                        (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v), CpuStorage::F32(g)) => {
                            self.run(&mut p[p_range?], &mut m[m_range?], &mut v[v_range?], &g[g_range?])
                        }
                        (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v), CpuStorage::F64(g)) => {
                            self.run(&mut p[p_range?], &mut m[m_range?], &mut v[v_range?], &g[g_range?])
                        }
                        _ => candle_core::bail!("adamw: f32 or f64 of one dtype"),
                    }
                    Ok(())
                })
            })
        })
    }

    fn run<T: Real>(&self, p: &mut [T], m: &mut [T], v: &mut [T], g: &[T]) {
        let f = |x: f64| T::from(x).expect("a float");
        let (beta1, rest1, beta2, rest2) = (f(self.beta1), f(1.0 - self.beta1), f(self.beta2), f(1.0 - self.beta2));
        let (decay, step, c2, eps) = (f(self.decay_factor), f(self.step_size), f(self.correction2_sqrt), f(self.eps));
        // Unclipped gradients are read as they are (scaling by one could only change a zero's sign).
        let scale = (self.grad_scale != 1.0).then(|| f(self.grad_scale));
        let p = p.par_chunks_mut(CHUNK).zip(m.par_chunks_mut(CHUNK));
        p.zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                let g = scale.map_or(g, |scale| g * scale);
                *m = *m * beta1 + g * rest1;
                *v = *v * beta2 + g * g * rest2;
                *p = *p * decay - step * (*m / (v.sqrt() / c2 + eps));
            }
        });
    }
}

/// Runs `f` on `tensor`'s storage, mutably, through an in-place op.
fn lend(
    tensor: &Tensor,
    f: impl FnMut(&mut CpuStorage, &Layout) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    struct Lend<F>(std::cell::RefCell<F>);
    impl<F: FnMut(&mut CpuStorage, &Layout) -> candle_core::Result<()>> candle_core::InplaceOp1 for Lend<F> {
        fn name(&self) -> &'static str {
            "adamw"
        }
        fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
            (self.0.borrow_mut())(storage, layout)
        }
    }
    tensor.inplace_op1(&Lend(std::cell::RefCell::new(f)))
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
        // Eight running sums per chunk: one is a chain of dependent adds that the compiler may not
        // reorder, which ran at one element per add latency.
        let lanes = |chunk: &[T]| {
            let blocks = chunk.chunks_exact(8);
            let tail: f64 = blocks.remainder().iter().map(|&v| v.into() * v.into()).sum();
            let mut lanes = [0.0f64; 8];
            for block in blocks {
                for (lane, &v) in lanes.iter_mut().zip(block) {
                    *lane += v.into() * v.into();
                }
            }
            lanes.iter().sum::<f64>() + tail
        };
        let partial: Vec<f64> = x.par_chunks(CHUNK).map(lanes).collect();
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

/// The factor that brings gradients of global norm `norm` to at most `max_norm` (torch's
/// `clip_grad_norm_`), or 1; [`AdamW::step`] applies it as it reads each gradient.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    let coefficient = max_norm / (norm + 1e-6);
    coefficient.min(1.0)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::Update;

    /// torch.optim.AdamW's update written out per element, in f64.
    fn reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], u: &Update) {
        for i in 0..p.len() {
            let g = g[i] * u.grad_scale;
            m[i] = u.beta1 * m[i] + (1.0 - u.beta1) * g;
            v[i] = u.beta2 * v[i] + (1.0 - u.beta2) * g * g;
            p[i] = p[i] * u.decay_factor - u.step_size * m[i] / (v[i].sqrt() / u.correction2_sqrt + u.eps);
        }
    }

    #[test]
    fn the_global_norm_is_the_square_root_of_every_gradients_sum_of_squares() {
        // Lengths around the chunk and the eight lanes; an f64 tensor and a strided view too.
        let values = |n: usize, seed: usize| -> Vec<f64> {
            (0..n).map(|i| ((i * 7919 + seed) % 97) as f64 / 16.0 - 3.0).collect()
        };
        let (a, b, c) = (values(super::CHUNK + 13, 1), values(7, 2), values(40, 3));
        let expected: f64 = a.iter().chain(&b).chain(c.iter().step_by(2)).map(|x| x * x).sum::<f64>().sqrt();
        let grads = std::collections::BTreeMap::from([
            ("a".to_string(), Tensor::new(a.as_slice(), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()),
            ("b".to_string(), Tensor::new(b.as_slice(), &Device::Cpu).unwrap()),
            ("c".to_string(), Tensor::from_vec(c, (20, 2), &Device::Cpu).unwrap().narrow(1, 0, 1).unwrap()),
        ]);
        // Sixteenths square and add exactly in f64 whatever the order.
        assert_eq!(super::global_norm(&grads).unwrap(), expected);
    }

    #[test]
    fn one_pass_updates_the_parameter_and_both_moments_of_a_row_view_with_the_scaled_gradient() {
        let u = Update {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_scale: 0.25,
            decay_factor: 0.99,
            step_size: 0.1 / 0.1,
            correction2_sqrt: 0.05f64.sqrt(),
        };
        let values = |seed: f64| (0..12).map(|i| ((i as f64 + seed) * 1.7).sin()).collect::<Vec<f64>>();
        let (mut p, mut m, g) = (values(0.0), values(1.0), values(3.0));
        let mut v: Vec<f64> = values(2.0).iter().map(|x| x * x).collect();
        let tensor = |x: &[f64]| Tensor::from_slice(x, (4, 3), &Device::Cpu).unwrap();
        let (pt, mt, vt) = (tensor(&p), tensor(&m), tensor(&v));
        // The last two rows train, as with `train_rows_from`.
        let rows = |t: &Tensor| t.narrow(0, 2, 2).unwrap();
        let grad = Tensor::from_slice(&g[6..], (2, 3), &Device::Cpu).unwrap();
        u.in_place(&rows(&pt), &rows(&mt), &rows(&vt), &grad).unwrap();
        reference(&mut p[6..], &mut m[6..], &mut v[6..], &g[6..], &u);
        for (tensor, expected) in [(&pt, &p), (&mt, &m), (&vt, &v)] {
            let got = tensor.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(
                got.iter().zip(expected.iter()).all(|(a, b)| (a - b).abs() <= 1e-15 * b.abs().max(1.0)),
                "{got:?} vs {expected:?}"
            );
        }
        // f32 follows the same formula.
        let f32s = |x: &[f64]| Tensor::from_slice(x, 12, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let (p32, m32, v32, g32) = (f32s(&p), f32s(&m), f32s(&v), f32s(&g));
        u.in_place(&p32, &m32, &v32, &g32).unwrap();
        reference(&mut p, &mut m, &mut v, &g, &u);
        let got = p32.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        assert!(got.iter().zip(&p).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)), "{got:?} vs {p:?}");
    }
}
