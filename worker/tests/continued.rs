//! Continuing a finished job through the API on a real worker: the child starts from the parent's
//! final checkpoint (its step 0 is the parent's end), runs its own amended schedule, and shows its
//! lineage in the job and the metrics.

mod common;

use common::{prepare_inputs, spec, Harness};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn evals(harness: &Harness, id: &str) -> Vec<Value> {
    harness.events(id, Some("eval")).await.into_iter().map(|e| e["data"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_continued_job_starts_where_its_parent_ended_and_shows_its_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tokio::task::block_in_place(|| prepare_inputs(root));
    let harness = Harness::start(root).await;
    let mut parent = spec(root, 4);
    parent["eval_data"] = json!({"english": root.join("heldout")});
    let parent_id = harness.post("/v1/jobs", parent).await["id"].as_str().unwrap().to_string();
    harness.follow(&parent_id, |_| false).await;
    let parent = harness.get(&format!("/v1/jobs/{parent_id}")).await;
    assert_eq!(parent["state"], "succeeded", "{parent}");

    let amendments = json!({"max_steps": 3, "lr": 5e-4, "schedule": "constant", "warmup_steps": 0});
    let child = harness.post(&format!("/v1/jobs/{parent_id}/continue"), amendments).await;
    let child_id = child["id"].as_str().unwrap_or_else(|| panic!("{child}")).to_string();
    assert_eq!(child["parent_id"], parent_id.as_str());
    assert_eq!(child["name"], "e2e (continued)");
    let from = &child["spec"]["continue_from"];
    assert!(from["checkpoint"].as_str().unwrap().ends_with("checkpoints/step-4"), "{from}");
    assert_eq!(child["spec"]["max_steps"], 3);
    harness.follow(&child_id, |_| false).await;
    let child = harness.get(&format!("/v1/jobs/{child_id}")).await;
    assert_eq!(child["state"], "succeeded", "{child}");
    let lineage = &child["lineage"];
    let parent_tokens = parent["progress"]["tokens_total"].as_i64().unwrap();
    assert_eq!(lineage["root_id"], parent_id.as_str());
    assert_eq!(lineage["ancestors"], json!([parent_id]));
    assert_eq!((lineage["step_offset"].as_i64(), lineage["tokens_offset"].as_i64()), (Some(4), Some(parent_tokens)));
    assert_eq!(
        lineage["tokens_total"].as_i64(),
        Some(parent_tokens + child["progress"]["tokens_total"].as_i64().unwrap())
    );
    assert_eq!(harness.get(&format!("/v1/jobs/{parent_id}")).await["lineage"]["root_id"], parent_id.as_str());

    // The child's step 0 is the parent's final model, measured against the parent's step 0.
    let (parent_evals, child_evals) = (evals(&harness, &parent_id).await, evals(&harness, &child_id).await);
    let (end, start) = (parent_evals.last().unwrap(), &child_evals[0]);
    assert_eq!(start["step"], 0);
    assert_eq!(
        (start["loss"].as_f64(), start["perplexity_change"].as_f64()),
        (end["loss"].as_f64(), end["perplexity_change"].as_f64())
    );
    let metrics = harness.http.get(format!("{}/metrics", harness.base)).send().await.unwrap().text().await.unwrap();
    let info = format!("cpt_job_info{{job_id=\"{child_id}\",name=\"e2e (continued)\",root_id=\"{parent_id}\"}} 1");
    assert!(metrics.contains(&info), "{metrics}");

    // What a continuation may not change, and what cannot be continued.
    let (status, error) = harness.call(&format!("/v1/jobs/{parent_id}/continue"), json!({"seq_len": 32})).await;
    assert_eq!((status, error["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("seq_len")));
    let (status, error) = harness.call(&format!("/v1/jobs/{parent_id}/continue"), json!({"lr": 7.0})).await;
    assert_eq!((status, error["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("lr")));
    let (status, _) = harness.call("/v1/jobs/no-such-job/continue", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    harness.stop().await;
}
