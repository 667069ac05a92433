-- Reveal governance, held by the database: a reveal policy (users per
-- reveal, reveals per login per 24 h), the two-person rule for reveals over
-- it, and honeytokens whose reveal raises an alarm the revealer cannot see.
--
--   reveal_policy    one row; only the owner may change it (no grants), and
--                    every change writes an audit row (trigger).
--   reveal_requests  gains a status: granted (within the policy), pending
--                    (over it, waiting for another login's approval),
--                    approved.
--   honeytokens      the synthetic users `pii-vault honeytoken plant` made;
--                    owner only.
--   audit_alarms     a trail of its own, owner only, with its own sequence:
--                    a revealer reading audit_log sees no entry and no gap
--                    in the ids that would tell it tripped a trap.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

CREATE TABLE reveal_policy (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_users_per_reveal  integer NOT NULL DEFAULT 10 CHECK (max_users_per_reveal >= 1),
    max_reveals_per_day   integer NOT NULL DEFAULT 50 CHECK (max_reveals_per_day >= 1),
    changed_at            timestamptz NOT NULL DEFAULT now(),
    changed_by            text NOT NULL DEFAULT session_user
);
INSERT INTO reveal_policy DEFAULT VALUES;

CREATE FUNCTION pii_vault_policy_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = 'the reveal policy cannot be deleted';
    END IF;
    NEW.singleton := true;
    NEW.changed_at := now();
    NEW.changed_by := session_user;
    INSERT INTO audit_log (action, target, reason, row_count)
    VALUES ('policy-set',
            format('max_users_per_reveal=%s max_reveals_per_day=%s', NEW.max_users_per_reveal, NEW.max_reveals_per_day),
            format('was max_users_per_reveal=%s max_reveals_per_day=%s', OLD.max_users_per_reveal, OLD.max_reveals_per_day),
            0);
    RETURN NEW;
END
$$;
CREATE TRIGGER reveal_policy_changed BEFORE UPDATE OR DELETE ON reveal_policy
    FOR EACH ROW EXECUTE FUNCTION pii_vault_policy_changed();

ALTER TABLE reveal_requests
    ADD COLUMN status text NOT NULL DEFAULT 'granted' CHECK (status IN ('granted', 'pending', 'approved')),
    ADD COLUMN users bigint NOT NULL DEFAULT 0,
    ADD COLUMN requested_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN reason text NOT NULL DEFAULT '',
    ADD COLUMN approved_by text,
    ADD COLUMN approved_at timestamptz,
    -- The audit row of the reveal that fetches an approved request.
    ADD COLUMN fetch_record bigint UNIQUE REFERENCES audit_log (id);

CREATE TABLE honeytokens (
    user_id     text PRIMARY KEY,
    planted_at  timestamptz NOT NULL DEFAULT now(),
    planted_by  text NOT NULL DEFAULT session_user
);

CREATE TABLE audit_alarms (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL DEFAULT session_user,
    request_id  bigint NOT NULL,
    target      text NOT NULL,
    honeytokens bigint NOT NULL
);
CREATE TRIGGER audit_alarms_no_update_delete BEFORE UPDATE OR DELETE ON audit_alarms
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_alarms_no_truncate BEFORE TRUNCATE ON audit_alarms
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Step one of a reveal, now under the policy. Within it: granted, as
-- before (audit action `reveal`). Over it (more distinct users than
-- allowed, or this login's reveals of the last 24 hours at the daily
-- limit): pending (audit action `reveal-request`), to be approved by another
-- login. A request whose logins include a honeytoken raises an alarm here,
-- in the same transaction as its audit row: it is committed before anything
-- can be fetched, and a revealer cannot roll it back.
DROP FUNCTION pii_vault_reveal_request(text, text, text, text);
CREATE FUNCTION pii_vault_reveal_request(p_selector text, p_value text, p_reason text, p_claimed_actor text)
RETURNS TABLE (request_id bigint, row_count bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    n bigint;
    u bigint;
    h bigint;
    today bigint;
    pol reveal_policy;
    st text := 'granted';
    rid bigint;
    target text;
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
    EXECUTE format(
        'SELECT count(*), count(DISTINCT l.user_id), count(DISTINCT h.user_id) FROM user_logins l '
        'LEFT JOIN honeytokens h ON h.user_id = l.user_id WHERE l.%I = $1', p_selector)
        INTO n, u, h USING p_value;
    SELECT * INTO pol FROM reveal_policy;
    SELECT count(*) INTO today FROM reveal_requests r
    WHERE r.requested_by = session_user AND r.status = 'granted' AND r.requested_at > now() - interval '24 hours';
    IF u > pol.max_users_per_reveal OR today >= pol.max_reveals_per_day THEN
        st := 'pending';
    END IF;
    target := p_selector || '=' || p_value;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES (CASE st WHEN 'granted' THEN 'reveal' ELSE 'reveal-request' END, target, p_reason,
            left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    INSERT INTO reveal_requests (id, selector, value, requested_by, status, users, reason)
    VALUES (rid, p_selector, p_value, session_user, st, u, p_reason);
    IF h > 0 THEN
        INSERT INTO audit_alarms (request_id, target, honeytokens) VALUES (rid, target, h);
        PERFORM pg_notify('pii_vault_alarm', rid::text);
    END IF;
    request_id := rid;
    row_count := n;
    status := st;
    RETURN NEXT;
END
$$;

-- The second person: another login with the revealer role approves a
-- pending request (within 24 hours of it), on the record.
CREATE FUNCTION pii_vault_approve(p_request bigint, p_reason text, p_claimed_actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
BEGIN
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
    IF r.requested_at < now() - interval '24 hours' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('request %s has expired', p_request);
    END IF;
    UPDATE reveal_requests SET status = 'approved', approved_by = session_user, approved_at = now()
    WHERE id = p_request;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('approve', format('request %s', p_request), p_reason, left(p_claimed_actor, 256), 0);
END
$$;

-- The requester takes an approved request: a `reveal` audit row of its
-- own (committed by the caller before the fetch, like any reveal), once,
-- within 24 hours of the request.
CREATE FUNCTION pii_vault_reveal_claim(p_request bigint, p_claimed_actor text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
    n bigint;
    rid bigint;
BEGIN
    SELECT * INTO r FROM reveal_requests WHERE id = p_request FOR UPDATE;
    IF NOT FOUND OR r.requested_by <> session_user THEN
        RAISE EXCEPTION USING ERRCODE = 'PV004', MESSAGE = format('reveal request %s is not one of this login', p_request);
    END IF;
    IF r.status <> 'approved' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV012', MESSAGE = format('reveal request %s is %s, not approved', p_request, r.status);
    END IF;
    IF r.fetch_record IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s was already fetched', p_request);
    END IF;
    IF r.requested_at < now() - interval '24 hours' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('reveal request %s has expired', p_request);
    END IF;
    EXECUTE format('SELECT count(*) FROM user_logins WHERE %I = $1', r.selector) INTO n USING r.value;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('reveal', r.selector || '=' || r.value,
            format('%s (request %s, approved by %s)', r.reason, p_request, r.approved_by),
            left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    UPDATE reveal_requests SET fetch_record = rid WHERE id = p_request;
    RETURN rid;
END
$$;

-- Step two, for a granted request (its own audit row) or an approved one
-- (the audit row of its claim).
CREATE OR REPLACE FUNCTION pii_vault_reveal_fetch(p_request bigint)
RETURNS TABLE (message_id text, user_id text, device_type text, masked_ip text, masked_device_id text,
               locale text, app_version text, create_date date, key_id text, nonce bytea, ciphertext bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    r reveal_requests;
BEGIN
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
    UPDATE reveal_requests SET fetched_at = now() WHERE id = r.id;
    RETURN QUERY EXECUTE format(
        'SELECT l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text, l.masked_device_id::text, '
        'l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext '
        'FROM user_logins l LEFT JOIN vault v ON v.message_id = l.message_id '
        'WHERE l.%I = $1 ORDER BY l.create_date, l.id', r.selector) USING r.value;
END
$$;

-- What a revealer may see of the requests (to approve one): everything but
-- whether a honeytoken is involved, which is not in this table at all.
CREATE VIEW pii_vault_pending_requests WITH (security_barrier) AS
    SELECT r.id, r.selector, r.value, r.requested_by, r.requested_at, r.users, r.reason, r.status,
           r.approved_by, r.approved_at
    FROM reveal_requests r
    WHERE r.status IN ('pending', 'approved') AND r.requested_at > now() - interval '24 hours';

REVOKE ALL ON TABLE reveal_policy, honeytokens, audit_alarms, pii_vault_pending_requests
    FROM PUBLIC, pii_vault_worker, pii_vault_analyst, pii_vault_revealer, pii_vault_rotator;
REVOKE EXECUTE ON FUNCTION pii_vault_policy_changed(), pii_vault_reveal_request(text, text, text, text),
    pii_vault_approve(bigint, text, text), pii_vault_reveal_claim(bigint, text) FROM PUBLIC;
GRANT SELECT ON reveal_policy, pii_vault_pending_requests TO pii_vault_revealer;
GRANT EXECUTE ON FUNCTION pii_vault_reveal_request(text, text, text, text), pii_vault_approve(bigint, text, text),
    pii_vault_reveal_claim(bigint, text) TO pii_vault_revealer;
