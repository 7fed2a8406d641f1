//! A job's lineage: the chain of jobs it continues, and where its steps and tokens sit on the
//! curve that spans them.

use serde::Serialize;
use sqlx::{Row, SqlitePool};

use super::{Job, JobError};

/// Where a job sits in the chain of jobs it continues (itself alone when it continues none).
#[derive(Debug, Clone, Serialize)]
pub struct Lineage {
    /// The first job of the chain.
    pub root_id: String,
    pub parent_id: Option<String>,
    /// Jobs before this one, root first.
    pub ancestors: Vec<String>,
    /// The steps and tokens of the ancestors: this job's step `s` is step `step_offset + s` of the
    /// lineage.
    pub step_offset: i64,
    pub tokens_offset: i64,
    /// Tokens trained over the whole lineage so far, this job's included.
    pub tokens_total: i64,
}

/// At most this many ancestors are followed (a chain is built one continue at a time).
const MAX_DEPTH: usize = 10_000;

/// The lineage of `job`.
pub async fn lineage(pool: &SqlitePool, job: &Job) -> Result<Lineage, JobError> {
    let (mut ancestors, mut step_offset, mut tokens_offset) = (Vec::new(), 0i64, 0i64);
    let mut next = job.parent_id.clone();
    while let Some(id) = next.take() {
        if ancestors.len() >= MAX_DEPTH {
            break;
        }
        let row = sqlx::query("SELECT step, tokens_total, parent_id FROM jobs WHERE id = ?")
            .bind(&id)
            .fetch_optional(pool)
            .await?;
        let Some(row) = row else { return Err(JobError::NotFound(id)) };
        step_offset += row.get::<i64, _>("step");
        tokens_offset += row.get::<i64, _>("tokens_total");
        next = row.get("parent_id");
        ancestors.push(id);
    }
    ancestors.reverse();
    Ok(Lineage {
        root_id: job.root_id.clone(),
        parent_id: job.parent_id.clone(),
        ancestors,
        step_offset,
        tokens_offset,
        tokens_total: tokens_offset + job.progress.tokens_total,
    })
}
