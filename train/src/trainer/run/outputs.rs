//! What a run leaves behind besides events: checkpoints, and sample continuations.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use cpt_data::StagedDir;
use cpt_protocol::Event;

use super::{rollback_target, Run};
use crate::adapter;
use crate::checkpoint;
use crate::hf::{write_model_files, write_tokenizer, ModelFiles};
use crate::text::{self, Decoding, Sampling};

impl Run<'_> {
    /// Writes a checkpoint of the current state (keeping the newest `keep_checkpoints`).
    pub(super) fn save(&mut self, on_event: &mut impl FnMut(Event)) -> Result<PathBuf> {
        let write_weights = |staged: &StagedDir| match &self.spec.adapter {
            // An adapter checkpoint is a PEFT adapter directory over the base (plus the tokenizer).
            Some(adapter) => {
                let base = self.base.path.display().to_string();
                adapter::write_adapter_files(staged, &self.params, adapter, &self.base.config, &base)?;
                write_tokenizer(staged, &self.tokenizer)
            }
            None => {
                let files = ModelFiles {
                    config_json: self.base.config_json.clone(),
                    params: &self.params,
                    dtype: DType::F32,
                    tokenizer: &self.tokenizer,
                    extra: self.extra.clone(),
                };
                write_model_files(staged, files)
            }
        };
        let keep = self.spec.keep_checkpoints;
        // A rollback returns to the newest scheduled checkpoint: retention keeps it.
        let protect = self.spec.spike_rollback.and_then(|_| rollback_target(self.spec, self.state.step));
        let path = checkpoint::save(self.run_dir, write_weights, protect, &self.optimizer, &self.state, keep)?;
        on_event(Event::Checkpoint {
            step: self.state.step,
            path: path.display().to_string(),
            tokens_total: self.state.tokens_total,
        });
        self.last_checkpoint = Some(path.clone());
        Ok(path)
    }

    /// A continuation of every sample prompt (greedy, or as `sample_decoding` says, seeded by the
    /// job's seed, the step and the prompt), on detached weights.
    pub(super) fn sample(&self, on_event: &mut impl FnMut(Event)) -> Result<()> {
        let model = self.model.detached();
        for (i, prompt) in self.spec.sample_prompts.iter().enumerate() {
            let decoding = match self.spec.sample_decoding {
                None => Decoding::GREEDY,
                Some(d) => Decoding {
                    sampling: (d.temperature > 0.0).then_some(Sampling {
                        temperature: d.temperature,
                        top_k: d.top_k,
                        top_p: d.top_p,
                        seed: self.spec.seed ^ (self.state.step << 8 | i as u64),
                    }),
                    repetition_penalty: d.repetition_penalty,
                },
            };
            let tokens = self.spec.sample_tokens;
            let continuation = text::generate(&model, &self.tokenizer, prompt, tokens, decoding, &self.device)?;
            on_event(Event::Sample { step: self.state.step, prompt: prompt.clone(), continuation });
        }
        Ok(())
    }
}
