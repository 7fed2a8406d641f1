//! `cpt-worker run`: lease jobs from a cpt-server and run them, streaming events back.
//!
//! Training runs on a dedicated thread (it is plain blocking code); the async side heartbeats (and
//! turns a cancel request into the training's stop flag) and posts events in ordered batches from
//! a bounded on-disk spool (`<run-dir>/spool/`), retrying with backoff until the server has them,
//! so a server outage loses nothing. An attempt that lost its lease still delivers what it
//! recorded (the server keeps it as history), and spools left by a crashed worker are delivered
//! when the next one starts.
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
use cpt_protocol::vocabulary::VocabularySpec;
use cpt_protocol::worker::{EventBatch, Finish, Heartbeat, HeartbeatReply, Lease, Outcome, Registered, Registration};
use cpt_protocol::{Event, JobKind, JobSpec};
use cpt_train::{train, RunOptions, StopFlag};
use reqwest::StatusCode;

use crate::client::ServerClient;
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

/// A registered worker.
struct Worker {
    client: ServerClient,
    config: WorkerConfig,
    id: String,
    heartbeat: Duration,
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

/// Registers, delivers any spool a crashed worker left, then leases and runs jobs until stopped.
pub async fn run(config: WorkerConfig) -> Result<()> {
    let client = ServerClient::new(&config.server, config.token.clone());
    let draining = Arc::new(AtomicBool::new(false));
    let current = Arc::new(Mutex::new(None));
    tokio::spawn(handle_signals(draining.clone(), current.clone()));
    let registration = Registration {
        name: config.name.clone(),
        device: cpt_train::device::name(&config.device),
        memory_bytes: cpt_train::device::memory_bytes(&config.device),
    };
    let response = client.post_retrying("/v1/workers", &registration).await;
    if !response.status().is_success() {
        bail!("registering with {}: {}", client.base(), response.text().await.unwrap_or_default());
    }
    let registered: Registered = response.json().await.context("reading the registration")?;
    tracing::info!(worker = registered.worker_id, server = client.base(), "registered");
    crate::leftover::deliver_all(&client, &config.data_dir).await;
    let worker = Worker {
        client,
        config,
        id: registered.worker_id,
        heartbeat: Duration::from_secs(registered.heartbeat_interval_seconds.max(1)),
        draining,
        current,
    };
    while !worker.draining.load(Ordering::SeqCst) {
        let path = format!("/v1/workers/{}/lease?wait_seconds=30", worker.id);
        let lease = worker.client.post_retrying(&path, &());
        let response = tokio::select! {
            response = lease => response,
            // Draining while idle: nothing to checkpoint.
            () = wait_for(&worker.draining) => return Ok(()),
        };
        if response.status() == StatusCode::NO_CONTENT {
            continue;
        }
        if !response.status().is_success() {
            bail!("leasing: {}", response.text().await.unwrap_or_default());
        }
        let lease: Lease = response.json().await.context("reading a lease")?;
        tracing::info!(job = lease.id, attempt = lease.attempt, "running");
        match lease.kind {
            JobKind::Prepare => worker.run_prepare(lease).await,
            JobKind::Train => worker.run_training(lease).await,
            JobKind::ExtendVocab => worker.run_extend_vocab(lease).await,
        }
    }
    Ok(())
}

async fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the heartbeat said.
enum Beat {
    Alive,
    CancelRequested,
    /// The attempt is no longer ours (the lease expired and the job moved on).
    LeaseLost,
}

impl Worker {
    async fn beat(&self, lease: &Lease) -> Beat {
        let body = Heartbeat { job_id: lease.id.clone(), attempt: lease.attempt };
        let response = self.client.post_retrying(&format!("/v1/workers/{}/heartbeat", self.id), &body).await;
        if response.status() == StatusCode::CONFLICT || response.status() == StatusCode::NOT_FOUND {
            return Beat::LeaseLost;
        }
        match response.json::<HeartbeatReply>().await {
            Ok(HeartbeatReply { cancel: true }) => Beat::CancelRequested,
            _ => Beat::Alive,
        }
    }

    /// Reports how the attempt ended.
    async fn finish(&self, lease: &Lease, outcome: Outcome, error: Option<String>) {
        let body = Finish { job_id: lease.id.clone(), attempt: lease.attempt, outcome, error };
        let response = self.client.post_retrying(&format!("/v1/workers/{}/finish", self.id), &body).await;
        tracing::info!(job = lease.id, ?outcome, status = %response.status(), "finished");
    }

    /// Runs one leased training job to its end and reports it.
    async fn run_training(&self, lease: Lease) {
        let run_dir = self.config.data_dir.join("runs").join(&lease.id);
        let spool_path = run_dir.join(format!("spool/attempt-{}.jsonl", lease.attempt));
        let spool = match Spool::create(&spool_path, self.config.spool_max_bytes)
            .and_then(|spool| crate::leftover::record_sender(&spool_path, &self.id).map(|()| spool))
        {
            Ok(spool) => spool,
            Err(error) => return self.finish(&lease, Outcome::Failed, Some(format!("{error:#}"))).await,
        };
        let stop = StopFlag::default();
        *self.current.lock().expect("stop flag lock") = Some(stop.clone());
        if self.draining.load(Ordering::SeqCst) {
            stop.stop();
        }
        // The training callback cannot return an error: a spool that cannot be written stops the job.
        let spool_error = Arc::new(Mutex::new(None::<String>));
        let training = {
            let (spool, stop, spool_error) = (spool.clone(), stop.clone(), spool_error.clone());
            let (device, spec) = (self.config.device.clone(), lease.spec.clone());
            std::thread::spawn(move || {
                let run = || {
                    let spec: JobSpec =
                        serde_json::from_value(spec).map_err(|e| format!("the job's spec does not parse: {e}"))?;
                    // A checkpoint in the run directory means an earlier attempt: resume from it exactly.
                    let options = RunOptions { resume: true, stop_after_steps: None, device };
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        train(&spec, &run_dir, &options, &stop, |event| {
                            if let Err(error) = spool.append(event, now_ms()) {
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
        let mut beat = tokio::time::interval(self.heartbeat);
        let fail_spool = |error: anyhow::Error| {
            spool_error.lock().expect("spool error lock").get_or_insert(format!("{error:#}"));
            spool.abandon();
            stop.stop();
        };
        loop {
            tokio::select! {
                batch = spool.next_batch() => {
                    let batch = match batch {
                        Ok(Some(batch)) => batch,
                        Ok(None) => break,
                        Err(error) => { fail_spool(error); break; }
                    };
                    let body = EventBatch { job_id: lease.id.clone(), attempt: lease.attempt, events: batch.events.clone() };
                    let response = self.client.post_retrying(&format!("/v1/workers/{}/events", self.id), &body).await;
                    if response.status() == StatusCode::CONFLICT {
                        // Nothing of this attempt will be taken any more.
                        lease_lost = true;
                        spool.abandon();
                        stop.stop();
                        break;
                    }
                    if !response.status().is_success() {
                        // A batch the server will never take must not stall the ones after it.
                        let status = response.status();
                        tracing::error!(job = lease.id, %status, "events refused: {}", response.text().await.unwrap_or_default());
                    }
                    if let Err(error) = spool.acknowledge(&batch) {
                        fail_spool(error);
                        break;
                    }
                }
                // While the lease holds; after losing it the rest of the spool is still delivered.
                _ = beat.tick(), if !lease_lost => match self.beat(&lease).await {
                    Beat::Alive => {}
                    Beat::CancelRequested => if !cancelled {
                        tracing::info!(job = lease.id, "cancel requested: checkpointing");
                        cancelled = true;
                        stop.stop();
                    },
                    Beat::LeaseLost => {
                        tracing::warn!(job = lease.id, "the lease was lost; delivering what this attempt recorded");
                        lease_lost = true;
                        stop.stop();
                    }
                },
            }
        }
        // Training returned and every event it wrote has been delivered (or the server refuses them).
        let mut result = training.join().unwrap_or_else(|_| Err("the training thread died".into()));
        *self.current.lock().expect("stop flag lock") = None;
        if let Some(error) = spool_error.lock().expect("spool error lock").take() {
            result = Err(format!("the event spool failed: {error}"));
        } else {
            crate::leftover::remove(&spool_path);
        }
        if lease_lost {
            tracing::warn!(job = lease.id, "the job continues elsewhere");
            return;
        }
        let (outcome, error) = match result {
            Ok(_) if cancelled => (Outcome::Cancelled, None),
            // Stopped for shutdown at a checkpoint: release it so another worker resumes at once.
            Ok(outcome) if outcome.paused => (Outcome::Paused, None),
            Ok(outcome) if outcome.stopped => (Outcome::Released, None),
            Ok(_) => (Outcome::Succeeded, None),
            Err(message) => (Outcome::Failed, Some(message)),
        };
        self.finish(&lease, outcome, error).await;
    }

    /// Runs a dataset preparation job (`<data-dir>/datasets/<job-id>`) and reports it as a
    /// `prepared` event carrying the manifest (with its cleaning report).
    async fn run_prepare(&self, lease: Lease) {
        let out = self.config.data_dir.join("datasets").join(&lease.id);
        self.run_product(lease, out, |out, spec| {
            let spec: cpt_protocol::prepare::PrepareSpec = serde_json::from_value(spec).context("the job's spec")?;
            let config = if spec.config.is_null() { serde_json::json!({}) } else { spec.config };
            let config: cpt_data::prepare::PrepareConfig = serde_json::from_value(config).context("`config`")?;
            // An earlier attempt may have finished the dataset without reporting it.
            if !out.join("manifest.json").exists() {
                let inputs: Vec<PathBuf> = spec.inputs.iter().map(PathBuf::from).collect();
                cpt_data::prepare::prepare(std::path::Path::new(&spec.tokenizer), &inputs, out, &config, |_| {})?;
            }
            let manifest = serde_json::to_value(cpt_data::reader::read_manifest(out)?)?;
            Ok(Event::Prepared { path: out.display().to_string(), manifest })
        })
        .await
    }

    /// Runs a vocabulary extension job (`<data-dir>/vocabularies/<job-id>`, a model directory) and
    /// reports it as a `vocabulary_extended` event carrying the extension report.
    async fn run_extend_vocab(&self, lease: Lease) {
        let out = self.config.data_dir.join("vocabularies").join(&lease.id);
        self.run_product(lease, out, |out, spec| {
            let spec: VocabularySpec = serde_json::from_value(spec).context("the job's spec")?;
            let report_file = out.join(cpt_train::vocab::REPORT_FILE);
            // The model directory appears whole (staged, then renamed) or not at all.
            if !report_file.exists() {
                let paths = |list: &[String]| list.iter().map(PathBuf::from).collect::<Vec<_>>();
                let (corpus, texts) = (paths(&spec.corpus), paths(&spec.report_texts));
                let base = std::path::Path::new(&spec.base_model);
                cpt_train::vocab::extend(base, &corpus, spec.new_tokens, spec.min_frequency, &texts, out)?;
            }
            let text =
                std::fs::read_to_string(&report_file).with_context(|| format!("reading {}", report_file.display()))?;
            let report = serde_json::from_str(&text).with_context(|| format!("reading {}", report_file.display()))?;
            Ok(Event::VocabularyExtended { path: out.display().to_string(), report })
        })
        .await
    }

    /// Runs `make` (blocking) on the job's spec to produce `out`, heartbeating meanwhile, and
    /// reports the event it returns; an attempt that loses its lease gives up without a word.
    async fn run_product(
        &self,
        lease: Lease,
        out: PathBuf,
        make: impl FnOnce(&std::path::Path, serde_json::Value) -> Result<Event> + Send + 'static,
    ) {
        let spec = lease.spec.clone();
        let mut work = tokio::task::spawn_blocking(move || make(&out, spec));
        let mut beat = tokio::time::interval(self.heartbeat);
        let result = loop {
            tokio::select! {
                result = &mut work => break result.map_err(anyhow::Error::from).and_then(|r| r),
                _ = beat.tick() => if let Beat::LeaseLost = self.beat(&lease).await {
                    // Another attempt makes it now; this one's result would be refused.
                    tracing::warn!(job = lease.id, "the lease was lost; abandoning the job");
                    return;
                },
            }
        };
        let (outcome, error) = match result {
            Ok(event) => {
                let envelope = cpt_protocol::worker::Envelope { seq: 0, time: now_ms(), event };
                let body = EventBatch { job_id: lease.id.clone(), attempt: lease.attempt, events: vec![envelope] };
                self.client.post_retrying(&format!("/v1/workers/{}/events", self.id), &body).await;
                (Outcome::Succeeded, None)
            }
            Err(error) => (Outcome::Failed, Some(format!("{error:#}"))),
        };
        self.finish(&lease, outcome, error).await;
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
