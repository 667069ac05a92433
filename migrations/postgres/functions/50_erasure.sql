-- Erasure: one user's originals (`forget --user-id`), or every original
-- before a day (`forget --before`, retention). Each deletes and writes its
-- audit row, with the count, in one transaction: the rotator has no DELETE
-- of its own, so no erasure goes unrecorded and no record claims an
-- erasure that did not happen.
--
-- Honeytokens are erased like anyone: what keeps a honeytoken a trap is its
-- user id in `honeytokens` and its rows in user_logins, which stay, so a
-- reveal of it still raises the alarm. Keeping its originals would tell a
-- rotator which users are honeytokens (the only vault rows left before the
-- retention date).

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

CREATE OR REPLACE FUNCTION pii_vault_forget(p_user_id text, p_reason text, p_claimed_actor text)
RETURNS TABLE (vault_rows bigint, quarantined bigint, logins_kept bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    rid bigint;
    days date[];
    m record;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013', MESSAGE = 'an erasure needs a reason';
    END IF;
    IF p_user_id IS NULL OR length(p_user_id) > 128 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a user id is at most 128 characters';
    END IF;
    WITH d AS (DELETE FROM vault WHERE user_id = p_user_id RETURNING create_date)
    SELECT coalesce(array_agg(create_date), '{}') INTO days FROM d;
    vault_rows := cardinality(days);
    -- Off the counts of the settled months they were in.
    FOR m IN
        SELECT l.lo, count(*) AS n FROM unnest(days) x(day)
        JOIN vault_month_ledgers l ON l.erased_by IS NULL AND x.day >= l.lo AND x.day < l.hi
        GROUP BY l.lo
    LOOP
        PERFORM pii_vault_month_ledger_take(m.lo, ARRAY[p_user_id], ARRAY[m.n]);
    END LOOP;
    DELETE FROM quarantine WHERE user_id = p_user_id;
    GET DIAGNOSTICS quarantined = ROW_COUNT;
    SELECT count(*) INTO logins_kept FROM user_logins WHERE user_id = p_user_id;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('forget', 'user_id=' || p_user_id, p_reason, left(p_claimed_actor, 256), vault_rows + quarantined)
    RETURNING id INTO rid;
    INSERT INTO erasure_subject_rows (record, user_id, rows) VALUES (rid, p_user_id, vault_rows + quarantined);
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_forget(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_forget(text, text, text) TO pii_vault_rotator;

-- Every vault row of a login before `p_before` (UTC day) and every body
-- quarantined before it; then the retired data keys left with nothing to
-- open are destroyed. One audit row (action `retention`) with the count,
-- and the users it touched in erasure_subjects.
--
-- Whole months go by partition (migration 0017): each vault partition that
-- ends on or before `p_before` is detached here and dropped right after,
-- which leaves no dead tuples and takes no time per row; only the
-- partition the day cuts, and the default partition, are deleted from.
-- The drops are the caller's next calls (pii_vault_retention_drop_next,
-- below), on several connections at once: what they cost is the kernel
-- freeing the files at COMMIT, which one transaction does file by file.
-- Each partition to drop is locked against writes first (SHARE: a late
-- redelivery into that month waits), so what its ledger counts is what is
-- dropped. The subject ledger
-- of a dropped month is its month ledger (0020), counted when the month
-- was settled and handed to this erasure's record; a month not settled yet
-- is settled (counted) here first. DETACH takes ACCESS EXCLUSIVE on
-- `vault` for the moment of the metadata change at the end; `lock_timeout`
-- keeps it from queueing behind a long transaction (the call then fails,
-- having changed nothing, and can be run again). Not DETACH … CONCURRENTLY:
-- that cannot run inside a function, and a function is what lets the
-- rotator erase without holding any right on the tables.
CREATE OR REPLACE FUNCTION pii_vault_retention(p_before date, p_reason text, p_claimed_actor text)
RETURNS TABLE (vault_rows bigint, quarantined bigint, undated_kept bigint, keys_destroyed text[],
               partitions_dropped text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    rid bigint;
    users text[] := '{}';
    counts bigint[] := '{}';
    part_users text[];
    part_counts bigint[];
    ledgers bigint[] := '{}';
    cut bigint;
    q_users text[];
    q_counts bigint[];
    part record;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013', MESSAGE = 'an erasure needs a reason';
    END IF;
    IF p_before IS NULL OR p_before > (clock_timestamp() AT TIME ZONE 'UTC')::date + 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013',
            MESSAGE = 'retention erases what is older than a day that has begun: the date is in the future';
    END IF;
    -- One retention at a time: a second waits for the first to end, then
    -- erases what is left (without, it failed on the months the first had
    -- detached, and two starting together could lock the same months SHARE
    -- and deadlock on their DETACH). Waits for a lock end after 10 s, the
    -- call then changing nothing.
    PERFORM set_config('lock_timeout', '10s', true);
    PERFORM pg_advisory_xact_lock(hashtext('pii_vault_retention'));
    vault_rows := 0;
    -- The per-user counts below hash every erased row's user id once: in
    -- memory, not spilled in batches to disk.
    PERFORM set_config('work_mem', '64MB', true);
    -- Whole partitions: locked against late writes, their ledgers taken
    -- (a month not settled yet is counted now); dropped at the end.
    SELECT coalesce(array_agg(p.name ORDER BY p.hi), '{}') INTO partitions_dropped
    FROM pii_vault_partitions('vault') p WHERE p.hi <= p_before;
    IF cardinality(partitions_dropped) > 0 THEN
        EXECUTE format('LOCK TABLE %s IN SHARE MODE',
                       (SELECT string_agg(quote_ident(x), ', ') FROM unnest(partitions_dropped) x));
        FOR part IN SELECT p.name, coalesce(p.lo, '-infinity') AS lo, p.hi
                    FROM pii_vault_partitions('vault') p WHERE p.name = ANY (partitions_dropped) ORDER BY p.hi LOOP
            ledgers := ledgers || pii_vault_month_settle(part.name, part.lo, part.hi);
        END LOOP;
        SELECT coalesce(sum(l.rows), 0) INTO vault_rows FROM vault_month_ledgers l WHERE l.id = ANY (ledgers);
    END IF;
    -- The partition the day cuts, and dated rows waiting in the default one.
    FOR part IN
        SELECT p.name, coalesce(p.lo, '-infinity') AS lo
        FROM pii_vault_partitions('vault') p WHERE p.hi > p_before AND coalesce(p.lo, '-infinity') < p_before
        UNION ALL SELECT 'vault_undated', NULL
    LOOP
        EXECUTE format('WITH d AS (DELETE FROM %I WHERE create_date < %L RETURNING user_id) '
                       'SELECT coalesce(sum(n), 0), coalesce(array_agg(user_id), ''{}''), coalesce(array_agg(n), ''{}'') '
                       'FROM (SELECT user_id, count(*) AS n FROM d GROUP BY user_id) g', part.name, p_before)
            INTO cut, part_users, part_counts;
        IF part.lo IS NOT NULL AND cut > 0 THEN
            PERFORM pii_vault_month_ledger_take(part.lo, part_users, part_counts);
        END IF;
        vault_rows := vault_rows + cut;
        users := users || part_users;
        counts := counts || part_counts;
    END LOOP;
    WITH d AS (DELETE FROM quarantine WHERE received_at < (p_before::timestamp AT TIME ZONE 'UTC') RETURNING user_id),
         g AS (SELECT user_id, count(*) AS n FROM d GROUP BY user_id)
    SELECT coalesce(sum(n), 0), coalesce(array_agg(user_id) FILTER (WHERE user_id IS NOT NULL), '{}'),
           coalesce(array_agg(n) FILTER (WHERE user_id IS NOT NULL), '{}')
    INTO quarantined, q_users, q_counts FROM g;
    -- File lines first loaded before the day: their logins' originals are
    -- gone, so a load of them again has nothing to keep apart from.
    DELETE FROM line_ranges WHERE create_date < p_before;
    DELETE FROM line_dates WHERE create_date < p_before;
    IF cardinality(partitions_dropped) > 0 THEN
        FOR part IN SELECT unnest(partitions_dropped) AS name LOOP
            EXECUTE format('ALTER TABLE vault DETACH PARTITION %I', part.name);
        END LOOP;
    END IF;
    SELECT count(*) INTO undated_kept FROM vault_undated WHERE create_date IS NULL;
    keys_destroyed := pii_vault_destroy_unreferenced_data_keys();
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('retention', format('before=%s keys_destroyed=%s', p_before, cardinality(keys_destroyed))
                         || CASE WHEN cardinality(partitions_dropped) > 0
                                 THEN format(' partitions_dropped=%s', cardinality(partitions_dropped)) ELSE '' END,
            p_reason, left(p_claimed_actor, 256), vault_rows + quarantined)
    RETURNING id INTO rid;
    UPDATE vault_month_ledgers SET erased_by = rid WHERE id = ANY (ledgers);
    -- The detached months are dropped by pii_vault_retention_drop_next(),
    -- each in a transaction of its own (0021): renamed first, so that a
    -- late row of the month finds its partition's name free.
    FOR part IN SELECT x AS name, x || '_erased_' || rid AS erased FROM unnest(partitions_dropped) x LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', part.name, part.erased);
        INSERT INTO retention_drops (name, record) VALUES (part.erased, rid);
    END LOOP;
    -- In user order: the key (record, user_id) grows at its right edge and
    -- the user index is walked in order, not at random. The users of a cut
    -- month are many (151,470 for six days of 10 M rows a year: 0.61-0.72 s
    -- so, 0.89 s in hash order).
    INSERT INTO erasure_subject_rows (record, user_id, rows)
    SELECT rid, u, sum(n) FROM (SELECT * FROM unnest(users, counts) UNION ALL SELECT * FROM unnest(q_users, q_counts)) x(u, n)
    WHERE u IS NOT NULL
    GROUP BY u ORDER BY u;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_retention(date, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_retention(date, text, text) TO pii_vault_rotator;

-- Drops one month that retention detached (0021), in the caller's
-- transaction, and returns its name; NULL when none is left to drop. Run
-- from several connections at once: each takes a month the others have
-- not (SKIP LOCKED). A month detached by a run that was killed before its
-- drops is dropped by the next retention's calls. Only tables retention
-- put in retention_drops, and never one that is a partition again.
CREATE OR REPLACE FUNCTION pii_vault_retention_drop_next() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    n text;
BEGIN
    PERFORM pii_vault_fresh_call();
    SELECT d.name INTO n FROM retention_drops d ORDER BY d.name LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF n IS NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(quote_ident(n))) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013',
            MESSAGE = format('%s is a partition again: not dropped', n);
    END IF;
    PERFORM set_config('lock_timeout', '10s', true);
    EXECUTE format('DROP TABLE IF EXISTS %I', n);
    DELETE FROM retention_drops WHERE name = n;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_retention_drop_next() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_retention_drop_next() TO pii_vault_rotator;

-- How many detached months are still to be dropped: after its drops,
-- retention says so if another session holds one of them (a concurrent
-- retention dropping it, or a transaction left open on its call).
CREATE OR REPLACE FUNCTION pii_vault_retention_drops_left() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT count(*) FROM retention_drops
$$;
REVOKE ALL ON FUNCTION pii_vault_retention_drops_left() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_retention_drops_left() TO pii_vault_rotator;

-- What retention would erase now (`forget --before … --dry-run`).
CREATE OR REPLACE FUNCTION pii_vault_retention_preview(p_before date)
RETURNS TABLE (vault_rows bigint, quarantined bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT
        (SELECT count(*) FROM vault WHERE create_date < p_before),
        (SELECT count(*) FROM quarantine WHERE received_at < (p_before::timestamp AT TIME ZONE 'UTC'))
$$;
REVOKE ALL ON FUNCTION pii_vault_retention_preview(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_retention_preview(date) TO pii_vault_rotator;
