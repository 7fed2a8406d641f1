//! cpt-server: the REST control plane of cpt. Jobs live in SQLite; workers lease them over HTTP.
//!
//! [`launch`] takes a bound listener and a shutdown future, so tests run real servers on port 0.

pub mod app;
pub mod config;
pub mod datasets;
pub mod db;
pub mod error;
pub mod events;
pub mod jobs;
pub mod local_workers;
pub mod metrics;
pub mod series;
pub mod workers;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;

/// Checks for expired leases several times per lease period.
async fn expire_leases_forever(state: app::AppState) {
    let period = std::time::Duration::from_millis((state.config.lease_ttl_seconds * 1000 / 4).max(100));
    let mut ticks = tokio::time::interval(period);
    loop {
        ticks.tick().await;
        if let Err(error) = workers::expire_leases(&state).await {
            tracing::error!(%error, "expiring leases");
        }
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
    let grace = jobs::store::now_ms() + config.lease_ttl_seconds as i64 * 1000;
    sqlx::query("UPDATE jobs SET lease_expires_at = MAX(lease_expires_at, ?) WHERE state IN ('running', 'cancelling')")
        .bind(grace)
        .execute(&pool)
        .await?;
    let (close, closing) = tokio::sync::watch::channel(false);
    let state = app::AppState {
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
    axum::serve(listener, app::router(state)).with_graceful_shutdown(shutdown).await?;
    expiry.abort();
    pool.close().await;
    Ok(())
}
