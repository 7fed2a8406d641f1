-- Each job's latest eval per set, so that lists (the job page's, `GET /v1/jobs`) show learning and
-- forgetting without reading every event. Jobs that already have evals get theirs from their events
-- (the newest stored eval of each set).
ALTER TABLE jobs ADD COLUMN latest_evals TEXT;
UPDATE jobs SET latest_evals = (
    SELECT json_group_object(json_extract(e.data, '$.set'), json_object(
        'step', json_extract(e.data, '$.step'),
        'perplexity', json_extract(e.data, '$.perplexity'),
        'bits_per_byte', json_extract(e.data, '$.bits_per_byte'),
        'perplexity_change', json_extract(e.data, '$.perplexity_change')))
    FROM events AS e
    WHERE e.job_id = jobs.id AND e.kind = 'eval' AND e.id = (
        SELECT MAX(newer.id) FROM events AS newer
        WHERE newer.job_id = e.job_id AND newer.kind = 'eval'
          AND json_extract(newer.data, '$.set') = json_extract(e.data, '$.set'))
)
WHERE EXISTS (SELECT 1 FROM events WHERE events.job_id = jobs.id AND events.kind = 'eval');
