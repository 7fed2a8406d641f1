//! What the end-to-end tests share: a tiny model and dataset built with the real CLI, a real
//! cpt-server in process on a loopback port, and real `cpt-worker run` processes.
#![allow(dead_code)] // each test crate uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use serde_json::{json, Value};
use tokio::sync::oneshot;

pub fn worker_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cpt-worker"))
}

pub fn succeed(args: &[&str]) {
    let output = worker_bin().args(args).output().unwrap();
    assert!(output.status.success(), "cpt-worker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

pub fn assets() -> PathBuf {
    std::env::var_os("CPT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cpt/assets"))
}

/// `text` prepared with SmolLM2's tokenizer into 16-token blocks at `<root>/<out>`, with the config
/// `<root>/<config>` (`prepare.json`: all for training; `heldout.json`: all held out).
pub fn prepare(root: &Path, text: &Path, out: &str, config: &str) {
    let p = |name: &str| root.join(name).display().to_string();
    let tokenizer = p("smollm2/tokenizer.json");
    let text = text.to_str().unwrap();
    succeed(&[
        "prepare",
        "--tokenizer",
        &tokenizer,
        "--input",
        text,
        "--out",
        &p(out),
        "--seq-len",
        "16",
        "--config",
        &p(config),
    ]);
}

/// SmolLM2-135M (scripts/fetch-assets.sh) imported to `<root>/smollm2`.
pub fn import_smollm2(root: &Path) -> PathBuf {
    let smol = root.join("smollm2");
    let gguf = assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "{} is missing: run scripts/fetch-assets.sh", gguf.display());
    succeed(&["import", gguf.to_str().unwrap(), "--out", smol.to_str().unwrap()]);
    smol
}

/// A tiny model with SmolLM2's tokenizer and a dataset of the English fixture, under `root`.
pub fn prepare_inputs(root: &Path) {
    let smol = import_smollm2(root);
    let config = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2});
    std::fs::write(root.join("config.json"), config.to_string()).unwrap();
    let tokenizer = smol.join("tokenizer.json");
    let p = |name: &str| root.join(name).display().to_string();
    succeed(&["init", "--config", &p("config.json"), "--tokenizer", tokenizer.to_str().unwrap(), "--out", &p("tiny")]);
    std::fs::write(root.join("prepare.json"), r#"{"validation_fraction": 0.0}"#).unwrap();
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/english.txt");
    prepare(root, &text, "data", "prepare.json");
    // The same text, all of it held out: an eval set.
    std::fs::write(root.join("heldout.json"), r#"{"validation_fraction": 1.0}"#).unwrap();
    prepare(root, &text, "heldout", "heldout.json");
}

/// [`prepare_inputs`], and the Chinese fixture held out whole as the dataset `chinese`: a set the
/// English training text makes less likely.
pub fn prepare_inputs_and_chinese(root: &Path) {
    prepare_inputs(root);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chinese-docs.txt");
    prepare(root, &docs, "chinese", "heldout.json");
}

pub fn spec(root: &Path, steps: u64) -> Value {
    let p = |name: &str| root.join(name).display().to_string();
    json!({"name": "e2e", "base_model": p("tiny"), "train_data": [{"dataset": p("data")}], "seq_len": 16,
           "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": steps, "checkpoint_every": 50,
           "eval_every": 0})
}

pub fn serve(
    root: &Path,
    listener: tokio::net::TcpListener,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    serve_with(root, listener, 0)
}

pub fn serve_with(
    root: &Path,
    listener: tokio::net::TcpListener,
    local_workers: usize,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let config = cpt_server::Config {
        data_dir: root.join("server"),
        bind: "127.0.0.1:0".parse().unwrap(),
        api_token: None,
        worker_token: None,
        lease_ttl_seconds: 3,
        data_roots: vec![root.to_path_buf()],
        allowed_hosts: vec![],
        body_timeout_seconds: 30,
        max_attempts: 3,
        max_body_bytes: 1 << 20,
        metrics_retention_seconds: 600,
        local_workers,
        worker_binary: Some(env!("CARGO_BIN_EXE_cpt-worker").into()),
        max_job_memory_bytes: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(cpt_server::launch(config, listener, async move {
        let _ = stopped.await;
    }));
    (stop, server)
}

pub fn spawn_worker(root: &Path, base: &str) -> Child {
    worker_bin()
        .args(["run", "--server", base, "--data-dir", root.join("worker").to_str().unwrap(), "--name", "e2e"])
        .env("CPT_LOG", "warn")
        .spawn()
        .unwrap()
}

pub struct Harness {
    pub base: String,
    pub address: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub stop: Option<oneshot::Sender<()>>,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub worker: Child,
}

impl Harness {
    pub async fn start(root: &Path) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let base = format!("http://{address}");
        let (stop, server) = serve(root, listener);
        let worker = spawn_worker(root, &base);
        Harness { base, address, http: reqwest::Client::new(), stop: Some(stop), server, worker }
    }

    /// Stops the server; the worker keeps training.
    pub async fn stop_server(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        let old = std::mem::replace(&mut self.server, tokio::spawn(async { Ok(()) }));
        old.await.unwrap().unwrap();
    }

    /// Starts the server again on the same address and data directory.
    pub async fn start_server(&mut self, root: &Path) {
        let listener = tokio::net::TcpListener::bind(self.address).await.unwrap();
        let (stop, server) = serve(root, listener);
        (self.stop, self.server) = (Some(stop), server);
    }

    /// Sends SIGTERM to the worker, waits for it to exit, and returns whether it exited cleanly.
    pub fn terminate_worker(&mut self) -> bool {
        let pid = self.worker.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        tokio::task::block_in_place(|| self.worker.wait().unwrap().success())
    }

    /// Kills the worker as `kill -9` would and starts a fresh one.
    pub fn crash_worker(&mut self, root: &Path) {
        self.worker.kill().unwrap();
        self.worker.wait().unwrap();
        self.worker = spawn_worker(root, &self.base);
    }

    /// POSTs `body` and returns the answer's JSON, whatever its status.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.call(path, body).await.1
    }

    /// POSTs `body` and returns the status and the answer's JSON.
    pub async fn call(&self, path: &str, body: Value) -> (reqwest::StatusCode, Value) {
        let response = self.http.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    /// The job's stored events (`{id, attempt, seq, kind, time, data}`), oldest first, optionally
    /// of one kind.
    pub async fn events(&self, id: &str, kind: Option<&str>) -> Vec<Value> {
        let filter = kind.map_or(String::new(), |kind| format!("&kind={kind}"));
        let page = self.get(&format!("/v1/jobs/{id}/events?limit=1000{filter}")).await;
        page["events"].as_array().unwrap_or_else(|| panic!("{page}")).clone()
    }

    pub async fn get(&self, path: &str) -> Value {
        self.http.get(format!("{}{path}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    /// Reads the job's SSE stream until `until` says stop or the stream ends (the job ended), and
    /// returns what it read; a job that takes over five minutes fails the test rather than hanging it.
    pub async fn follow(&self, id: &str, mut until: impl FnMut(&str) -> bool) -> String {
        let read = async {
            let mut response = self.http.get(format!("{}/v1/jobs/{id}/events/stream", self.base)).send().await.unwrap();
            let mut text = String::new();
            while let Some(chunk) = response.chunk().await.unwrap() {
                text.push_str(&String::from_utf8_lossy(&chunk));
                if until(&text) {
                    break;
                }
            }
            text
        };
        tokio::time::timeout(std::time::Duration::from_secs(300), read)
            .await
            .expect("the job ended within five minutes")
    }

    pub async fn stop(mut self) {
        // The worker first: its long-poll lease would otherwise hold the graceful shutdown open.
        let _ = self.worker.kill();
        let _ = self.worker.wait();
        self.stop.take().unwrap().send(()).unwrap();
        let server = std::mem::replace(&mut self.server, tokio::spawn(async { Ok(()) }));
        server.await.unwrap().unwrap();
    }
}

impl Drop for Harness {
    /// The worker is a child process: never leave it running, even when an assertion failed.
    fn drop(&mut self) {
        let _ = self.worker.kill();
        let _ = self.worker.wait();
    }
}

/// Runs `spec` with `cpt-worker train`, uninterrupted, in `<root>/reference`, and asserts that the
/// final checkpoint's `files` in `run` are byte for byte the same.
pub fn assert_same_bytes_as_uninterrupted(root: &Path, spec: &Value, run: &Path, steps_total: u64, files: &[&str]) {
    std::fs::write(root.join("spec.json"), spec.to_string()).unwrap();
    let reference = root.join("reference");
    let (spec_path, reference_dir) = (root.join("spec.json"), reference.display().to_string());
    tokio::task::block_in_place(|| {
        succeed(&["train", "--spec", spec_path.to_str().unwrap(), "--run-dir", &reference_dir])
    });
    for file in files {
        let path = format!("checkpoints/step-{steps_total}/{file}");
        let read = |dir: &Path| {
            std::fs::read(dir.join(&path)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(&path).display()))
        };
        assert!(read(run) == read(&reference), "an interrupted run must end with the uninterrupted run's {file}");
    }
}
