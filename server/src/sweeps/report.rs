//! A sweep's comparison table: per job, where each eval set started, ended and was best, read from
//! the job's eval events; and the curves the plot draws.

use std::collections::BTreeMap;

use cpt_protocol::JobState;
use serde::Serialize;
use serde_json::Value;

use crate::events::series::{EvalCourses, EvalPoint};
use crate::jobs::store::Job;

/// Per job id, per set, the evals by step ([`crate::events::series::eval_courses`]: a step evaluated again by a later
/// attempt keeps the later value, the one the run went on from).
pub type Courses = BTreeMap<String, EvalCourses>;

/// One set's course in one job, in a line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct SetSummary {
    /// Perplexity at the first eval (step 0).
    pub initial: f64,
    #[serde(rename = "final")]
    pub last: f64,
    pub final_step: u64,
    pub best: f64,
    pub best_step: u64,
    /// `final / initial - 1`: negative is learning, positive forgetting.
    pub change: f64,
    pub best_change: f64,
    /// Bits per byte at the first and last eval, where the worker measured them.
    pub bits_per_byte_initial: Option<f64>,
    pub bits_per_byte_final: Option<f64>,
}

fn summary(course: &BTreeMap<u64, EvalPoint>) -> Option<SetSummary> {
    let (_, first) = course.first_key_value()?;
    let (&final_step, last) = course.last_key_value()?;
    let (&best_step, best) = course
        .iter()
        .filter(|(_, p)| p.perplexity.is_finite())
        .min_by(|a, b| a.1.perplexity.total_cmp(&b.1.perplexity))
        .unwrap_or((&final_step, last));
    let measured = |bpb: f64| Some(bpb).filter(|b| b.is_finite());
    Some(SetSummary {
        initial: first.perplexity,
        last: last.perplexity,
        final_step,
        best: best.perplexity,
        best_step,
        change: last.perplexity / first.perplexity - 1.0,
        best_change: best.perplexity / first.perplexity - 1.0,
        bits_per_byte_initial: measured(first.bits_per_byte),
        bits_per_byte_final: measured(last.bits_per_byte),
    })
}

/// One line of the table: a job of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub job_id: String,
    pub name: String,
    pub state: JobState,
    /// The grid's values for this job.
    pub point: Value,
    pub step: i64,
    pub total_steps: Option<i64>,
    pub tokens_total: i64,
    /// From its first lease to its end (or now), waits for a resume included.
    pub wall_seconds: Option<f64>,
    pub error: Option<String>,
    pub eval: BTreeMap<String, SetSummary>,
}

pub fn line(job: &Job, courses: &Courses, now_ms: i64) -> Line {
    let eval = courses
        .get(&job.id)
        .map(|sets| sets.iter().filter_map(|(set, course)| Some((set.clone(), summary(course)?))).collect())
        .unwrap_or_default();
    Line {
        job_id: job.id.clone(),
        name: job.name.clone(),
        state: job.state,
        point: job.sweep_point.clone().unwrap_or(Value::Null),
        step: job.progress.step,
        total_steps: job.progress.total_steps,
        tokens_total: job.progress.tokens_total,
        wall_seconds: job.started_at.map(|start| (job.finished_at.unwrap_or(now_ms) - start).max(0) as f64 / 1000.0),
        error: job.error.clone(),
        eval,
    }
}

/// The sweep's state, from its jobs': running while any runs, else queued while any waits, else
/// paused while any is paused; at rest, succeeded only if all did, else failed if any failed, else
/// cancelled.
pub fn state(jobs: &[Job]) -> &'static str {
    let any = |states: &[JobState]| jobs.iter().any(|j| states.contains(&j.state));
    if any(&[JobState::Running, JobState::Cancelling]) {
        "running"
    } else if any(&[JobState::Queued]) {
        "queued"
    } else if any(&[JobState::Paused]) {
        "paused"
    } else if jobs.iter().all(|j| j.state == JobState::Succeeded) {
        "succeeded"
    } else if any(&[JobState::Failed]) {
        "failed"
    } else {
        "cancelled"
    }
}

/// The two sets a plot compares when the client names none: `domain` and `general` if the jobs
/// evaluate both, else the first two names.
pub fn default_axes(courses: &Courses) -> Option<(String, String)> {
    let mut names: Vec<&String> = courses.values().flat_map(|sets| sets.keys()).collect();
    names.sort();
    names.dedup();
    if names.iter().any(|n| *n == "domain") && names.iter().any(|n| *n == "general") {
        return Some(("domain".into(), "general".into()));
    }
    match names[..] {
        [x, y, ..] => Some((x.clone(), y.clone())),
        _ => None,
    }
}

/// Each job's path through (x perplexity, y perplexity), over the steps where both were evaluated.
pub fn curve(courses: &Courses, job_id: &str, x: &str, y: &str) -> Vec<(f64, f64)> {
    let Some(sets) = courses.get(job_id) else { return Vec::new() };
    let (Some(xs), Some(ys)) = (sets.get(x), sets.get(y)) else { return Vec::new() };
    xs.iter()
        .filter_map(|(step, px)| Some((px.perplexity, ys.get(step)?.perplexity)))
        .filter(|(a, b)| a.is_finite() && b.is_finite() && *a > 0.0 && *b > 0.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn course(points: &[(u64, f64)]) -> BTreeMap<u64, EvalPoint> {
        points.iter().map(|&(s, p)| (s, EvalPoint { loss: p.ln(), perplexity: p, bits_per_byte: f64::NAN })).collect()
    }

    #[test]
    fn a_summary_reads_first_last_and_best() {
        let s = summary(&course(&[(0, 40.0), (10, 20.0), (20, 25.0)])).unwrap();
        assert_eq!((s.initial, s.last, s.final_step, s.best, s.best_step), (40.0, 25.0, 20, 20.0, 10));
        assert!((s.change - (25.0 / 40.0 - 1.0)).abs() < 1e-12 && (s.best_change + 0.5).abs() < 1e-12);
        assert_eq!(s.bits_per_byte_final, None);
        assert!(summary(&BTreeMap::new()).is_none());
    }

    #[test]
    fn the_default_axes_prefer_domain_and_general() {
        let mut courses = Courses::new();
        courses.entry("a".into()).or_default().insert("zh".into(), course(&[(0, 1.0)]));
        assert_eq!(default_axes(&courses), None);
        courses.entry("b".into()).or_default().insert("en".into(), course(&[(0, 1.0)]));
        assert_eq!(default_axes(&courses), Some(("en".into(), "zh".into())));
        courses.entry("b".into()).or_default().insert("general".into(), course(&[(0, 1.0)]));
        courses.entry("a".into()).or_default().insert("domain".into(), course(&[(0, 1.0)]));
        assert_eq!(default_axes(&courses), Some(("domain".into(), "general".into())));
    }
}
