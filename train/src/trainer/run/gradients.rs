//! One optimizer step's gradients: from the explicit step where it runs (full f32 training on the
//! CPU), else from candle's autograd, summed over the micro-batches.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::Run;
use crate::step;
use crate::trainer::batch_loss;

impl Run<'_> {
    /// The summed loss, the seconds spent fetching data and the gradients of one optimizer step's
    /// micro-batches: through the explicit step where it runs, else through candle's autograd.
    pub(super) fn gradients(&mut self, step: u64) -> Result<(f64, f64, BTreeMap<String, Tensor>)> {
        let spec = self.spec;
        let (mut data_seconds, mut loss_sum) = (0.0, 0.0f64);
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut explicit = step::Gradients::<f32>::default();
        let scale = 1.0 / spec.grad_accum_steps as f64;
        for micro in 0..spec.grad_accum_steps {
            // Dropout masks follow from (seed, step, micro-batch), so a resumed run draws the same.
            self.model.set_dropout_pass(Some(spec.seed ^ (step << 20 | micro as u64)));
            let fetch = Instant::now();
            let batch = self.data.next_batch(spec.micro_batch_size, &self.device)?;
            data_seconds += fetch.elapsed().as_secs_f64();
            if self.explicit {
                let config = &self.base.config;
                let mask = batch.mask.as_ref();
                loss_sum += step::accumulate(
                    config,
                    &self.params,
                    &batch.ids,
                    mask,
                    scale,
                    spec.recompute_every,
                    &mut explicit,
                )?;
                continue;
            }
            let loss = batch_loss(&self.model, &batch)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let store = (loss / spec.grad_accum_steps as f64)?.backward()?;
            for (name, var) in self.params.iter() {
                let grad = store.get(var).with_context(|| format!("`{name}` received no gradient"))?;
                let summed = match grads.remove(name) {
                    Some(previous) => (previous + grad)?,
                    None => grad.clone(),
                };
                grads.insert(name.to_string(), summed);
            }
        }
        if self.explicit {
            grads = explicit.into_tensors(&self.params)?;
        }
        Ok((loss_sum, data_seconds, grads))
    }
}
