//! A real cpt-server on port 0 with a temporary SQLite file, and a data root with a tiny model.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub struct Server {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub client: reqwest::Client,
    token: Option<String>,
}

impl Server {
    pub async fn start(data_dir: &Path, roots: &Path, token: Option<&str>) -> Server {
        Self::start_with(data_dir, roots, token, token, 30).await
    }

    /// A server that takes request bodies of up to 16 MiB.
    pub async fn start_big(data_dir: &Path, roots: &Path) -> Server {
        let mut config = Self::config(data_dir, roots, None, None, 30);
        config.max_body_bytes = 16 << 20;
        Self::start_config(config).await
    }

    pub async fn start_with(
        data_dir: &Path,
        roots: &Path,
        token: Option<&str>,
        worker_token: Option<&str>,
        lease_ttl_seconds: u64,
    ) -> Server {
        Self::start_config(Self::config(data_dir, roots, token, worker_token, lease_ttl_seconds)).await
    }

    pub fn config(
        data_dir: &Path,
        roots: &Path,
        token: Option<&str>,
        worker_token: Option<&str>,
        lease_ttl_seconds: u64,
    ) -> cpt_server::Config {
        cpt_server::Config {
            data_dir: data_dir.to_path_buf(),
            bind: "127.0.0.1:0".parse().unwrap(),
            api_token: token.map(str::to_string),
            data_roots: vec![roots.to_path_buf()],
            allowed_hosts: vec![],
            body_timeout_seconds: 30,
            max_attempts: 3,
            max_body_bytes: 64 * 1024,
            worker_token: worker_token.map(str::to_string),
            lease_ttl_seconds,
            metrics_retention_seconds: 600,
            local_workers: 0,
            worker_binary: None,
            max_job_memory_bytes: None,
        }
    }

    /// Serves `config` on a fresh loopback port.
    pub async fn start_config(config: cpt_server::Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let token = config.api_token.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cpt_server::launch(config, listener, async move {
            let _ = stopped.await;
        }));
        let server = Server { base, stop: Some(stop), task, client: reqwest::Client::new(), token };
        // The listener is bound before launch, so this first request waits in its backlog until
        // the database is migrated and the server serves: no polling needed.
        let ready = server.client.get(format!("{}/readyz", server.base)).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::OK);
        server
    }

    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A data root with a tiny model config and two "datasets" (manifests are all the API checks).
pub fn data_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("model")).unwrap();
    let config = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": true});
    std::fs::write(root.join("model/config.json"), config.to_string()).unwrap();
    for name in ["domain", "general"] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("manifest.json"), manifest(64, 10, 2).to_string()).unwrap();
    }
    root
}

/// The parts of a dataset's manifest that a submission checks.
pub fn manifest(seq_len: u64, train_blocks: u64, validation_blocks: u64) -> Value {
    let split = |blocks: u64| json!({"documents": blocks, "tokens": 0, "blocks": blocks, "dropped_tail_tokens": 0, "shards": []});
    json!({"format_version": 1, "seq_len": seq_len, "token_width": "u16", "tokenizer_sha256": "0", "vocab_size": 256,
           "eos_token_id": 0, "sources": [], "splits": {"train": split(train_blocks), "validation": split(validation_blocks)}})
}

pub fn spec(root: &Path, name: &str) -> Value {
    let p = |n: &str| root.join(n).display().to_string();
    json!({"name": name, "base_model": p("model"), "train_data": [{"dataset": p("domain")}, {"dataset": p("general"), "weight": 0.25}],
           "eval_data": {"domain": p("domain")}, "seq_len": 64, "max_steps": 20, "lr": 1e-4, "warmup_steps": 2})
}

pub fn error_of(body: &Value) -> (&str, Option<&str>) {
    (body["error"]["code"].as_str().unwrap(), body["error"]["field"].as_str())
}

/// A step event as a worker sends it: loss 2.5 (or `loss`), 64 tokens a step.
pub fn step_event_with(seq: u64, step: u64, loss: f64) -> Value {
    json!({"seq": seq, "kind": "step", "time": 1000 + seq, "step": step, "loss": loss, "lr": 1e-4, "grad_norm": 1.0,
           "skipped": false, "tokens": 64, "tokens_total": step * 64, "tokens_per_second": 100.0, "flops": 1e6,
           "flops_total": step as f64 * 1e6, "flops_per_second": 1e8, "mfu": 0.1, "step_seconds": 0.5,
           "data_seconds": 0.1, "compute_seconds": 0.4})
}

pub fn step_event(seq: u64, step: u64) -> Value {
    step_event_with(seq, step, 2.5)
}

pub fn eval_event(seq: u64, step: u64, set: &str, loss: f64, perplexity: f64) -> Value {
    json!({"seq": seq, "kind": "eval", "time": 1000 + seq, "step": step, "set": set, "loss": loss,
           "perplexity": perplexity, "tokens": 64})
}

pub fn checkpoint_event(seq: u64, step: u64, path: &str) -> Value {
    json!({"seq": seq, "kind": "checkpoint", "time": 1000 + seq, "step": step, "path": path, "tokens_total": step * 64})
}

pub fn started_event(seq: u64) -> Value {
    json!({"seq": seq, "kind": "started", "time": 1000 + seq, "from_step": 0, "resumed": false, "device": "cpu",
           "peak_flops_per_second": 1e9, "peak_source": "test",
           "plan": {"total_steps": 20, "tokens_per_step": 64, "total_tokens": 1280, "warmup_steps": 2,
                    "lr": {"peak": 1e-4, "min": 1e-5, "reasoning": "test"}, "flops_per_token": 1.0,
                    "total_flops": 1280.0, "parameters": 1, "memory_estimate_bytes": 1}})
}
