-- `attempt` only ever grows for a job; the retries left after lease expiries are counted apart
-- (`retries`, reset by a user's resume). Each attempt's holder is kept: its events stay accepted as
-- history after the job moved on. Idempotency keys remember a hash of the body they were used with.
ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN request_hash TEXT;

CREATE TABLE attempts (
    job_id     TEXT NOT NULL REFERENCES jobs (id),
    attempt    INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
INSERT INTO attempts (job_id, attempt, worker_id, started_at)
    SELECT id, attempt, worker_id, COALESCE(started_at, created_at) FROM jobs WHERE worker_id IS NOT NULL AND attempt > 0;

-- One row that `/readyz` rewrites to prove the database takes writes.
CREATE TABLE probes (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);

-- What a worker says it can hold, for refusing jobs no worker can run.
ALTER TABLE workers ADD COLUMN memory_bytes INTEGER;

-- When the attempt's worker reported its end: its events are refused after that.
ALTER TABLE attempts ADD COLUMN finished_at INTEGER;
