-- Trust boundaries, round two: what an adversary with one role's login
-- still broke, closed. This file changes tables only; the functions,
-- triggers, views and grants that use them are re-applied by `migrate`
-- from migrations/postgres/functions/ after the versioned migrations.
--
-- * Rotation jobs hold a lease (job_leases) instead of an advisory lock:
--   any login could take the advisory lock and block every rotation, and a
--   rotator could take it itself without recording a job. Only the
--   functions that record a job write the lease.
-- * A reveal's rows are fixed when it is recorded (reveal_request_rows),
--   not decided again when it is fetched.
-- * A reveal request that touches a honeytoken writes nothing a request
--   of a real user does not: the count sits in reveal_requests, which only
--   the owner reads, and audit_alarms becomes a view of it (the table was
--   a write the revealer could see in its own statistics and locks, then
--   roll back).
-- * Each login's reveal requests are serialised on a row of reveal_quota,
--   so that concurrent requests cannot all pass the daily limit.
-- * Honeytoken logins wait in honeytoken_logins until a worker writes them
--   among real events (same transaction, dates and attributes as their
--   neighbours).
-- * Superseded functions are dropped: the chunk readers of 0003 and 0005
--   checked no job, and signatures that change are dropped here and made
--   again from functions/.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

DROP FUNCTION pii_vault_rotation_vault_rows(bigint, text[], text, int);
DROP FUNCTION pii_vault_rotation_quarantine_rows(bigint, text[], text, int);
DROP FUNCTION pii_vault_rotation_logins(bigint, bigint, bigint, int);
DROP FUNCTION pii_vault_rotation_logins_chunk(bigint, bigint, bigint, bigint, int);
DROP FUNCTION pii_vault_rotation_job_add_key(bigint, bigint, text);
DROP FUNCTION pii_vault_rotation_job_start(bigint, text, bigint, text[]);
DROP FUNCTION pii_vault_rotation_job_resume(bigint, text);
DROP FUNCTION pii_vault_rotation_job_finish(bigint, bigint);
DROP FUNCTION pii_vault_check_lock(text);
DROP FUNCTION pii_vault_rotation_advance(bigint, bigint, int, text, bigint, boolean);
DROP FUNCTION pii_vault_retention(date, text, text);

-- ----------------------------------------------------------------- leases
CREATE TABLE job_leases (
    kind          text PRIMARY KEY CHECK (kind IN ('rotate-kek', 'rotate-data-keys', 'rotate-token-key')),
    -- The audit record of the run holding it, and that run's connection.
    record        bigint REFERENCES audit_log (id),
    holder_pid    integer,
    holder_login  text,
    taken_at      timestamptz
);
INSERT INTO job_leases (kind) VALUES ('rotate-kek'), ('rotate-data-keys'), ('rotate-token-key');

ALTER TABLE rotation_jobs DROP CONSTRAINT rotation_jobs_kind_check;
ALTER TABLE rotation_jobs ADD CONSTRAINT rotation_jobs_kind_check
    CHECK (kind IN ('rotate-kek', 'rotate-data-keys', 'rotate-token-key'));
ALTER TABLE rotation_jobs
    -- rotate kek: the KMS key it re-wraps under, fixed by its first record.
    ADD COLUMN kek_target text,
    ADD COLUMN keys_rewrapped bigint NOT NULL DEFAULT 0;

-- ---------------------------------------------------------------- reveals
ALTER TABLE reveal_requests ADD COLUMN honeytokens bigint NOT NULL DEFAULT 0;
UPDATE reveal_requests r SET honeytokens = a.honeytokens FROM audit_alarms a WHERE a.request_id = r.id;
DROP TABLE audit_alarms;

-- The logins a request covers, by message id, fixed when it is recorded.
CREATE TABLE reveal_request_rows (
    request_id  bigint NOT NULL REFERENCES reveal_requests (id),
    message_id  text NOT NULL,
    PRIMARY KEY (request_id, message_id)
);
-- Requests recorded before this migration and not fetched yet keep the
-- rows they match now.
INSERT INTO reveal_request_rows (request_id, message_id)
SELECT r.id, l.message_id FROM reveal_requests r JOIN user_logins l
  ON (r.selector = 'user_id' AND l.user_id = r.value)
  OR (r.selector = 'masked_ip' AND l.masked_ip = r.value)
  OR (r.selector = 'masked_device_id' AND l.masked_device_id = r.value)
WHERE r.fetched_at IS NULL AND r.requested_at > now() - interval '24 hours';

CREATE TABLE reveal_quota (
    login    text PRIMARY KEY,
    last_at  timestamptz NOT NULL
);

ALTER TABLE reveal_policy
    -- A call of a revealer's or rotator's function in a transaction that
    -- began longer ago than this is refused: times on the record are the
    -- call's, and a transaction held open is how they were stretched.
    ADD COLUMN max_transaction_seconds integer NOT NULL DEFAULT 60 CHECK (max_transaction_seconds >= 1);

-- ------------------------------------------------------------------ keys
-- One live line-id key at most: two set-ups racing each other each found
-- none and stored one, and a file's lines would then get two sets of ids.
-- A database where that happened keeps working; the index then waits for
-- the operator (see the warning).
DO $$
BEGIN
    IF (SELECT count(*) FROM vault_keys WHERE purpose = 'line-ids' AND state <> 'destroyed') <= 1 THEN
        CREATE UNIQUE INDEX vault_keys_one_line_id_key ON vault_keys (purpose)
            WHERE purpose = 'line-ids' AND state <> 'destroyed';
    ELSE
        RAISE WARNING 'more than one live line-id key: keep the one in use, destroy the others, then create index vault_keys_one_line_id_key (migration 0010)';
    END IF;
END
$$;

-- ------------------------------------------------------------ honeytokens
CREATE TABLE honeytoken_logins (
    id        bigserial PRIMARY KEY,
    user_id   text NOT NULL REFERENCES honeytokens (user_id),
    -- Its message id among SQS messages, and among the lines of a file:
    -- the worker takes the one shaped like its batch's.
    uuid_id   text NOT NULL UNIQUE,
    line_id   text NOT NULL UNIQUE,
    -- The synthetic originals ({"user_id", "ip", "device_id"}): made up,
    -- nobody's PII. The worker fills the other fields from a neighbour.
    body      text NOT NULL,
    due_at    timestamptz NOT NULL
);
CREATE INDEX honeytoken_logins_due ON honeytoken_logins (due_at);
