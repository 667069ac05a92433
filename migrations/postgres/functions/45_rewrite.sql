-- Rotations by rewrite: `rotate data-keys` and `rotate token-key` copy each
-- closed partition (a range partition whose upper bound is on or before the
-- first day of the database's current month) into a new table instead of
-- updating it in place, then swap the new table in (migration 0018 says
-- why). Open partitions (this month, later months, the default partition)
-- are still rotated in place by the functions of 40_rotation.sql, which
-- leave the listed partitions alone.
--
-- The new table is a plain table outside the partitioned parent, so the
-- parent's fence triggers never see what goes into it: these functions are
-- the fence. Rows go in only re-sealed under the job's own new data keys,
-- or re-tokenised under the job's version, or copied as they are from the
-- partition they replace. Every call checks the job, its committed record
-- and its lease (pii_vault_rotation_job_check), as every rotation function
-- does. The rotator has no DDL and no INSERT of its own; no role holds any
-- privilege on the new table, before or after the swap.
--
-- Steps per partition: pii_vault_rewrite_begin (a new, empty table),
-- chunks read by pii_vault_rewrite_vault_chunk / _logins_chunk and written
-- by pii_vault_rewrite_vault_write / _logins_write, pii_vault_rewrite_index
-- (indexes, bounds, statistics: no lock on anything anyone else uses), and
-- pii_vault_rewrite_swap (the short lock).

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- Lists the closed partitions of job `j`'s table in rotation_rewrites, when
-- the job starts. Called by pii_vault_rotation_job_new only.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_plan(p_job bigint, p_table text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    this_month date := date_trunc('month', clock_timestamp() AT TIME ZONE 'UTC')::date;
BEGIN
    INSERT INTO rotation_rewrites (job_id, partition, parent, lo, hi)
    SELECT p_job, p.name, p_table, p.lo, p.hi FROM pii_vault_partitions(p_table) p WHERE p.hi <= this_month;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_plan(bigint, text) FROM PUBLIC;

-- The oids of the partitions job `p_job` rewrites: the in-place readers of
-- 40_rotation.sql skip their rows (a swapped partition keeps its name, so
-- its new table is skipped too).
CREATE OR REPLACE FUNCTION pii_vault_rewrite_oids(p_job bigint) RETURNS oid[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT coalesce(array_agg(to_regclass(quote_ident(w.partition))::oid) FILTER (
                        WHERE to_regclass(quote_ident(w.partition)) IS NOT NULL), '{}')
    FROM rotation_rewrites w WHERE w.job_id = p_job
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_oids(bigint) FROM PUBLIC;

-- The closed partitions of a job, in order, with their state.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_list(p_record bigint, p_job bigint)
RETURNS TABLE (partition text, state text, rows_done bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    RETURN QUERY SELECT w.partition, w.state, w.rows_done FROM rotation_rewrites w
        WHERE w.job_id = p_job ORDER BY w.hi;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_list(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_list(bigint, bigint) TO pii_vault_rotator;

-- The name of the new table that replaces partition `p_partition`.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_new_name(p_partition text) RETURNS text
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT left(p_partition, 55) || '_rewrite'
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_new_name(text) FROM PUBLIC;

-- The job `p_job` (checked) and its row for `p_partition`, which must be
-- in one of `p_states`; the job's kind must rewrite `p_parent`'s
-- partitions when given. Raises otherwise.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_check(p_record bigint, p_job bigint, p_partition text, p_states text[],
                                                   p_parent text) RETURNS rotation_rewrites
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    w rotation_rewrites;
BEGIN
    SELECT * INTO w FROM rotation_rewrites r WHERE r.job_id = p_job AND r.partition = p_partition;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('%s is not a partition rotation job %s rewrites', p_partition, p_job);
    END IF;
    IF NOT (w.state = ANY (p_states)) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('partition %s of rotation job %s is %s, not %s', p_partition, p_job, w.state,
                             array_to_string(p_states, ' or '));
    END IF;
    IF p_parent IS NOT NULL AND w.parent <> p_parent THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('partition %s of rotation job %s is of %s, not %s', p_partition, p_job, w.parent, p_parent);
    END IF;
    PERFORM pii_vault_rotation_job_is(j, CASE w.parent WHEN 'vault' THEN 'rotate-data-keys' ELSE 'rotate-token-key' END);
    RETURN w;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_check(bigint, bigint, text, text[], text) FROM PUBLIC;

-- The columns of `p_parent`, in order, as a select list over alias `p_from`,
-- each column named in `p_replaced` taken from alias `u` instead.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_columns(p_parent text, p_from text, p_replaced text[]) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT string_agg(CASE WHEN a.attname = ANY (p_replaced) THEN 'u.' ELSE p_from || '.' END || quote_ident(a.attname),
                      ', ' ORDER BY a.attnum)
    FROM pg_attribute a
    WHERE a.attrelid = p_parent::regclass AND a.attnum > 0 AND NOT a.attisdropped
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_columns(text, text, text[]) FROM PUBLIC;

-- Starts (or starts over) the rewrite of `p_partition`: its new table,
-- left half-filled by a killed run, is dropped and made again, empty, like
-- the parent and without indexes (rows go in faster, and each index is
-- then built in one sorted pass). False, with the partition marked `gone`,
-- when retention dropped it since the job started.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_begin(p_record bigint, p_job bigint, p_partition text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition,
                                                   ARRAY['pending', 'filling', 'indexed'], NULL);
    new text := pii_vault_rewrite_new_name(p_partition);
BEGIN
    IF to_regclass(quote_ident(new)) IS NOT NULL THEN
        EXECUTE format('DROP TABLE %I', new);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pii_vault_partitions(w.parent) p
                   WHERE p.name = p_partition AND p.lo IS NOT DISTINCT FROM w.lo AND p.hi = w.hi) THEN
        UPDATE rotation_rewrites r SET state = 'gone' WHERE r.job_id = p_job AND r.partition = p_partition;
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)', new, w.parent);
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, '
                   'pii_vault_rotator, pii_vault_auditor, pii_vault_searcher', new);
    UPDATE rotation_rewrites r SET state = 'filling', rows_done = 0
    WHERE r.job_id = p_job AND r.partition = p_partition;
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_begin(bigint, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_begin(bigint, bigint, text) TO pii_vault_rotator;

-- The writers below join a chunk's arrays to the partition by key: one
-- index probe a row. Left to itself, the planner, which knows the arrays'
-- length, hashes the whole partition for every chunk instead (41 ms a chunk
-- of 5,000 against 14 ms at 85,000 rows a month, and a rewrite quadratic in
-- the month's size), hence their settings (and no JIT, which that plan's
-- cost on paper would otherwise buy for every chunk).

-- ------------------------------------------------------------- data keys
-- Up to `p_limit` rows of vault partition `p_partition` under the job's old
-- keys with a message id above `p_after`, in message id order.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_vault_chunk(p_record bigint, p_job bigint, p_partition text,
                                                         p_after text, p_limit int)
RETURNS TABLE (message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET max_parallel_workers_per_gather = 0
SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['filling'], 'vault');
    old text[] := (SELECT j.old_keys FROM rotation_jobs j WHERE j.id = p_job);
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT v.message_id, v.user_id::text, v.key_id, v.nonce, v.ciphertext FROM %I v '
        'WHERE v.message_id > $1 AND v.key_id = ANY ($2) ORDER BY v.message_id LIMIT $3', w.partition)
        USING p_after, old, p_limit;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_vault_chunk(bigint, bigint, text, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_vault_chunk(bigint, bigint, text, text, int) TO pii_vault_rotator;

-- Writes one chunk into the new table of `p_partition`: each row of the
-- partition named by `p_ids` that is still under its old key `p_old`, one
-- of the job's old keys, re-sealed under `p_new`, one of the job's own new
-- keys; and the rows named by `p_keep` (rows the rotation could not open)
-- as they are. Returns the rows written.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_vault_write(p_record bigint, p_job bigint, p_partition text,
                                                         p_ids text[], p_old text[], p_new text[], p_nonces bytea[],
                                                         p_cts bytea[], p_keep text[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['filling'], 'vault');
    j rotation_jobs;
    new text := pii_vault_rewrite_new_name(p_partition);
    n bigint;
    kept bigint;
BEGIN
    SELECT * INTO j FROM rotation_jobs r WHERE r.id = p_job;
    PERFORM pii_vault_rotation_check_keys(j, p_old, p_new);
    EXECUTE format('INSERT INTO %I SELECT %s FROM %I v '
                   'JOIN unnest($1, $2, $3, $4, $5) AS u(message_id, old_key, key_id, nonce, ciphertext) '
                   'ON v.message_id = u.message_id AND v.key_id = u.old_key',
                   new, pii_vault_rewrite_columns('vault', 'v', ARRAY['key_id', 'nonce', 'ciphertext']), w.partition)
        USING p_ids, p_old, p_new, p_nonces, p_cts;
    GET DIAGNOSTICS n = ROW_COUNT;
    EXECUTE format('INSERT INTO %I SELECT %s FROM %I v WHERE v.message_id = ANY ($1) AND v.key_id = ANY ($2)',
                   new, pii_vault_rewrite_columns('vault', 'v', '{}'), w.partition)
        USING coalesce(p_keep, '{}'), j.old_keys;
    GET DIAGNOSTICS kept = ROW_COUNT;
    UPDATE rotation_rewrites r SET rows_done = r.rows_done + n WHERE r.job_id = p_job AND r.partition = p_partition;
    RETURN n + kept;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_vault_write(bigint, bigint, text, text[], text[], text[], bytea[], bytea[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_vault_write(bigint, bigint, text, text[], text[], text[], bytea[], bytea[], text[])
    TO pii_vault_rotator;

-- ------------------------------------------------------------- token key
-- Up to `p_limit` logins of user_logins partition `p_partition` with a login
-- id above `p_after` and tokens not of the job's version, in id order, with
-- their sealed originals (NULL where the vault row is gone: erased). The
-- vault row is looked up by day too: one probe into its month's partition
-- (pruned as each login is read), not one into every month's (47 ms a
-- chunk of 5,000 against 13 ms, over 18 monthly partitions).
CREATE OR REPLACE FUNCTION pii_vault_rewrite_logins_chunk(p_record bigint, p_job bigint, p_partition text,
                                                          p_after bigint, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET enable_hashjoin = off
SET enable_mergejoin = off SET max_parallel_workers_per_gather = 0 SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['filling'], 'user_logins');
    pat text := 't' || (SELECT j.token_version FROM rotation_jobs j WHERE j.id = p_job) || '\_%';
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT l.id, l.message_id, v.user_id::text, v.key_id, v.nonce, v.ciphertext FROM %I l '
        'LEFT JOIN LATERAL (SELECT x.user_id, x.key_id, x.nonce, x.ciphertext FROM vault x '
        '                   WHERE x.message_id = l.message_id AND x.create_date = l.create_date LIMIT 1) v ON true '
        'WHERE l.id > $1 AND (l.masked_ip NOT LIKE $2 OR l.masked_device_id NOT LIKE $2) '
        'ORDER BY l.id LIMIT $3', w.partition)
        USING p_after, pat, p_limit;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_logins_chunk(bigint, bigint, text, bigint, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_logins_chunk(bigint, bigint, text, bigint, int) TO pii_vault_rotator;

-- Writes one chunk into the new table of `p_partition`: each login named
-- by `p_ids` with its new tokens, every one of the job's version (a network
-- token may be NULL where they are turned off); and the logins named by
-- `p_keep` (erased originals, or originals that could not be opened) as
-- they are. Returns the rows written.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_logins_write(p_record bigint, p_job bigint, p_partition text,
                                                          p_ids bigint[], p_ips text[], p_devs text[], p_nets text[],
                                                          p_keep bigint[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['filling'], 'user_logins');
    j rotation_jobs := (SELECT r FROM rotation_jobs r WHERE r.id = p_job);
    new text := pii_vault_rewrite_new_name(p_partition);
    n bigint;
    kept bigint;
BEGIN
    PERFORM pii_vault_rotation_check_tokens(j, p_ids, p_ips, p_devs, p_nets);
    EXECUTE format('INSERT INTO %I SELECT %s FROM %I l '
                   'JOIN unnest($1, $2, $3, $4) AS u(id, masked_ip, masked_device_id, masked_ip_net) ON l.id = u.id',
                   new, pii_vault_rewrite_columns('user_logins', 'l',
                                                  ARRAY['masked_ip', 'masked_device_id', 'masked_ip_net']),
                   w.partition)
        USING p_ids, p_ips, p_devs, p_nets;
    GET DIAGNOSTICS n = ROW_COUNT;
    EXECUTE format('INSERT INTO %I SELECT %s FROM %I l WHERE l.id = ANY ($1)',
                   new, pii_vault_rewrite_columns('user_logins', 'l', '{}'), w.partition)
        USING coalesce(p_keep, '{}');
    GET DIAGNOSTICS kept = ROW_COUNT;
    UPDATE rotation_rewrites r SET rows_done = r.rows_done + n WHERE r.job_id = p_job AND r.partition = p_partition;
    RETURN n + kept;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_logins_write(bigint, bigint, text, bigint[], text[], text[], text[], bigint[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_logins_write(bigint, bigint, text, bigint[], text[], text[], text[], bigint[])
    TO pii_vault_rotator;

-- ----------------------------------------------------------------- index
-- Builds, on the filled new table of `p_partition`, one index per index of
-- the parent (a unique constraint as a constraint: ATTACH matches a
-- constraint's index only to a constraint's) and a validated CHECK of the
-- partition's bounds, so that the swap's ATTACH finds every index and
-- reads no row; then its statistics. Nobody else uses the new table, so
-- none of this holds up anyone.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_index(p_record bigint, p_job bigint, p_partition text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['filling'], NULL);
    new text := pii_vault_rewrite_new_name(p_partition);
    pi record;
    n int := 0;
BEGIN
    FOR pi IN
        SELECT i.indexrelid, i.indisunique, con.oid AS conoid, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
        WHERE i.indrelid = w.parent::regclass ORDER BY i.indexrelid
    LOOP
        n := n + 1;
        IF pi.conoid IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I %s', new, left(new, 56) || '_i' || n,
                           pg_get_constraintdef(pi.conoid));
        ELSE
            EXECUTE format('CREATE %sINDEX %I ON %I USING %s', CASE WHEN pi.indisunique THEN 'UNIQUE ' ELSE '' END,
                           left(new, 56) || '_i' || n, new, substring(pi.def FROM ' USING (.*)$'));
        END IF;
    END LOOP;
    IF w.lo IS NULL THEN
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (create_date IS NOT NULL AND create_date < %L)',
                       new, left(p_partition, 56) || '_bounds', w.hi);
    ELSE
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (create_date IS NOT NULL AND create_date >= %L '
                       'AND create_date < %L)', new, left(p_partition, 57) || '_month', w.lo, w.hi);
    END IF;
    EXECUTE format('ANALYZE %I', new);
    UPDATE rotation_rewrites r SET state = 'indexed' WHERE r.job_id = p_job AND r.partition = p_partition;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_index(bigint, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_index(bigint, bigint, text) TO pii_vault_rotator;

-- ------------------------------------------------------------------ swap
-- Puts the new table of `p_partition` in its place, in one transaction:
-- * SHARE UPDATE EXCLUSIVE on the parent alone first (ATTACH takes it at
--   the end anyway; readers and writers go on; ONLY, so that VACUUM of
--   other months goes on too), then SHARE on the partition:
--   writes into that month (late redeliveries, erasures) wait from here;
-- * the new table is made equal to the partition: rows the partition no
--   longer has (erased since they were copied) are deleted, and rows it
--   has that the new table lacks (written after their chunk was read, so
--   under a data key the job did not retire, or with tokens of the job's
--   version: checked, refused otherwise) are copied as they are; the row
--   counts must then be equal;
-- * with lock_timeout 10s (a refusal rolls all of it back, the caller
--   tries again): DETACH the partition, ATTACH the new table with the same
--   bounds (its CHECK spares the scan; a default partition is still
--   checked, as for any new partition), DROP the old one, give the new
--   table and its indexes the old names, make sure no role holds
--   anything on it, and, for a settled month of the vault, give it the
--   trigger that counts late rows (migration 0020; the old one went with
--   the old table).
-- Returns the rows copied under the lock; 0 for a partition already
-- swapped (a retry after a lost answer). A partition that retention
-- dropped meanwhile has its new table dropped and is marked `gone`.
CREATE OR REPLACE FUNCTION pii_vault_rewrite_swap(p_record bigint, p_job bigint, p_partition text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    w rotation_rewrites := pii_vault_rewrite_check(p_record, p_job, p_partition, ARRAY['indexed', 'swapped'], NULL);
    j rotation_jobs;
    new text := pii_vault_rewrite_new_name(p_partition);
    key_cols constant text := 'n.message_id = o.message_id AND n.create_date = o.create_date';
    pat text;
    copied bigint;
    bad bigint;
    n_old bigint;
    n_new bigint;
    names record;
    parents oid[];
    old_names text[];
BEGIN
    IF w.state = 'swapped' THEN
        RETURN 0;
    END IF;
    SELECT * INTO j FROM rotation_jobs r WHERE r.id = p_job;
    EXECUTE format('LOCK TABLE ONLY %I IN SHARE UPDATE EXCLUSIVE MODE', w.parent);
    IF NOT EXISTS (SELECT 1 FROM pii_vault_partitions(w.parent) p
                   WHERE p.name = p_partition AND p.lo IS NOT DISTINCT FROM w.lo AND p.hi = w.hi) THEN
        IF to_regclass(quote_ident(p_partition)) IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'PV011',
                MESSAGE = format('partition %s is no longer the partition rotation job %s listed', p_partition, p_job);
        END IF;
        IF to_regclass(quote_ident(new)) IS NOT NULL THEN
            EXECUTE format('DROP TABLE %I', new);
        END IF;
        UPDATE rotation_rewrites r SET state = 'gone' WHERE r.job_id = p_job AND r.partition = p_partition;
        RETURN 0;
    END IF;
    EXECUTE format('LOCK TABLE %I IN SHARE MODE', p_partition);

    EXECUTE format('DELETE FROM %I n WHERE NOT EXISTS (SELECT 1 FROM %I o WHERE %s)', new, p_partition, key_cols);
    IF w.parent = 'vault' THEN
        EXECUTE format('SELECT count(*) FROM %I o WHERE o.key_id = ANY ($1) '
                       'AND NOT EXISTS (SELECT 1 FROM %I n WHERE %s)', p_partition, new, key_cols)
            INTO bad USING j.old_keys;
    ELSE
        pat := 't' || j.token_version || '\_%';
        EXECUTE format('SELECT count(*) FROM %I o WHERE (o.masked_ip NOT LIKE $1 OR o.masked_device_id NOT LIKE $1) '
                       'AND EXISTS (SELECT 1 FROM vault v WHERE v.message_id = o.message_id) '
                       'AND NOT EXISTS (SELECT 1 FROM %I n WHERE %s)', p_partition, new, key_cols)
            INTO bad USING pat;
    END IF;
    IF bad > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('partition %s holds %s row(s) that rotation job %s neither rewrote nor can copy as they are '
                             '(still under an old key or token version); the partition was not swapped',
                             p_partition, bad, p_job);
    END IF;
    EXECUTE format('INSERT INTO %I SELECT %s FROM %I o WHERE NOT EXISTS (SELECT 1 FROM %I n WHERE %s)',
                   new, pii_vault_rewrite_columns(w.parent, 'o', '{}'), p_partition, new, key_cols);
    GET DIAGNOSTICS copied = ROW_COUNT;
    EXECUTE format('SELECT count(*) FROM %I', p_partition) INTO n_old;
    EXECUTE format('SELECT count(*) FROM %I', new) INTO n_new;
    IF n_old <> n_new THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('the rewrite of partition %s has %s row(s), the partition %s; the partition was not swapped',
                             p_partition, n_new, n_old);
    END IF;

    -- The old partition's index names, by the parent index each belongs to.
    SELECT coalesce(array_agg(h.inhparent ORDER BY h.inhparent), '{}'), coalesce(array_agg(c.relname::text ORDER BY h.inhparent), '{}')
    INTO parents, old_names
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_inherits h ON h.inhrelid = i.indexrelid
    WHERE i.indrelid = to_regclass(quote_ident(p_partition));

    SET LOCAL lock_timeout = '10s';
    EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', w.parent, p_partition);
    IF w.lo IS NULL THEN
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)', w.parent, new, w.hi);
    ELSE
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', w.parent, new, w.lo, w.hi);
    END IF;
    EXECUTE format('DROP TABLE %I', p_partition);
    EXECUTE format('ALTER TABLE %I RENAME TO %I', new, p_partition);
    FOR names IN
        SELECT c.relname AS now, old_names[array_position(parents, h.inhparent)] AS was
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_inherits h ON h.inhrelid = i.indexrelid
        WHERE i.indrelid = to_regclass(quote_ident(p_partition)) AND h.inhparent = ANY (parents)
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', names.now, names.was);
    END LOOP;
    IF w.parent = 'vault' THEN
        PERFORM pii_vault_month_ledger_arm(p_partition, w.lo);
    END IF;
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, '
                   'pii_vault_rotator, pii_vault_auditor, pii_vault_searcher', p_partition);
    UPDATE rotation_rewrites r SET state = 'swapped', swapped_at = clock_timestamp()
    WHERE r.job_id = p_job AND r.partition = p_partition;
    RETURN copied;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rewrite_swap(bigint, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rewrite_swap(bigint, bigint, text) TO pii_vault_rotator;
