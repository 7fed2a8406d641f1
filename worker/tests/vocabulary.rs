//! A new language through the API alone: `POST /v1/vocabularies` extends a model's vocabulary on a
//! real worker, its tokenizer prepares the datasets, stage 1 trains only the new rows, and stage 2
//! (LoRA plus embeddings) starts from stage 1's checkpoint.

mod common;

use std::path::Path;

use common::{prepare_inputs, Harness};
use serde_json::{json, Value};

/// Queues `body` at `collection`, waits for its job to end, and returns the product once succeeded.
async fn make(harness: &Harness, collection: &str, body: Value) -> Value {
    let queued = harness.post(collection, body).await;
    let id = queued["id"].as_str().unwrap_or_else(|| panic!("{queued}")).to_string();
    harness.follow(&id, |_| false).await;
    let made = harness.get(&format!("{collection}/{id}")).await;
    assert_eq!(made["state"], "succeeded", "{made}");
    made
}

/// What the job's events of `kind` say.
async fn events(harness: &Harness, id: &str, kind: &str) -> Vec<Value> {
    harness.events(id, Some(kind)).await.into_iter().map(|e| e["data"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vocabulary_extended_through_the_api_trains_in_two_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chinese-docs.txt");
    std::fs::copy(fixture, root.join("docs.txt")).unwrap();
    let harness = Harness::start(root).await;
    let p = |name: &str| root.join(name).display().to_string();

    let request = json!({"name": "zh", "base_model": p("tiny"), "corpus": [p("docs.txt")], "new_tokens": 40,
                         "report_texts": [p("docs.txt")]});
    let vocabulary = make(&harness, "/v1/vocabularies", request.clone()).await;
    let report = &vocabulary["report"];
    assert_eq!(report["added_tokens"], 40, "{vocabulary}");
    let base_vocab = report["base_vocab_size"].as_u64().unwrap();
    let fertility = &report["fertility"][0];
    assert!(fertility["after"].as_f64() < fertility["before"].as_f64(), "{fertility}");
    let model = vocabulary["path"].as_str().unwrap().to_string();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&model).join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], base_vocab + 40);
    let listed = harness.get("/v1/vocabularies").await;
    assert_eq!(listed["vocabularies"][0]["id"], vocabulary["id"], "{listed}");
    let datasets = harness.get("/v1/datasets").await;
    assert_eq!(datasets["datasets"].as_array().unwrap().len(), 0, "a vocabulary is not a dataset: {datasets}");

    // Datasets in the new tokenizer: all of the text for training, and all of it held out.
    let dataset = |fraction: f64| {
        json!({"name": "docs", "tokenizer": format!("{model}/tokenizer.json"), "inputs": [p("docs.txt")],
               "config": {"seq_len": 16, "validation_fraction": fraction}})
    };
    let train = make(&harness, "/v1/datasets", dataset(0.0)).await["path"].clone();
    let heldout = make(&harness, "/v1/datasets", dataset(1.0)).await["path"].clone();
    let stage = |steps: u64, lr: f64, adapter: Value| {
        json!({"name": "stage", "base_model": model, "train_data": [{"dataset": train}],
               "eval_data": {"domain": heldout}, "seq_len": 16, "micro_batch_size": 2, "lr": lr, "warmup_steps": 1,
               "max_steps": steps, "eval_every": 0, "checkpoint_every": 0, "adapter": adapter})
    };
    let rows = json!({"modules_to_save": ["embed_tokens"], "train_rows_from": base_vocab});
    let stage1 = make(&harness, "/v1/jobs", stage(6, 1e-2, rows)).await;
    let stage1_id = stage1["id"].as_str().unwrap();
    let checkpoint = events(&harness, stage1_id, "checkpoint").await.pop().expect("stage 1 ends with a checkpoint");
    let stage1_evals = events(&harness, stage1_id, "eval").await;
    let (first, last) = (&stage1_evals[0], stage1_evals.last().unwrap());
    assert!(last["loss"].as_f64() < first["loss"].as_f64(), "stage 1 learns: {stage1_evals:?}");

    let lora = json!({"lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                      "modules_to_save": ["embed_tokens"], "embedding_lr": 1e-3, "init_from": checkpoint["path"]});
    let stage2 = make(&harness, "/v1/jobs", stage(4, 1e-3, lora)).await;
    let stage2_evals = events(&harness, stage2["id"].as_str().unwrap(), "eval").await;
    // LoRA starts as the identity (B = 0): stage 2 at step 0 is stage 1's final model.
    let (end_of_1, start_of_2) = (last["loss"].as_f64().unwrap(), stage2_evals[0]["loss"].as_f64().unwrap());
    assert_eq!(stage2_evals[0]["step"], 0);
    assert!(
        (end_of_1 - start_of_2).abs() <= 1e-5 * end_of_1,
        "stage 1 ended at {end_of_1}, stage 2 began at {start_of_2}"
    );

    let mut outside = request;
    outside["report_texts"] = json!(["/etc/passwd"]);
    let refused = harness.post("/v1/vocabularies", outside).await;
    assert_eq!(refused["error"]["field"], "report_texts[0]", "{refused}");
    harness.stop().await;
}
