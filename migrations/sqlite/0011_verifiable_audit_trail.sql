-- What migrations/postgres/0011_verifiable_audit_trail.sql brought, on the
-- embedded default: the two hash chains (computed by the store's one
-- writer, src/store/sqlite/trail.rs, with the encoding of src/trail/), the
-- checkpoints' copies, the users each reveal returned and each erasure
-- touched. The alarms become a view of the requests, as on Postgres, so
-- that they are in the requests' chain.
--
-- The file's owner can edit anything in it; the triggers here are guard
-- rails against mistakes, and the chain plus checkpoints kept elsewhere
-- are what shows an edit.

-- head_id -1: the rows already here are not hashed yet; the store hashes
-- them, in id order, when it next opens the file.
CREATE TABLE audit_chain (
    chain       TEXT PRIMARY KEY CHECK (chain IN ('trail', 'requests')),
    head_id     INTEGER NOT NULL,
    head_hash   BLOB NOT NULL,
    count       INTEGER NOT NULL,
    base_id     INTEGER NOT NULL DEFAULT 0,
    base_hash   BLOB NOT NULL,
    base_count  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO audit_chain (chain, head_id, head_hash, count, base_hash)
VALUES ('trail', -1, zeroblob(32), 0, zeroblob(32)), ('requests', -1, zeroblob(32), 0, zeroblob(32));

-- Postgres's writing transaction; always NULL here, a column so that both
-- backends read the trail with one SELECT.
ALTER TABLE audit_log ADD COLUMN xact INTEGER;
ALTER TABLE audit_log ADD COLUMN prev_hash BLOB;
ALTER TABLE audit_log ADD COLUMN hash BLOB;
-- Rows are hashed once (their hash set while it is NULL), then never change;
-- rows through the chain's base (archived) may be deleted.
DROP TRIGGER audit_log_no_update;
DROP TRIGGER audit_log_no_delete;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log WHEN OLD.hash IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'PV009 audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
WHEN OLD.id > (SELECT base_id FROM audit_chain WHERE chain = 'trail')
BEGIN SELECT RAISE(ABORT, 'PV009 audit_log is append-only'); END;

ALTER TABLE reveal_requests ADD COLUMN honeytokens INTEGER NOT NULL DEFAULT 0;
-- A JSON array of user ids (NULL: recorded before they were).
ALTER TABLE reveal_requests ADD COLUMN subjects TEXT;
ALTER TABLE reveal_requests ADD COLUMN prev_hash BLOB;
ALTER TABLE reveal_requests ADD COLUMN hash BLOB;
-- Requests of 0002, before requests had their own time: their audit row's.
UPDATE reveal_requests SET requested_at = (SELECT a.at FROM audit_log a WHERE a.id = reveal_requests.id)
WHERE requested_at = '';
UPDATE reveal_requests SET honeytokens = (SELECT sum(a.honeytokens) FROM audit_alarms a WHERE a.request_id = reveal_requests.id)
WHERE id IN (SELECT request_id FROM audit_alarms);
UPDATE reveal_requests SET subjects = (
    SELECT json_group_array(u) FROM (
        SELECT DISTINCT l.user_id AS u FROM reveal_request_rows rr JOIN user_logins l ON l.message_id = rr.message_id
        WHERE rr.request_id = reveal_requests.id AND l.user_id IS NOT NULL ORDER BY u))
WHERE id IN (SELECT request_id FROM reveal_request_rows);
CREATE TRIGGER reveal_requests_fixed BEFORE UPDATE OF id, requested_at, requested_by, selector, value, reason, users,
    honeytokens, subjects, prev_hash, hash ON reveal_requests
WHEN OLD.hash IS NOT NULL
BEGIN SELECT RAISE(ABORT, 'PV009 a reveal request''s recorded fields cannot change'); END;
CREATE TRIGGER reveal_requests_no_delete BEFORE DELETE ON reveal_requests
WHEN OLD.id > (SELECT base_id FROM audit_chain WHERE chain = 'requests')
BEGIN SELECT RAISE(ABORT, 'PV009 reveal requests are deleted only by pii-vault audit archive'); END;

DROP TABLE audit_alarms;
CREATE VIEW audit_alarms AS
    SELECT r.id, r.requested_at AS at, r.requested_by AS actor, r.id AS request_id,
           r.selector || '=' || r.value AS target, r.honeytokens
    FROM reveal_requests r
    WHERE r.honeytokens > 0;

CREATE TABLE erasure_subjects (
    record   INTEGER NOT NULL REFERENCES audit_log (id),
    user_id  TEXT NOT NULL,
    rows     INTEGER NOT NULL,
    PRIMARY KEY (record, user_id)
);
CREATE INDEX erasure_subjects_user ON erasure_subjects (user_id);
INSERT INTO erasure_subjects (record, user_id, rows)
SELECT id, substr(target, length('user_id=') + 1), row_count FROM audit_log
WHERE action = 'forget' AND target LIKE 'user_id=%';

CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,
    at         TEXT NOT NULL,
    line       TEXT NOT NULL,
    stored_by  TEXT NOT NULL,
    stored_at  TEXT NOT NULL
);
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'PV009 audit_checkpoints is append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN SELECT RAISE(ABORT, 'PV009 audit_checkpoints is append-only'); END;
