//! `cpt-worker`: the standalone CLI over cpt's training core (and, later, the worker process).

mod cli;
mod progress;
mod run_local;
mod serve;
mod spool;
mod watch;

use clap::Parser;

// Tokenization and cleaning allocate many small strings from several threads; glibc's allocator
// spent ~30% of `prepare` in malloc/free (perf), mimalloc far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CPT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::Cli::parse().run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
