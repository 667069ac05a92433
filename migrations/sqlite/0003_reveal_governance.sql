-- Reveal governance on the embedded default: the same policy, requests and
-- honeytokens as on Postgres (migrations/postgres/0004_reveal_governance.sql).
-- One SQLite file has one principal (the operating-system user that runs
-- the command), so the two-person rule holds only between different system
-- users sharing the file; it is meant for Postgres.

CREATE TABLE reveal_policy (
    singleton             INTEGER PRIMARY KEY CHECK (singleton = 1),
    max_users_per_reveal  INTEGER NOT NULL DEFAULT 10 CHECK (max_users_per_reveal >= 1),
    max_reveals_per_day   INTEGER NOT NULL DEFAULT 50 CHECK (max_reveals_per_day >= 1),
    changed_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    changed_by            TEXT NOT NULL DEFAULT ''
);
INSERT INTO reveal_policy (singleton) VALUES (1);
CREATE TRIGGER reveal_policy_no_delete BEFORE DELETE ON reveal_policy
BEGIN SELECT RAISE(ABORT, 'PV009 the reveal policy cannot be deleted'); END;

ALTER TABLE reveal_requests ADD COLUMN status TEXT NOT NULL DEFAULT 'granted'
    CHECK (status IN ('granted', 'pending', 'approved'));
ALTER TABLE reveal_requests ADD COLUMN users INTEGER NOT NULL DEFAULT 0;
ALTER TABLE reveal_requests ADD COLUMN requested_at TEXT NOT NULL DEFAULT '';
ALTER TABLE reveal_requests ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE reveal_requests ADD COLUMN approved_by TEXT;
ALTER TABLE reveal_requests ADD COLUMN approved_at TEXT;
ALTER TABLE reveal_requests ADD COLUMN fetch_record INTEGER REFERENCES audit_log (id);

CREATE TABLE honeytokens (
    user_id     TEXT PRIMARY KEY,
    planted_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    planted_by  TEXT NOT NULL DEFAULT ''
);

CREATE TABLE audit_alarms (
    id           INTEGER PRIMARY KEY,
    at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    actor        TEXT NOT NULL,
    request_id   INTEGER NOT NULL,
    target       TEXT NOT NULL,
    honeytokens  INTEGER NOT NULL
);
CREATE TRIGGER audit_alarms_no_update BEFORE UPDATE ON audit_alarms
BEGIN SELECT RAISE(ABORT, 'audit_alarms is append-only'); END;
CREATE TRIGGER audit_alarms_no_delete BEFORE DELETE ON audit_alarms
BEGIN SELECT RAISE(ABORT, 'audit_alarms is append-only'); END;
