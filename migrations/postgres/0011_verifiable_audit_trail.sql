-- An audit trail an auditor can verify without trusting the database
-- owner. This file changes tables only; the chain's triggers, the encoding
-- they hash and the auditor's functions are in
-- migrations/postgres/functions/15_audit_chain.sql, which also hashes the
-- rows written before this migration (once, the first time it finds no
-- chain head).
--
-- * Every audit row carries prev_hash and hash = SHA-256(prev_hash ‖ its
--   canonical encoding); reveal requests (which hold the honeytoken alarms
--   and the users each reveal returned) form a second chain of their own,
--   readable only by the owner and the auditor, so that a revealer cannot
--   test a hash for "this request touched a honeytoken".
-- * audit_chain holds each chain's head; writers are serialised on it, and
--   the trigger takes the row's id under that lock, so chain order is id
--   order. It also holds the base: what was archived (rows up to base_id,
--   the hash of the last one, how many).
-- * audit_checkpoints keeps a copy of each signed checkpoint (the copy
--   that counts is the one shipped outside the database).
-- * reveal_requests.subjects: the users a request returned, fixed when it
--   is recorded; erasure_subjects: the users an erasure touched. Together
--   they answer "who saw, and who erased, the data of user U".
-- * pii_vault_auditor: reads the trail, the alarms and the checkpoints,
--   nothing of the data.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pii_vault_auditor') THEN
        BEGIN
            CREATE ROLE pii_vault_auditor NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
        END;
    END IF;
    -- As for the other roles (0002): CONNECT and USAGE where this role may
    -- grant them, a notice for the DBA otherwise.
    IF pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO pii_vault_auditor', current_database());
    ELSE
        RAISE NOTICE 'not the owner of database %: grant CONNECT to pii_vault_auditor if PUBLIC lacks it',
            current_database();
    END IF;
    IF pg_has_role((SELECT nspowner FROM pg_namespace WHERE nspname = current_schema()), 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO pii_vault_auditor', current_schema());
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM pii_vault_auditor', current_schema());
    ELSE
        RAISE NOTICE 'not the owner of schema %: grant USAGE on it to pii_vault_auditor if PUBLIC lacks it',
            current_schema();
    END IF;
END
$$;

CREATE TABLE audit_chain (
    chain       text PRIMARY KEY CHECK (chain IN ('trail', 'requests')),
    head_id     bigint NOT NULL,
    head_hash   bytea NOT NULL,
    -- Rows in the chain since it began, archived ones included.
    count       bigint NOT NULL,
    base_id     bigint NOT NULL DEFAULT 0,
    base_hash   bytea NOT NULL,
    base_count  bigint NOT NULL DEFAULT 0
);

ALTER TABLE audit_log ADD COLUMN prev_hash bytea, ADD COLUMN hash bytea;
-- The chain trigger takes the id under the chain's lock: a default taken
-- before it would let two writers chain in another order than their ids.
ALTER TABLE audit_log ALTER COLUMN id DROP DEFAULT;

ALTER TABLE reveal_requests
    ADD COLUMN subjects text[],
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash bytea;
-- Requests recorded before this migration whose rows were fixed (0010):
-- their users now. Older ones keep NULL (not recorded); the subject
-- ledger then goes by the request's own user id selector.
UPDATE reveal_requests r SET subjects = s.users
FROM (SELECT rr.request_id, array_agg(DISTINCT l.user_id::text ORDER BY l.user_id::text) AS users
      FROM reveal_request_rows rr JOIN user_logins l ON l.message_id = rr.message_id
      WHERE l.user_id IS NOT NULL
      GROUP BY rr.request_id) s
WHERE s.request_id = r.id;
CREATE INDEX reveal_requests_subjects ON reveal_requests USING gin (subjects);

CREATE TABLE erasure_subjects (
    record   bigint NOT NULL REFERENCES audit_log (id),
    user_id  text NOT NULL,
    rows     bigint NOT NULL,
    PRIMARY KEY (record, user_id)
);
CREATE INDEX erasure_subjects_user ON erasure_subjects (user_id);
-- Erasures of one user before this migration name the user in the target.
INSERT INTO erasure_subjects (record, user_id, rows)
SELECT id, substr(target, length('user_id=') + 1), row_count FROM audit_log
WHERE action = 'forget' AND target LIKE 'user_id=%';

CREATE TABLE audit_checkpoints (
    seq        bigint PRIMARY KEY,
    at         timestamptz NOT NULL,
    -- The signed JSON line, as shipped.
    line       text NOT NULL,
    stored_by  text NOT NULL,
    stored_at  timestamptz NOT NULL
);
