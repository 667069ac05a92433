-- Rotations at scale: a rotation job outlives the process that runs it.
--
-- A `rotate data-keys` or `rotate token-key` splits its table into key
-- ranges (keyset order, no OFFSET) and works them on several connections.
-- What a killed run needs to continue is kept here: the set of old data
-- keys (so that a rerun does not mistake the killed run's own new keys for
-- old ones), the new token version (so that a rerun does not make yet
-- another one), and one cursor per range, advanced in the same transaction
-- as the rows it covers (so that finished chunks are never redone).
--
-- Nobody but the owner touches these tables directly. The rotator reads and
-- writes them only through the SECURITY DEFINER functions below, which,
-- like the row readers of 0003, want a committed audit record of the
-- caller's own and the advisory lock of the job's kind. Workers, analysts
-- and revealers get nothing.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

CREATE TABLE rotation_jobs (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('rotate-data-keys', 'rotate-token-key')),
    -- The audit record of the run that started the job, and of the run
    -- that holds it now (a resumed run writes a record of its own first).
    started_by     bigint NOT NULL REFERENCES audit_log (id),
    held_by        bigint NOT NULL REFERENCES audit_log (id),
    old_keys       text[] NOT NULL DEFAULT '{}',
    new_keys       text[] NOT NULL DEFAULT '{}',
    token_version  bigint,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
-- One unfinished job per kind: that is the one a rerun resumes.
CREATE UNIQUE INDEX rotation_jobs_one_open ON rotation_jobs (kind) WHERE finished_at IS NULL;

-- Rows of `tbl` with a key in (lo, hi] (hi NULL: to the end); `cursor` is
-- the last key whose chunk is committed. Keys are message ids (vault,
-- quarantine) or login ids written as decimal text (user_logins).
CREATE TABLE rotation_ranges (
    job_id     bigint NOT NULL REFERENCES rotation_jobs (id),
    no         int NOT NULL,
    tbl        text NOT NULL CHECK (tbl IN ('vault', 'quarantine', 'user_logins')),
    lo         text NOT NULL,
    hi         text,
    cursor     text NOT NULL,
    rows_done  bigint NOT NULL DEFAULT 0,
    done       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, no)
);

-- The open job of `p_kind` that the caller's committed, locked record may
-- work on; raises otherwise.
CREATE FUNCTION pii_vault_rotation_job_check(p_record bigint, p_job bigint) RETURNS rotation_jobs
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs;
BEGIN
    SELECT * INTO j FROM rotation_jobs WHERE id = p_job;
    IF NOT FOUND OR j.finished_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not open', p_job);
    END IF;
    PERFORM pii_vault_check_record(p_record, ARRAY[j.kind], interval '7 days');
    PERFORM pii_vault_check_lock(j.kind);
    IF j.held_by <> p_record THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('rotation job %s is held by audit record %s, not %s', p_job, j.held_by, p_record);
    END IF;
    RETURN j;
END
$$;

-- A rerun takes over the open job of its kind, if there is one: the job now
-- answers to the new record. The data keys the killed run made for itself
-- are retired (their rows stay readable; the next rotation re-encrypts
-- them), so that nothing keeps writing under a key no process holds.
CREATE FUNCTION pii_vault_rotation_job_resume(p_record bigint, p_kind text)
RETURNS TABLE (job_id bigint, started_by bigint, old_keys text[], token_version bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs;
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY[p_kind], interval '7 days');
    PERFORM pii_vault_check_lock(p_kind);
    SELECT * INTO j FROM rotation_jobs r WHERE r.kind = p_kind AND r.finished_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE rotation_jobs SET held_by = p_record WHERE id = j.id;
    UPDATE vault_keys SET state = 'retired'
    WHERE id = ANY (j.new_keys) AND purpose = 'vault' AND state = 'active';
    job_id := j.id;
    started_by := j.started_by;
    old_keys := j.old_keys;
    token_version := j.token_version;
    RETURN NEXT;
END
$$;

-- Starts a job. For `rotate data-keys` it retires every active data key
-- and takes every retired one as the old set, in this one transaction (the
-- fence of 0003 refuses rows under them from then on). `p_bounds` are the
-- range boundaries of the main table, its first element the start; one
-- range per gap, the last one open-ended. Quarantine gets one range.
CREATE FUNCTION pii_vault_rotation_job_start(p_record bigint, p_kind text, p_token_version bigint, p_bounds text[])
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    jid bigint;
    old text[] := '{}';
    n int := coalesce(array_length(p_bounds, 1), 0);
    main text := CASE p_kind WHEN 'rotate-data-keys' THEN 'vault' ELSE 'user_logins' END;
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY[p_kind], interval '7 days');
    PERFORM pii_vault_check_lock(p_kind);
    IF n < 1 OR n > 65 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a rotation job has 1 to 64 ranges';
    END IF;
    IF p_kind = 'rotate-data-keys' THEN
        UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active';
        SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO old
        FROM vault_keys WHERE purpose = 'vault' AND state = 'retired';
    ELSIF p_token_version IS NULL OR p_token_version <= (
        SELECT coalesce(max(version), 0) FROM vault_keys WHERE purpose = 'token'
    ) THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a token rotation needs a version above every existing one';
    END IF;
    INSERT INTO rotation_jobs (kind, started_by, held_by, old_keys, token_version)
    VALUES (p_kind, p_record, p_record, old, CASE WHEN p_kind = 'rotate-token-key' THEN p_token_version END)
    RETURNING id INTO jid;
    INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor)
    SELECT jid, i - 1, main, p_bounds[i], CASE WHEN i < n THEN p_bounds[i + 1] END, p_bounds[i]
    FROM generate_series(1, n) i;
    IF p_kind = 'rotate-data-keys' THEN
        INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor) VALUES (jid, n, 'quarantine', '', NULL, '');
    END IF;
    RETURN jid;
END
$$;

CREATE FUNCTION pii_vault_rotation_job_ranges(p_record bigint, p_job bigint)
RETURNS TABLE (no int, tbl text, lo text, hi text, cursor text, rows_done bigint, done boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    RETURN QUERY SELECT r.no, r.tbl, r.lo, r.hi, r.cursor, r.rows_done, r.done
        FROM rotation_ranges r WHERE r.job_id = p_job ORDER BY r.no;
END
$$;

-- A data key the job made for itself, so that a rerun can retire it.
CREATE FUNCTION pii_vault_rotation_job_add_key(p_record bigint, p_job bigint, p_key text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    UPDATE rotation_jobs SET new_keys = array_append(new_keys, p_key) WHERE id = p_job;
END
$$;

-- Moves a range's cursor; called in the transaction that writes the chunk.
CREATE FUNCTION pii_vault_rotation_advance(p_record bigint, p_job bigint, p_no int, p_cursor text, p_rows bigint,
                                           p_done boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    UPDATE rotation_ranges SET cursor = coalesce(p_cursor, cursor), rows_done = rows_done + p_rows, done = p_done
    WHERE job_id = p_job AND no = p_no AND NOT done;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('range %s of rotation job %s is not open', p_no, p_job);
    END IF;
END
$$;

CREATE FUNCTION pii_vault_rotation_job_finish(p_record bigint, p_job bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_rotation_job_check(p_record, p_job);
    UPDATE rotation_jobs SET finished_at = now() WHERE id = p_job;
END
$$;

-- The two chunk readers below walk one range in key order, LIMIT rows at a
-- time: only an index walk is right for that, at any table size. Without
-- the settings, statistics that lag a bulk load (or a rotation's own
-- rewrite) make the planner hash or sort whole tables for every chunk,
-- which turns a rotation quadratic.

-- A chunk of vault rows under the job's old keys, in one range.
CREATE FUNCTION pii_vault_rotation_vault_chunk(p_record bigint, p_job bigint, p_after text, p_hi text, p_limit int)
RETURNS TABLE (message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET max_parallel_workers_per_gather = 0
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
BEGIN
    IF j.kind <> 'rotate-data-keys' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not a data-key rotation', p_job);
    END IF;
    RETURN QUERY SELECT v.message_id, v.user_id::text, v.key_id, v.nonce, v.ciphertext FROM vault v
        WHERE v.message_id > p_after AND (p_hi IS NULL OR v.message_id <= p_hi) AND v.key_id = ANY (j.old_keys)
        ORDER BY v.message_id LIMIT p_limit;
END
$$;

-- A chunk of logins (with their sealed originals) whose tokens are not of
-- the job's version, in one range of login ids.
CREATE FUNCTION pii_vault_rotation_logins_chunk(p_record bigint, p_job bigint, p_after bigint, p_hi bigint, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET enable_hashjoin = off
SET enable_mergejoin = off SET max_parallel_workers_per_gather = 0
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    pat text;
BEGIN
    IF j.kind <> 'rotate-token-key' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not a token-key rotation', p_job);
    END IF;
    pat := 't' || j.token_version || '\_%';
    RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
        FROM user_logins l JOIN vault v ON v.message_id = l.message_id
        WHERE l.id > p_after AND (p_hi IS NULL OR l.id <= p_hi)
          AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
        ORDER BY l.id LIMIT p_limit;
END
$$;

REVOKE ALL ON TABLE rotation_jobs, rotation_ranges
    FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator;
REVOKE ALL ON SEQUENCE rotation_jobs_id_seq
    FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator;
REVOKE EXECUTE ON FUNCTION
    pii_vault_rotation_job_check(bigint, bigint),
    pii_vault_rotation_job_resume(bigint, text),
    pii_vault_rotation_job_start(bigint, text, bigint, text[]),
    pii_vault_rotation_job_ranges(bigint, bigint),
    pii_vault_rotation_job_add_key(bigint, bigint, text),
    pii_vault_rotation_advance(bigint, bigint, int, text, bigint, boolean),
    pii_vault_rotation_job_finish(bigint, bigint),
    pii_vault_rotation_vault_chunk(bigint, bigint, text, text, int),
    pii_vault_rotation_logins_chunk(bigint, bigint, bigint, bigint, int)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    pii_vault_rotation_job_resume(bigint, text),
    pii_vault_rotation_job_start(bigint, text, bigint, text[]),
    pii_vault_rotation_job_ranges(bigint, bigint),
    pii_vault_rotation_job_add_key(bigint, bigint, text),
    pii_vault_rotation_advance(bigint, bigint, int, text, bigint, boolean),
    pii_vault_rotation_job_finish(bigint, bigint),
    pii_vault_rotation_vault_chunk(bigint, bigint, text, text, int),
    pii_vault_rotation_logins_chunk(bigint, bigint, bigint, bigint, int)
    TO pii_vault_rotator;
