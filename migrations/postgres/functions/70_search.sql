-- Searches (`pii-vault tokenize`): an IP or a device id turned into the
-- tokens it has in user_logins, recorded and committed before the client
-- prints them, under a daily limit, with the honeytoken alarm of reveals.
--
-- The token is computed by the client, from the value it already has and
-- the token key it unwrapped (its KMS rights allow exactly that): the
-- value never reaches the database, and the database cannot stop a
-- searcher that skips this call. What it can do is keep the honest path
-- on the record, count it, and give the caller nothing it could use
-- without recording: the call returns only the id of its audit row.
--
-- As for reveals (functions/30_reveal.sql), what the caller's session can
-- observe (rows written, notifications, errors) does not depend on whether
-- a honeytoken was matched: the count sits in `searches`, which only the
-- owner reads, and every search sends the same NOTIFY.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- Records a search for `p_tokens` (the value's tokens under each live
-- token-key version, newest first) of kind `p_kind` ('ip' or
-- 'device_id'). Refused with PV018 when this login made
-- max_searches_per_day searches in the last 24 hours. A login's searches
-- are serialised on its row of reveal_quota, as its reveals are, so that
-- racing sessions cannot all pass the limit: under READ COMMITTED the
-- upsert waits for the other transaction and the count then sees its row;
-- under REPEATABLE READ or SERIALIZABLE the second fails with 40001.
CREATE OR REPLACE FUNCTION pii_vault_search_record(p_kind text, p_tokens text[], p_reason text, p_claimed_actor text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t text;
    col text;
    users text[];
    h bigint;
    today bigint;
    pol reveal_policy;
    rid bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    -- EXECUTE is granted to the searcher role alone; the owner, who may
    -- call any function of its own, is refused too: a search is a
    -- searcher's act, counted against a searcher's login.
    IF NOT pg_has_role(session_user, 'pii_vault_searcher', 'USAGE') THEN
        RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'a search needs a login with the pii_vault_searcher role';
    END IF;
    IF p_kind IS NULL OR p_kind NOT IN ('ip', 'ip_net', 'device_id') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a search is of kind ip, ip_net or device_id';
    END IF;
    IF p_tokens IS NULL OR cardinality(p_tokens) NOT BETWEEN 1 AND 4 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a search records between one and four tokens';
    END IF;
    -- Tokens only (t<version>_ and 43 base64url characters, as pii-vault
    -- makes them): a raw value passed by mistake would otherwise be kept
    -- in the trail. Refused without repeating it.
    FOREACH t IN ARRAY p_tokens LOOP
        IF t IS NULL OR t !~ '^t[0-9]+_[A-Za-z0-9_-]{43}$' THEN
            RAISE EXCEPTION USING ERRCODE = '22023',
                MESSAGE = 'a search records tokens (t<version>_...), never an original value';
        END IF;
    END LOOP;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a search needs a reason (at most 1000 characters)';
    END IF;
    INSERT INTO reveal_quota AS q (login, last_at) VALUES (session_user, clock_timestamp())
    ON CONFLICT (login) DO UPDATE SET last_at = excluded.last_at;
    SELECT * INTO pol FROM reveal_policy;
    SELECT count(*) INTO today FROM searches s
    WHERE s.requested_by = session_user AND s.requested_at > clock_timestamp() - interval '24 hours';
    IF today >= pol.max_searches_per_day THEN
        RAISE EXCEPTION USING ERRCODE = 'PV018',
            MESSAGE = format('this login reached the daily limit of %s searches (max_searches_per_day): nothing was '
                             'recorded or shown; try again once its oldest search of the last 24 hours is older than that',
                             pol.max_searches_per_day);
    END IF;
    col := CASE p_kind WHEN 'ip' THEN 'masked_ip' WHEN 'ip_net' THEN 'masked_ip_net' ELSE 'masked_device_id' END;
    -- Honeytokens among the users whose logins carry these tokens: once a
    -- worker has written a trap's logins, its IP and device id have tokens
    -- like anyone's.
    EXECUTE format(
        'SELECT coalesce(array_agg(DISTINCT l.user_id::text) FILTER (WHERE l.user_id IS NOT NULL), ''{}'') '
        'FROM user_logins l WHERE l.%I = ANY ($1)', col)
        INTO users USING p_tokens;
    h := pii_vault_honeytokens_among(users);
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('search', col || '=' || array_to_string(p_tokens, ','), p_reason, left(p_claimed_actor, 256), 0)
    RETURNING id INTO rid;
    INSERT INTO searches (record, kind, tokens, requested_by, requested_at, honeytokens)
    VALUES (rid, p_kind, p_tokens, session_user, clock_timestamp(), h);
    PERFORM pg_notify('pii_vault_alarm', rid::text);
    RETURN rid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_search_record(text, text[], text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_search_record(text, text[], text, text) TO pii_vault_searcher;

-- Recorded searches stay as they were recorded.
CREATE OR REPLACE TRIGGER searches_no_update_delete BEFORE UPDATE OR DELETE ON searches
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE OR REPLACE TRIGGER searches_no_truncate BEFORE TRUNCATE ON searches
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
