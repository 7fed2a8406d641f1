//! `GET /v1/jobs/{id}/plot.svg?chart=…`: a job's curves as SVG — train loss (raw and smoothed),
//! learning rate, throughput, and each eval set's perplexity or bits per byte — for the job page
//! and anyone with curl.

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::series::{evals_of, sampled_steps_of};
use crate::error::ApiError;
use crate::jobs::store as jobs;
use crate::plots::{render_off_runtime, svg_response, Chart, Scale, Series};
use crate::AppState;

/// The charts there are.
pub const CHARTS: [&str; 5] = ["loss", "lr", "throughput", "perplexity", "bits_per_byte"];

/// How much of the past the smoothed loss keeps per step (TensorBoard's smoothing weight).
const SMOOTHING: f64 = 0.9;

/// At most this many points per line: a chart of a long run stays a few hundred kilobytes, whose
/// redraw the job page can afford every couple of seconds.
const MAX_POINTS: usize = 2000;

/// Every k-th point (and the last), so that at most [`MAX_POINTS`] remain.
pub fn thinned(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let stride = points.len().div_ceil(MAX_POINTS - 1);
    let last = points[points.len() - 1];
    let mut kept: Vec<(f64, f64)> = points.into_iter().step_by(stride).collect();
    if kept.last() != Some(&last) {
        kept.push(last);
    }
    kept
}

/// An exponential moving average, debiased so that it starts at the first value. A gap of k steps
/// between points decays the average as k single steps would, so a long run's chart (which reads
/// every k-th step) smooths over the same span of steps as a short one.
pub fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let (mut average, mut weight, mut previous) = (0.0, 0.0, None);
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            let decay = SMOOTHING.powf(previous.map_or(1.0, |p: f64| (x - p).max(1.0)));
            previous = Some(x);
            average = decay * average + (1.0 - decay) * y;
            weight = decay * weight + (1.0 - decay);
            (x, average / weight)
        })
        .collect()
}

#[derive(Deserialize)]
pub struct PlotQuery {
    chart: Option<String>,
}

fn line(label: &str, points: Vec<(f64, f64)>) -> Series {
    Series { label: label.to_string(), points: thinned(points), faint: false }
}

/// `GET /v1/jobs/{id}/plot.svg?chart=loss|lr|throughput|perplexity|bits_per_byte` (default loss).
pub async fn plot(
    State(app): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<PlotQuery>,
) -> Result<Response, ApiError> {
    let chart = query.chart.unwrap_or_else(|| "loss".into());
    if !CHARTS.contains(&chart.as_str()) {
        return Err(ApiError::invalid_field("chart", format!("one of {}", CHARTS.join(", "))));
    }
    let job = jobs::existing(&app.pool, &id).await?;
    let (series, y_desc, y_scale) = if matches!(chart.as_str(), "perplexity" | "bits_per_byte") {
        let evals = evals_of(&app, &id).await?;
        let pick = |v: &super::series::EvalPoint| if chart == "perplexity" { v.perplexity } else { v.bits_per_byte };
        let series: Vec<Series> = evals
            .iter()
            .map(|(set, points)| line(set, points.iter().map(|(s, v)| (*s as f64, pick(v))).collect()))
            .collect();
        let (desc, scale) = if chart == "perplexity" {
            ("perplexity (log scale)", Scale::Log)
        } else {
            ("bits per byte", Scale::Linear)
        };
        (series, desc, scale)
    } else {
        let steps = sampled_steps_of(&app, &id, MAX_POINTS - 1).await?;
        let column = |value: fn(&cpt_protocol::StepMetrics) -> f64| -> Vec<(f64, f64)> {
            steps.iter().map(|(s, m)| (*s as f64, value(m))).collect()
        };
        match chart.as_str() {
            "loss" => {
                let raw = column(|m| m.loss);
                let smooth = smoothed(&raw);
                let raw = Series { label: "train loss".into(), points: thinned(raw), faint: true };
                (vec![raw, line("smoothed", smooth)], "nats per token", Scale::Linear)
            }
            "lr" => (vec![line("", column(|m| m.lr))], "learning rate", Scale::Linear),
            _ => (vec![line("", column(|m| m.tokens_per_second))], "tokens per second", Scale::Linear),
        }
    };
    let svg = render_off_runtime(Chart {
        title: format!("{} — {chart}", job.name),
        x_desc: "step".into(),
        y_desc: y_desc.into(),
        x_scale: Scale::Linear,
        y_scale,
        marks: matches!(chart.as_str(), "perplexity" | "bits_per_byte"),
        series,
        size: (640, 320),
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(svg_response(svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_are_thinned_to_at_most_max_points_keeping_both_ends() {
        let points: Vec<(f64, f64)> = (1..=100_000).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let kept = thinned(points.clone());
        assert!(kept.len() <= MAX_POINTS && kept.len() > MAX_POINTS / 2, "{}", kept.len());
        assert_eq!((kept[0], *kept.last().unwrap()), (points[0], points[99_999]));
        assert_eq!(thinned(points[..10].to_vec()), points[..10]);
    }

    #[test]
    fn smoothing_starts_at_the_first_value_and_follows_a_step() {
        let points: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, if i < 10 { 4.0 } else { 2.0 })).collect();
        let s = smoothed(&points);
        assert!((s[0].1 - 4.0).abs() < 1e-12 && (s[9].1 - 4.0).abs() < 1e-12);
        assert!(s[12].1 < 4.0 && s[12].1 > 2.5 && (s[49].1 - 2.0).abs() < 0.05);
    }

    #[test]
    fn every_tenth_step_smooths_over_the_same_span_as_every_step() {
        let points: Vec<(f64, f64)> = (0..1000).map(|i| (i as f64, if i < 500 { 4.0 } else { 2.0 })).collect();
        let every = smoothed(&points);
        let tenth = smoothed(&points.iter().copied().step_by(10).collect::<Vec<_>>());
        for (&(x, sampled), &(_, full)) in tenth.iter().zip(every.iter().step_by(10)) {
            match x {
                x if x < 500.0 => assert!((sampled - 4.0).abs() < 1e-12, "step {x}: {sampled}"),
                x if x >= 600.0 => assert!((sampled - full).abs() < 1e-3, "step {x}: {sampled} against {full}"),
                x => assert!((2.0..=4.0).contains(&sampled), "step {x}: {sampled}"),
            }
        }
    }
}
