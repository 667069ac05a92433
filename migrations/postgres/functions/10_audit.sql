-- The audit trail: what the database vouches for in every row, and the
-- checks every privileged function starts with.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- An audit trail that its subjects could edit would prove nothing: refuse
-- UPDATE, DELETE and TRUNCATE for every role short of disabling the
-- trigger, except the deletion of rows already archived (rows through the
-- chain's base, which only pii_vault_audit_archive moves, after a signed
-- checkpoint names it: see 15_audit_chain.sql).
CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_log'
       AND OLD.id <= (SELECT base_id FROM audit_chain WHERE chain = 'trail') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = format('%s is append-only', TG_TABLE_NAME);
END
$$;
REVOKE ALL ON FUNCTION audit_log_append_only() FROM PUBLIC;
CREATE OR REPLACE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- The stamp on every row (who, when, which transaction) and its link in
-- the chain: pii_vault_audit_stamp in 15_audit_chain.sql.

-- Refuses a call made in a transaction that began longer ago than the
-- policy allows (PV014). Times on the record are the call's own; this
-- cuts off what a long-open transaction could still do (hold a request's
-- locks, read with an old snapshot). `idle_in_transaction_session_timeout`
-- cannot do it: a session may SET it for itself.
CREATE OR REPLACE FUNCTION pii_vault_fresh_call() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    lim integer;
BEGIN
    SELECT max_transaction_seconds INTO lim FROM reveal_policy;
    lim := coalesce(lim, 60);
    IF clock_timestamp() - transaction_timestamp() > make_interval(secs => lim) THEN
        RAISE EXCEPTION USING ERRCODE = 'PV014',
            MESSAGE = format('this transaction began more than %s s before the call: end it and call again in a new one', lim);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_fresh_call() FROM PUBLIC;

-- Whether audit row `p_id` is one of the caller's, of one of `p_actions`,
-- younger than `p_max_age` at the time of the call, and committed by a
-- transaction before this one (a row of the current transaction could
-- still be rolled back, taking the trail of what was read with it).
CREATE OR REPLACE FUNCTION pii_vault_check_record(p_id bigint, p_actions text[], p_max_age interval) RETURNS audit_log
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
    IF a.at < clock_timestamp() - p_max_age THEN
        RAISE EXCEPTION USING ERRCODE = 'PV006', MESSAGE = format('audit record %s has expired', p_id);
    END IF;
    RETURN a;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_check_record(bigint, text[], interval) FROM PUBLIC;

-- ----------------------------------------------------------------- policy
-- One row; only the owner may change it (no grants), never delete or
-- truncate it, and every change writes an audit row.
CREATE OR REPLACE FUNCTION pii_vault_policy_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
        RAISE EXCEPTION USING ERRCODE = 'PV009', MESSAGE = 'the reveal policy cannot be deleted';
    END IF;
    NEW.singleton := true;
    NEW.changed_at := clock_timestamp();
    NEW.changed_by := session_user;
    INSERT INTO audit_log (action, target, reason, row_count)
    VALUES ('policy-set',
            format('max_users_per_reveal=%s max_reveals_per_day=%s max_transaction_seconds=%s max_searches_per_day=%s',
                   NEW.max_users_per_reveal, NEW.max_reveals_per_day, NEW.max_transaction_seconds,
                   NEW.max_searches_per_day),
            format('was max_users_per_reveal=%s max_reveals_per_day=%s max_transaction_seconds=%s max_searches_per_day=%s',
                   OLD.max_users_per_reveal, OLD.max_reveals_per_day, OLD.max_transaction_seconds,
                   OLD.max_searches_per_day),
            0);
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_policy_changed() FROM PUBLIC;
CREATE OR REPLACE TRIGGER reveal_policy_changed BEFORE UPDATE OR DELETE ON reveal_policy
    FOR EACH ROW EXECUTE FUNCTION pii_vault_policy_changed();
CREATE OR REPLACE TRIGGER reveal_policy_no_truncate BEFORE TRUNCATE ON reveal_policy
    FOR EACH STATEMENT EXECUTE FUNCTION pii_vault_policy_changed();
