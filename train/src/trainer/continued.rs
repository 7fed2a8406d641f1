//! A job that continues another's run (`continue_from`): it starts from the parent's checkpoint
//! with the parent's weights, AdamW moments and update count, step-0 perplexities and data cursors,
//! and follows its own schedule from its own step 0.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use cpt_data::mixture::MixtureState;
use cpt_protocol::spec::ContinueFrom;
use cpt_protocol::JobSpec;

use crate::adapter::{self, Start};
use crate::checkpoint::{self, TrainerState};
use crate::hf::ModelDir;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::Params;

/// The parameters, optimizer and trainer state a continued job starts with; `fresh` is its own
/// step-0 state, which keeps its schedule and spec hash.
pub(super) fn open(
    spec: &JobSpec,
    base: &ModelDir,
    from: &ContinueFrom,
    adamw: AdamWConfig,
    fresh: TrainerState,
    device: &Device,
) -> Result<(Params, AdamW, TrainerState)> {
    let dir = Path::new(&from.checkpoint);
    let loaded =
        checkpoint::load(dir, device).with_context(|| format!("continue_from.checkpoint {}", dir.display()))?;
    let params = match &spec.adapter {
        Some(adapter) => adapter::open_params(base, adapter, Start::Exactly(dir), spec.seed, device)?,
        None => ModelDir::open(dir)?.load_params(DType::F32, device)?,
    };
    let optimizer = AdamW::restore(&params, adamw, loaded.optimizer_tensors, loaded.state.optimizer_updates)
        .context("continue_from: the parent's optimizer state does not fit this job's parameters")?;
    let state = TrainerState {
        optimizer_updates: loaded.state.optimizer_updates,
        eval_baseline: loaded.state.eval_baseline,
        data: carried_cursors(spec, from, &loaded.state.data),
        ..fresh
    };
    Ok((params, optimizer, state))
}

/// The mixture state the job's sources start from: each source at the same position and on the
/// same dataset as one of the parent's keeps its cursor (its shuffle key depends on both), the
/// others start at their beginning; the draw count goes on.
fn carried_cursors(spec: &JobSpec, from: &ContinueFrom, parent: &MixtureState) -> MixtureState {
    let cursors = spec
        .train_data
        .iter()
        .enumerate()
        .map(|(i, source)| match (from.train_data.get(i), parent.cursors.get(i)) {
            (Some(dataset), Some(cursor)) if *dataset == source.dataset => *cursor,
            _ => Default::default(),
        })
        .collect();
    MixtureState { draws: parent.draws, cursors }
}
