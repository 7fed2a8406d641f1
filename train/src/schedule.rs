//! The learning-rate schedule as a pure function of the step.

use cpt_protocol::spec::Schedule;

/// Everything `lr_at` depends on; saved in checkpoints so a resumed run follows the same curve.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// `wsd`: steps in the final decay.
    pub decay_steps: u64,
}

impl LrSchedule {
    /// The learning rate of 1-based optimizer step `step`.
    ///
    /// Warmup rises linearly to `peak` at step `warmup_steps`; afterwards `constant` stays, `linear`
    /// and `cosine` fall to `min` at the last step, and `wsd` holds `peak` until the last
    /// `decay_steps`, then falls linearly to `min`.
    pub fn lr_at(&self, step: u64) -> f64 {
        let (peak, min) = (self.peak, self.min);
        if step <= self.warmup_steps {
            return peak * step as f64 / self.warmup_steps as f64;
        }
        let after = (step - self.warmup_steps) as f64;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (after / span).min(1.0);
        match self.kind {
            Schedule::Constant => peak,
            Schedule::Linear => min + (peak - min) * (1.0 - progress),
            Schedule::Cosine => min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Wsd => {
                let decay_start = self.total_steps.saturating_sub(self.decay_steps).max(self.warmup_steps);
                if step <= decay_start {
                    peak
                } else {
                    let q = ((step - decay_start) as f64 / (self.total_steps - decay_start).max(1) as f64).min(1.0);
                    peak + (min - peak) * q
                }
            }
        }
    }
}
