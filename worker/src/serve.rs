//! `cpt-worker run`: lease jobs from a cpt-server and run them, streaming events back.
//!
//! Training runs on a dedicated thread (it is plain blocking code); the async side heartbeats (and
//! turns a cancel request into the training's stop flag) and posts events in ordered batches from
//! a bounded on-disk spool (`<run-dir>/spool/`), retrying with backoff until the server has them,
//! so a server outage loses nothing.
//!
//! SIGTERM (or Ctrl-C) drains: the running job checkpoints at its next step boundary, its events are
//! delivered, the job is released to the queue for another worker, and the process exits. A second
//! signal exits at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use cpt_protocol::JobSpec;
use cpt_train::{train, RunOptions, StopFlag};
use serde_json::{json, Value};

use crate::spool::Spool;

/// How to reach the server and where to keep run directories.
#[derive(Clone)]
pub struct WorkerConfig {
    pub server: String,
    pub token: Option<String>,
    pub name: String,
    pub data_dir: PathBuf,
    /// The bound on events kept on disk while the server is unreachable.
    pub spool_max_bytes: u64,
    /// The device this worker trains on.
    pub device: Device,
}

struct Client {
    http: reqwest::Client,
    config: WorkerConfig,
    /// Set by the first shutdown signal.
    draining: Arc<AtomicBool>,
    /// The stop flag of the job being trained, for the signal handler.
    current: Arc<Mutex<Option<StopFlag>>>,
}

/// First signal: drain (stop the running job at a checkpoint); second: exit now.
async fn handle_signals(draining: Arc<AtomicBool>, current: Arc<Mutex<Option<StopFlag>>>) {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    let mut signals = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signals += 1;
        if signals > 1 {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
        tracing::info!("shutting down: checkpointing the running job, then exiting");
        draining.store(true, Ordering::SeqCst);
        if let Some(stop) = current.lock().expect("stop flag lock").as_ref() {
            stop.stop();
        }
    }
}

impl Client {
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.config.server.trim_end_matches('/')));
        match &self.config.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// POSTs `body` until the server answers, backing off up to 30 s between tries.
    async fn post_retrying(&self, path: &str, body: &Value) -> reqwest::Response {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.post(path).json(body).send().await {
                Ok(response) if !response.status().is_server_error() => return response,
                Ok(response) => tracing::warn!(status = %response.status(), path, "server error; retrying"),
                Err(error) => tracing::warn!(%error, path, "server unreachable; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Registers, then leases and runs jobs until the process is stopped.
pub async fn run(config: WorkerConfig) -> Result<()> {
    let client = Client {
        http: reqwest::Client::new(),
        config,
        draining: Arc::new(AtomicBool::new(false)),
        current: Arc::new(Mutex::new(None)),
    };
    tokio::spawn(handle_signals(client.draining.clone(), client.current.clone()));
    let registration = client
        .post_retrying(
            "/v1/workers",
            &json!({"name": client.config.name, "device": cpt_train::device::name(&client.config.device)}),
        )
        .await;
    if !registration.status().is_success() {
        bail!("registering with {}: {}", client.config.server, registration.text().await.unwrap_or_default());
    }
    let registration: Value = registration.json().await?;
    let worker = registration["worker_id"].as_str().context("no worker_id in the registration")?.to_string();
    let heartbeat = Duration::from_secs(registration["heartbeat_interval_seconds"].as_u64().unwrap_or(10).max(1));
    tracing::info!(worker, server = client.config.server, "registered");
    while !client.draining.load(Ordering::SeqCst) {
        let (path, body) = (format!("/v1/workers/{worker}/lease?wait_seconds=30"), json!({}));
        let lease = client.post_retrying(&path, &body);
        let response = tokio::select! {
            response = lease => response,
            // Draining while idle: nothing to checkpoint.
            () = wait_for(&client.draining) => return Ok(()),
        };
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            continue;
        }
        if !response.status().is_success() {
            bail!("leasing: {}", response.text().await.unwrap_or_default());
        }
        let job: Value = response.json().await?;
        if job["kind"] == "prepare" {
            run_prepare(&client, &worker, job).await;
        } else {
            run_job(&client, &worker, job, heartbeat).await;
        }
    }
    Ok(())
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one leased job to its end and reports it.
async fn run_job(client: &Client, worker: &str, job: Value, heartbeat: Duration) {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let attempt = job["attempt"].as_i64().unwrap_or(1);
    tracing::info!(job = id, attempt, "running");
    let spec: Result<JobSpec, _> = serde_json::from_value(job["spec"].clone());
    let run_dir = client.config.data_dir.join("runs").join(&id);
    let spool =
        match Spool::create(&run_dir.join(format!("spool/attempt-{attempt}.jsonl")), client.config.spool_max_bytes) {
            Ok(spool) => spool,
            Err(error) => return finish(client, worker, &id, "failed", Some(format!("{error:#}"))).await,
        };
    let stop = StopFlag::default();
    *client.current.lock().expect("stop flag lock") = Some(stop.clone());
    if client.draining.load(Ordering::SeqCst) {
        stop.stop();
    }
    // The training callback cannot return an error: a spool that cannot be written stops the job.
    let spool_error = Arc::new(Mutex::new(None::<String>));
    let training = {
        let (spool, stop, spool_error) = (spool.clone(), stop.clone(), spool_error.clone());
        let device = client.config.device.clone();
        std::thread::spawn(move || {
            let run = || {
                let spec = spec.map_err(|error| format!("the job's spec does not parse: {error}"))?;
                // A checkpoint in the run directory means an earlier attempt: resume from it exactly.
                let options = RunOptions { resume: true, stop_after_steps: None, device };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    train(&spec, &run_dir, &options, &stop, |event| {
                        let value = serde_json::to_value(&event).unwrap_or(Value::Null);
                        if let Err(error) = spool.append(value, now_ms()) {
                            spool_error.lock().expect("spool error lock").get_or_insert(format!("{error:#}"));
                            stop.stop();
                        }
                    })
                }));
                match outcome {
                    Ok(result) => result.map_err(|e| format!("{e:#}")),
                    Err(panic) => Err(format!("training panicked: {}", panic_message(&panic))),
                }
            };
            let result = run();
            // On every path, or the delivery loop would wait for events forever.
            spool.close();
            result
        })
    };

    let mut cancelled = false;
    let mut lease_lost = false;
    let mut beat = tokio::time::interval(heartbeat);
    loop {
        tokio::select! {
            batch = spool.next_batch() => {
                let batch = match batch {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(error) => {
                        spool_error.lock().expect("spool error lock").get_or_insert(format!("{error:#}"));
                        spool.abandon();
                        stop.stop();
                        break;
                    }
                };
                let body = json!({"job_id": id, "attempt": attempt, "events": batch.events});
                let response = client.post_retrying(&format!("/v1/workers/{worker}/events"), &body).await;
                if response.status() == reqwest::StatusCode::CONFLICT {
                    lease_lost = true;
                    spool.abandon();
                    stop.stop();
                    break;
                }
                if !response.status().is_success() {
                    // A batch the server will never take must not stall the ones after it.
                    let status = response.status();
                    tracing::error!(job = id, %status, "events refused: {}", response.text().await.unwrap_or_default());
                }
                if let Err(error) = spool.acknowledge(&batch) {
                    spool_error.lock().expect("spool error lock").get_or_insert(format!("{error:#}"));
                    spool.abandon();
                    stop.stop();
                    break;
                }
            }
            _ = beat.tick() => {
                let response = client.post_retrying(&format!("/v1/workers/{worker}/heartbeat"), &json!({"job_id": id})).await;
                if response.status() == reqwest::StatusCode::CONFLICT {
                    lease_lost = true;
                    spool.abandon();
                    stop.stop();
                    break;
                } else if let Ok(answer) = response.json::<Value>().await {
                    if answer["cancel"] == true && !cancelled {
                        tracing::info!(job = id, "cancel requested: checkpointing");
                        cancelled = true;
                        stop.stop();
                    }
                }
            }
        }
    }
    // Training returned and every event it wrote has been delivered (or the job is lost).
    let mut result = training.join().unwrap_or_else(|_| Err("the training thread died".into()));
    *client.current.lock().expect("stop flag lock") = None;
    if lease_lost {
        tracing::warn!(job = id, "the lease was lost; the job continues elsewhere");
        return;
    }
    if let Some(error) = spool_error.lock().expect("spool error lock").take() {
        result = Err(format!("the event spool failed: {error}"));
    } else {
        spool.remove();
    }
    let (outcome, error) = match result {
        Ok(_) if cancelled => ("cancelled", None),
        // Stopped for shutdown at a checkpoint: release it so another worker resumes at once.
        Ok(outcome) if outcome.stopped => ("queued", None),
        Ok(_) => ("succeeded", None),
        Err(message) => ("failed", Some(message)),
    };
    finish(client, worker, &id, outcome, error).await;
}

/// Reports a job's outcome.
async fn finish(client: &Client, worker: &str, id: &str, outcome: &str, error: Option<String>) {
    let body = json!({"job_id": id, "outcome": outcome, "error": error});
    let response = client.post_retrying(&format!("/v1/workers/{worker}/finish"), &body).await;
    tracing::info!(job = id, outcome, status = %response.status(), "finished");
}

/// Runs a dataset preparation job: `<data-dir>/datasets/<job-id>`, reported as a `prepared` event
/// carrying the manifest (with its cleaning report).
async fn run_prepare(client: &Client, worker: &str, job: Value) {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let attempt = job["attempt"].as_i64().unwrap_or(1);
    let out = client.config.data_dir.join("datasets").join(&id);
    let work = {
        let out = out.clone();
        let spec = job["spec"].clone();
        tokio::task::spawn_blocking(move || -> Result<Value> {
            let spec: cpt_protocol::spec::PrepareSpec = serde_json::from_value(spec).context("the job's spec")?;
            let config = if spec.config.is_null() { json!({}) } else { spec.config };
            let config: cpt_data::prepare::PrepareConfig = serde_json::from_value(config).context("`config`")?;
            // An earlier attempt may have finished the dataset without reporting it.
            if !out.join("manifest.json").exists() {
                let inputs: Vec<PathBuf> = spec.inputs.iter().map(PathBuf::from).collect();
                cpt_data::prepare::prepare(std::path::Path::new(&spec.tokenizer), &inputs, &out, &config, |_| {})?;
            }
            Ok(serde_json::to_value(cpt_data::reader::read_manifest(&out)?)?)
        })
    };
    let (outcome, error) = match work.await.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(manifest) => {
            let event = json!({"seq": 0, "kind": "prepared", "time": now_ms(), "path": out.display().to_string(), "manifest": manifest});
            let body = json!({"job_id": id, "attempt": attempt, "events": [event]});
            client.post_retrying(&format!("/v1/workers/{worker}/events"), &body).await;
            ("succeeded", None)
        }
        Err(error) => ("failed", Some(format!("{error:#}"))),
    };
    finish(client, worker, &id, outcome, error).await;
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
