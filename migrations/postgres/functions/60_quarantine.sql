-- Quarantine tools: listing rejects without their bodies, an audited
-- reveal of one body (revealer), and the replay of bodies after a fix
-- (rotator). Tables from migration 0012.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- --------------------------------------------------------------- list
-- What was rejected, when, from where and why: no body, no key, no user
-- id. The reason codes and texts are value-free by construction
-- (src/domain/event.rs); a message id is the SQS id or a keyed line id;
-- `source` is a file name (not PII). For the operators of every role that
-- handles rejects: the worker that made them, the revealer who may look
-- at one, the rotator who replays them.
CREATE OR REPLACE VIEW pii_vault_quarantine_list WITH (security_barrier) AS
    SELECT q.message_id, q.reason_code, q.reason, q.received_at, q.source, q.line
    FROM quarantine q
    WHERE q.replayed_at IS NULL;
GRANT SELECT ON pii_vault_quarantine_list TO pii_vault_worker, pii_vault_revealer, pii_vault_rotator;

-- ------------------------------------------------------------ show
-- Step one of `quarantine show`: the audit row (action `quarantine-show`,
-- target the message id, one row) and the body it covers, fixed here; the
-- caller commits it before step two. Counted with the caller's granted
-- reveals against the reveal policy's daily limit, serialised on the
-- caller's reveal_quota row as reveals are; over the limit it is refused
-- (a body is one message: there is no approval for it).
CREATE OR REPLACE FUNCTION pii_vault_quarantine_show_request(p_message_id text, p_reason text, p_claimed_actor text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    pol reveal_policy;
    today bigint;
    rid bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_message_id IS NULL OR length(p_message_id) > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a quarantined message id has at most 256 characters';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'showing a quarantined body needs a reason (at most 1000 characters)';
    END IF;
    INSERT INTO reveal_quota AS q (login, last_at) VALUES (session_user, clock_timestamp())
    ON CONFLICT (login) DO UPDATE SET last_at = excluded.last_at;
    IF NOT EXISTS (SELECT 1 FROM quarantine WHERE message_id = p_message_id AND replayed_at IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = 'no quarantined message has this id';
    END IF;
    SELECT * INTO pol FROM reveal_policy;
    today := pii_vault_reveals_today();
    IF today >= pol.max_reveals_per_day THEN
        RAISE EXCEPTION USING ERRCODE = 'PV017',
            MESSAGE = format('this login reached the daily limit of %s reveals (quarantine show counts as one); nothing was shown',
                             pol.max_reveals_per_day);
    END IF;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('quarantine-show', 'message_id=' || p_message_id, p_reason, left(p_claimed_actor, 256), 1)
    RETURNING id INTO rid;
    INSERT INTO quarantine_reveals (record, message_id, requested_by, requested_at, user_id)
    VALUES (rid, p_message_id, session_user, clock_timestamp(),
            (SELECT q.user_id::text FROM quarantine q WHERE q.message_id = p_message_id));
    RETURN rid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_show_request(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_show_request(text, text, text) TO pii_vault_revealer;

-- Step two: the sealed body named by a committed `quarantine-show` record
-- of the caller's, within an hour of it, once.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_show_fetch(p_record bigint)
RETURNS TABLE (message_id text, reason_code text, reason text, user_id text, key_id text, nonce bytea,
               ciphertext bytea, received_at timestamptz, source text, line bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    s quarantine_reveals;
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_record, ARRAY['quarantine-show'], interval '1 hour');
    SELECT * INTO s FROM quarantine_reveals r WHERE r.record = p_record FOR UPDATE;
    IF NOT FOUND OR s.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('record %s is not a quarantine show of this login', p_record);
    END IF;
    IF s.fetched_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('quarantine show %s was already fetched', p_record);
    END IF;
    UPDATE quarantine_reveals SET fetched_at = clock_timestamp() WHERE record = p_record;
    RETURN QUERY
        SELECT q.message_id, q.reason_code, q.reason, q.user_id::text, q.key_id, q.nonce, q.ciphertext,
               q.received_at, q.source, q.line
        FROM quarantine q WHERE q.message_id = s.message_id AND q.replayed_at IS NULL;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_show_fetch(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_show_fetch(bigint) TO pii_vault_revealer;

-- Between steps one and two: the data key the body is sealed under, so
-- that the caller unwraps it before the fetch uses the record up (a KMS
-- fault then shows nothing and leaves the record unfetched). Key ids are
-- not secret: a revealer reads vault_keys.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_show_key(p_record bigint) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    s quarantine_reveals;
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY['quarantine-show'], interval '1 hour');
    SELECT * INTO s FROM quarantine_reveals r WHERE r.record = p_record;
    IF NOT FOUND OR s.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('record %s is not a quarantine show of this login', p_record);
    END IF;
    RETURN (SELECT q.key_id FROM quarantine q WHERE q.message_id = s.message_id AND q.replayed_at IS NULL);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_show_key(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_show_key(bigint) TO pii_vault_revealer;

-- ----------------------------------------------------------- replay
-- A rotator's operation: it opens sealed bodies (as `rotate data-keys`
-- does) and writes logins, which a worker must never be able to read back.
-- Step one: the audit row (action `quarantine-replay`), the quarantined
-- messages it covers (`p_ids`, or every one when NULL) fixed here, and
-- the data key the replay seals under, registered here (active, under an
-- allowed KEK: the key guard). Committed by the caller before step two.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_replay_request(p_ids text[], p_key_id text, p_kek_id text,
                                                               p_wrapped bytea, p_reason text, p_claimed_actor text)
RETURNS TABLE (record_id bigint, row_count bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    rid bigint;
    n bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a replay needs a reason (at most 1000 characters)';
    END IF;
    IF p_key_id IS NULL OR p_key_id !~ '^dek-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a data key id is dek-<uuid>';
    END IF;
    IF p_wrapped IS NULL OR length(p_wrapped) NOT BETWEEN 16 AND 4096 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a wrapped data key is 16 to 4096 bytes';
    END IF;
    SELECT count(*) INTO n FROM quarantine q WHERE q.replayed_at IS NULL AND (p_ids IS NULL OR q.message_id = ANY (p_ids));
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('quarantine-replay',
            CASE WHEN p_ids IS NULL THEN 'all' ELSE left('message_id=' || array_to_string(p_ids, ','), 512) END,
            p_reason, left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
    VALUES (p_key_id, 'vault', 0, p_kek_id, p_wrapped, 'active');
    INSERT INTO quarantine_replays (record, key_id, requested_by) VALUES (rid, p_key_id, session_user);
    INSERT INTO quarantine_replay_rows (record, message_id)
        SELECT rid, q.message_id FROM quarantine q WHERE q.replayed_at IS NULL AND (p_ids IS NULL OR q.message_id = ANY (p_ids));
    RETURN QUERY SELECT rid, n;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_replay_request(text[], text, text, bytea, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_replay_request(text[], text, text, bytea, text, text) TO pii_vault_rotator;

-- The replay of `p_record`, checked: the caller's, committed, within an
-- hour, not finished.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_replay_check(p_record bigint) RETURNS quarantine_replays
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r quarantine_replays;
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_record, ARRAY['quarantine-replay'], interval '1 hour');
    SELECT * INTO r FROM quarantine_replays WHERE record = p_record FOR UPDATE;
    IF NOT FOUND OR r.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('record %s is not a quarantine replay of this login', p_record);
    END IF;
    IF r.finished_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('quarantine replay %s is finished', p_record);
    END IF;
    RETURN r;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_replay_check(bigint) FROM PUBLIC;

-- Step two: the sealed bodies the replay covers that are still quarantined.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_replay_fetch(p_record bigint)
RETURNS TABLE (message_id text, reason_code text, reason text, user_id text, key_id text, nonce bytea,
               ciphertext bytea, received_at timestamptz, source text, line bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_quarantine_replay_check(p_record);
    RETURN QUERY
        SELECT q.message_id, q.reason_code, q.reason, q.user_id::text, q.key_id, q.nonce, q.ciphertext,
               q.received_at, q.source, q.line
        FROM quarantine_replay_rows rr JOIN quarantine q ON q.message_id = rr.message_id
        WHERE rr.record = p_record AND q.replayed_at IS NULL
        ORDER BY q.message_id;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_replay_fetch(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_replay_fetch(bigint) TO pii_vault_rotator;

-- Step three: the logins that now pass, each under its original message
-- id, with its originals sealed under the replay's data key. A message id
-- already in user_logins is not stored again (exactly once); either way
-- its quarantine row becomes a tombstone (replayed_at set; body, key and
-- user id gone). Only messages the replay covers, only under its key; one
-- that another replay handled meanwhile is skipped. Returns how many were
-- stored and how many were there already.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_replay_store(p_record bigint, p_message_id text[], p_user_id text[],
        p_device_type text[], p_masked_ip text[], p_masked_device_id text[], p_masked_ip_net text[], p_locale text[],
        p_app_version text[], p_create_date date[], p_nonce bytea[], p_ciphertext bytea[])
RETURNS TABLE (stored bigint, already bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    r quarantine_replays;
    live text[];
    ins text[];
BEGIN
    r := pii_vault_quarantine_replay_check(p_record);
    IF coalesce(cardinality(p_message_id), 0) = 0 THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_message_id) m(id)
               WHERE NOT EXISTS (SELECT 1 FROM quarantine_replay_rows rr
                                 WHERE rr.record = p_record AND rr.message_id = m.id)) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004',
            MESSAGE = format('quarantine replay %s: a message id it does not cover', p_record);
    END IF;
    -- The ones still quarantined, locked: a replay running beside this one
    -- waits here, then finds them replayed and skips them.
    SELECT coalesce(array_agg(s.message_id), '{}') INTO live
    FROM (SELECT q.message_id FROM quarantine q
          WHERE q.message_id = ANY (p_message_id) AND q.replayed_at IS NULL
          FOR UPDATE) s;
    WITH i AS (
        INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, masked_ip_net, locale,
                                 app_version, create_date)
        SELECT u.* FROM unnest(p_message_id, p_user_id, p_device_type, p_masked_ip, p_masked_device_id,
                               p_masked_ip_net, p_locale, p_app_version, p_create_date)
                        AS u(m, uid, dt, ip, dev, net, loc, ver, d)
        WHERE u.m = ANY (live)
        ON CONFLICT (message_id, create_date) DO NOTHING
        RETURNING message_id
    )
    SELECT coalesce(array_agg(message_id), '{}') INTO ins FROM i;
    INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext, create_date)
    SELECT u.m, u.u, r.key_id, u.nonce, u.ct, u.d
    FROM unnest(p_message_id, p_user_id, p_nonce, p_ciphertext, p_create_date) AS u(m, u, nonce, ct, d)
    WHERE u.m = ANY (ins);
    -- Kept as a tombstone: no body, key or user id left, the message id
    -- still there so that a redelivery stays a duplicate.
    UPDATE quarantine q SET replayed_at = clock_timestamp(), key_id = NULL, nonce = NULL, ciphertext = NULL,
                            user_id = NULL
    WHERE q.message_id = ANY (live);
    RETURN QUERY SELECT cardinality(ins)::bigint, (cardinality(live) - cardinality(ins))::bigint;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_replay_store(bigint, text[], text[], text[], text[], text[], text[], text[],
    text[], date[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_replay_store(bigint, text[], text[], text[], text[], text[], text[], text[],
    text[], date[], bytea[], bytea[]) TO pii_vault_rotator;

-- The end of a replay: its data key retired (nothing more is sealed under
-- it), the replay finished.
CREATE OR REPLACE FUNCTION pii_vault_quarantine_replay_finish(p_record bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r quarantine_replays;
BEGIN
    r := pii_vault_quarantine_replay_check(p_record);
    UPDATE vault_keys SET state = 'retired' WHERE id = r.key_id AND state = 'active';
    UPDATE quarantine_replays SET finished_at = clock_timestamp() WHERE record = p_record;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_quarantine_replay_finish(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_quarantine_replay_finish(bigint) TO pii_vault_rotator;
