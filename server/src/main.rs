//! `cpt-server`: parse the configuration, bind, serve until Ctrl-C or SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CPT_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let config = cpt_server::Config::parse();
    let listener = tokio::net::TcpListener::bind(config.bind).await?;
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
