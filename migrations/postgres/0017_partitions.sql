-- vault and user_logins partitioned by month of create_date.
--
-- Why: at a billion rows, retention must drop whole months instead of
-- deleting (and vacuuming) hundreds of millions of rows, and analysts'
-- queries by date must read only their months. See docs/scale.md.
--
-- Upgrade in place, without rewriting history: each table is renamed and
-- attached, as it is, as the partition for every date up to the end of the
-- month of its newest row (`<table>_before_yYYYYmMM`), after a validated
-- CHECK that says so (which spares ATTACH its own scan). Its rows without
-- a date (legacy logins) move to the default partition `<table>_undated`,
-- which also takes any row dated in a month that has no partition yet.
-- Monthly partitions from there on are created by
-- pii_vault_partitions_ensure (functions/80_partitions.sql), which
-- `migrate` and the workers call.
--
-- A partitioned table's unique key must hold the partition key, so the
-- exactly-once key is (message_id, create_date): a message keeps its date
-- when it is delivered again (SQS SentTimestamp; a file line the day it was
-- first loaded, see the line_dates table below). NULLS NOT DISTINCT keeps
-- undated rows unique by message id alone. user_logins.id is no longer a
-- primary key (that would need create_date in it, and NOT NULL): the
-- sequence still numbers every login, and a plain index serves lookups by it.
--
-- For a large database, build the new unique indexes online first
-- (`pii-vault migrate --prepare-partitions`): ATTACH then finds them and
-- reads nothing.

DO $$
DECLARE
    t text;
    old text;
    idx record;
    newest date;
    cutoff date;
    seq text;
BEGIN
    FOREACH t IN ARRAY ARRAY['user_logins', 'vault'] LOOP
        old := t || '_single';
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t, old);
        -- Free the index and constraint names for the partitioned table.
        FOR idx IN
            SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = old::regclass
        LOOP
            EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname, left('single_' || idx.relname, 63));
        END LOOP;
        -- The fences are the parent's statement triggers now (functions/20_keys.sql).
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_fence_insert', old);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_fence_update', old);

        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE) '
                       'PARTITION BY RANGE (create_date)', t, old);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I DEFAULT', t || '_undated', t);

        EXECUTE format('SELECT max(create_date) FROM %I', old) INTO newest;
        IF newest IS NULL THEN
            -- Nothing dated (a new database): move whatever is undated and
            -- drop the old table.
            EXECUTE format('INSERT INTO %I SELECT * FROM %I', t || '_undated', old);
            IF t = 'user_logins' THEN
                seq := pg_get_serial_sequence(old, 'id');
                EXECUTE format('ALTER SEQUENCE %s OWNED BY user_logins.id', seq);
            END IF;
            EXECUTE format('DROP TABLE %I', old);
            CONTINUE;
        END IF;

        cutoff := (date_trunc('month', newest) + interval '1 month')::date;
        EXECUTE format('INSERT INTO %I SELECT * FROM %I WHERE create_date IS NULL', t || '_undated', old);
        EXECUTE format('DELETE FROM %I WHERE create_date IS NULL', old);
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (create_date IS NOT NULL AND create_date < %L) NOT VALID',
                       old, old || '_dated', cutoff);
        EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', old, old || '_dated');
        IF t = 'user_logins' THEN
            seq := pg_get_serial_sequence(old, 'id');
            EXECUTE format('ALTER SEQUENCE %s OWNED BY user_logins.id', seq);
        END IF;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', t, old, cutoff);
        EXECUTE format('ALTER TABLE %I RENAME TO %I', old,
                       format('%s_before_y%sm%s', t, to_char(cutoff, 'YYYY'), to_char(cutoff, 'MM')));
    END LOOP;
END
$$;

-- Unique keys and indexes on the parents: created on every partition, and
-- matched to an equal index where the old table has one.
-- Unique indexes rather than constraints: ATTACH adopts an equal index
-- that `migrate --prepare-partitions` built online, and ON CONFLICT needs
-- no more.
CREATE UNIQUE INDEX user_logins_message_id_key ON user_logins (message_id, create_date) NULLS NOT DISTINCT;
CREATE INDEX user_logins_user_id ON user_logins (user_id);
-- What the primary key on id gave: `rotate token-key` writes tokens by login
-- id, and its final sweep reads in id order.
CREATE INDEX user_logins_id ON user_logins (id);
CREATE INDEX user_logins_masked_ip ON user_logins (masked_ip);
CREATE INDEX user_logins_masked_device_id ON user_logins (masked_device_id);

CREATE UNIQUE INDEX vault_message_id_key ON vault (message_id, create_date) NULLS NOT DISTINCT;
CREATE INDEX vault_user_id ON vault (user_id);
CREATE INDEX vault_key_id ON vault (key_id);

-- Partitions are read and written through their parent only: no role holds
-- anything on one (functions/90_tables.sql grants on the parents), so no
-- statement can skip the parent's fences. The old tables' grants go.
DO $$
DECLARE
    p regclass;
BEGIN
    FOR p IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent IN ('user_logins'::regclass, 'vault'::regclass) LOOP
        EXECUTE format('REVOKE ALL ON %s FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, '
                       'pii_vault_rotator, pii_vault_auditor, pii_vault_searcher', p);
    END LOOP;
END
$$;

-- The day each file line was first loaded, by its message id. A file line
-- has no time of its own, and the day it is read would put a re-run of the
-- file on a later day into another partition, where the unique key would
-- not see it. Workers add to it (COPY, no SELECT); the dates come back only
-- through pii_vault_line_dates. Ids and days only: nothing about a user.
CREATE TABLE line_dates (
    message_id  text PRIMARY KEY,
    create_date date NOT NULL
);

-- pii_vault_retention returns the partitions it dropped now (a new result
-- column needs the old function gone; functions/50_erasure.sql recreates it).
DROP FUNCTION IF EXISTS pii_vault_retention(date, text, text);

-- File lines stored before this migration: their first-load day is the day
-- they were stored with.
INSERT INTO line_dates (message_id, create_date)
SELECT message_id, create_date FROM user_logins WHERE message_id LIKE 'line-%' AND create_date IS NOT NULL;

-- Retention names every user a dropped month touched in erasure_subjects
-- (a row per user), and the foreign key's per-row check of audit_log cost
-- as much as the rest of the erasure together. The rows are written only by
-- the erasure functions, in the transaction of the audit row they name
-- (functions/50_erasure.sql); no role writes the table.
ALTER TABLE erasure_subjects DROP CONSTRAINT erasure_subjects_record_fkey;

-- A reveal's rows keep each login's day, so that its fetch reads one
-- partition per login (functions/30_reveal.sql).
ALTER TABLE reveal_request_rows ADD COLUMN create_date date;
