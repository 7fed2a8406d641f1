//! `cpt-worker watch`: follow a job on a cpt-server from the terminal — live progress from its SSE
//! stream (reconnecting with `Last-Event-ID` if the server restarts), then learning versus
//! forgetting per eval set. Exits when the job ends or pauses, non-zero unless it succeeded.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cpt_protocol::Event;
use serde_json::Value;

use crate::client::ServerClient;
use crate::progress::Progress;

/// How long the server may stay unreachable before `watch` gives up.
const PATIENCE: Duration = Duration::from_secs(120);

struct Api {
    client: ServerClient,
}

impl Api {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.request(reqwest::Method::GET, path)
    }

    async fn job(&self, id: &str) -> Result<Value> {
        self.client.job(id).await
    }

    /// Reads the SSE stream after event `last_id` until it ends, handing each event to `on_event`.
    async fn follow(&self, id: &str, last_id: &mut i64, mut on_event: impl FnMut(&str, Value)) -> Result<()> {
        let path = format!("/v1/jobs/{id}/events/stream");
        let mut response = self.get(&path).header("Last-Event-ID", last_id.to_string()).send().await?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        let mut buffer = String::new();
        while let Some(chunk) = response.chunk().await? {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let frame: String = buffer.drain(..end + 2).collect();
                let (mut kind, mut data) = ("", None);
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("id: ") {
                        *last_id = value.parse().unwrap_or(*last_id);
                    } else if let Some(value) = line.strip_prefix("event: ") {
                        kind = value;
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(value).ok();
                    }
                }
                if let Some(data) = data {
                    on_event(kind, data);
                }
            }
        }
        Ok(())
    }
}

/// Nothing will happen to a job in `state` until someone acts: it ended, or a budget paused it.
fn is_at_rest(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled" | "paused")
}

/// Follows job `id` until it ends or pauses.
pub async fn watch(server: String, token: Option<String>, id: &str) -> Result<()> {
    let api = Api { client: ServerClient::new(&server, token) };
    let job = api.job(id).await.with_context(|| format!("reading job {id}"))?;
    let progress = Progress::new(job["progress"]["total_steps"].as_u64().unwrap_or(0));
    progress.say(format!("job {id} ({}): {}", job["name"].as_str().unwrap_or(""), job["state"].as_str().unwrap_or("")));
    // Per eval set: (first step, first (perplexity, bits/byte), last step, last (perplexity, bits/byte)).
    type Point = (f64, f64);
    let mut evals: BTreeMap<String, (u64, Point, u64, Point)> = BTreeMap::new();
    let mut last_id = 0;
    let mut unreachable_since = None;
    let job = loop {
        let followed = api
            .follow(id, &mut last_id, |kind, data| match serde_json::from_value::<Event>(data) {
                Ok(event) => {
                    if let Event::Eval { step, set, perplexity, bits_per_byte, .. } = &event {
                        let point = (*perplexity, *bits_per_byte);
                        let entry = evals.entry(set.clone()).or_insert((*step, point, *step, point));
                        (entry.2, entry.3) = (*step, point);
                    }
                    progress.show(&event);
                }
                Err(error) => progress.say(format!("an unreadable {kind} event: {error}")),
            })
            .await;
        // The stream ends with the job, or broke: ask the job itself.
        match (followed, api.job(id).await) {
            (_, Ok(job)) if is_at_rest(job["state"].as_str().unwrap_or("")) => break job,
            (Ok(()), Ok(_)) => unreachable_since = None,
            (Err(error), _) | (_, Err(error)) => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > PATIENCE {
                    return Err(error.context(format!("the server has been unreachable for {PATIENCE:?}")));
                }
                progress.say(format!("server unreachable ({error:#}); retrying"));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    progress.finish();
    for (set, (first_step, (first, first_bpb), last_step, (last, last_bpb))) in &evals {
        let change = 100.0 * (last / first - 1.0);
        let bits = if first_bpb.is_finite() && last_bpb.is_finite() {
            format!("   bits/byte {first_bpb:.4} → {last_bpb:.4}")
        } else {
            String::new()
        };
        println!(
            "{set:<10} perplexity {first:9.2} (step {first_step}) → {last:9.2} (step {last_step})  {change:+.1}%{bits}"
        );
    }
    let state = job["state"].as_str().unwrap_or_default();
    println!("job {id} {state} at step {}", job["progress"]["step"]);
    match state {
        "succeeded" => Ok(()),
        "paused" => bail!("job {id} is paused by a forgetting budget; POST /v1/jobs/{id}/resume continues it"),
        _ => bail!("job {id} ended {state}: {}", job["error"].as_str().unwrap_or("no error recorded")),
    }
}
