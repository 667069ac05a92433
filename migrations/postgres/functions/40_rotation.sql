-- Rotations: `rotate kek`, `rotate data-keys`, `rotate token-key`.
--
-- A rotator writes keys, ciphertext, tokens and the allow-list only through
-- these functions, each of which checks (pii_vault_rotation_job_check) an
-- open job of the caller's own whose audit record is committed and whose
-- lease it holds, and records what it changed (cursors and counts in
-- rotation_ranges / rotation_jobs, a `rotation-done` audit row at the end).
--
-- The lease (job_leases, one row per kind) replaces the advisory lock of
-- earlier versions, which any login could take to block every rotation. It
-- is taken only by pii_vault_record, in the transaction that writes the
-- job's audit record, for the connection that called it; it is held while
-- that connection's backend runs as that login (pg_stat_activity), and
-- released by pii_vault_job_release or when the backend ends.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- ----------------------------------------------------------------- lease
CREATE OR REPLACE FUNCTION pii_vault_lease_live(l job_leases) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT l.record IS NOT NULL AND EXISTS (
        SELECT 1 FROM pg_stat_activity a
        WHERE a.pid = l.holder_pid AND a.usename = l.holder_login AND a.datname = current_database())
$$;
REVOKE ALL ON FUNCTION pii_vault_lease_live(job_leases) FROM PUBLIC;

-- Refuses unless the lease of `p_kind` is held, by this login, for record
-- `p_record`.
CREATE OR REPLACE FUNCTION pii_vault_check_lease(p_kind text, p_record bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    l job_leases;
BEGIN
    SELECT * INTO l FROM job_leases WHERE kind = p_kind;
    IF NOT FOUND OR l.record IS DISTINCT FROM p_record OR l.holder_login IS DISTINCT FROM session_user
       OR NOT pii_vault_lease_live(l) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV007',
            MESSAGE = format('%s work is done only by the run that holds its lease, which audit record %s does not',
                             p_kind, p_record);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_check_lease(text, bigint) FROM PUBLIC;

-- The audit record of a rotation, written before the job reads anything,
-- and the lease of its kind for the calling connection: a second rotation
-- of the same kind is refused (PV007) while the first one's connection
-- lives. Erasures and key set-up write their own audit rows, beside what
-- they change; this function records rotations only.
CREATE OR REPLACE FUNCTION pii_vault_record(p_action text, p_target text, p_reason text, p_claimed_actor text, p_row_count bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    rid bigint;
    n int;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_action IS NULL OR p_action NOT IN ('rotate-kek', 'rotate-data-keys', 'rotate-token-key') THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('%s is not a rotation (erasures and key set-up record themselves)', p_action);
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'an audited job needs a reason';
    END IF;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES (p_action, left(coalesce(p_target, ''), 512), left(p_reason, 1000), left(p_claimed_actor, 256),
            coalesce(p_row_count, 0))
    RETURNING id INTO rid;
    UPDATE job_leases l
    SET record = rid, holder_pid = pg_backend_pid(), holder_login = session_user, taken_at = clock_timestamp()
    WHERE l.kind = p_action AND NOT pii_vault_lease_live(l);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'PV007',
            MESSAGE = format('another %s is running (it holds the job''s lease); wait for it to finish', p_action);
    END IF;
    RETURN rid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_record(text, text, text, text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_record(text, text, text, text, bigint) TO pii_vault_rotator;

-- Ends the lease of record `p_record`, from the connection that holds it.
CREATE OR REPLACE FUNCTION pii_vault_job_release(p_record bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    UPDATE job_leases SET record = NULL, holder_pid = NULL, holder_login = NULL, taken_at = NULL
    WHERE record = p_record AND holder_login = session_user AND holder_pid = pg_backend_pid()
$$;
REVOKE ALL ON FUNCTION pii_vault_job_release(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_job_release(bigint) TO pii_vault_rotator;

-- ------------------------------------------------------------------- jobs
-- The open job `p_job` that the caller's committed, leased record may work
-- on; raises otherwise.
CREATE OR REPLACE FUNCTION pii_vault_rotation_job_check(p_record bigint, p_job bigint) RETURNS rotation_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs;
BEGIN
    PERFORM pii_vault_fresh_call();
    SELECT * INTO j FROM rotation_jobs WHERE id = p_job;
    IF NOT FOUND OR j.finished_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not open', p_job);
    END IF;
    PERFORM pii_vault_check_record(p_record, ARRAY[j.kind], interval '7 days');
    PERFORM pii_vault_check_lease(j.kind, p_record);
    IF j.held_by <> p_record THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rotation job %s is held by audit record %s, not %s', p_job, j.held_by, p_record);
    END IF;
    RETURN j;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_job_check(bigint, bigint) FROM PUBLIC;

-- Refuses unless job `j` is of kind `p_kind`.
CREATE OR REPLACE FUNCTION pii_vault_rotation_job_is(j rotation_jobs, p_kind text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF j.kind <> p_kind THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is a %s job, not %s', j.id, j.kind, p_kind);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_job_is(rotation_jobs, text) FROM PUBLIC;

-- What a data-key rotation may write, in place or into a rewritten
-- partition: rows moved from one of job `j`'s old keys to one of the keys
-- it made, nothing else.
CREATE OR REPLACE FUNCTION pii_vault_rotation_check_keys(j rotation_jobs, p_old text[], p_new text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT unnest(p_new)) k(id) WHERE k.id IS NULL OR NOT (k.id = ANY (j.new_keys))) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rows re-sealed by rotation job %s go under data keys the job made', j.id);
    END IF;
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT unnest(p_old)) k(id) WHERE k.id IS NULL OR NOT (k.id = ANY (j.old_keys))) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rotation job %s re-seals only rows under its old data keys', j.id);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_check_keys(rotation_jobs, text[], text[]) FROM PUBLIC;

-- What a token-key rotation may write, in place or into a rewritten
-- partition: for each login id one token of each kind, every one of job
-- `j`'s version (a network token may be NULL: network tokens turned off,
-- where the CHECK constraint then refuses any other).
CREATE OR REPLACE FUNCTION pii_vault_rotation_check_tokens(j rotation_jobs, p_ids bigint[], p_ips text[],
                                                           p_devs text[], p_nets text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT left(t, strpos(t, '_'))
                       FROM unnest(p_ips || p_devs || array_remove(p_nets, NULL)) t) s(prefix)
        WHERE s.prefix IS DISTINCT FROM 't' || j.token_version || '_'
    ) OR cardinality(p_nets) IS DISTINCT FROM cardinality(p_ids)
      OR cardinality(p_ips) IS DISTINCT FROM cardinality(p_ids)
      OR cardinality(p_devs) IS DISTINCT FROM cardinality(p_ids) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV003',
            MESSAGE = format('tokens written by rotation job %s carry its version (t%s_…)', j.id, j.token_version);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_check_tokens(rotation_jobs, bigint[], text[], text[], text[]) FROM PUBLIC;

-- A rerun takes over the open job of its kind, if there is one: the job now
-- answers to the new record. The data keys the killed run made for itself
-- are retired (their rows stay readable; the next rotation re-encrypts
-- them), so that nothing keeps writing under a key no process holds.
CREATE OR REPLACE FUNCTION pii_vault_rotation_job_resume(p_record bigint, p_kind text)
RETURNS TABLE (job_id bigint, started_by bigint, old_keys text[], token_version bigint, kek_target text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs;
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_record, ARRAY[p_kind], interval '7 days');
    PERFORM pii_vault_check_lease(p_kind, p_record);
    SELECT * INTO j FROM rotation_jobs r WHERE r.kind = p_kind AND r.finished_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE rotation_jobs r SET held_by = p_record WHERE r.id = j.id;
    UPDATE vault_keys k SET state = 'retired'
    WHERE k.id = ANY (j.new_keys) AND k.purpose = 'vault' AND k.state = 'active';
    RETURN QUERY SELECT j.id, j.started_by, j.old_keys, j.token_version, j.kek_target;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_job_resume(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_job_resume(bigint, text) TO pii_vault_rotator;

-- A new job of the leased record's kind, with one range per gap of
-- `p_bounds` over `p_table` (the first element is the start, the last range
-- open-ended) and, for data keys, one range over quarantine.
CREATE OR REPLACE FUNCTION pii_vault_rotation_job_new(p_record bigint, p_kind text, p_table text, p_bounds text[],
                                                      p_old_keys text[], p_token_version bigint, p_kek_target text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    jid bigint;
    n int := coalesce(array_length(p_bounds, 1), 0);
BEGIN
    IF p_table IS NOT NULL AND (n < 1 OR n > 65) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a rotation job has 1 to 64 ranges';
    END IF;
    INSERT INTO rotation_jobs (kind, started_by, held_by, old_keys, token_version, kek_target, started_at)
    VALUES (p_kind, p_record, p_record, coalesce(p_old_keys, '{}'), p_token_version, p_kek_target, clock_timestamp())
    RETURNING id INTO jid;
    IF p_table IS NOT NULL THEN
        INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor)
        SELECT jid, i - 1, p_table, p_bounds[i], CASE WHEN i < n THEN p_bounds[i + 1] END, p_bounds[i]
        FROM generate_series(1, n) i;
    END IF;
    IF p_kind = 'rotate-data-keys' THEN
        INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor) VALUES (jid, n, 'quarantine', '', NULL, '');
    END IF;
    -- Closed partitions are rewritten, not updated (functions/45_rewrite.sql).
    IF p_table IN ('vault', 'user_logins') THEN
        PERFORM pii_vault_rewrite_plan(jid, p_table);
    END IF;
    RETURN jid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_job_new(bigint, text, text, text[], text[], bigint, text) FROM PUBLIC;

-- `rotate data-keys` starts: every active data key is retired and the
-- retired ones become the job's old set, in this one transaction (the
-- fence refuses rows under them from then on).
CREATE OR REPLACE FUNCTION pii_vault_rotation_start_data_keys(p_record bigint, p_bounds text[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    old text[];
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_record, ARRAY['rotate-data-keys'], interval '7 days');
    PERFORM pii_vault_check_lease('rotate-data-keys', p_record);
    UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active';
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO old
    FROM vault_keys WHERE purpose = 'vault' AND state = 'retired';
    RETURN pii_vault_rotation_job_new(p_record, 'rotate-data-keys', 'vault', p_bounds, old, NULL, NULL);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_start_data_keys(bigint, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_start_data_keys(bigint, text[]) TO pii_vault_rotator;

-- `rotate token-key` starts: the new token key (a version above every
-- existing one) is stored and becomes the only active one, in this one
-- transaction; workers switch at their next commit.
CREATE OR REPLACE FUNCTION pii_vault_rotation_start_token_key(p_record bigint, p_bounds text[], p_key_id text,
                                                              p_version bigint, p_kek_id text, p_wrapped bytea)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_record, ARRAY['rotate-token-key'], interval '7 days');
    PERFORM pii_vault_check_lease('rotate-token-key', p_record);
    IF p_version IS NULL OR p_version <= (SELECT coalesce(max(version), 0) FROM vault_keys WHERE purpose = 'token') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a token rotation needs a version above every existing one';
    END IF;
    IF p_key_id IS NULL OR p_key_id !~ '^tok-[0-9a-f-]{36}$' OR p_wrapped IS NULL
       OR length(p_wrapped) NOT BETWEEN 16 AND 4096 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a token key is tok-<uuid> and 16 to 4096 wrapped bytes';
    END IF;
    INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
    VALUES (p_key_id, 'token', p_version, p_kek_id, p_wrapped, 'active');
    UPDATE vault_keys SET state = 'retired' WHERE purpose = 'token' AND state = 'active' AND id <> p_key_id;
    RETURN pii_vault_rotation_job_new(p_record, 'rotate-token-key', 'user_logins', p_bounds, NULL, p_version, NULL);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_start_token_key(bigint, text[], text, bigint, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_start_token_key(bigint, text[], text, bigint, text, bytea)
    TO pii_vault_rotator;

-- `rotate kek` starts: its target is the KMS key its audit record names,
-- which goes on the allow-list here (the allow-list's own trigger notes by
-- whom); the job re-wraps under that key and no other.
CREATE OR REPLACE FUNCTION pii_vault_rotation_start_kek(p_record bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    a audit_log;
BEGIN
    PERFORM pii_vault_fresh_call();
    a := pii_vault_check_record(p_record, ARRAY['rotate-kek'], interval '7 days');
    PERFORM pii_vault_check_lease('rotate-kek', p_record);
    IF btrim(a.target) = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'the record of a rotate kek must name its target KMS key';
    END IF;
    INSERT INTO kms_allowlist (kek_id) VALUES (a.target) ON CONFLICT DO NOTHING;
    RETURN pii_vault_rotation_job_new(p_record, 'rotate-kek', NULL, NULL, NULL, NULL, a.target);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_start_kek(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_start_kek(bigint) TO pii_vault_rotator;

CREATE OR REPLACE FUNCTION pii_vault_rotation_job_ranges(p_record bigint, p_job bigint)
RETURNS TABLE (no int, tbl text, lo text, hi text, cursor text, rows_done bigint, done boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    RETURN QUERY SELECT r.no, r.tbl, r.lo, r.hi, r.cursor, r.rows_done, r.done
        FROM rotation_ranges r WHERE r.job_id = p_job ORDER BY r.no;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_job_ranges(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_job_ranges(bigint, bigint) TO pii_vault_rotator;

-- Moves a range's cursor and counts its rows; called by the checked
-- functions below in the transaction that writes the chunk.
CREATE OR REPLACE FUNCTION pii_vault_rotation_advance(p_job bigint, p_no int, p_cursor text, p_rows bigint,
                                                      p_done boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE rotation_ranges SET cursor = coalesce(p_cursor, cursor), rows_done = rows_done + p_rows, done = p_done
    WHERE job_id = p_job AND no = p_no AND NOT done;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('range %s of rotation job %s is not open', p_no, p_job);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_advance(bigint, int, text, bigint, boolean) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pii_vault_rotation_range_done(p_record bigint, p_job bigint, p_no int) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    PERFORM pii_vault_rotation_advance(p_job, p_no, NULL, 0, true);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_range_done(bigint, bigint, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_range_done(bigint, bigint, int) TO pii_vault_rotator;

-- -------------------------------------------------------------- data keys
-- A data key the job makes for itself: stored active (under an allowed
-- KEK, the guard checks) and noted in the job, before any row is sealed
-- under it, so that a rerun retires it.
CREATE OR REPLACE FUNCTION pii_vault_rotation_new_data_key(p_record bigint, p_job bigint, p_id text, p_kek_id text,
                                                           p_wrapped bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-data-keys');
    IF p_id IS NULL OR p_id !~ '^dek-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a data key id is dek-<uuid>';
    END IF;
    IF p_wrapped IS NULL OR length(p_wrapped) NOT BETWEEN 16 AND 4096 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a wrapped data key is 16 to 4096 bytes';
    END IF;
    INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
    VALUES (p_id, 'vault', 0, p_kek_id, p_wrapped, 'active');
    UPDATE rotation_jobs SET new_keys = array_append(new_keys, p_id) WHERE id = p_job;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_new_data_key(bigint, bigint, text, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_new_data_key(bigint, bigint, text, text, bytea) TO pii_vault_rotator;

-- Retires one of the job's own data keys that reached its use cap.
CREATE OR REPLACE FUNCTION pii_vault_rotation_retire_key(p_record bigint, p_job bigint, p_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
BEGIN
    IF p_id IS NULL OR NOT (p_id = ANY (j.new_keys)) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('key %s was not made by rotation job %s', p_id, p_job);
    END IF;
    UPDATE vault_keys SET state = 'retired' WHERE id = p_id AND state = 'active';
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_retire_key(bigint, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_retire_key(bigint, bigint, text) TO pii_vault_rotator;

-- The chunk readers below walk one range in key order, LIMIT rows at a
-- time: only an index walk is right for that, at any table size. Without
-- the settings, statistics that lag a bulk load (or a rotation's own
-- rewrite) make the planner hash or sort whole tables for every chunk,
-- which turns a rotation quadratic.

-- A chunk of vault rows under the job's old keys, in one range, outside
-- the partitions the job rewrites.
CREATE OR REPLACE FUNCTION pii_vault_rotation_vault_chunk(p_record bigint, p_job bigint, p_after text, p_hi text, p_limit int)
RETURNS TABLE (message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET max_parallel_workers_per_gather = 0
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    rewritten oid[] := pii_vault_rewrite_oids(p_job);
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-data-keys');
    RETURN QUERY SELECT v.message_id, v.user_id::text, v.key_id, v.nonce, v.ciphertext FROM vault v
        WHERE v.message_id > p_after AND (p_hi IS NULL OR v.message_id <= p_hi) AND v.key_id = ANY (j.old_keys)
          AND v.tableoid <> ALL (rewritten)
        ORDER BY v.message_id LIMIT p_limit;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_vault_chunk(bigint, bigint, text, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_vault_chunk(bigint, bigint, text, text, int) TO pii_vault_rotator;

-- A chunk of quarantined bodies under the job's old keys.
CREATE OR REPLACE FUNCTION pii_vault_rotation_quarantine_chunk(p_record bigint, p_job bigint, p_after text, p_limit int)
RETURNS TABLE (message_id text, reason_code text, reason text, user_id text, key_id text, nonce bytea,
               ciphertext bytea, received_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-data-keys');
    RETURN QUERY SELECT q.message_id, q.reason_code, q.reason, q.user_id::text, q.key_id, q.nonce, q.ciphertext,
        q.received_at FROM quarantine q
        WHERE q.key_id = ANY (j.old_keys) AND q.message_id > p_after
        ORDER BY q.message_id LIMIT p_limit;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_quarantine_chunk(bigint, bigint, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_quarantine_chunk(bigint, bigint, text, int) TO pii_vault_rotator;

-- The two in-place writers below (re-sealed rows, new tokens) join a
-- chunk's arrays to the table by key, one index probe a row. Left to
-- itself, the planner, which knows the arrays' length, hashes the whole
-- table, every partition of it, for every chunk: 418 ms for a chunk of
-- 3,400 logins at 1 M rows against 136 ms (and a rotation quadratic in the
-- table's size), hence their settings; and no JIT, which the plan's cost
-- on paper would otherwise buy for every chunk.

-- Writes one re-sealed chunk of range `p_no` (vault or quarantine, as the
-- range says) and moves its cursor. A row is re-sealed only if it is still
-- under its old key, which must be one of the job's old keys, and only
-- under one of the job's own new keys. Returns the rows changed.
CREATE OR REPLACE FUNCTION pii_vault_rotation_reseal(p_record bigint, p_job bigint, p_no int, p_cursor text,
                                                     p_ids text[], p_old text[], p_new text[], p_nonces bytea[],
                                                     p_cts bytea[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    t text;
    changed bigint := 0;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-data-keys');
    SELECT r.tbl INTO t FROM rotation_ranges r WHERE r.job_id = p_job AND r.no = p_no AND NOT r.done;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('range %s of rotation job %s is not open', p_no, p_job);
    END IF;
    PERFORM pii_vault_rotation_check_keys(j, p_old, p_new);
    IF t = 'vault' THEN
        UPDATE vault SET key_id = u.key_id, nonce = u.nonce, ciphertext = u.ciphertext
        FROM unnest(p_ids, p_old, p_new, p_nonces, p_cts) AS u(message_id, old_key, key_id, nonce, ciphertext)
        WHERE vault.message_id = u.message_id AND vault.key_id = u.old_key;
    ELSE
        UPDATE quarantine SET key_id = u.key_id, nonce = u.nonce, ciphertext = u.ciphertext
        FROM unnest(p_ids, p_old, p_new, p_nonces, p_cts) AS u(message_id, old_key, key_id, nonce, ciphertext)
        WHERE quarantine.message_id = u.message_id AND quarantine.key_id = u.old_key;
    END IF;
    GET DIAGNOSTICS changed = ROW_COUNT;
    PERFORM pii_vault_rotation_advance(p_job, p_no, p_cursor, changed, false);
    RETURN changed;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_reseal(bigint, bigint, int, text, text[], text[], text[], bytea[], bytea[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_reseal(bigint, bigint, int, text, text[], text[], text[], bytea[], bytea[])
    TO pii_vault_rotator;

-- ------------------------------------------------------------- token key
-- Stale logins with a vault row and a message id in (p_after, p_hi], in
-- message_id order, outside the partitions the job rewrites, with their
-- sealed originals: two index range scans in
-- the same order, merged (migration 0009 has the measurements).
CREATE OR REPLACE FUNCTION pii_vault_rotation_logins_by_message(p_record bigint, p_job bigint, p_after text, p_hi text,
                                                                p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET enable_hashjoin = off
SET enable_nestloop = off SET max_parallel_workers_per_gather = 0 SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    rewritten oid[] := pii_vault_rewrite_oids(p_job);
    pat text;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-token-key');
    pat := 't' || j.token_version || '\_%';
    -- Two statements, not "p_hi IS NULL OR ... <= p_hi": a cached generic
    -- plan could not use that as an index bound on either side.
    IF p_hi IS NULL THEN
        RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
            FROM user_logins l JOIN vault v ON v.message_id = l.message_id
            WHERE l.message_id > p_after AND v.message_id > p_after
              AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat) AND l.tableoid <> ALL (rewritten)
            ORDER BY l.message_id LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
            FROM user_logins l JOIN vault v ON v.message_id = l.message_id
            WHERE l.message_id > p_after AND l.message_id <= p_hi
              AND v.message_id > p_after AND v.message_id <= p_hi
              AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat) AND l.tableoid <> ALL (rewritten)
            ORDER BY l.message_id LIMIT p_limit;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_logins_by_message(bigint, bigint, text, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_logins_by_message(bigint, bigint, text, text, int) TO pii_vault_rotator;

-- The final sweep's read: stale logins with a vault row after login id
-- `p_after`, in id order, whatever range or partition they fell in (it
-- runs after every rewrite is swapped in: it then meets only what the
-- rewrites copied as it was, rows they could not open).
CREATE OR REPLACE FUNCTION pii_vault_rotation_sweep_chunk(p_record bigint, p_job bigint, p_after bigint, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    pat text;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-token-key');
    pat := 't' || j.token_version || '\_%';
    RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
        FROM user_logins l JOIN vault v ON v.message_id = l.message_id
        WHERE l.id > p_after AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
        ORDER BY l.id LIMIT p_limit;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_sweep_chunk(bigint, bigint, bigint, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_sweep_chunk(bigint, bigint, bigint, int) TO pii_vault_rotator;

-- Writes new tokens (login id, masked_ip, masked_device_id, masked_ip_net)
-- and, for a range (`p_no` not NULL; NULL for the final sweep), moves its
-- cursor. Every token must be of the job's version; a network token may be
-- NULL (network tokens turned off: the CHECK constraint then refuses any
-- other). Returns the rows changed.
CREATE OR REPLACE FUNCTION pii_vault_rotation_tokens(p_record bigint, p_job bigint, p_no int, p_cursor text,
                                                     p_ids bigint[], p_ips text[], p_devs text[], p_nets text[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    changed bigint := 0;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-token-key');
    PERFORM pii_vault_rotation_check_tokens(j, p_ids, p_ips, p_devs, p_nets);
    UPDATE user_logins SET masked_ip = u.ip, masked_device_id = u.dev, masked_ip_net = u.net
    FROM unnest(p_ids, p_ips, p_devs, p_nets) AS u(id, ip, dev, net)
    WHERE user_logins.id = u.id;
    GET DIAGNOSTICS changed = ROW_COUNT;
    IF p_no IS NOT NULL THEN
        PERFORM pii_vault_rotation_advance(p_job, p_no, p_cursor, changed, false);
    END IF;
    RETURN changed;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_tokens(bigint, bigint, int, text, bigint[], text[], text[], text[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_tokens(bigint, bigint, int, text, bigint[], text[], text[], text[])
    TO pii_vault_rotator;

-- ------------------------------------------------------------------- kek
-- Stores key `p_key_id` re-wrapped under the job's target (and no other
-- KMS key); false when it is destroyed or already there.
CREATE OR REPLACE FUNCTION pii_vault_rotation_rewrap(p_record bigint, p_job bigint, p_key_id text, p_kek_id text,
                                                     p_wrapped bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    n int;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-kek');
    IF p_kek_id IS DISTINCT FROM j.kek_target THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rotation job %s re-wraps under its target KMS key only', p_job);
    END IF;
    IF p_wrapped IS NULL OR length(p_wrapped) NOT BETWEEN 16 AND 4096 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a wrapped key is 16 to 4096 bytes';
    END IF;
    UPDATE vault_keys SET wrapped = p_wrapped, kek_id = j.kek_target
    WHERE id = p_key_id AND state <> 'destroyed' AND kek_id <> j.kek_target;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE rotation_jobs SET keys_rewrapped = keys_rewrapped + n WHERE id = p_job;
    RETURN n > 0;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_rewrap(bigint, bigint, text, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_rewrap(bigint, bigint, text, text, bytea) TO pii_vault_rotator;

-- Retires every active data key, so that running workers take fresh ones
-- under the new KEK (they follow the current token key's KEK).
CREATE OR REPLACE FUNCTION pii_vault_rotation_retire_data_keys(p_record bigint, p_job bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    n bigint;
BEGIN
    PERFORM pii_vault_rotation_job_is(j, 'rotate-kek');
    UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active';
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_retire_data_keys(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_retire_data_keys(bigint, bigint) TO pii_vault_rotator;

-- ---------------------------------------------------------------- finish
-- Ends a job, destroying only what the database can see is no longer
-- needed, and records it (audit action `rotation-done`, with the rows
-- changed and the keys destroyed):
-- * data keys: the job's own keys are retired, then every retired data key
--   that no vault or quarantine row names is destroyed;
-- * token key: the versions below the job's are destroyed if no login with
--   recoverable originals still carries one (else they stay retired);
-- * kek: refused while a key not destroyed is under another KMS key.
-- Returns the ids of the keys destroyed.
CREATE OR REPLACE FUNCTION pii_vault_rotation_finish(p_record bigint, p_job bigint) RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    a audit_log;
    gone text[] := '{}';
    done_rows bigint;
    note text;
    pat text;
BEGIN
    SELECT coalesce(sum(r.rows_done), 0) INTO done_rows FROM rotation_ranges r WHERE r.job_id = p_job;
    done_rows := done_rows + (SELECT coalesce(sum(w.rows_done), 0) FROM rotation_rewrites w WHERE w.job_id = p_job);
    IF EXISTS (SELECT 1 FROM rotation_rewrites w WHERE w.job_id = p_job AND w.state NOT IN ('swapped', 'gone')) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rotation job %s: closed partitions remain to be rewritten', p_job);
    END IF;
    IF j.kind = 'rotate-data-keys' THEN
        UPDATE vault_keys SET state = 'retired' WHERE id = ANY (j.new_keys) AND state = 'active';
        gone := pii_vault_destroy_unreferenced_data_keys();
        note := format('%s row(s) re-sealed under %s new data key(s); %s data key(s) destroyed',
                       done_rows, cardinality(j.new_keys), cardinality(gone));
    ELSIF j.kind = 'rotate-token-key' THEN
        pat := 't' || j.token_version || '\_%';
        IF NOT EXISTS (
            SELECT 1 FROM user_logins l JOIN vault v ON v.message_id = l.message_id
            WHERE l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat
        ) THEN
            WITH d AS (
                UPDATE vault_keys SET state = 'destroyed'
                WHERE purpose = 'token' AND version < j.token_version AND state = 'retired'
                RETURNING id
            )
            SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO gone FROM d;
        END IF;
        note := format('%s login(s) re-tokenised to v%s; %s token key(s) destroyed',
                       done_rows, j.token_version, cardinality(gone));
    ELSE
        IF EXISTS (SELECT 1 FROM vault_keys WHERE state <> 'destroyed' AND kek_id <> j.kek_target) THEN
            RAISE EXCEPTION USING ERRCODE = 'PV011',
                MESSAGE = format('rotation job %s: keys under another key-encryption key remain; re-wrap them first', p_job);
        END IF;
        done_rows := j.keys_rewrapped;
        note := format('%s key(s) re-wrapped under %s', done_rows, j.kek_target);
    END IF;
    UPDATE rotation_jobs SET finished_at = clock_timestamp() WHERE id = p_job;
    SELECT * INTO a FROM audit_log WHERE id = p_record;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('rotation-done', left(format('%s job %s: %s', j.kind, p_job, note), 512), a.reason, a.claimed_actor, done_rows);
    RETURN gone;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_rotation_finish(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_finish(bigint, bigint) TO pii_vault_rotator;
