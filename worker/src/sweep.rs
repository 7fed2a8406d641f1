//! `cpt-worker sweep`: a sweep's comparison table in the terminal — per job, its grid point, state,
//! progress, and per eval set the final perplexity, its change from step 0, and the best one — and
//! optionally its learning-versus-forgetting plot saved as SVG.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::client::ServerClient;

/// Prints sweep `id`'s table; with `plot`, writes its plot there.
pub async fn show(server: String, token: Option<String>, id: &str, plot: Option<&Path>) -> Result<()> {
    let client = ServerClient::new(&server, token);
    let sweep: Value = client.get(&format!("/v1/sweeps/{id}")).await.context("reading the sweep")?.json().await?;
    print!("{}", table(&sweep));
    if let Some(path) = plot {
        let svg = client.get(&format!("/v1/sweeps/{id}/plot.svg")).await?.text().await?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// A grid point as `path=value` pairs (a list or object value by its JSON, shortened).
fn point(point: &Value) -> String {
    let Some(values) = point.as_object() else { return String::new() };
    let shown: Vec<String> = values
        .iter()
        .map(|(path, value)| {
            let mut text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if text.chars().count() > 40 {
                text = text.chars().take(39).collect::<String>() + "…";
            }
            format!("{path}={text}")
        })
        .collect();
    shown.join(" ")
}

fn duration(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s >= 3600.0 => format!("{}h{:02}m", (s / 3600.0) as u64, (s % 3600.0 / 60.0) as u64),
        Some(s) => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        None => "-".into(),
    }
}

/// The table, one line per job; per eval set "final (change) best@step".
pub fn table(sweep: &Value) -> String {
    let jobs = sweep["jobs"].as_array().cloned().unwrap_or_default();
    let mut sets: Vec<String> =
        jobs.iter().filter_map(|j| j["eval"].as_object()).flat_map(|e| e.keys().cloned()).collect();
    sets.sort();
    sets.dedup();
    let mut out = String::new();
    let counts: Vec<String> = sweep["counts"]
        .as_object()
        .map(|c| c.iter().filter(|(_, n)| n.as_u64() > Some(0)).map(|(s, n)| format!("{n} {s}")).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "sweep {} ({}): {} — {} jobs: {}",
        sweep["id"].as_str().unwrap_or(""),
        sweep["name"].as_str().unwrap_or(""),
        sweep["state"].as_str().unwrap_or(""),
        jobs.len(),
        counts.join(", ")
    );
    let mut header = format!("{:<36} {:<10} {:>9} {:>9} {:>7}", "point", "state", "step", "tokens", "wall");
    for set in &sets {
        let _ = write!(header, "  {:<28}", format!("{set} ppl: final (Δ) best@step"));
    }
    let _ = writeln!(out, "{}", header.trim_end());
    for job in &jobs {
        let steps = match job["total_steps"].as_i64() {
            Some(total) => format!("{}/{total}", job["step"]),
            None => job["step"].to_string(),
        };
        let mut line = format!(
            "{:<36} {:<10} {:>9} {:>9} {:>7}",
            point(&job["point"]),
            job["state"].as_str().unwrap_or(""),
            steps,
            job["tokens_total"].to_string(),
            duration(job["wall_seconds"].as_f64())
        );
        for set in &sets {
            let e = &job["eval"][set];
            let cell = match (e["final"].as_f64(), e["change"].as_f64(), e["best"].as_f64()) {
                (Some(last), Some(change), Some(best)) => {
                    format!("{last:.2} ({:+.1}%) {best:.2}@{}", 100.0 * change, e["best_step"])
                }
                _ => "-".into(),
            };
            let _ = write!(line, "  {cell:<28}");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_a_line_per_job_and_a_column_per_set() {
        let sweep = json!({"id": "s", "name": "lr", "state": "running", "counts": {"running": 1, "queued": 1, "failed": 0},
            "jobs": [
                {"point": {"lr": 0.001}, "state": "running", "step": 3, "total_steps": 10, "tokens_total": 96, "wall_seconds": 75.0,
                 "eval": {"domain": {"final": 20.0, "change": -0.5, "best": 19.5, "best_step": 2},
                          "general": {"final": 44.0, "change": 0.1, "best": 40.0, "best_step": 0}}},
                {"point": {"train_data": [{"dataset": "a-very-long-dataset-path/that/goes/on"}]}, "state": "queued",
                 "step": 0, "total_steps": 10, "tokens_total": 0, "wall_seconds": null, "eval": {}}]});
        let text = table(&sweep);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "sweep s (lr): running — 2 jobs: 1 queued, 1 running");
        assert!(lines[1].contains("domain ppl") && lines[1].contains("general ppl"));
        assert!(lines[2].contains("lr=0.001") && lines[2].contains("3/10") && lines[2].contains("1m15s"));
        assert!(lines[2].contains("20.00 (-50.0%) 19.50@2") && lines[2].contains("44.00 (+10.0%) 40.00@0"));
        assert!(lines[3].contains("train_data=[{\"dataset\"") && lines[3].contains('…') && lines[3].contains(" -"));
    }
}
