//! Loss-spike rollback (`spike_rollback`): back to the newest scheduled checkpoint, past the data
//! window that caused the spike, at a cooled learning rate.

use anyhow::{bail, Context, Result};
use cpt_protocol::{Event, JobSpec};

use super::{Reopen, Run};
use crate::checkpoint;

/// The checkpoint a rollback at or after `step` returns to: the newest scheduled one (a multiple of
/// `checkpoint_every`, whatever stops added), `None` for the start. Stops and resumes do not move
/// it, so a resumed run rolls back exactly as an uninterrupted one.
pub(super) fn rollback_target(spec: &JobSpec, step: u64) -> Option<u64> {
    let every = spec.checkpoint_every;
    (every > 0).then(|| step / every * every).filter(|&s| s > 0)
}

impl<'a> Run<'a> {
    /// After a spike at `step`: the run reopened at its newest scheduled checkpoint (or its start)
    /// with the data where it is now, so the window since is skipped, and the learning rate lowered
    /// for the spec's cooldown. Deterministic: a resume that meets the same spike rolls back the
    /// same way.
    pub fn roll_back(self, step: u64, loss: f64, average: f64, on_event: &mut impl FnMut(Event)) -> Result<Run<'a>> {
        let rollback = self.spec.spike_rollback.context("rolling back without spike_rollback")?;
        let rollbacks = self.state.rollbacks + 1;
        if rollbacks > rollback.max_rollbacks {
            bail!(
                "step {step}: loss {loss:.4} is {:.1}× its moving average {average:.4}, and the run has rolled back \
                 {} times already (spike_rollback.max_rollbacks)",
                loss / average,
                rollback.max_rollbacks
            );
        }
        let (spec, run_dir, device) = (self.spec, self.run_dir, self.device.clone());
        let (data, baseline) = (self.data.mixture.state(), self.state.eval_baseline.clone());
        drop(self); // one copy of the model at a time
        let target = rollback_target(spec, step - 1);
        // Checkpoints after the target (a stop's) hold the window being undone.
        for newer in checkpoint::list(run_dir)?.into_iter().filter(|&s| s > target.unwrap_or(0)) {
            std::fs::remove_dir_all(checkpoint::dir_of(run_dir, newer))?;
        }
        let mut run = Run::open_at(spec, run_dir, target.map_or(Reopen::Fresh, Reopen::Step), &device)?;
        run.warnings.clear(); // announced when the run started
        let to_step = run.state.step;
        run.data.mixture.restore(&data)?;
        let state = &mut run.state;
        state.data = data;
        state.eval_baseline = baseline;
        state.rollbacks = rollbacks;
        state.cooldown_until = to_step + rollback.cooldown_steps;
        on_event(Event::Rollback {
            step,
            to_step,
            loss,
            average,
            skipped_tokens: (step - to_step) * run.plan.tokens_per_step,
            lr_scale: rollback.lr_scale,
            cooldown_until: state.cooldown_until,
            rollbacks,
        });
        Ok(run)
    }
}
