-- `rotate token-key` now walks logins in message_id order, as on Postgres
-- (migrations/postgres/0009_token_rotation_by_message_id.sql). A token-key
-- job left open by an earlier version has an id cursor: it starts its one
-- range over again by message id. The chunk read returns only logins whose
-- tokens are not yet of the job's version, so what was done is passed over.
UPDATE rotation_ranges SET lo = '', hi = NULL, cursor = '', done = 0
WHERE job_id IN (SELECT id FROM rotation_jobs WHERE kind = 'rotate-token-key' AND finished_at IS NULL);
