-- Trust boundaries held by the database itself, not by the CLI.
--
-- After this migration, a login granted one pii_vault_* role and using
-- plain SQL gets exactly what the role is for:
--
--   worker    appends logins, vault and quarantine rows; registers its own
--             data keys (pii_vault_register_data_key) and retires them
--             (pii_vault_retire_data_key). Cannot create token or line-id
--             keys, choose the KMS key others wrap under, or change states.
--   revealer  records a reveal (pii_vault_reveal_request), and only after
--             that audit row is committed fetches the ciphertexts of exactly
--             that reveal, once (pii_vault_reveal_fetch). No SELECT on vault
--             or quarantine.
--   rotator   records each job in the trail first (pii_vault_record, which
--             also takes the job's advisory lock) and reads ciphertext only
--             through functions that check that record.
--   everyone  audit rows take actor = session_user, at = now() and the
--             writing transaction from the database; what the CLI claims is
--             kept in claimed_actor.
--
-- Functions that hand out more than a role's grants are SECURITY DEFINER
-- (they run as the owner, the role that runs `pii-vault migrate`), with a
-- search_path fixed to this schema and pg_temp last, so that a caller's
-- temporary objects cannot stand in for ours. EXECUTE is revoked from
-- PUBLIC and granted per role.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- ------------------------------------------------------------ allow-list
-- The KMS keys (or local key-file ids) that stored keys may be wrapped
-- under. Workers and reveal unwrap nothing else, and the database refuses a
-- key row under any other KEK. Filled by `pii-vault migrate` and
-- `rotate kek --to`; only the owner and the rotator may add to it.
CREATE TABLE kms_allowlist (
    kek_id    text PRIMARY KEY,
    added_at  timestamptz NOT NULL DEFAULT now(),
    added_by  text NOT NULL DEFAULT session_user
);
-- An upgraded database keeps working: the KEKs its keys already use were
-- chosen before this list existed. Review them (`SELECT * FROM
-- kms_allowlist`) after upgrading.
INSERT INTO kms_allowlist (kek_id, added_by)
SELECT DISTINCT kek_id, 'migration 0003' FROM vault_keys WHERE state <> 'destroyed';

CREATE FUNCTION pii_vault_allowlist_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.added_at := now();
        NEW.added_by := session_user;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PV008',
        MESSAGE = 'kms_allowlist only grows: entries cannot be changed or removed (destroy the KMS key instead)';
END
$$;
CREATE TRIGGER kms_allowlist_guard BEFORE INSERT OR UPDATE OR DELETE ON kms_allowlist
    FOR EACH ROW EXECUTE FUNCTION pii_vault_allowlist_guard();

-- ----------------------------------------------------------------- keys
ALTER TABLE vault_keys ADD COLUMN created_by text;
ALTER TABLE vault_keys ALTER COLUMN created_at SET DEFAULT now();

-- What no role may do to a key row, owner included: plant it under a KEK
-- that is not allowed, backdate it, bring a retired or destroyed key back,
-- change what it is, or lower a token version below the current one.
CREATE FUNCTION pii_vault_keys_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.created_at := now();
        NEW.created_by := session_user;
        NEW.usage_count := 0;
        IF NEW.purpose = 'token' AND NEW.version < (
            SELECT coalesce(max(version), 0) FROM vault_keys WHERE purpose = 'token'
        ) THEN
            RAISE EXCEPTION USING ERRCODE = 'PV009',
                MESSAGE = 'a new token key must have a version above every existing one';
        END IF;
    ELSE
        IF NEW.id <> OLD.id OR NEW.purpose <> OLD.purpose OR NEW.version <> OLD.version
           OR NEW.created_at <> OLD.created_at OR NEW.created_by IS DISTINCT FROM OLD.created_by THEN
            RAISE EXCEPTION USING ERRCODE = 'PV009',
                MESSAGE = 'a key''s id, purpose, version and creation are fixed';
        END IF;
        IF OLD.state = 'destroyed' AND NEW.state <> 'destroyed'
           OR OLD.state = 'retired' AND NEW.state = 'active' THEN
            RAISE EXCEPTION USING ERRCODE = 'PV009',
                MESSAGE = format('key %s cannot go from %s back to %s', OLD.id, OLD.state, NEW.state);
        END IF;
        IF NEW.usage_count < OLD.usage_count THEN
            RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = 'a key''s usage count only grows';
        END IF;
        IF NEW.kek_id = OLD.kek_id THEN
            IF NEW.state = 'destroyed' THEN
                NEW.wrapped := NULL;
            END IF;
            RETURN NEW;
        END IF;
    END IF;
    IF NEW.state = 'destroyed' THEN
        NEW.wrapped := NULL;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM kms_allowlist WHERE kek_id = NEW.kek_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV002',
            MESSAGE = format('key %s: its key-encryption key is not on the KMS allow-list (kms_allowlist)', NEW.id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER vault_keys_guard BEFORE INSERT OR UPDATE ON vault_keys
    FOR EACH ROW EXECUTE FUNCTION pii_vault_keys_guard();

-- The one way a worker adds a key: its own data key, active, version 0,
-- time and author set by the database, under an allowed KEK (the guard).
CREATE FUNCTION pii_vault_register_data_key(p_id text, p_kek_id text, p_wrapped bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_id IS NULL OR p_id !~ '^dek-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a data key id is dek-<uuid>';
    END IF;
    IF p_wrapped IS NULL OR length(p_wrapped) NOT BETWEEN 16 AND 4096 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a wrapped data key is 16 to 4096 bytes';
    END IF;
    INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
    VALUES (p_id, 'vault', 0, p_kek_id, p_wrapped, 'active');
END
$$;

-- A worker retires a data key it registered itself (when it reached its use
-- cap), and nothing else: active -> retired.
CREATE FUNCTION pii_vault_retire_data_key(p_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE vault_keys SET state = 'retired'
    WHERE id = p_id AND purpose = 'vault' AND state = 'active' AND created_by = session_user;
    RETURN FOUND;
END
$$;

-- --------------------------------------------------------------- fences
-- Every statement that writes sealed rows (vault, quarantine; insert or
-- re-seal) must name active data keys only. Checked once per statement
-- over its transition table, so the cost is per batch, not per row. The
-- UPDATE also counts the uses and locks the key rows until commit, so a
-- rotation that retires one of these keys waits for this transaction and
-- then sees its rows, or has retired it first and the statement fails
-- (SQLSTATE PV001): the worker then seals the batch again with a fresh key.
CREATE FUNCTION pii_vault_fence_data_keys() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    missing text;
BEGIN
    WITH u AS (
        SELECT key_id, count(*) AS n FROM new_rows WHERE key_id IS NOT NULL GROUP BY key_id
    ), hit AS (
        UPDATE vault_keys k SET usage_count = k.usage_count + u.n FROM u
        WHERE k.id = u.key_id AND k.purpose = 'vault' AND k.state = 'active'
        RETURNING k.id
    )
    SELECT u.key_id INTO missing FROM u WHERE u.key_id NOT IN (SELECT id FROM hit) LIMIT 1;
    IF missing IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM vault_keys WHERE id = missing AND purpose = 'vault') THEN
            RAISE EXCEPTION USING ERRCODE = 'PV010',
                MESSAGE = format('key %s is not a stored data key (unknown key id)', missing);
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'PV001',
            MESSAGE = format('key %s is not an active data key', missing);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER vault_fence_insert AFTER INSERT ON vault
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE TRIGGER vault_fence_update AFTER UPDATE ON vault
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE TRIGGER quarantine_fence_insert AFTER INSERT ON quarantine
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE TRIGGER quarantine_fence_update AFTER UPDATE ON quarantine
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();

-- The same for tokens: every token a statement writes into user_logins
-- carries its key version (t<version>_…), which must be an active token
-- key. FOR SHARE holds the key until commit, so `rotate token-key`, which
-- retires the old version before re-tokenising, waits for this batch and
-- then re-tokenises it too.
CREATE FUNCTION pii_vault_fence_token_keys() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v bigint;
    k text;
BEGIN
    FOR v IN
        SELECT DISTINCT substring(t FROM '^t([0-9]{1,18})_')::bigint
        FROM (SELECT masked_ip AS t FROM new_rows UNION ALL SELECT masked_device_id FROM new_rows) s
        WHERE t IS NOT NULL
    LOOP
        IF v IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'PV003',
                MESSAGE = 'a token written to user_logins carries no token-key version';
        END IF;
        SELECT id INTO k FROM vault_keys
        WHERE purpose = 'token' AND version = v AND state = 'active' FOR SHARE;
        IF k IS NULL THEN
            SELECT id INTO k FROM vault_keys WHERE purpose = 'token' AND version = v;
            IF k IS NULL THEN
                RAISE EXCEPTION USING ERRCODE = 'PV010',
                    MESSAGE = format('key token-v%s is not a stored token key (unknown key version)', v);
            END IF;
            RAISE EXCEPTION USING ERRCODE = 'PV001',
                MESSAGE = format('key %s is not an active token key', k);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER user_logins_fence_insert AFTER INSERT ON user_logins
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_token_keys();
CREATE TRIGGER user_logins_fence_update AFTER UPDATE ON user_logins
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_token_keys();

-- ---------------------------------------------------------------- audit
ALTER TABLE audit_log ADD COLUMN claimed_actor text;
ALTER TABLE audit_log ADD COLUMN xact bigint;
ALTER TABLE audit_log ALTER COLUMN actor SET DEFAULT session_user;

-- What the database vouches for, whoever inserts: the login, the time and
-- the transaction (to tell later whether the row was committed before
-- anything was read under it).
CREATE FUNCTION pii_vault_audit_stamp() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    NEW.actor := session_user;
    NEW.at := now();
    NEW.xact := txid_current();
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_stamp BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION pii_vault_audit_stamp();

-- Whether audit row `p_id` is one of the caller's, of one of `p_actions`,
-- younger than `p_max_age`, and committed by a transaction before this one
-- (a row of the current transaction could still be rolled back, taking the
-- trail of what was read with it). Raises otherwise.
CREATE FUNCTION pii_vault_check_record(p_id bigint, p_actions text[], p_max_age interval) RETURNS audit_log
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    a audit_log;
BEGIN
    SELECT * INTO a FROM audit_log WHERE id = p_id;
    IF NOT FOUND OR a.actor <> session_user OR NOT (a.action = ANY (p_actions)) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004',
            MESSAGE = format('audit record %s is not a %s record of this login', p_id, array_to_string(p_actions, '/'));
    END IF;
    IF a.xact IS NULL OR txid_status(a.xact) IS DISTINCT FROM 'committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV005',
            MESSAGE = format('audit record %s must be committed (in an earlier transaction) before anything is read under it', p_id);
    END IF;
    IF a.at < now() - p_max_age THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('audit record %s has expired', p_id);
    END IF;
    RETURN a;
END
$$;

-- --------------------------------------------------------------- reveal
-- One row per recorded reveal: what it selects, who asked, when it was
-- fetched. Written only by the functions below.
CREATE TABLE reveal_requests (
    id            bigint PRIMARY KEY REFERENCES audit_log (id),
    selector      text NOT NULL CHECK (selector IN ('user_id', 'masked_ip', 'masked_device_id')),
    value         text NOT NULL,
    requested_by  text NOT NULL,
    fetched_at    timestamptz
);

-- Step one of a reveal: the audit row (and the count of logins it covers).
-- The caller commits, then calls pii_vault_reveal_fetch.
CREATE FUNCTION pii_vault_reveal_request(p_selector text, p_value text, p_reason text, p_claimed_actor text)
RETURNS TABLE (request_id bigint, row_count bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    n bigint;
    rid bigint;
BEGIN
    IF p_selector IS NULL OR p_selector NOT IN ('user_id', 'masked_ip', 'masked_device_id') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal selects by user_id, masked_ip or masked_device_id';
    END IF;
    IF p_value IS NULL OR length(p_value) > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal needs a value of at most 256 characters';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal needs a reason (at most 1000 characters)';
    END IF;
    EXECUTE format('SELECT count(*) FROM user_logins WHERE %I = $1', p_selector) INTO n USING p_value;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('reveal', p_selector || '=' || p_value, p_reason, left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    INSERT INTO reveal_requests (id, selector, value, requested_by) VALUES (rid, p_selector, p_value, session_user);
    request_id := rid;
    row_count := n;
    RETURN NEXT;
END
$$;

-- Step two: the logins of a recorded reveal, with their ciphertexts. Only
-- for the login that recorded it, only once the audit row is committed,
-- within an hour, and once (unless the fetching transaction rolls back,
-- which leaves the committed audit row standing).
CREATE FUNCTION pii_vault_reveal_fetch(p_request bigint)
RETURNS TABLE (message_id text, user_id text, device_type text, masked_ip text, masked_device_id text,
               locale text, app_version text, create_date date, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
BEGIN
    PERFORM pii_vault_check_record(p_request, ARRAY['reveal'], interval '1 hour');
    SELECT * INTO r FROM reveal_requests WHERE id = p_request FOR UPDATE;
    IF NOT FOUND OR r.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('reveal request %s is not one of this login', p_request);
    END IF;
    IF r.fetched_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s was already fetched', p_request);
    END IF;
    UPDATE reveal_requests SET fetched_at = now() WHERE id = p_request;
    RETURN QUERY EXECUTE format(
        'SELECT l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text, l.masked_device_id::text, '
        'l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext '
        'FROM user_logins l LEFT JOIN vault v ON v.message_id = l.message_id '
        'WHERE l.%I = $1 ORDER BY l.create_date, l.id', r.selector) USING r.value;
END
$$;

-- ------------------------------------------------------------- rotation
-- The audit row of a rotator's job, written before the job reads anything.
-- A rotation also takes its kind's advisory lock here, on the calling
-- connection, for as long as that connection keeps it: a second rotation
-- of the same kind is refused (SQLSTATE PV007) until the first one ends.
CREATE FUNCTION pii_vault_record(p_action text, p_target text, p_reason text, p_claimed_actor text, p_row_count bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    rid bigint;
    kind int;
BEGIN
    kind := array_position(ARRAY['rotate-kek', 'rotate-data-keys', 'rotate-token-key'], p_action);
    IF kind IS NULL AND p_action NOT IN ('forget', 'keys-init', 'allow-kek') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = format('%s is not an action of the rotator', p_action);
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'an audited job needs a reason';
    END IF;
    IF kind IS NOT NULL AND NOT pg_try_advisory_lock(1347835904, kind) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV007',
            MESSAGE = format('another %s is running (it holds the advisory lock of its kind); wait for it to finish', p_action);
    END IF;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES (p_action, left(coalesce(p_target, ''), 512), left(p_reason, 1000), left(p_claimed_actor, 256), coalesce(p_row_count, 0))
    RETURNING id INTO rid;
    RETURN rid;
END
$$;

-- Whether some session of this login holds the advisory lock of `p_action`
-- (taken by pii_vault_record), so that a job's rows are read only while
-- its lock is held.
CREATE FUNCTION pii_vault_check_lock(p_action text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    kind int := array_position(ARRAY['rotate-kek', 'rotate-data-keys', 'rotate-token-key'], p_action);
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = 1347835904::oid AND l.objid = kind::oid AND l.objsubid = 2
          AND a.usename = session_user
    ) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV007',
            MESSAGE = format('%s rows are read only while the job holds its lock (record it with pii_vault_record)', p_action);
    END IF;
END
$$;

-- Sealed vault rows under `p_keys`, after message id `p_after`, for a
-- recorded `rotate data-keys`.
CREATE FUNCTION pii_vault_rotation_vault_rows(p_record bigint, p_keys text[], p_after text, p_limit int)
RETURNS TABLE (message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY['rotate-data-keys'], interval '7 days');
    PERFORM pii_vault_check_lock('rotate-data-keys');
    RETURN QUERY SELECT v.message_id, v.user_id::text, v.key_id, v.nonce, v.ciphertext FROM vault v
        WHERE v.key_id = ANY (p_keys) AND v.message_id > coalesce(p_after, '')
        ORDER BY v.message_id LIMIT p_limit;
END
$$;

CREATE FUNCTION pii_vault_rotation_quarantine_rows(p_record bigint, p_keys text[], p_after text, p_limit int)
RETURNS TABLE (message_id text, reason_code text, reason text, user_id text, key_id text, nonce bytea,
               ciphertext bytea, received_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY['rotate-data-keys'], interval '7 days');
    PERFORM pii_vault_check_lock('rotate-data-keys');
    RETURN QUERY SELECT q.message_id, q.reason_code, q.reason, q.user_id::text, q.key_id, q.nonce, q.ciphertext,
        q.received_at FROM quarantine q
        WHERE q.key_id = ANY (p_keys) AND q.message_id > coalesce(p_after, '')
        ORDER BY q.message_id LIMIT p_limit;
END
$$;

-- Logins (with their sealed originals) whose tokens are not of version
-- `p_version`, after internal id `p_after`, for a recorded `rotate token-key`.
CREATE FUNCTION pii_vault_rotation_logins(p_record bigint, p_version bigint, p_after bigint, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, device_type text, masked_ip text, masked_device_id text,
               locale text, app_version text, create_date date, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    pat text := 't' || p_version || '\_%';
BEGIN
    PERFORM pii_vault_check_record(p_record, ARRAY['rotate-token-key'], interval '7 days');
    PERFORM pii_vault_check_lock('rotate-token-key');
    RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text,
        l.masked_device_id::text, l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext
        FROM user_logins l JOIN vault v ON v.message_id = l.message_id
        WHERE l.id > p_after AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
        ORDER BY l.id LIMIT p_limit;
END
$$;

-- ---------------------------------------------------------------- grants
REVOKE ALL ON TABLE kms_allowlist, reveal_requests
    FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator;
REVOKE EXECUTE ON FUNCTION
    pii_vault_allowlist_guard(), pii_vault_keys_guard(), pii_vault_register_data_key(text, text, bytea),
    pii_vault_retire_data_key(text), pii_vault_fence_data_keys(), pii_vault_fence_token_keys(),
    pii_vault_audit_stamp(), pii_vault_check_record(bigint, text[], interval),
    pii_vault_reveal_request(text, text, text, text), pii_vault_reveal_fetch(bigint),
    pii_vault_record(text, text, text, text, bigint), pii_vault_check_lock(text),
    pii_vault_rotation_vault_rows(bigint, text[], text, int),
    pii_vault_rotation_quarantine_rows(bigint, text[], text, int),
    pii_vault_rotation_logins(bigint, bigint, bigint, int)
    FROM PUBLIC;

-- Worker: keys only through the two functions.
REVOKE INSERT, UPDATE ON vault_keys FROM pii_vault_worker;
GRANT SELECT ON kms_allowlist TO pii_vault_worker;
GRANT EXECUTE ON FUNCTION pii_vault_register_data_key(text, text, bytea), pii_vault_retire_data_key(text)
    TO pii_vault_worker;

-- Revealer: no ciphertext except through a recorded reveal; the trail is
-- written only by the request function.
REVOKE SELECT ON vault FROM pii_vault_revealer;
REVOKE INSERT ON audit_log FROM pii_vault_revealer;
GRANT SELECT ON kms_allowlist TO pii_vault_revealer;
GRANT EXECUTE ON FUNCTION pii_vault_reveal_request(text, text, text, text), pii_vault_reveal_fetch(bigint)
    TO pii_vault_revealer;

-- Rotator: key ids and owners of sealed rows, never their ciphertext except
-- through a recorded job; audit rows only through pii_vault_record.
REVOKE SELECT ON vault, quarantine FROM pii_vault_rotator;
GRANT SELECT (message_id, user_id, key_id) ON vault TO pii_vault_rotator;
GRANT SELECT (message_id, reason_code, reason, user_id, key_id, received_at) ON quarantine TO pii_vault_rotator;
REVOKE INSERT ON audit_log FROM pii_vault_rotator;
GRANT SELECT, INSERT ON kms_allowlist TO pii_vault_rotator;
GRANT EXECUTE ON FUNCTION pii_vault_record(text, text, text, text, bigint),
    pii_vault_rotation_vault_rows(bigint, text[], text, int),
    pii_vault_rotation_quarantine_rows(bigint, text[], text, int),
    pii_vault_rotation_logins(bigint, bigint, bigint, int)
    TO pii_vault_rotator;
