//! Checkpoints: `<run_dir>/checkpoints/step-<N>/` holding a loadable HF model directory plus
//! `optimizer.safetensors`, `trainer_state.json` and `checksums.json`.
//!
//! A checkpoint is written under a temporary name, fsynced and renamed, so a crash leaves either a
//! complete checkpoint or none; `checksums.json` (sha256 of every other file) catches a file torn
//! or corrupted afterwards, and loading falls back to the previous checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use cpt_data::{sha256_file, MixtureState, StagedDir};
use serde::{Deserialize, Serialize};

use crate::adapter;
use crate::optim::AdamW;
use crate::params::write_safetensors;
use crate::schedule::LrSchedule;

/// Everything besides tensors that an exact resume needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (skipped ones included).
    pub step: u64,
    /// AdamW updates applied (skipped steps excluded).
    pub optimizer_updates: u64,
    pub tokens_total: u64,
    pub flops_total: f64,
    /// Per-source data cursors and the mixture's draw count: the data RNG is a pure function of these.
    pub data: MixtureState,
    pub schedule: LrSchedule,
    /// Moving average of the loss, for spike warnings.
    pub loss_average: Option<f64>,
    pub consecutive_bad_steps: u32,
    /// sha256 of the job spec this run follows; resuming under another spec is refused.
    pub spec_sha256: String,
    /// Seconds spent training so far, over all attempts.
    pub elapsed_seconds: f64,
    /// Each eval set's perplexity at step 0: what forgetting budgets and perplexity changes are
    /// measured against.
    #[serde(default)]
    pub eval_baseline: std::collections::BTreeMap<String, f64>,
    /// Loss-spike rollbacks so far, and the last step of the lowered learning rate after the latest.
    #[serde(default)]
    pub rollbacks: u32,
    #[serde(default)]
    pub cooldown_until: u64,
}

/// The checkpoints directory of a run.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The directory of the checkpoint of `step`.
pub fn dir_of(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(checkpoint_name(step))
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step}")
}

/// Steps of the complete checkpoints in `run_dir`, ascending.
pub fn list(run_dir: &Path) -> Result<Vec<u64>> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut steps: Vec<u64> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    Ok(steps)
}

/// The checkpoints to delete so that only the newest `keep` remain.
pub fn to_delete(steps: &[u64], keep: usize) -> Vec<u64> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.truncate(sorted.len().saturating_sub(keep));
    sorted
}

/// Writes the checkpoint of `state.step` (its weights through `write_weights`: a model directory's
/// files, or an adapter's), then prunes old ones down to `keep`, never `protect`.
pub fn save(
    run_dir: &Path,
    write_weights: impl FnOnce(&StagedDir) -> Result<()>,
    protect: Option<u64>,
    optimizer: &AdamW,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf> {
    let out = checkpoints_dir(run_dir).join(checkpoint_name(state.step));
    if out.exists() {
        // Same step written by an earlier attempt that died before recording it: replace it.
        std::fs::remove_dir_all(&out)?;
    }
    let staged = StagedDir::begin(&out)?;
    write_weights(&staged)?;
    write_safetensors(&staged.path().join("optimizer.safetensors"), &optimizer.state_tensors())?;
    staged.write("trainer_state.json", serde_json::to_string_pretty(state)?)?;
    let mut checksums = BTreeMap::new();
    for entry in std::fs::read_dir(staged.path())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        checksums.insert(name, sha256_file(&entry.path())?);
    }
    staged.write("checksums.json", serde_json::to_string_pretty(&checksums)?)?;
    let path = staged.commit()?;
    for step in to_delete(&list(run_dir)?, keep).into_iter().filter(|&step| Some(step) != protect) {
        std::fs::remove_dir_all(checkpoints_dir(run_dir).join(checkpoint_name(step)))?;
    }
    Ok(path)
}

/// Checks every file of a checkpoint against `checksums.json`.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join("checksums.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let checksums: BTreeMap<String, String> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let weights = if checksums.contains_key(adapter::CONFIG_FILE) {
        [adapter::WEIGHTS_FILE, adapter::CONFIG_FILE]
    } else {
        ["model.safetensors", "config.json"]
    };
    for required in weights.into_iter().chain(["optimizer.safetensors", "trainer_state.json"]) {
        if !checksums.contains_key(required) {
            bail!("{}: no checksum for {required}", dir.display());
        }
    }
    for (file, expected) in &checksums {
        let actual = sha256_file(&dir.join(file))?;
        if &actual != expected {
            bail!("{}: {file} is corrupt (sha256 {actual}, expected {expected})", dir.display());
        }
    }
    Ok(())
}

/// A verified checkpoint, ready to restore.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub optimizer_tensors: std::collections::HashMap<String, candle_core::Tensor>,
}

/// The checkpoint `dir`, verified, with its trainer and optimizer state.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    verify(dir)?;
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))?;
    let state: TrainerState = serde_json::from_str(&text).context("parsing trainer_state.json")?;
    let optimizer_tensors = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    Ok(Loaded { dir: dir.to_path_buf(), state, optimizer_tensors })
}

/// The newest checkpoint that verifies; each one that does not is reported to `on_corrupt` and skipped.
pub fn latest_valid(
    run_dir: &Path,
    device: &Device,
    mut on_corrupt: impl FnMut(&Path, &anyhow::Error),
) -> Result<Option<Loaded>> {
    for step in list(run_dir)?.into_iter().rev() {
        let dir = checkpoints_dir(run_dir).join(checkpoint_name(step));
        match load(&dir, device) {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(error) => on_corrupt(&dir, &error),
        }
    }
    Ok(None)
}
