-- Jobs of kind `extend_vocab`, the state `paused`, and `parent_id`: the job a continued job
-- started from (`POST /v1/jobs/{id}/continue`). SQLite cannot alter a CHECK constraint, so `jobs`
-- is rebuilt. sqlx runs a SQLite migration inside a transaction, where foreign keys cannot be
-- switched off; deferred instead, the drop leaves events and attempts orphaned for a moment, and
-- re-inserting each job re-parents them before the commit checks.
PRAGMA defer_foreign_keys = ON;
CREATE TEMP TABLE jobs_copy AS SELECT * FROM jobs;
DROP TABLE jobs;
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('train', 'prepare', 'extend_vocab')),
    name            TEXT NOT NULL,
    spec            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled', 'paused')),
    attempt         INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    worker_id       TEXT,
    lease_expires_at INTEGER,
    error           TEXT,
    plan            TEXT,
    step            INTEGER NOT NULL DEFAULT 0,
    total_steps     INTEGER,
    tokens_total    INTEGER NOT NULL DEFAULT 0,
    latest_metrics  TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    retries         INTEGER NOT NULL DEFAULT 0,
    request_hash    TEXT,
    parent_id       TEXT REFERENCES jobs (id)
);
INSERT INTO jobs (id, kind, name, spec, state, attempt, max_attempts, idempotency_key, worker_id, lease_expires_at,
    error, plan, step, total_steps, tokens_total, latest_metrics, created_at, updated_at, started_at,
    finished_at, retries, request_hash)
SELECT id, kind, name, spec, state, attempt, max_attempts, idempotency_key, worker_id, lease_expires_at,
    error, plan, step, total_steps, tokens_total, latest_metrics, created_at, updated_at, started_at,
    finished_at, retries, request_hash FROM jobs_copy;
DROP TABLE jobs_copy;
CREATE INDEX jobs_by_state ON jobs (state, created_at);
CREATE INDEX jobs_by_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_by_parent ON jobs (parent_id);
