-- `rotate token-key` walked user_logins in id ranges and found each login's
-- vault row by message_id: one random probe of the vault's primary key per
-- login (message ids are random), which at a million rows cost more than
-- the token update itself once the indexes outgrew the buffer cache.
-- It now walks message_id ranges instead: a chunk of logins (their unique
-- message_id index, in order) and their vault rows (the vault's primary
-- key, in order) are two range scans in the same order, merged. Measured
-- in psql, 5,000-row chunks on 2 connections, read then update and commit,
-- 1 M logins, shared_buffers 256 MB: 15.2-18.7 s by message_id ranges,
-- 19.0-22.8 s by id ranges with a probe per login.
--
-- A token-key job left open by an earlier version has id ranges: it is
-- given one range over every message id instead. Nothing is lost: the
-- chunk read returns only logins whose tokens are not yet of the job's
-- version, so what the killed run did is passed over.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

DELETE FROM rotation_ranges r USING rotation_jobs j
WHERE r.job_id = j.id AND j.kind = 'rotate-token-key' AND j.finished_at IS NULL AND r.no > 0;
UPDATE rotation_ranges r SET lo = '', hi = NULL, cursor = '', done = false
FROM rotation_jobs j
WHERE r.job_id = j.id AND j.kind = 'rotate-token-key' AND j.finished_at IS NULL;

-- Stale logins with a vault row and a message id in (p_after, p_hi], in
-- message_id order, with their sealed originals.
CREATE FUNCTION pii_vault_rotation_logins_by_message(p_record bigint, p_job bigint, p_after text, p_hi text, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET enable_hashjoin = off
SET enable_nestloop = off SET max_parallel_workers_per_gather = 0 SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    pat text;
BEGIN
    IF j.kind <> 'rotate-token-key' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not a token-key rotation', p_job);
    END IF;
    pat := 't' || j.token_version || '\_%';
    -- Two statements, not "p_hi IS NULL OR ... <= p_hi": a cached generic
    -- plan could not use that as an index bound on either side.
    IF p_hi IS NULL THEN
        RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
            FROM user_logins l JOIN vault v ON v.message_id = l.message_id
            WHERE l.message_id > p_after AND v.message_id > p_after
              AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
            ORDER BY l.message_id LIMIT p_limit;
    ELSE
        RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
            FROM user_logins l JOIN vault v ON v.message_id = l.message_id
            WHERE l.message_id > p_after AND l.message_id <= p_hi
              AND v.message_id > p_after AND v.message_id <= p_hi
              AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
            ORDER BY l.message_id LIMIT p_limit;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION pii_vault_rotation_logins_by_message(bigint, bigint, text, text, int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_rotation_logins_by_message(bigint, bigint, text, text, int) TO pii_vault_rotator;
