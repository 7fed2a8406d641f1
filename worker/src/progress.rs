//! A run's progress on the terminal: a bar with the latest step metrics and a line per eval,
//! checkpoint, sample and warning (plain lines on stderr when there is no terminal). Used by
//! `cpt-worker train` (events from the training core) and `cpt-worker watch` (events from a server).

use cpt_protocol::Event;
use indicatif::{ProgressBar, ProgressStyle};

/// The terminal view of one run.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `total_steps` optimizer steps.
    pub fn new(total_steps: u64) -> Self {
        let bar = ProgressBar::new(total_steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("a valid template"),
        );
        Self { bar }
    }

    /// Prints a line above the bar.
    pub fn say(&self, line: String) {
        // Without a terminal the bar draws nothing, so lines go to stderr as they are.
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Shows one event.
    pub fn show(&self, event: &Event) {
        match event {
            Event::Step(m) => {
                let line = format!(
                    "loss {:.4} lr {:.2e} |g| {:.2} {:.0} tok/s MFU {:.1}%",
                    m.loss,
                    m.lr,
                    m.grad_norm,
                    m.tokens_per_second,
                    100.0 * m.mfu
                );
                self.bar.set_position(m.step);
                if self.bar.is_hidden() {
                    eprintln!("step {}/{}: {line}", m.step, self.bar.length().unwrap_or(0));
                }
                self.bar.set_message(line);
            }
            Event::Started { from_step, .. } => {
                self.bar.set_position(*from_step);
                self.say(describe(event));
            }
            other => self.say(describe(other)),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Started { plan, from_step, .. } => format!(
            "{} steps × {} tokens, lr {:.2e} ({}), warmup {} steps, {:.2} GFLOP/token, from step {from_step}",
            plan.total_steps,
            plan.tokens_per_step,
            plan.lr.peak,
            plan.lr.reasoning,
            plan.warmup_steps,
            plan.flops_per_token / 1e9
        ),
        Event::Eval { step, set, loss, perplexity, bits_per_byte, .. } => {
            // Events from before bits per byte existed have none.
            let bits =
                if bits_per_byte.is_finite() { format!(", {bits_per_byte:.4} bits/byte") } else { String::new() };
            format!("step {step} eval {set}: loss {loss:.4}, perplexity {perplexity:.2}{bits}")
        }
        Event::Checkpoint { path, .. } => format!("checkpoint {path}"),
        Event::Sample { step, prompt, continuation } => format!("step {step} sample: {prompt}|{continuation}"),
        Event::Warning { message, .. } => format!("warning: {message}"),
        Event::Rollback { step, to_step, loss, average, .. } => {
            format!("step {step}: loss {loss:.4} spiked over its average {average:.4}; rolled back to step {to_step}")
        }
        Event::ForgettingBudget { step, set, rise, max_rise, action, .. } => format!(
            "step {step} forgetting budget of {set}: perplexity {:+.2}% over step 0 (at most {:+.2}%): {}",
            rise * 100.0,
            max_rise * 100.0,
            action.as_str()
        ),
        Event::Finished { step, outcome, .. } => format!("{outcome} at step {step}"),
        Event::Step(m) => format!("step {} loss {:.4}", m.step, m.loss),
        Event::Prepared { path, .. } => format!("dataset prepared in {path}"),
        Event::VocabularyExtended { path, .. } => format!("vocabulary extended in {path}"),
    }
}
