//! The worker protocol: the bodies `cpt-worker run` and `cpt-server` exchange under `/v1/workers`.
//! Both sides speak these types; `openapi.yaml` describes the same shapes.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::jobs::JobKind;

/// `POST /v1/workers`: a worker introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// A label for people (host name, GPU index); 1 to 200 characters.
    pub name: String,
    /// `cpu` or `cuda:N`.
    #[serde(default)]
    pub device: String,
    /// Memory the worker can give one job, in bytes (RAM on a CPU, GPU memory on a GPU): jobs whose
    /// plan estimates more are refused at submit while no registered worker has that much.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// The answer to a registration: the worker's id and the lease timing it must keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registered {
    pub worker_id: String,
    pub lease_ttl_seconds: u64,
    pub heartbeat_interval_seconds: u64,
}

/// `POST /v1/workers/{id}/lease` (200): the job a worker now holds. The server sends the whole job;
/// a worker needs these fields of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub kind: JobKind,
    /// Grows by one with every lease of the job, never repeats: events carry it.
    pub attempt: u64,
    /// A [`crate::JobSpec`] for `train`, a [`crate::prepare::PrepareSpec`] for `prepare`.
    pub spec: serde_json::Value,
}

/// `POST /v1/workers/{id}/heartbeat`: the holder of `job_id`'s `attempt` is alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub job_id: String,
    pub attempt: u64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// A user asked to cancel: checkpoint at the next step boundary and finish as `cancelled`.
    pub cancel: bool,
}

/// One event as sent and stored: its per-attempt sequence number, its time and what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// 0, 1, 2, … within one attempt: `(job, attempt, seq)` is stored once.
    pub seq: u64,
    /// Unix milliseconds when the worker recorded it.
    pub time: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// `POST /v1/workers/{id}/events`: events of one attempt, in order. Events of an earlier attempt
/// of the same worker are history and are stored too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub job_id: String,
    pub attempt: u64,
    pub events: Vec<Envelope>,
}

/// What the server did with a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchReply {
    pub stored: u64,
    /// Events it already had (a retried batch).
    pub duplicates: u64,
}

/// How a worker's hold on a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    /// Stopped at a checkpoint for the worker's shutdown: the job goes back to the queue and
    /// another attempt resumes it at once.
    #[serde(rename = "queued")]
    Released,
    /// Stopped at a checkpoint by a forgetting budget: the job waits, paused, for a resume.
    Paused,
}

/// `POST /v1/workers/{id}/finish`: the worker's attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finish {
    pub job_id: String,
    pub attempt: u64,
    pub outcome: Outcome,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    #[test]
    fn an_envelope_is_one_flat_object_with_its_kind() {
        let envelope = Envelope {
            seq: 3,
            time: 17,
            event: Event::Checkpoint { step: 10, path: "/r/step-10".into(), tokens_total: 640 },
        };
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"seq": 3, "time": 17, "kind": "checkpoint", "step": 10, "path": "/r/step-10", "tokens_total": 640})
        );
        assert_eq!(serde_json::from_value::<Envelope>(json).unwrap(), envelope);
        assert!(serde_json::from_value::<Envelope>(serde_json::json!({"seq": 0, "time": 1, "kind": "nope"})).is_err());
    }

    #[test]
    fn release_is_sent_as_queued() {
        assert_eq!(serde_json::to_value(Outcome::Released).unwrap(), "queued");
        assert_eq!(serde_json::from_value::<Outcome>("queued".into()).unwrap(), Outcome::Released);
    }
}
