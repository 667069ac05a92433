-- Quarantine tools (`pii-vault quarantine list|show|replay`).
--
-- * Where a file reject came from: `source` is the input's source id (its
--   file name, without the directory, or the `--source-id` given for
--   standard input) and `line` its line number. Neither is PII: a file
--   name names an export, not a person. SQS rejects have neither (their
--   message id is the SQS one).
-- * quarantine_reveals: each `quarantine show` of a body, fixed when its
--   audit row is recorded, fetched once.
-- * quarantine_replays / quarantine_replay_rows: each `quarantine replay`,
--   its data key and the quarantined messages it covers, fixed when its
--   audit row is recorded.
-- The functions that use them are in functions/60_quarantine.sql.

ALTER TABLE quarantine ADD COLUMN source text, ADD COLUMN line bigint, ADD COLUMN replayed_at timestamptz;

CREATE TABLE quarantine_reveals (
    record        bigint PRIMARY KEY,
    message_id    text NOT NULL,
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL,
    fetched_at    timestamptz
);
CREATE INDEX quarantine_reveals_by ON quarantine_reveals (requested_by, requested_at);

CREATE TABLE quarantine_replays (
    record        bigint PRIMARY KEY,
    key_id        text NOT NULL,
    requested_by  text NOT NULL,
    finished_at   timestamptz
);

CREATE TABLE quarantine_replay_rows (
    record      bigint NOT NULL,
    message_id  text NOT NULL,
    PRIMARY KEY (record, message_id)
);

REVOKE ALL ON quarantine_reveals, quarantine_replays, quarantine_replay_rows FROM PUBLIC;
