-- What migrations/postgres/0012_quarantine_tools.sql brought, on the
-- embedded default: where a file reject came from (`source`: the input's
-- source id, its file name or `--source-id`, not PII; `line`: its line
-- number), and each `quarantine show` of a body, fetched once.

ALTER TABLE quarantine ADD COLUMN source TEXT;
ALTER TABLE quarantine ADD COLUMN line INTEGER;
-- A replayed message keeps its row as a tombstone (no body, key or user
-- id): a redelivery or a rerun of the same file stays a duplicate.
ALTER TABLE quarantine ADD COLUMN replayed_at TEXT;

CREATE TABLE quarantine_reveals (
    record        INTEGER PRIMARY KEY,
    message_id    TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  TEXT NOT NULL,
    fetched_at    TEXT
);

-- Each `quarantine replay`: its data key and the messages it covers.
CREATE TABLE quarantine_replays (
    record        INTEGER PRIMARY KEY,
    key_id        TEXT NOT NULL,
    finished_at   TEXT
);

CREATE TABLE quarantine_replay_rows (
    record      INTEGER NOT NULL,
    message_id  TEXT NOT NULL,
    PRIMARY KEY (record, message_id)
);
