-- vault.key_id and quarantine.key_id named their data key through foreign
-- keys to vault_keys: a lookup and a row lock on vault_keys for every row
-- written, inserted or re-sealed. At a million rows that was a fifth of a
-- `rotate data-keys` (measured: 1 M re-sealed rows in chunks, 2 connections,
-- 10.9 s without the foreign key and the fence, 13.8 s with both).
--
-- The fences of 0003 already refuse, once per statement and distinct key,
-- every row whose key is not a stored, active data key (PV010 unknown,
-- PV001 not active), holding the key row locked until commit: stricter than
-- the foreign key, which accepted a retired or destroyed key. What the
-- foreign key did beyond that, refuse to delete a key row that rows still
-- name, is now a guard for every login, the owner's included: key rows are
-- never deleted or truncated. A key is destroyed in place (state
-- 'destroyed', its wrapped copy erased), and its row stays as the record.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

ALTER TABLE vault DROP CONSTRAINT vault_key_id_fkey;
ALTER TABLE quarantine DROP CONSTRAINT quarantine_key_id_fkey;

CREATE FUNCTION pii_vault_keys_no_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PV009',
        MESSAGE = 'key rows are never deleted: a key is destroyed in place (rotate, forget)';
END
$$;
CREATE TRIGGER vault_keys_no_delete BEFORE DELETE ON vault_keys
    FOR EACH ROW EXECUTE FUNCTION pii_vault_keys_no_delete();
CREATE TRIGGER vault_keys_no_truncate BEFORE TRUNCATE ON vault_keys
    FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_keys_no_delete();
REVOKE EXECUTE ON FUNCTION pii_vault_keys_no_delete() FROM PUBLIC;
