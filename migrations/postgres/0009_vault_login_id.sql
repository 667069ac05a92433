-- `rotate token-key` walks user_logins in id order and needs each login's
-- vault row. Joined by message_id, that was one random probe of the vault's
-- primary key per login (message ids are random): at a million rows it cost
-- more than the token update itself once the indexes outgrew the buffer
-- cache (measured: 5,000-row chunks on 2 connections, read and update,
-- 19.3-20.8 s; update alone 12.9-15.4 s). Each vault row now also carries
-- the id of its login, so a chunk of logins and their vault rows are two
-- range scans in the same order, merged (14.1-16.5 s, same runs).
--
-- The database sets login_id, not the writer: a row trigger looks the login
-- up by message_id when the vault row is inserted (the worker writes the
-- login first, in the same transaction). A value the writer supplies is
-- overwritten, and no role may update the column, so login_id never names
-- another message's login. The rotation still joins on message_id as well;
-- a vault row without a login_id (written before its login, or by an older
-- binary's path that this trigger did not see) is left to the rotation's
-- final sweep, which joins by message_id as before.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

ALTER TABLE vault ADD COLUMN login_id bigint;

CREATE FUNCTION pii_vault_vault_login_id() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    NEW.login_id := (SELECT l.id FROM user_logins l WHERE l.message_id = NEW.message_id);
    RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION pii_vault_vault_login_id() FROM PUBLIC;
CREATE TRIGGER vault_login_id BEFORE INSERT ON vault
    FOR EACH ROW EXECUTE FUNCTION pii_vault_vault_login_id();

-- The rows already there. The data-key fence checks the key of every
-- updated row, and rows under retired keys are the normal case, so it is
-- off for this one statement (inside this migration's transaction).
ALTER TABLE vault DISABLE TRIGGER vault_fence_update;
UPDATE vault v SET login_id = l.id FROM user_logins l WHERE l.message_id = v.message_id;
ALTER TABLE vault ENABLE TRIGGER vault_fence_update;
CREATE INDEX vault_login_id ON vault (login_id);

-- Same contract as in 0005; the join is now the merge of two range scans.
CREATE OR REPLACE FUNCTION pii_vault_rotation_logins_chunk(p_record bigint, p_job bigint, p_after bigint, p_hi bigint, p_limit int)
RETURNS TABLE (id bigint, message_id text, user_id text, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off SET enable_hashjoin = off
SET enable_nestloop = off SET max_parallel_workers_per_gather = 0 SET jit = off
SET search_path FROM CURRENT AS $$
DECLARE
    j rotation_jobs := pii_vault_rotation_job_check(p_record, p_job);
    pat text;
    hi bigint := coalesce(p_hi, 9223372036854775807);
BEGIN
    IF j.kind <> 'rotate-token-key' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011', MESSAGE = format('rotation job %s is not a token-key rotation', p_job);
    END IF;
    pat := 't' || j.token_version || '\_%';
    RETURN QUERY SELECT l.id, l.message_id, l.user_id::text, v.key_id, v.nonce, v.ciphertext
        FROM user_logins l JOIN vault v ON v.login_id = l.id AND v.message_id = l.message_id
        WHERE l.id > p_after AND l.id <= hi AND v.login_id > p_after AND v.login_id <= hi
          AND (l.masked_ip NOT LIKE pat OR l.masked_device_id NOT LIKE pat)
        ORDER BY l.id LIMIT p_limit;
END
$$;
