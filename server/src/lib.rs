//! cpt-server: the REST control plane of cpt. Jobs live in SQLite; workers lease them over HTTP.
//!
//! [`launch`] takes a bound listener and a shutdown future, so tests run real servers on port 0.

pub mod app;
pub mod config;
pub mod db;
pub mod error;
pub mod jobs;

use std::future::Future;
use std::sync::Arc;

pub use config::Config;

/// Serves the API on `listener` until `shutdown` completes, then drains in-flight requests.
pub async fn launch(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = config.finish()?;
    let pool = db::open(&config.data_dir).await?;
    let state = app::AppState { pool: pool.clone(), config: Arc::new(config) };
    tracing::info!(address = %listener.local_addr()?, "cpt-server listening");
    axum::serve(listener, app::router(state)).with_graceful_shutdown(shutdown).await?;
    pool.close().await;
    Ok(())
}
