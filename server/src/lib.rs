//! cpt-server: the REST control plane of cpt. Jobs live in SQLite; workers lease them over HTTP.
//!
//! [`launch`] takes a bound listener and a shutdown future, so tests run real servers on port 0.

pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod jobs;
pub mod local_workers;
pub mod metrics;
pub mod pages;
pub mod plots;
pub mod products;
pub mod router;
pub mod sweeps;
pub mod workers;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
use sqlx::SqlitePool;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: SqlitePool,
    pub config: Arc<Config>,
    /// Woken whenever a job becomes queued, for long-polling leases.
    pub queue: Arc<tokio::sync::Notify>,
    /// Every newly stored event, for SSE subscribers.
    pub events: tokio::sync::broadcast::Sender<events::StoredEvent>,
    pub metrics: Arc<metrics::Metrics>,
    /// Turns true when the server is about to stop: SSE streams end and long-polls return, so
    /// the graceful shutdown is not held open by clients that would otherwise wait for a job.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl AppState {
    /// A lease's length in milliseconds.
    pub fn lease_ms(&self) -> i64 {
        self.config.lease_ttl_seconds as i64 * 1000
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Checks for expired leases several times per lease period. A lease never expires because the
/// server itself stood still (frozen, swapping, a disk that took seconds per write): when a tick
/// comes much later than planned, every lease first gets a full period for its worker to check in.
async fn expire_leases_forever(state: AppState) {
    let period = Duration::from_millis((state.config.lease_ttl_seconds * 1000 / 4).max(100));
    let stalled_after = period + Duration::from_millis(state.config.lease_ttl_seconds * 1000 / 2);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = std::time::Instant::now();
    loop {
        ticks.tick().await;
        let stalled = last.elapsed() > stalled_after;
        if stalled {
            tracing::warn!(seconds = last.elapsed().as_secs_f64(), "the server stalled; extending every lease");
            if let Err(error) = jobs::store::extend_leases(&state.pool, now_ms() + state.lease_ms()).await {
                tracing::error!(%error, "extending leases");
            }
        }
        match jobs::store::expire_leases(&state.pool).await {
            Ok(expired) => {
                if expired.requeued > 0 {
                    state.queue.notify_waiters();
                }
                for id in expired.ended {
                    metrics::forget_later(&state, id);
                }
            }
            Err(error) => tracing::error!(%error, "expiring leases"),
        }
        last = std::time::Instant::now();
    }
}

/// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests.
pub async fn launch(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = config.finish()?;
    let pool = db::open(&config.data_dir).await?;
    // Workers kept running while the server was down: give every lease a full period to check in
    // before expiry can requeue a job that is still training.
    jobs::store::extend_leases(&pool, now_ms() + config.lease_ttl_seconds as i64 * 1000).await?;
    let (close, closing) = tokio::sync::watch::channel(false);
    let state = AppState {
        pool: pool.clone(),
        config: Arc::new(config),
        queue: Arc::new(tokio::sync::Notify::new()),
        events: tokio::sync::broadcast::channel(1024).0,
        metrics: Arc::new(metrics::Metrics::new()),
        closing,
    };
    let expiry = tokio::spawn(expire_leases_forever(state.clone()));
    let address = listener.local_addr()?;
    let (stop_workers, workers_stopped) = tokio::sync::watch::channel(false);
    let local = local_workers::LocalWorkers {
        count: state.config.local_workers,
        binary: state.config.worker_binary.clone().unwrap_or_else(local_workers::default_binary),
        server_url: format!("http://{address}"),
        data_dir: state.config.data_dir.clone(),
        worker_token: state.config.worker_token.clone(),
    };
    let supervisor = tokio::spawn(local_workers::supervise(local, workers_stopped));
    tracing::info!(%address, "cpt-server listening");
    // Local workers drain first, while the API still serves them: their jobs checkpoint, deliver
    // their events and return to the queue. Remote workers keep training and retry until it is back.
    let queue = state.queue.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop_workers.send(true);
        let _ = supervisor.await;
        let _ = close.send(true);
        queue.notify_waiters();
    };
    axum::serve(listener, router::router(state)).with_graceful_shutdown(shutdown).await?;
    expiry.abort();
    pool.close().await;
    Ok(())
}
