//! A full disk under the database: clear 5xx codes while it lasts, `/readyz` not ready, and after
//! space is freed everything works again and nothing that was acknowledged is lost. The disk is a
//! small tmpfs the test mounts itself (CI runs as root).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{data_root, error_of, spec, step_event, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status();
        assert!(status.is_ok_and(|s| s.success()), "mounting a tmpfs needs root (CI runs as root)");
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file, to the last byte it takes.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    path
}

fn big_events(from: u64, count: u64) -> Vec<Value> {
    (from..from + count)
        .map(|seq| json!({"seq": seq, "kind": "sample", "time": 1, "step": 1, "prompt": "p", "continuation": "x".repeat(20_000)}))
        .collect()
}

#[tokio::test]
async fn a_full_disk_answers_with_storage_codes_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&tmp.path().join("small"), "40m");
    let root = data_root(tmp.path());
    let data = disk.0.join("data");
    let server = Server::start_big(&data, &root).await;
    let (_, worker) = server.call(Method::POST, "/v1/workers", Some(json!({"name": "w"}))).await;
    let worker = worker["worker_id"].as_str().unwrap().to_string();
    let mut long = spec(&root, "long");
    long["max_steps"] = json!(1000);
    let (_, job) = server.call(Method::POST, "/v1/jobs", Some(long)).await;
    let id = job["id"].as_str().unwrap().to_string();
    server.call(Method::POST, &format!("/v1/workers/{worker}/lease"), None).await;
    let url = format!("/v1/workers/{worker}/events");
    let (mut acknowledged, mut seq) = (0u64, 0u64);
    let filler = fill(&disk.0);

    let (status, error) = server.call(Method::GET, "/readyz", None).await;
    assert_eq!((status, error_of(&error).0), (StatusCode::SERVICE_UNAVAILABLE, "storage_low"));
    let mut refusals = std::collections::BTreeMap::new();
    for _ in 0..100 {
        let (status, body) = server
            .call(Method::POST, &url, Some(json!({"job_id": id, "attempt": 1, "events": big_events(seq, 10)})))
            .await;
        if status == StatusCode::OK {
            acknowledged += body["stored"].as_u64().unwrap();
            seq += 10;
            continue;
        }
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        *refusals.entry((status.as_u16(), error_of(&body).0.to_string())).or_insert(0) += 1;
        if refusals.values().sum::<u32>() >= 3 {
            break;
        }
    }
    assert!(refusals.contains_key(&(507, "storage_full".to_string())), "{refusals:?}");
    let (status, error) = server.call(Method::POST, "/v1/jobs", Some(spec(&root, "meanwhile"))).await;
    assert!(status.is_server_error() && status != StatusCode::INTERNAL_SERVER_ERROR, "{status} {error}");

    std::fs::remove_file(filler).unwrap();
    assert_eq!(server.call(Method::GET, "/readyz", None).await.0, StatusCode::OK, "ready again once space is back");
    let (status, body) =
        server.call(Method::POST, &url, Some(json!({"job_id": id, "attempt": 1, "events": big_events(seq, 10)}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    acknowledged += body["stored"].as_u64().unwrap();
    let (status, _) = server
        .call(Method::POST, &url, Some(json!({"job_id": id, "attempt": 1, "events": [step_event(seq + 10, 1)]})))
        .await;
    assert_eq!(status, StatusCode::OK, "every pooled connection writes again");
    server.stop().await;

    let server = Server::start_big(&data, &root).await;
    let mut stored = 0;
    let mut after = 0;
    loop {
        let (_, page) =
            server.call(Method::GET, &format!("/v1/jobs/{id}/events?kind=sample&limit=1000&after={after}"), None).await;
        let events = page["events"].as_array().unwrap();
        stored += events.len() as u64;
        match page["next_cursor"].as_i64() {
            Some(cursor) => after = cursor,
            None => break,
        }
    }
    assert_eq!(stored, acknowledged, "every acknowledged event survived the full disk and a restart");
    server.stop().await;
}
