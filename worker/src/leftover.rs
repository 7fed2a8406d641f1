//! Spools that a crashed worker left behind: their events are delivered (as the history of the
//! attempt that wrote them) by the next worker that starts on the same data directory. A spool
//! still locked by a running worker is left alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cpt_protocol::worker::{Envelope, EventBatch};

use crate::client::ServerClient;
use crate::spool::{lock, parse_lines};

/// Events per delivered batch: well under the server's batch and body limits.
const BATCH_EVENTS: usize = 200;

fn sender_path(spool: &Path) -> PathBuf {
    spool.with_extension("worker")
}

/// Records which worker writes the spool at `spool`: its events are accepted only from that worker.
pub fn record_sender(spool: &Path, worker_id: &str) -> Result<()> {
    std::fs::write(sender_path(spool), worker_id).with_context(|| format!("writing {}", sender_path(spool).display()))
}

/// Removes a delivered spool.
pub fn remove(spool: &Path) {
    let _ = std::fs::remove_file(spool);
    let _ = std::fs::remove_file(sender_path(spool));
}

/// Every `runs/<job>/spool/attempt-<n>.jsonl` under `data_dir`, with its job and attempt.
fn spools(data_dir: &Path) -> Vec<(PathBuf, String, u64)> {
    let mut found = Vec::new();
    let Ok(runs) = std::fs::read_dir(data_dir.join("runs")) else { return found };
    for run in runs.flatten() {
        let job = run.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(run.path().join("spool")) else { continue };
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let attempt = name.strip_prefix("attempt-").and_then(|n| n.strip_suffix(".jsonl"));
            if let Some(attempt) = attempt.and_then(|n| n.parse().ok()) {
                found.push((file.path(), job.clone(), attempt));
            }
        }
    }
    found.sort();
    found
}

/// The events of a leftover spool and the worker that wrote them; `None` while a worker still
/// holds it.
fn read(path: &Path) -> Result<Option<(String, Vec<Envelope>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if lock(&file).is_err() {
        return Ok(None);
    }
    let worker = std::fs::read_to_string(sender_path(path))
        .with_context(|| format!("reading {}", sender_path(path).display()))?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    // A crash may have cut the last line short: it was never acknowledged, and never will be.
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |last| last + 1);
    Ok(Some((worker.trim().to_string(), parse_lines(&bytes[..complete], path)?)))
}

/// Delivers every leftover spool under `data_dir`, then removes it (the server stores each event
/// once, so events it already had cost nothing).
pub async fn deliver_all(client: &ServerClient, data_dir: &Path) {
    for (path, job_id, attempt) in spools(data_dir) {
        let (worker, events) = match read(&path) {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(error) => {
                tracing::error!(spool = %path.display(), "a leftover spool cannot be delivered: {error:#}");
                continue;
            }
        };
        tracing::info!(job = job_id, attempt, events = events.len(), "delivering a leftover event spool");
        for chunk in events.chunks(BATCH_EVENTS) {
            let batch = EventBatch { job_id: job_id.clone(), attempt, events: chunk.to_vec() };
            let response = client.post_retrying(&format!("/v1/workers/{worker}/events"), &batch).await;
            if !response.status().is_success() {
                let status = response.status();
                tracing::warn!(job = job_id, attempt, %status, "leftover events refused: {}", response.text().await.unwrap_or_default());
                break;
            }
        }
        remove(&path);
    }
}
