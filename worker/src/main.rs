//! `cpt-worker`: the worker process of cpt-server and the standalone CLI over cpt's training core.

mod bench;
mod cli;
mod client;
mod leftover;
mod model_tools;
mod progress;
mod run;
mod run_local;
mod spool;
mod sweep;
mod watch;

use clap::Parser;

// Tokenization and cleaning allocate many small strings from several threads; glibc's allocator
// spent ~30% of `prepare` in malloc/free (perf), mimalloc far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Training frees and reallocates the same large buffers every step; returning them to the OS
    // made the kernel zero fresh pages each time (~6% of a CPU step in perf). Keep them instead.
    // SAFETY: setting an option is thread-safe and takes effect for later purges.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
