-- Jobs and their events. Times are Unix milliseconds.
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('train', 'prepare')),
    name            TEXT NOT NULL,
    spec            TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('queued', 'running', 'cancelling', 'succeeded', 'failed', 'cancelled')),
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
    finished_at     INTEGER
);
CREATE INDEX jobs_by_state ON jobs (state, created_at);
CREATE INDEX jobs_by_created ON jobs (created_at DESC, id DESC);

-- Each event once per (job, attempt, seq): worker retries are idempotent. `id` is the global,
-- monotonic cursor used for pagination and SSE's Last-Event-ID.
CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    attempt INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    time    INTEGER NOT NULL,
    data    TEXT NOT NULL,
    UNIQUE (job_id, attempt, seq)
);
CREATE INDEX events_by_job ON events (job_id, id);
