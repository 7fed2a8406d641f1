//! Server configuration, from flags or `CPT_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// cpt-server: the control plane of continued-pretraining jobs.
#[derive(Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Directory of the SQLite database, local workers' runs and prepared datasets.
    #[arg(long, env = "CPT_DATA_DIR", default_value = "cpt-data")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "CPT_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Bearer token for the user API: `/v1/jobs`, `/v1/datasets`, `/v1/vocabularies`, `/v1/sweeps`
    /// and `/metrics` (required, with --worker-token, when bound beyond loopback).
    #[arg(long, env = "CPT_API_TOKEN")]
    pub api_token: Option<String>,
    /// Bearer token for the worker protocol: `/v1/workers/...` (required, with --api-token, when
    /// bound beyond loopback).
    #[arg(long, env = "CPT_WORKER_TOKEN")]
    pub worker_token: Option<String>,
    /// Host names besides loopback ones that a server without tokens answers to (a browser whose
    /// page's domain was rebound to this address sends its own name, which is refused).
    #[arg(long, env = "CPT_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// A leased job whose worker has not heartbeated for this long is requeued.
    #[arg(long, env = "CPT_LEASE_TTL_SECONDS", default_value_t = 30)]
    pub lease_ttl_seconds: u64,
    /// `cpt-worker run` processes to start and keep running (0: remote workers only).
    #[arg(long, env = "CPT_LOCAL_WORKERS", default_value_t = 1)]
    pub local_workers: usize,
    /// The cpt-worker binary for local workers (default: the one beside cpt-server).
    #[arg(long, env = "CPT_WORKER_BINARY")]
    pub worker_binary: Option<PathBuf>,
    /// A finished job's Prometheus series are kept this long, then dropped.
    #[arg(long, env = "CPT_METRICS_RETENTION_SECONDS", default_value_t = 600)]
    pub metrics_retention_seconds: u64,
    /// Directories that paths in job specs must lie inside (default: the data dir).
    #[arg(long = "data-roots", alias = "data-root", env = "CPT_DATA_ROOTS", value_delimiter = ',')]
    pub data_roots: Vec<PathBuf>,
    /// Retries of a job whose worker vanished, before it fails.
    #[arg(long, env = "CPT_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: i64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "CPT_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A request body that stalls this long is given up on (400), so a client that sends half a body
    /// and waits holds nothing for long.
    #[arg(long, env = "CPT_BODY_TIMEOUT_SECONDS", default_value_t = 30)]
    pub body_timeout_seconds: u64,
    /// Jobs whose plan estimates more memory are refused at submit (default: the most any recently
    /// seen worker reported).
    #[arg(long, env = "CPT_MAX_JOB_MEMORY_BYTES")]
    pub max_job_memory_bytes: Option<u64>,
}

/// Tokens are secrets: `Debug` says only whether they are set.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |token: &Option<String>| if token.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("bind", &self.bind)
            .field("api_token", &set(&self.api_token))
            .field("worker_token", &set(&self.worker_token))
            .field("lease_ttl_seconds", &self.lease_ttl_seconds)
            .field("local_workers", &self.local_workers)
            .field("worker_binary", &self.worker_binary)
            .field("metrics_retention_seconds", &self.metrics_retention_seconds)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("data_roots", &self.data_roots)
            .field("max_attempts", &self.max_attempts)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("body_timeout_seconds", &self.body_timeout_seconds)
            .field("max_job_memory_bytes", &self.max_job_memory_bytes)
            .finish()
    }
}

impl Config {
    /// Fills defaults that depend on other fields and refuses unsafe combinations.
    pub fn finish(mut self) -> anyhow::Result<Self> {
        if self.data_roots.is_empty() {
            self.data_roots = vec![self.data_dir.clone()];
        }
        let missing = |token: &Option<String>| token.as_deref().is_none_or(str::is_empty);
        // One token alone would leave the other half of the server open to anyone who can reach it.
        if missing(&self.api_token) != missing(&self.worker_token) {
            anyhow::bail!("give both --api-token and --worker-token, or neither");
        }
        if !self.bind.ip().is_loopback() && missing(&self.api_token) {
            anyhow::bail!("binding {} beyond loopback needs --api-token and --worker-token", self.bind);
        }
        if self.lease_ttl_seconds == 0 {
            anyhow::bail!("--lease-ttl-seconds must be positive");
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_and_its_variable_are_in_the_readme_table() {
        let readme = include_str!("../../README.md");
        for arg in super::Config::command().get_arguments() {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else { continue };
            let row = format!("| `--{long}` | `{}` |", env.to_string_lossy());
            assert!(readme.contains(&row), "README.md has no row {row}");
        }
    }
}
