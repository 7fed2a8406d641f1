-- Sweeps (`POST /v1/sweeps`): a base spec and a grid; each point of the grid is a training job
-- that names its sweep and the grid's values at that point.
CREATE TABLE sweeps (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    request         TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT,
    created_at      INTEGER NOT NULL
);
ALTER TABLE jobs ADD COLUMN sweep_id TEXT REFERENCES sweeps (id);
ALTER TABLE jobs ADD COLUMN sweep_point TEXT;
CREATE INDEX jobs_by_sweep ON jobs (sweep_id) WHERE sweep_id IS NOT NULL;
