-- Retention: erase every recoverable original older than a date, in bulk,
-- and only ever with an audit row in the same transaction.
--
-- * vault.create_date: the day of the login (the same day as its
--   user_logins row), written by the worker with the ciphertext, so that
--   retention selects by it without joining 100 M logins. A BRIN index: rows
--   arrive in time order, so a few block ranges per day find them, at almost
--   no cost to the write path (a btree would add a fourth index insert per
--   row). Legacy vault rows are dated from their login here; a vault row
--   without a login keeps NULL and is never erased by date.
-- * Erasure goes through two SECURITY DEFINER functions, pii_vault_forget
--   (one user) and pii_vault_retention (everything before a day), which
--   delete and write their audit row, with the row count, in one
--   transaction. The rotator loses DELETE on vault and quarantine: with it,
--   plain SQL could erase without a trace.
-- * Honeytokens are never erased by retention: they are how a bulk reveal
--   is noticed, however old. The counts returned do not say how many were
--   kept (the rotator may not know the honeytokens).
-- * PV013: an erasure refused (no reason, a date in the future).

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

ALTER TABLE vault ADD COLUMN create_date date;

-- The backfill is the owner's, not a worker's: the data-key fence (which
-- would refuse rows under retired keys, and count this as key use) stays
-- out of it.
ALTER TABLE vault DISABLE TRIGGER vault_fence_update;
UPDATE vault v SET create_date = u.create_date
FROM user_logins u WHERE u.message_id = v.message_id AND u.create_date IS NOT NULL;
ALTER TABLE vault ENABLE TRIGGER vault_fence_update;

CREATE INDEX vault_create_date ON vault USING brin (create_date);
CREATE INDEX quarantine_received_at ON quarantine USING brin (received_at);

CREATE FUNCTION pii_vault_forget(p_user_id text, p_reason text, p_claimed_actor text)
RETURNS TABLE (vault_rows bigint, quarantined bigint, logins_kept bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013', MESSAGE = 'an erasure needs a reason';
    END IF;
    DELETE FROM vault WHERE user_id = p_user_id;
    GET DIAGNOSTICS vault_rows = ROW_COUNT;
    DELETE FROM quarantine WHERE user_id = p_user_id;
    GET DIAGNOSTICS quarantined = ROW_COUNT;
    SELECT count(*) INTO logins_kept FROM user_logins WHERE user_id = p_user_id;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('forget', 'user_id=' || p_user_id, p_reason, p_claimed_actor, vault_rows + quarantined);
    RETURN NEXT;
END
$$;

CREATE FUNCTION pii_vault_retention(p_before date, p_reason text, p_claimed_actor text)
RETURNS TABLE (vault_rows bigint, quarantined bigint, undated_kept bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013', MESSAGE = 'an erasure needs a reason';
    END IF;
    IF p_before IS NULL OR p_before > current_date + 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'PV013',
            MESSAGE = 'retention erases what is older than a day that has begun: the date is in the future';
    END IF;
    DELETE FROM vault
    WHERE create_date < p_before AND user_id NOT IN (SELECT user_id FROM honeytokens);
    GET DIAGNOSTICS vault_rows = ROW_COUNT;
    DELETE FROM quarantine
    WHERE received_at < (p_before::timestamp AT TIME ZONE 'UTC')
      AND (user_id IS NULL OR user_id NOT IN (SELECT user_id FROM honeytokens));
    GET DIAGNOSTICS quarantined = ROW_COUNT;
    SELECT count(*) INTO undated_kept FROM vault WHERE create_date IS NULL;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('retention', 'before=' || p_before, p_reason, p_claimed_actor, vault_rows + quarantined);
    RETURN NEXT;
END
$$;

-- What retention would erase now (`forget --before … --dry-run`). Counted
-- here because the rows to leave out are honeytokens, which only the owner
-- may list; the totals do not say how many were left out.
CREATE FUNCTION pii_vault_retention_preview(p_before date)
RETURNS TABLE (vault_rows bigint, quarantined bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT
        (SELECT count(*) FROM vault
         WHERE create_date < p_before AND user_id NOT IN (SELECT user_id FROM honeytokens)),
        (SELECT count(*) FROM quarantine
         WHERE received_at < (p_before::timestamp AT TIME ZONE 'UTC')
           AND (user_id IS NULL OR user_id NOT IN (SELECT user_id FROM honeytokens)))
$$;

REVOKE EXECUTE ON FUNCTION pii_vault_forget(text, text, text), pii_vault_retention(date, text, text),
    pii_vault_retention_preview(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_forget(text, text, text), pii_vault_retention(date, text, text),
    pii_vault_retention_preview(date) TO pii_vault_rotator;
REVOKE DELETE ON vault, quarantine FROM pii_vault_rotator;
