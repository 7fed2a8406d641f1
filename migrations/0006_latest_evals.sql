-- Each job's latest eval per set, so that lists (the job page's, `GET /v1/jobs`) show learning and
-- forgetting without reading every event.
ALTER TABLE jobs ADD COLUMN latest_evals TEXT;
