-- Rotation jobs that outlive the process running them, as on Postgres
-- (migrations/postgres/0005_rotation_scale.sql): the old data-key set, the
-- new token version and one cursor per key range, so that a rerun of a
-- killed rotation continues where it stopped. Key lists are JSON arrays.
CREATE TABLE rotation_jobs (
    id             INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('rotate-data-keys', 'rotate-token-key')),
    started_by     INTEGER NOT NULL REFERENCES audit_log (id),
    held_by        INTEGER NOT NULL REFERENCES audit_log (id),
    old_keys       TEXT NOT NULL DEFAULT '[]',
    new_keys       TEXT NOT NULL DEFAULT '[]',
    token_version  INTEGER,
    started_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at    TEXT
);
CREATE UNIQUE INDEX rotation_jobs_one_open ON rotation_jobs (kind) WHERE finished_at IS NULL;

CREATE TABLE rotation_ranges (
    job_id     INTEGER NOT NULL REFERENCES rotation_jobs (id),
    no         INTEGER NOT NULL,
    tbl        TEXT NOT NULL CHECK (tbl IN ('vault', 'quarantine', 'user_logins')),
    lo         TEXT NOT NULL,
    hi         TEXT,
    cursor     TEXT NOT NULL,
    rows_done  INTEGER NOT NULL DEFAULT 0,
    done       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, no)
);
