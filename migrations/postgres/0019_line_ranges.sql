-- The first-load day of file lines, by runs of line numbers instead of by
-- message id.
--
-- Why: line_dates (0017) held a row per file line, keyed by its message
-- id, a keyed hash: every line loaded added an entry at a random place of
-- a B-tree as large as the logins' own unique index, and that index was
-- the one cost of a file load that a raw COPY of the same rows does not
-- pay. A load reads its lines in order, so one row per batch says the
-- same: lines first_line..last_line of `source` were first loaded on
-- create_date. A line loaded again (the file re-run next month) falls in a
-- range and keeps that range's day, so it lands in its first month's
-- partition and meets itself under the unique key. A line number not yet
-- in any range (a file that grew) starts a new range with the day of the
-- load that reads it first. Ranges of one source never overlap: they are
-- written only by pii_vault_line_days (functions/80_partitions.sql), which
-- holds a per-source lock while it reads and adds them.
--
-- line_dates stays, read-only, for the lines loaded before this migration
-- (their source and line number were never stored): pii_vault_line_days
-- also answers by message id from it, and its day wins. Retention deletes
-- from both. Workers no longer write it (functions/90_tables.sql revokes
-- their INSERT), so a worker of an earlier release fails on a file load
-- instead of writing per-line rows the new ones would not read first.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

CREATE TABLE line_ranges (
    -- The input's source id (its file name or --source-id; not PII, and
    -- kept in quarantine rows beside their line numbers already).
    source      text NOT NULL,
    first_line  bigint NOT NULL,
    last_line   bigint NOT NULL,
    create_date date NOT NULL,
    PRIMARY KEY (source, first_line),
    CHECK (first_line >= 1 AND first_line <= last_line)
);

DROP FUNCTION IF EXISTS pii_vault_line_dates(text[]);
