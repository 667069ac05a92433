-- Reveals: recorded (and committed) before anything is handed out, under
-- the reveal policy, with the two-person rule for reveals over it, and
-- honeytokens whose reveal raises an alarm the revealer cannot see.
--
-- What a revealer's session can observe of its own request (its rows'
-- count, its statistics in pg_stat_xact_*, its locks, its errors, its
-- notifications) must not depend on whether a honeytoken was touched, or
-- it could probe a user and roll back. So a request writes the same rows
-- to the same tables either way; the honeytoken count is a column of
-- reveal_requests, which only the owner reads, and every request sends the
-- same NOTIFY.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- How many of `p_users` are honeytokens. A sequential scan of the whole
-- table whatever the answer: an index probe would count the matches in the
-- caller's own pg_stat_xact_user_tables (idx_tup_fetch).
CREATE OR REPLACE FUNCTION pii_vault_honeytokens_among(p_users text[]) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER
SET enable_indexscan = off SET enable_indexonlyscan = off SET enable_bitmapscan = off
SET search_path FROM CURRENT AS $$
    SELECT count(*) FROM honeytokens WHERE user_id = ANY (p_users)
$$;
REVOKE ALL ON FUNCTION pii_vault_honeytokens_among(text[]) FROM PUBLIC;

-- What counts against this login's daily reveal limit: its granted
-- reveals and its shown quarantined bodies (functions/60_quarantine.sql)
-- of the last 24 hours. Called by the definer functions after they took
-- the login's reveal_quota row.
CREATE OR REPLACE FUNCTION pii_vault_reveals_today() RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT (SELECT count(*) FROM reveal_requests r
            WHERE r.requested_by = session_user AND r.status = 'granted'
              AND r.requested_at > clock_timestamp() - interval '24 hours')
         + (SELECT count(*) FROM quarantine_reveals s
            WHERE s.requested_by = session_user AND s.requested_at > clock_timestamp() - interval '24 hours')
$$;
REVOKE ALL ON FUNCTION pii_vault_reveals_today() FROM PUBLIC;

-- Step one of a reveal. The logins it covers are fixed here
-- (reveal_request_rows): a later fetch hands out exactly these, whenever
-- it runs. Within the policy: granted (audit action `reveal`). Over it
-- (more distinct users than allowed, or this login's granted reveals of
-- the last 24 hours at the daily limit): pending (audit action
-- `reveal-request`), to be approved by another login.
--
-- A login's requests are serialised on its row of reveal_quota, so the
-- day's count below sees every earlier request of this login: under READ
-- COMMITTED the upsert waits for a concurrent request and the count then
-- sees it; under REPEATABLE READ or SERIALIZABLE the second fails with a
-- serialization error (40001) instead of counting from an old snapshot.
CREATE OR REPLACE FUNCTION pii_vault_reveal_request(p_selector text, p_value text, p_reason text, p_claimed_actor text)
RETURNS TABLE (request_id bigint, row_count bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    ids text[];
    days date[];
    users text[];
    n bigint;
    u bigint;
    h bigint;
    today bigint;
    pol reveal_policy;
    st text := 'granted';
    rid bigint;
    tgt text;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_selector IS NULL OR p_selector NOT IN ('user_id', 'masked_ip', 'masked_device_id') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal selects by user_id, masked_ip or masked_device_id';
    END IF;
    IF p_value IS NULL OR length(p_value) > 256 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal needs a value of at most 256 characters';
    END IF;
    -- A token selector takes a token (t<version>_ and base64url, as
    -- pii-vault makes them): a raw IP or device id given by mistake would
    -- otherwise be kept in the audit target, which every revealer reads.
    -- Refused before anything is written, without repeating the value.
    IF p_selector <> 'user_id' AND p_value !~ '^t[0-9]+_[A-Za-z0-9_-]+$' THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'a reveal by masked_ip or masked_device_id takes a token (t<version>_...), not an original value';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a reveal needs a reason (at most 1000 characters)';
    END IF;
    INSERT INTO reveal_quota AS q (login, last_at) VALUES (session_user, clock_timestamp())
    ON CONFLICT (login) DO UPDATE SET last_at = excluded.last_at;

    EXECUTE format(
        'SELECT coalesce(array_agg(l.message_id), ''{}''), coalesce(array_agg(l.create_date), ''{}''), '
        'coalesce(array_agg(DISTINCT l.user_id::text) FILTER (WHERE l.user_id IS NOT NULL), ''{}'') '
        'FROM user_logins l WHERE l.%I = $1', p_selector)
        INTO ids, days, users USING p_value;
    n := cardinality(ids);
    u := cardinality(users);
    h := pii_vault_honeytokens_among(users);

    SELECT * INTO pol FROM reveal_policy;
    today := pii_vault_reveals_today();
    IF u > pol.max_users_per_reveal OR today >= pol.max_reveals_per_day THEN
        st := 'pending';
    END IF;
    tgt := p_selector || '=' || p_value;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES (CASE st WHEN 'granted' THEN 'reveal' ELSE 'reveal-request' END, tgt, p_reason,
            left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    -- The users it covers, fixed with its rows: the subject ledger's
    -- answer to "who saw the data of user U", whatever the selector was.
    INSERT INTO reveal_requests (id, selector, value, requested_by, status, users, reason, requested_at, honeytokens,
                                 subjects)
    VALUES (rid, p_selector, p_value, session_user, st, u, p_reason, clock_timestamp(), h, users);
    -- With each login's day: the fetch then finds it in its own month's
    -- partition (migration 0017), not by probing every month.
    INSERT INTO reveal_request_rows (request_id, message_id, create_date) SELECT rid, m, d FROM unnest(ids, days) u(m, d);
    -- Every request notifies: the owner's watcher looks the id up in
    -- audit_alarms; a listener learns nothing from the notification itself.
    PERFORM pg_notify('pii_vault_alarm', rid::text);
    RETURN QUERY SELECT rid, n, st;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_reveal_request(text, text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_reveal_request(text, text, text, text) TO pii_vault_revealer;

-- The second person: another login with the revealer role approves a
-- pending request (within 24 hours of it), on the record.
CREATE OR REPLACE FUNCTION pii_vault_approve(p_request bigint, p_reason text, p_claimed_actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'an approval needs a reason (at most 1000 characters)';
    END IF;
    SELECT * INTO r FROM reveal_requests WHERE id = p_request FOR UPDATE;
    IF NOT FOUND OR r.status <> 'pending' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('request %s is not a pending reveal request', p_request);
    END IF;
    IF r.requested_by = session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV011',
            MESSAGE = format('request %s was made by this login: another login must approve it', p_request);
    END IF;
    IF r.requested_at < clock_timestamp() - interval '24 hours' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('request %s has expired', p_request);
    END IF;
    UPDATE reveal_requests SET status = 'approved', approved_by = session_user, approved_at = clock_timestamp()
    WHERE id = p_request;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('approve', format('request %s', p_request), p_reason, left(p_claimed_actor, 256), 0);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_approve(bigint, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_approve(bigint, text, text) TO pii_vault_revealer;

-- The requester takes an approved request: a `reveal` audit row of its
-- own (committed by the caller before the fetch, like any reveal), once,
-- within 24 hours of the request. It covers the rows fixed at the request.
-- Claimed but not fetched yet (the fetch failed: KMS away, a lost
-- connection), the claim's row is handed back, so the approval is not
-- lost; the fetch itself is still once.
CREATE OR REPLACE FUNCTION pii_vault_reveal_claim(p_request bigint, p_claimed_actor text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
    n bigint;
    rid bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    SELECT * INTO r FROM reveal_requests WHERE id = p_request FOR UPDATE;
    IF NOT FOUND OR r.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('reveal request %s is not one of this login', p_request);
    END IF;
    IF r.status <> 'approved' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV012', MESSAGE = format('reveal request %s is %s, not approved', p_request, r.status);
    END IF;
    IF r.fetched_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s was already fetched', p_request);
    END IF;
    IF r.requested_at < clock_timestamp() - interval '24 hours' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s has expired', p_request);
    END IF;
    IF r.fetch_record IS NOT NULL THEN
        RETURN r.fetch_record;
    END IF;
    SELECT count(*) INTO n FROM reveal_request_rows WHERE request_id = p_request;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('reveal', r.selector || '=' || r.value,
            format('%s (request %s, approved by %s)', r.reason, p_request, r.approved_by),
            left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    UPDATE reveal_requests SET fetch_record = rid WHERE id = p_request;
    RETURN rid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_reveal_claim(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_reveal_claim(bigint, text) TO pii_vault_revealer;

-- Step two, for a granted request (its own audit row) or an approved one
-- (the audit row of its claim): the logins fixed at the request, with
-- their ciphertexts. Only for the login that recorded it, only once that
-- audit row is committed, within an hour of it. It is marked fetched here;
-- a fetch whose transaction rolls back can be made again within the hour
-- and hands out the same rows, which the committed audit row already
-- names (Postgres has no write that survives its transaction's rollback).
-- Nested loops only, no JIT: a fetch reads a request's rows by key (a few,
-- or some tens of thousands), and the planner's estimate for the branch of
-- rows without a day (usually none) is whole partitions, which at 10 M
-- rows made it plan a merge join and spend 0.8 s compiling it (JIT) for
-- ten rows.
CREATE OR REPLACE FUNCTION pii_vault_reveal_fetch(p_request bigint)
RETURNS TABLE (message_id text, user_id text, device_type text, masked_ip text, masked_device_id text,
               locale text, app_version text, create_date date, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER
SET jit = off SET enable_hashjoin = off SET enable_mergejoin = off SET max_parallel_workers_per_gather = 0
SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
BEGIN
    PERFORM pii_vault_fresh_call();
    PERFORM pii_vault_check_record(p_request, ARRAY['reveal'], interval '1 hour');
    SELECT * INTO r FROM reveal_requests q
    WHERE (q.id = p_request AND q.status = 'granted') OR (q.fetch_record = p_request AND q.status = 'approved')
    FOR UPDATE;
    IF NOT FOUND OR r.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('reveal request %s is not one of this login', p_request);
    END IF;
    IF r.fetched_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s was already fetched', p_request);
    END IF;
    UPDATE reveal_requests SET fetched_at = clock_timestamp() WHERE id = r.id;
    -- Each login and its vault row by message id and day: one partition
    -- each, pruned while the join runs. Rows without a day (undated logins,
    -- and requests recorded before migration 0017) by message id alone.
    RETURN QUERY
        SELECT x.message_id, x.user_id, x.device_type, x.masked_ip, x.masked_device_id, x.locale, x.app_version,
               x.create_date, x.key_id, x.nonce, x.ciphertext
        FROM (
            SELECT l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text,
                   l.masked_device_id::text, l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce,
                   v.ciphertext, l.id
            FROM reveal_request_rows rr
            JOIN user_logins l ON l.message_id = rr.message_id AND l.create_date = rr.create_date
            LEFT JOIN vault v ON v.message_id = l.message_id AND v.create_date = l.create_date
            WHERE rr.request_id = r.id AND rr.create_date IS NOT NULL
            UNION ALL
            SELECT l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text,
                   l.masked_device_id::text, l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce,
                   v.ciphertext, l.id
            FROM reveal_request_rows rr
            JOIN user_logins l ON l.message_id = rr.message_id
            LEFT JOIN vault v ON v.message_id = l.message_id AND v.create_date IS NOT DISTINCT FROM l.create_date
            WHERE rr.request_id = r.id AND rr.create_date IS NULL
        ) x
        ORDER BY x.create_date, x.id;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_reveal_fetch(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_reveal_fetch(bigint) TO pii_vault_revealer;

-- What a revealer may see of the requests (to approve one): everything but
-- whether a honeytoken is involved.
CREATE OR REPLACE VIEW pii_vault_pending_requests WITH (security_barrier) AS
    SELECT r.id, r.selector, r.value, r.requested_by, r.requested_at, r.users, r.reason, r.status,
           r.approved_by, r.approved_at
    FROM reveal_requests r
    WHERE r.status IN ('pending', 'approved') AND r.requested_at > clock_timestamp() - interval '24 hours';
GRANT SELECT ON pii_vault_pending_requests TO pii_vault_revealer;

-- The alarms, for the owner: every request that touched a honeytoken, and
-- every search (functions/70_search.sql) for a honeytoken's IP or device id.
CREATE OR REPLACE VIEW audit_alarms AS
    SELECT r.id, r.requested_at AS at, r.requested_by AS actor, r.id AS request_id,
           r.selector || '=' || r.value AS target, r.honeytokens
    FROM reveal_requests r
    WHERE r.honeytokens > 0
    UNION ALL
    SELECT s.record, s.requested_at, s.requested_by, s.record,
           CASE s.kind WHEN 'ip' THEN 'masked_ip' ELSE 'masked_device_id' END || '=' || array_to_string(s.tokens, ','),
           s.honeytokens
    FROM searches s
    WHERE s.honeytokens > 0;

-- ------------------------------------------------------------ honeytokens
-- A worker's batch takes the honeytoken logins that are due and not yet
-- written, and writes them among its own events, so that they share its
-- transaction, its data key, its dates and its attributes. Already written
-- ones are not handed out again, and neither are those not yet due.
CREATE OR REPLACE FUNCTION pii_vault_honeytokens_due(p_limit int)
RETURNS TABLE (uuid_id text, line_id text, body text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY
        SELECT h.uuid_id, h.line_id, h.body FROM honeytoken_logins h
        WHERE h.due_at <= clock_timestamp()
          AND NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id IN (h.uuid_id, h.line_id))
        ORDER BY h.due_at
        LIMIT least(greatest(p_limit, 0), 100);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_honeytokens_due(int) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_honeytokens_due(int) TO pii_vault_worker;
