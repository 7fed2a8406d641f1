//! Local workers: the embedded default runs its own `cpt-worker run` processes and restarts any
//! that exits, with exponential backoff (reset after a minute of healthy running). On shutdown they
//! get SIGTERM: a training job checkpoints, delivers its events and goes back to the queue.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;

/// What a local worker needs to reach this server.
#[derive(Clone)]
pub struct LocalWorkers {
    pub count: usize,
    pub binary: PathBuf,
    pub server_url: String,
    pub data_dir: PathBuf,
    pub worker_token: Option<String>,
}

/// The `cpt-worker` next to the running `cpt-server`, where both are built and installed.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("cpt-worker")))
        .unwrap_or_else(|| PathBuf::from("cpt-worker"))
}

/// How long a local worker may take to checkpoint and exit after SIGTERM before it is killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Keeps `count` workers running until `shutdown` turns true, then drains them.
pub async fn supervise(workers: LocalWorkers, shutdown: watch::Receiver<bool>) {
    let tasks: Vec<_> =
        (0..workers.count).map(|i| tokio::spawn(keep_running(workers.clone(), i, shutdown.clone()))).collect();
    for task in tasks {
        let _ = task.await;
    }
}

async fn keep_running(workers: LocalWorkers, index: usize, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    while !*shutdown.borrow() {
        let mut command = Command::new(&workers.binary);
        command
            .args(["run", "--server", &workers.server_url, "--name", &format!("local-{index}")])
            .arg("--data-dir")
            .arg(&workers.data_dir)
            // Its own process group: a Ctrl-C in the server's terminal reaches only the server,
            // which then drains the worker with one SIGTERM (a second signal would skip the checkpoint).
            .process_group(0)
            .kill_on_drop(true);
        if let Some(token) = &workers.worker_token {
            command.env("CPT_WORKER_TOKEN", token);
        }
        let started = tokio::time::Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(%error, binary = %workers.binary.display(), "cannot start a local worker");
                return;
            }
        };
        tokio::select! {
            status = child.wait() => {
                tracing::warn!(worker = index, ?status, "local worker exited; restarting");
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            _ = shutdown.changed() => {
                if let Some(pid) = child.id() {
                    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
                }
                if tokio::time::timeout(DRAIN_TIMEOUT, child.wait()).await.is_err() {
                    tracing::warn!(worker = index, "local worker did not drain in time; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}
