//! `cpt-server`: parse the configuration, bind, serve until Ctrl-C or SIGTERM.

use clap::Parser;

/// A configuration or start-up mistake ends the process with one line naming it, never a backtrace
/// (returning the error from `main` printed one whenever `RUST_BACKTRACE` was set).
#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CPT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let config = cpt_server::Config::parse();
    match serve(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cpt-server: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: cpt_server::Config) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(config.bind).await.map_err(|e| anyhow::anyhow!("--bind {}: {e}", config.bind))?;
    cpt_server::launch(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async { tokio::signal::ctrl_c().await.expect("a Ctrl-C handler") };
    let term = async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler")
            .recv()
            .await;
    };
    tokio::select! { () = ctrl_c => {}, _ = term => {} }
}
