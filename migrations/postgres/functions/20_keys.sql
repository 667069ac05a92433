-- Keys: the allow-list of key-encryption keys, what no role may do to a key
-- row, the two ways a worker touches keys, the audited set-up of the first
-- keys, and the fences that keep rows from being written under retired keys.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- ------------------------------------------------------------ allow-list
-- It only grows: entries are never changed, deleted or truncated, by the
-- owner either; who added one and when is set here.
CREATE OR REPLACE FUNCTION pii_vault_allowlist_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.added_at := clock_timestamp();
        NEW.added_by := session_user;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PV008',
        MESSAGE = 'kms_allowlist only grows: entries cannot be changed or removed (destroy the KMS key instead)';
END
$$;
REVOKE ALL ON FUNCTION pii_vault_allowlist_guard() FROM PUBLIC;
CREATE OR REPLACE TRIGGER kms_allowlist_guard BEFORE INSERT OR UPDATE OR DELETE ON kms_allowlist
    FOR EACH ROW EXECUTE FUNCTION pii_vault_allowlist_guard();
CREATE OR REPLACE TRIGGER kms_allowlist_no_truncate BEFORE TRUNCATE ON kms_allowlist
    FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_allowlist_guard();

-- ----------------------------------------------------------------- keys
-- What no role may do to a key row, owner included: plant it under a KEK
-- that is not allowed, backdate it, bring a retired or destroyed key back,
-- change what it is, or lower a token version below the current one.
CREATE OR REPLACE FUNCTION pii_vault_keys_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.created_at := clock_timestamp();
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
REVOKE ALL ON FUNCTION pii_vault_keys_guard() FROM PUBLIC;
CREATE OR REPLACE TRIGGER vault_keys_guard BEFORE INSERT OR UPDATE ON vault_keys
    FOR EACH ROW EXECUTE FUNCTION pii_vault_keys_guard();

-- Key rows are never deleted or truncated, by the owner either: a key is
-- destroyed in place (state 'destroyed', its wrapped copy erased) and its
-- row stays as the record (what the foreign keys dropped in 0008 also did).
CREATE OR REPLACE FUNCTION pii_vault_keys_no_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PV009',
        MESSAGE = 'key rows are never deleted: a key is destroyed in place (rotate, forget)';
END
$$;
REVOKE ALL ON FUNCTION pii_vault_keys_no_delete() FROM PUBLIC;
CREATE OR REPLACE TRIGGER vault_keys_no_delete BEFORE DELETE ON vault_keys
    FOR EACH ROW EXECUTE FUNCTION pii_vault_keys_no_delete();
CREATE OR REPLACE TRIGGER vault_keys_no_truncate BEFORE TRUNCATE ON vault_keys
    FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_keys_no_delete();

-- Destroys (erases the wrapped copy of) every retired data key that no
-- vault or quarantine row names any more; returns their ids. Called by the
-- functions that record why: a finished data-key rotation, retention.
CREATE OR REPLACE FUNCTION pii_vault_destroy_unreferenced_data_keys() RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    gone text[];
    k text;
BEGIN
    -- One index probe per retired key (its key_id index, in each monthly
    -- partition): a join here may be planned as one read of the whole vault.
    -- Index scans only: a month that a rotation rewrote holds one key, which
    -- its statistics call common, so a sequential read of the months in
    -- turn until one has it would look as cheap to the planner. No JIT: the
    -- quarantine's probe (no key_id index) then costs enough on paper to be
    -- compiled, 55 ms a key for a read of a few pages (1.0 s of a
    -- rotation's last step for 14 keys at 1 M rows, against 4 ms).
    gone := '{}';
    FOR k IN SELECT id FROM vault_keys WHERE purpose = 'vault' AND state = 'retired' ORDER BY id LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM vault v WHERE v.key_id = k)
                   OR EXISTS (SELECT 1 FROM quarantine q WHERE q.key_id = k);
        UPDATE vault_keys SET state = 'destroyed' WHERE id = k;
        gone := gone || k;
    END LOOP;
    RETURN gone;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_destroy_unreferenced_data_keys() FROM PUBLIC;

-- ---------------------------------------------------------------- worker
-- The one way a worker adds a key: its own data key, active, version 0,
-- time and author set by the database, under an allowed KEK (the guard).
CREATE OR REPLACE FUNCTION pii_vault_register_data_key(p_id text, p_kek_id text, p_wrapped bytea) RETURNS void
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
REVOKE ALL ON FUNCTION pii_vault_register_data_key(text, text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_register_data_key(text, text, bytea) TO pii_vault_worker;

-- A worker retires a data key it registered itself (when it reached its use
-- cap), and nothing else: active -> retired.
CREATE OR REPLACE FUNCTION pii_vault_retire_data_key(p_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE vault_keys SET state = 'retired'
    WHERE id = p_id AND purpose = 'vault' AND state = 'active' AND created_by = session_user;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_retire_data_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_retire_data_key(text) TO pii_vault_worker;

-- ---------------------------------------------------------------- set-up
-- `migrate` (the owner) and `keys init` (a rotator): puts `p_kek` on the
-- allow-list and stores token key v1 and the line-id key when the database
-- has none, each addition with its audit row in the same transaction. A
-- key passed that is not needed (another run created one first) is not
-- stored.
CREATE OR REPLACE FUNCTION pii_vault_keys_init(p_kek text, p_token_id text, p_token_wrapped bytea,
                                               p_line_id text, p_line_wrapped bytea, p_claimed_actor text)
RETURNS TABLE (kek_added boolean, token_key boolean, line_id_key boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_kek IS NULL OR btrim(p_kek) = '' OR length(p_kek) > 512 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a key-encryption key id is 1 to 512 characters';
    END IF;
    INSERT INTO kms_allowlist (kek_id) VALUES (p_kek) ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    kek_added := n > 0;
    IF kek_added THEN
        INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
        VALUES ('allow-kek', p_kek, 'key set-up', left(p_claimed_actor, 256), 0);
    END IF;
    token_key := false;
    IF p_token_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM vault_keys WHERE purpose = 'token') THEN
        IF p_token_id !~ '^tok-[0-9a-f-]{36}$' OR p_token_wrapped IS NULL OR length(p_token_wrapped) NOT BETWEEN 16 AND 4096 THEN
            RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a token key is tok-<uuid> and 16 to 4096 wrapped bytes';
        END IF;
        -- Two set-ups at once: the token-version index lets one win.
        INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
        VALUES (p_token_id, 'token', 1, p_kek, p_token_wrapped, 'active') ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        token_key := n > 0;
    END IF;
    line_id_key := false;
    IF p_line_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM vault_keys WHERE purpose = 'line-ids' AND state <> 'destroyed') THEN
        IF p_line_id !~ '^ids-[0-9a-f-]{36}$' OR p_line_wrapped IS NULL OR length(p_line_wrapped) NOT BETWEEN 16 AND 4096 THEN
            RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a line-id key is ids-<uuid> and 16 to 4096 wrapped bytes';
        END IF;
        INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state)
        VALUES (p_line_id, 'line-ids', 0, p_kek, p_line_wrapped, 'active') ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        line_id_key := n > 0;
    END IF;
    IF token_key OR line_id_key THEN
        INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
        VALUES ('keys-init',
                CASE WHEN token_key AND line_id_key THEN 'token key v1, line-id key'
                     WHEN token_key THEN 'token key v1' ELSE 'line-id key' END,
                'initial keys', left(p_claimed_actor, 256), 0);
    END IF;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_keys_init(text, text, bytea, text, bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_keys_init(text, text, bytea, text, bytea, text) TO pii_vault_rotator;

-- --------------------------------------------------------------- fences
-- Every statement that writes sealed rows (vault, quarantine; insert or
-- re-seal) must name active data keys only. Checked once per statement
-- over its transition table, so the cost is per batch, not per row. The
-- UPDATE also counts the uses and locks the key rows until commit, so a
-- rotation that retires one of these keys waits for this transaction and
-- then sees its rows, or has retired it first and the statement fails
-- (SQLSTATE PV001): the worker then seals the batch again with a fresh key.
-- A key id that names no stored data key is refused too (PV010).
CREATE OR REPLACE FUNCTION pii_vault_fence_data_keys() RETURNS trigger
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
REVOKE ALL ON FUNCTION pii_vault_fence_data_keys() FROM PUBLIC;
CREATE OR REPLACE TRIGGER vault_fence_insert AFTER INSERT ON vault
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE OR REPLACE TRIGGER vault_fence_update AFTER UPDATE ON vault
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE OR REPLACE TRIGGER quarantine_fence_insert AFTER INSERT ON quarantine
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();
CREATE OR REPLACE TRIGGER quarantine_fence_update AFTER UPDATE ON quarantine
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_data_keys();

-- The same for tokens: every token a statement writes into user_logins
-- (IP, device id and, since migration 0015, network; NULLs aside)
-- carries its key version (t<version>_…), which must be an active token
-- key. FOR SHARE holds the key until commit, so `rotate token-key`, which
-- retires the old version before re-tokenising, waits for this batch and
-- then re-tokenises it too. The version is read from the distinct prefixes
-- up to the first `_` (one regular expression per distinct prefix, not per
-- token: 0.4 s of CPU per million logins instead of 4.9 s, migration 0007).
CREATE OR REPLACE FUNCTION pii_vault_fence_token_keys() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    p text;
    v bigint;
    k text;
BEGIN
    FOR p IN
        SELECT DISTINCT left(t, strpos(t, '_'))
        FROM (SELECT masked_ip AS t FROM new_rows UNION ALL SELECT masked_device_id FROM new_rows
              UNION ALL SELECT masked_ip_net FROM new_rows) s
        WHERE t IS NOT NULL
    LOOP
        v := substring(p FROM '^t([0-9]{1,18})_$')::bigint;
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
REVOKE ALL ON FUNCTION pii_vault_fence_token_keys() FROM PUBLIC;
CREATE OR REPLACE TRIGGER user_logins_fence_insert AFTER INSERT ON user_logins
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_token_keys();
CREATE OR REPLACE TRIGGER user_logins_fence_update AFTER UPDATE ON user_logins
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_fence_token_keys();
