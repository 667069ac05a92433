-- Month ledgers (migration 0020): the users a settled month of the vault
-- holds rows of, counted once when the month is settled, kept exact while it
-- stays, and handed to retention's audit record when the month is
-- dropped, so that retention need not read a dropped month's rows.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- Days after a month ends before it is settled: SQS keeps a message for at
-- most 14 days, so by then no redelivery of it is still to come. Rows that
-- come later all the same are counted by the month's trigger.
CREATE OR REPLACE FUNCTION pii_vault_month_settle_grace() RETURNS integer
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$ SELECT 15 $$;
REVOKE ALL ON FUNCTION pii_vault_month_settle_grace() FROM PUBLIC;

-- A late row of a settled month (fires after each row inserted into a
-- settled month's partition, and only there: the open months pay nothing).
-- The ledger row first, so that two writers of late rows of one month
-- take turns there before either touches a user's count.
CREATE OR REPLACE FUNCTION pii_vault_month_ledger_count() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    l constant bigint := TG_ARGV[0]::bigint;
BEGIN
    UPDATE vault_month_ledgers SET rows = rows + 1 WHERE id = l;
    INSERT INTO vault_month_users AS u (ledger, user_id, rows) VALUES (l, NEW.user_id, 1)
    ON CONFLICT (ledger, user_id) DO UPDATE SET rows = u.rows + 1;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_month_ledger_count() FROM PUBLIC;

-- Settles month partition `p_name` (bounds p_lo, p_hi; p_lo -infinity for
-- the partition from MINVALUE): counts its rows by user, once, and adds
-- the trigger that counts rows written into it later. Writers of the
-- month wait while it is counted (SHARE ROW EXCLUSIVE, the lock CREATE
-- TRIGGER takes anyway), so no row is counted twice or missed. Returns the
-- month's ledger (the one already open, if any).
CREATE OR REPLACE FUNCTION pii_vault_month_settle(p_name text, p_lo date, p_hi date) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT SET jit = off AS $$
DECLARE
    l bigint;
    n bigint;
BEGIN
    EXECUTE format('LOCK TABLE %I IN SHARE ROW EXCLUSIVE MODE', p_name);
    SELECT id INTO l FROM vault_month_ledgers WHERE lo = p_lo AND erased_by IS NULL;
    IF FOUND THEN
        RETURN l;
    END IF;
    -- Every user id of the month hashed once, in memory; the users then
    -- inserted in key order, so both indexes grow at their right edge.
    PERFORM set_config('work_mem', '64MB', true);
    INSERT INTO vault_month_ledgers (lo, hi, rows, settled_at) VALUES (p_lo, p_hi, 0, clock_timestamp())
    RETURNING id INTO l;
    EXECUTE format('WITH g AS (SELECT user_id, count(*) AS n FROM %I GROUP BY user_id), '
                   'i AS (INSERT INTO vault_month_users (ledger, user_id, rows) SELECT $1, user_id, n FROM g ORDER BY user_id) '
                   'SELECT coalesce(sum(n), 0) FROM g', p_name)
        INTO n USING l;
    UPDATE vault_month_ledgers SET rows = n WHERE id = l;
    PERFORM pii_vault_month_ledger_arm(p_name, p_lo);
    RETURN l;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_month_settle(text, date, date) FROM PUBLIC;

-- Settles the oldest vault month that ended more than the grace ago and is
-- not settled yet; returns its first day (NULL: none left, or another
-- session is settling one). Workers call it in the background about once a
-- month, one month a call, each in a transaction of its own.
CREATE OR REPLACE FUNCTION pii_vault_month_settle_next() RETURNS date
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    today constant date := (clock_timestamp() AT TIME ZONE 'UTC')::date;
    p record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pii_vault_month_settle_next')) THEN
        RETURN NULL;
    END IF;
    SELECT x.name, coalesce(x.lo, '-infinity') AS lo, x.hi INTO p
    FROM pii_vault_partitions('vault') x
    WHERE x.hi <= today - pii_vault_month_settle_grace()
      AND NOT EXISTS (SELECT 1 FROM vault_month_ledgers l
                      WHERE l.lo = coalesce(x.lo, '-infinity') AND l.erased_by IS NULL)
    ORDER BY x.hi LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM pii_vault_month_settle(p.name, p.lo, p.hi);
    RETURN p.lo;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_month_settle_next() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_month_settle_next() TO pii_vault_worker;

-- Rows of month `p_lo` erased one by one (forget, the month retention
-- cuts): `p_counts` of user `p_users` taken off its open ledger, if the
-- month is settled.
CREATE OR REPLACE FUNCTION pii_vault_month_ledger_take(p_lo date, p_users text[], p_counts bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    l bigint;
BEGIN
    SELECT id INTO l FROM vault_month_ledgers WHERE lo = p_lo AND erased_by IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    DELETE FROM vault_month_users u USING unnest(p_users, p_counts) c(user_id, n)
    WHERE u.ledger = l AND u.user_id = c.user_id AND u.rows <= c.n;
    UPDATE vault_month_users u SET rows = u.rows - c.n FROM unnest(p_users, p_counts) c(user_id, n)
    WHERE u.ledger = l AND u.user_id = c.user_id;
    UPDATE vault_month_ledgers SET rows = greatest(rows - (SELECT coalesce(sum(n), 0) FROM unnest(p_counts) n), 0)
    WHERE id = l;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_month_ledger_take(date, text[], bigint[]) FROM PUBLIC;

-- Puts the trigger that counts late rows on `p_partition`, the month from
-- `p_lo` (NULL or -infinity: from MINVALUE), if that month has an open
-- ledger: when the month is settled, and on the new table a rotation's
-- rewrite swaps in for a settled month (the old one's trigger went with
-- it).
CREATE OR REPLACE FUNCTION pii_vault_month_ledger_arm(p_partition text, p_lo date) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    l bigint;
BEGIN
    SELECT id INTO l FROM vault_month_ledgers WHERE lo = coalesce(p_lo, '-infinity') AND erased_by IS NULL;
    IF FOUND THEN
        EXECUTE format('CREATE TRIGGER vault_month_ledger AFTER INSERT ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION pii_vault_month_ledger_count(%L)', p_partition, l);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_month_ledger_arm(text, date) FROM PUBLIC;
