-- The audit trail's hash chains, checkpoints, subject ledger and archive.
--
-- Two chains (audit_chain): 'trail', every audit row; 'requests', every
-- reveal request with its honeytoken count and the users it returned
-- (owner and auditor only: a revealer who could read a request's hash
-- could test it for "touched a honeytoken"). Each row's
--   hash = sha256(prev_hash || encoding)
-- where the encoding (version 1) is a tag, then every field as 0x00 (NULL)
-- or 0x01, its UTF-8 length (4 bytes, big endian) and its bytes; numbers
-- in decimal, times in UTC as YYYY-MM-DDTHH:MI:SS.USZ. src/trail/entry.rs
-- writes the same bytes, and so can an auditor's own tool.
--
-- Writers are serialised on the chain's row of audit_chain (FOR UPDATE,
-- held to commit), and the trigger takes the row's id under that lock, so
-- chain order is id order. A transaction that rolls back takes its ids,
-- its rows and its move of the head with it: ids may have gaps, the chain
-- has none.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- ---------------------------------------------------------------- encoding
-- plpgsql loops rather than a helper function per field: every call of a
-- function with a pinned search_path saves and restores that setting, and
-- eleven such calls a row cost ten times what the row's insert does.
CREATE OR REPLACE FUNCTION pii_vault_trail_bytes(a audit_log) RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    out bytea := convert_to('pii-vault/audit/v1', 'UTF8');
    v text;
BEGIN
    FOREACH v IN ARRAY ARRAY[a.id::text, to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                             a.actor, a.claimed_actor, a.action, a.target, a.reason, a.row_count::text,
                             a.xact::text] LOOP
        IF v IS NULL THEN
            out := out || '\x00'::bytea;
        ELSE
            out := out || '\x01'::bytea || int4send(octet_length(v)) || convert_to(v, 'UTF8');
        END IF;
    END LOOP;
    RETURN out;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_trail_bytes(audit_log) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pii_vault_request_bytes(r reveal_requests) RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    out bytea := convert_to('pii-vault/request/v1', 'UTF8');
    v text;
BEGIN
    FOREACH v IN ARRAY ARRAY[r.id::text, to_char(r.requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                             r.requested_by, r.selector, r.value, r.reason, r.users::text,
                             r.honeytokens::text] LOOP
        IF v IS NULL THEN
            out := out || '\x00'::bytea;
        ELSE
            out := out || '\x01'::bytea || int4send(octet_length(v)) || convert_to(v, 'UTF8');
        END IF;
    END LOOP;
    -- The users: absent (0x00), or 0x01, how many (4 bytes), each as a field.
    IF r.subjects IS NULL THEN
        RETURN out || '\x00'::bytea;
    END IF;
    out := out || '\x01'::bytea || int4send(cardinality(r.subjects));
    FOREACH v IN ARRAY r.subjects LOOP
        out := out || '\x01'::bytea || int4send(octet_length(v)) || convert_to(v, 'UTF8');
    END LOOP;
    RETURN out;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_request_bytes(reveal_requests) FROM PUBLIC;

-- ---------------------------------------------------- rows before chains
-- Once, on the first migrate after 0011: hash the rows already there, in
-- id order, and record both heads. (Later runs find the heads and skip.)
DO $$
DECLARE
    zero constant bytea := decode(repeat('00', 32), 'hex');
    a audit_log;
    r reveal_requests;
    prev bytea;
    n bigint;
    last bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit_chain WHERE chain = 'trail') THEN
        ALTER TABLE audit_log DISABLE TRIGGER USER;
        prev := zero; n := 0; last := 0;
        FOR a IN SELECT * FROM audit_log ORDER BY id LOOP
            a.prev_hash := prev;
            a.hash := sha256(prev || pii_vault_trail_bytes(a));
            UPDATE audit_log SET prev_hash = a.prev_hash, hash = a.hash WHERE id = a.id;
            prev := a.hash; n := n + 1; last := a.id;
        END LOOP;
        ALTER TABLE audit_log ENABLE TRIGGER USER;
        INSERT INTO audit_chain (chain, head_id, head_hash, count, base_hash) VALUES ('trail', last, prev, n, zero);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM audit_chain WHERE chain = 'requests') THEN
        ALTER TABLE reveal_requests DISABLE TRIGGER USER;
        prev := zero; n := 0; last := 0;
        FOR r IN SELECT * FROM reveal_requests ORDER BY id LOOP
            r.prev_hash := prev;
            r.hash := sha256(prev || pii_vault_request_bytes(r));
            UPDATE reveal_requests SET prev_hash = r.prev_hash, hash = r.hash WHERE id = r.id;
            prev := r.hash; n := n + 1; last := r.id;
        END LOOP;
        ALTER TABLE reveal_requests ENABLE TRIGGER USER;
        INSERT INTO audit_chain (chain, head_id, head_hash, count, base_hash) VALUES ('requests', last, prev, n, zero);
    END IF;
END
$$;

-- ------------------------------------------------------------- the trail
-- Who, when and in which transaction, whoever inserts: the login, the time
-- of the call (not of the transaction's start, which a session could hold
-- open for an hour to backdate an entry), the transaction (to tell later
-- whether the row was committed before anything was read under it); then
-- the row's id and its link, under the chain's lock.
CREATE OR REPLACE FUNCTION pii_vault_audit_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    c audit_chain;
BEGIN
    SELECT * INTO c FROM audit_chain WHERE chain = 'trail' FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PV015', MESSAGE = 'the audit chain has no head: run pii-vault migrate';
    END IF;
    NEW.id := nextval('audit_log_id_seq');
    NEW.actor := session_user;
    NEW.at := clock_timestamp();
    NEW.xact := txid_current();
    NEW.prev_hash := c.head_hash;
    NEW.hash := sha256(c.head_hash || pii_vault_trail_bytes(NEW));
    UPDATE audit_chain SET head_id = NEW.id, head_hash = NEW.hash, count = count + 1 WHERE chain = 'trail';
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_audit_stamp() FROM PUBLIC;
CREATE OR REPLACE TRIGGER audit_log_stamp BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION pii_vault_audit_stamp();

-- ----------------------------------------------------------- the requests
-- A request's recorded fields never change (status, approval and fetch
-- do, and are on the trail as their own rows); it is deleted only once
-- archived.
CREATE OR REPLACE FUNCTION pii_vault_request_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    c audit_chain;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT * INTO c FROM audit_chain WHERE chain = 'requests' FOR UPDATE;
        IF NOT FOUND OR NEW.id <= c.head_id THEN
            RAISE EXCEPTION USING ERRCODE = 'PV015', MESSAGE = 'reveal requests are chained in id order';
        END IF;
        NEW.prev_hash := c.head_hash;
        NEW.hash := sha256(c.head_hash || pii_vault_request_bytes(NEW));
        UPDATE audit_chain SET head_id = NEW.id, head_hash = NEW.hash, count = count + 1 WHERE chain = 'requests';
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        IF (NEW.id, NEW.requested_at, NEW.requested_by, NEW.selector, NEW.value, NEW.reason, NEW.users,
            NEW.honeytokens, NEW.subjects, NEW.prev_hash, NEW.hash)
           IS DISTINCT FROM
           (OLD.id, OLD.requested_at, OLD.requested_by, OLD.selector, OLD.value, OLD.reason, OLD.users,
            OLD.honeytokens, OLD.subjects, OLD.prev_hash, OLD.hash) THEN
            RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = 'a reveal request''s recorded fields cannot change';
        END IF;
        RETURN NEW;
    ELSIF TG_OP = 'DELETE' AND OLD.id <= (SELECT base_id FROM audit_chain WHERE chain = 'requests') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = 'reveal requests are deleted only by pii-vault audit archive';
END
$$;
REVOKE ALL ON FUNCTION pii_vault_request_chain() FROM PUBLIC;
CREATE OR REPLACE TRIGGER reveal_requests_chain BEFORE INSERT OR UPDATE OR DELETE ON reveal_requests
    FOR EACH ROW EXECUTE FUNCTION pii_vault_request_chain();
CREATE OR REPLACE TRIGGER reveal_requests_no_truncate BEFORE TRUNCATE ON reveal_requests
    FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_request_chain();

-- The chain heads and the checkpoints are changed only by the functions
-- here (and the owner, who can also switch triggers off: what checkpoints
-- kept elsewhere are for).
CREATE OR REPLACE TRIGGER audit_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE OR REPLACE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- ------------------------------------------------------------ checkpoints
-- Keeps a copy of a signed checkpoint line (the signature is checked by
-- `audit verify`, not here: Postgres has no ECDSA). Refused unless it is
-- the next in sequence, chains to the last one's signature and names rows
-- this database holds with these hashes.
CREATE OR REPLACE FUNCTION pii_vault_checkpoint_store(p_seq bigint, p_at timestamptz, p_line text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j jsonb;
    last audit_checkpoints;
    h jsonb;
    held bytea;
    c text;
BEGIN
    LOCK TABLE audit_checkpoints IN SHARE ROW EXCLUSIVE MODE;
    BEGIN
        j := p_line::jsonb;
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION USING ERRCODE = 'PV015', MESSAGE = 'a checkpoint is one JSON object';
    END;
    SELECT * INTO last FROM audit_checkpoints ORDER BY seq DESC LIMIT 1;
    IF p_seq IS DISTINCT FROM coalesce(last.seq, 0) + 1 OR (j->>'seq')::bigint IS DISTINCT FROM p_seq THEN
        RAISE EXCEPTION USING ERRCODE = 'PV015',
            MESSAGE = format('checkpoint %s is not the next one (the last stored is %s): run the checkpoint again', p_seq, coalesce(last.seq, 0));
    END IF;
    IF (j->>'prev_sig') IS DISTINCT FROM (last.line::jsonb->>'sig') THEN
        RAISE EXCEPTION USING ERRCODE = 'PV015', MESSAGE = format('checkpoint %s does not chain to checkpoint %s', p_seq, last.seq);
    END IF;
    FOREACH c IN ARRAY ARRAY['trail', 'requests'] LOOP
        h := j->c;
        IF h IS NULL OR (h->>'head_id')::bigint IS NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'PV015', MESSAGE = format('checkpoint %s names no %s head', p_seq, c);
        END IF;
        IF (h->>'head_id')::bigint > (SELECT base_id FROM audit_chain WHERE chain = c) THEN
            IF c = 'trail' THEN
                SELECT hash INTO held FROM audit_log WHERE id = (h->>'head_id')::bigint;
            ELSE
                SELECT hash INTO held FROM reveal_requests WHERE id = (h->>'head_id')::bigint;
            END IF;
            IF held IS NULL OR encode(held, 'hex') <> h->>'head_hash' THEN
                RAISE EXCEPTION USING ERRCODE = 'PV015',
                    MESSAGE = format('checkpoint %s names %s row %s with another hash than this database holds', p_seq, c, h->>'head_id');
            END IF;
        END IF;
    END LOOP;
    INSERT INTO audit_checkpoints (seq, at, line, stored_by, stored_at)
    VALUES (p_seq, p_at, p_line, session_user, clock_timestamp());
END
$$;
REVOKE ALL ON FUNCTION pii_vault_checkpoint_store(bigint, timestamptz, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_checkpoint_store(bigint, timestamptz, text) TO pii_vault_auditor;

-- ---------------------------------------------------------- subject ledger
-- Who saw, and who erased, the data of one user (GDPR Art. 15): every
-- reveal request that returned a row of the user (by any selector), with
-- its approval and whether it was fetched, and every erasure that touched
-- the user. Selectors, not their values: a masked-ip reveal's value is a
-- token, which the ledger's readers have no use for.
CREATE OR REPLACE FUNCTION pii_vault_subject_rows(p_user_id text)
RETURNS TABLE (record bigint, at timestamptz, actor text, claimed_actor text, action text, selector text,
               reason text, status text, approved_by text, approved_at timestamptz, fetched_at timestamptz,
               row_count bigint, message_ids text[])
LANGUAGE sql STABLE SECURITY DEFINER SET jit = off SET search_path FROM CURRENT AS $$
    SELECT r.id, r.requested_at, r.requested_by, a.claimed_actor, a.action, r.selector, r.reason, r.status,
           r.approved_by, r.approved_at, r.fetched_at, cardinality(m.ids)::bigint, m.ids
    FROM reveal_requests r
    JOIN audit_log a ON a.id = r.id
    CROSS JOIN LATERAL (
        SELECT coalesce(array_agg(rr.message_id ORDER BY rr.message_id), '{}') AS ids
        FROM reveal_request_rows rr
        -- By day too where the request kept it: one partition per login.
        JOIN user_logins l ON l.message_id = rr.message_id
                          AND (rr.create_date IS NULL OR l.create_date = rr.create_date)
        WHERE rr.request_id = r.id AND l.user_id = p_user_id) m
    WHERE r.subjects @> ARRAY[p_user_id]
       OR (r.subjects IS NULL AND r.selector = 'user_id' AND r.value = p_user_id)
    UNION ALL
    SELECT a.id, a.at, a.actor, a.claimed_actor, a.action, NULL, a.reason, NULL, NULL, NULL, NULL, e.rows, NULL
    FROM erasure_subjects e JOIN audit_log a ON a.id = e.record
    WHERE e.user_id = p_user_id
    UNION ALL
    -- Each quarantined body of the user's that was shown (row_count 0:
    -- recorded, never fetched).
    SELECT a.id, a.at, a.actor, a.claimed_actor, a.action, 'message_id', a.reason, NULL, NULL, NULL,
           s.fetched_at, (s.fetched_at IS NOT NULL)::int::bigint, ARRAY[s.message_id]
    FROM quarantine_reveals s JOIN audit_log a ON a.id = s.record
    WHERE s.user_id = p_user_id
$$;
REVOKE ALL ON FUNCTION pii_vault_subject_rows(text) FROM PUBLIC;

-- The ledger, with the looking recorded (action `subject-access`).
CREATE OR REPLACE FUNCTION pii_vault_subject_ledger(p_user_id text, p_reason text, p_claimed_actor text)
RETURNS TABLE (record bigint, at timestamptz, actor text, claimed_actor text, action text, selector text,
               reason text, status text, approved_by text, approved_at timestamptz, fetched_at timestamptz,
               row_count bigint, message_ids text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_user_id IS NULL OR p_user_id = '' OR length(p_user_id) > 128 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a user id is 1 to 128 characters';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' OR length(p_reason) > 1000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'a subject access needs a reason (at most 1000 characters)';
    END IF;
    SELECT count(*) INTO n FROM pii_vault_subject_rows(p_user_id);
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('subject-access', 'user_id=' || p_user_id, p_reason, left(p_claimed_actor, 256), n);
    RETURN QUERY SELECT * FROM pii_vault_subject_rows(p_user_id) s ORDER BY s.at, s.record;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_subject_ledger(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_subject_ledger(text, text, text) TO pii_vault_auditor;

-- ----------------------------------------------------------------- archive
-- How far an archive may go, given it wants rows through `p_want`: short
-- of anything still in use (an open rotation job or lease, a reveal that
-- may still be approved or fetched), and never splitting a rotation job's
-- records. Returns the row it may go through, and why it stops short.
CREATE OR REPLACE FUNCTION pii_vault_archive_cut(p_want bigint, OUT cut bigint, OUT held_back_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    lim bigint;
BEGIN
    cut := p_want;
    SELECT min(x) INTO lim FROM (
        SELECT record AS x FROM job_leases WHERE record IS NOT NULL
        UNION ALL SELECT least(started_by, held_by) FROM rotation_jobs WHERE finished_at IS NULL
        UNION ALL SELECT id FROM reveal_requests
            WHERE fetched_at IS NULL AND requested_at > clock_timestamp() - interval '25 hours') s;
    IF lim IS NOT NULL AND lim <= cut THEN
        cut := lim - 1;
        held_back_by := format('row %s is still in use (an open rotation or lease, or a recent reveal)', lim);
    END IF;
    LOOP
        SELECT min(least(started_by, held_by)) INTO lim FROM rotation_jobs
        WHERE least(started_by, held_by) <= cut AND greatest(started_by, held_by) > cut;
        EXIT WHEN lim IS NULL;
        cut := lim - 1;
        held_back_by := format('a rotation job''s records from row %s on are archived together', lim);
    END LOOP;
    cut := greatest(cut, (SELECT base_id FROM audit_chain WHERE chain = 'trail'));
END
$$;
REVOKE ALL ON FUNCTION pii_vault_archive_cut(bigint) FROM PUBLIC;

-- Where both chains stand at trail row `p_through`: what an archive
-- checkpoint through it signs.
CREATE OR REPLACE FUNCTION pii_vault_archive_point(p_through bigint)
RETURNS TABLE (through_id bigint, trail_hash bytea, trail_count bigint,
               requests_id bigint, requests_hash bytea, requests_count bigint,
               trail_rows bigint, request_rows bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    t audit_chain;
    q audit_chain;
BEGIN
    SELECT * INTO t FROM audit_chain WHERE chain = 'trail';
    SELECT * INTO q FROM audit_chain WHERE chain = 'requests';
    through_id := p_through;
    SELECT a.hash INTO trail_hash FROM audit_log a WHERE a.id = p_through;
    trail_hash := coalesce(trail_hash, t.base_hash);
    SELECT count(*) INTO trail_rows FROM audit_log a WHERE a.id <= p_through;
    trail_count := t.base_count + trail_rows;
    SELECT coalesce(max(r.id), q.base_id) INTO requests_id FROM reveal_requests r WHERE r.id <= p_through;
    SELECT r.hash INTO requests_hash FROM reveal_requests r WHERE r.id = requests_id;
    requests_hash := coalesce(requests_hash, q.base_hash);
    SELECT count(*) INTO request_rows FROM reveal_requests r WHERE r.id <= p_through;
    requests_count := q.base_count + request_rows;
    RETURN NEXT;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_archive_point(bigint) FROM PUBLIC;

-- What `audit archive --before` would take: the point, and why it stops
-- short of the date if it does. Owner only.
CREATE OR REPLACE FUNCTION pii_vault_archive_plan(p_before timestamptz)
RETURNS TABLE (through_id bigint, trail_hash bytea, trail_count bigint,
               requests_id bigint, requests_hash bytea, requests_count bigint,
               trail_rows bigint, request_rows bigint, held_back_by text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT p.*, c.held_back_by
    FROM pii_vault_archive_cut((SELECT coalesce(max(id), 0) FROM audit_log WHERE at < p_before)) c,
         pii_vault_archive_point(c.cut) p
$$;
REVOKE ALL ON FUNCTION pii_vault_archive_plan(timestamptz) FROM PUBLIC;

-- Deletes the trail through `p_through`, which a stored archive checkpoint
-- (`p_checkpoint`) must name as it is, so that the rows left still verify
-- from a signed start; writes the `audit-archive` row. Owner only.
CREATE OR REPLACE FUNCTION pii_vault_audit_archive(p_through bigint, p_checkpoint bigint, p_reason text, p_claimed_actor text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    j jsonb;
    p record;
    c record;
    n bigint;
    nr bigint;
    rid bigint;
BEGIN
    PERFORM pii_vault_fresh_call();
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'PV016', MESSAGE = 'an archive needs a reason';
    END IF;
    IF p_through <= (SELECT base_id FROM audit_chain WHERE chain = 'trail') THEN
        RAISE EXCEPTION USING ERRCODE = 'PV016', MESSAGE = format('rows through %s are archived already', p_through);
    END IF;
    SELECT line::jsonb INTO j FROM audit_checkpoints WHERE seq = p_checkpoint;
    IF j IS NULL OR j->>'kind' <> 'archive' OR (j->'trail'->>'head_id')::bigint IS DISTINCT FROM p_through THEN
        RAISE EXCEPTION USING ERRCODE = 'PV016',
            MESSAGE = format('checkpoint %s is not an archive checkpoint through row %s', p_checkpoint, p_through);
    END IF;
    SELECT * INTO c FROM pii_vault_archive_cut(p_through);
    IF c.cut < p_through THEN
        RAISE EXCEPTION USING ERRCODE = 'PV016', MESSAGE = format('rows through %s cannot be archived now: %s', p_through, c.held_back_by);
    END IF;
    SELECT * INTO p FROM pii_vault_archive_point(p_through);
    IF encode(p.trail_hash, 'hex') <> j->'trail'->>'head_hash' OR p.trail_count <> (j->'trail'->>'count')::bigint
       OR p.requests_id <> (j->'requests'->>'head_id')::bigint
       OR encode(p.requests_hash, 'hex') <> j->'requests'->>'head_hash'
       OR p.requests_count <> (j->'requests'->>'count')::bigint THEN
        RAISE EXCEPTION USING ERRCODE = 'PV016',
            MESSAGE = format('checkpoint %s does not describe the rows through %s as they are', p_checkpoint, p_through);
    END IF;
    UPDATE audit_chain SET base_id = p_through, base_hash = p.trail_hash, base_count = p.trail_count WHERE chain = 'trail';
    UPDATE audit_chain SET base_id = p.requests_id, base_hash = p.requests_hash, base_count = p.requests_count
    WHERE chain = 'requests';
    DELETE FROM reveal_request_rows WHERE request_id <= p_through;
    DELETE FROM reveal_requests WHERE id <= p_through;
    GET DIAGNOSTICS nr = ROW_COUNT;
    DELETE FROM erasure_subject_rows WHERE record <= p_through;
    DELETE FROM vault_month_users WHERE ledger IN (SELECT id FROM vault_month_ledgers WHERE erased_by <= p_through);
    DELETE FROM vault_month_ledgers WHERE erased_by <= p_through;
    DELETE FROM rotation_ranges WHERE job_id IN (SELECT id FROM rotation_jobs WHERE greatest(started_by, held_by) <= p_through);
    DELETE FROM rotation_jobs WHERE greatest(started_by, held_by) <= p_through;
    DELETE FROM audit_log WHERE id <= p_through;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO audit_log (action, target, reason, claimed_actor, row_count)
    VALUES ('audit-archive', format('through=%s checkpoint=%s requests=%s', p_through, p_checkpoint, nr), p_reason,
            left(p_claimed_actor, 256), n)
    RETURNING id INTO rid;
    RETURN rid;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_audit_archive(bigint, bigint, text, text) FROM PUBLIC;
