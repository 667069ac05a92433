-- Monthly partitions of vault and user_logins (migration 0017): listing
-- them, creating them ahead of need, and the first-load day of file lines.

SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true);

-- The range partitions of `p_table` with their bounds (lo NULL for the
-- partition that starts at MINVALUE), in order. The default partition is
-- not listed.
CREATE OR REPLACE FUNCTION pii_vault_partitions(p_table text)
RETURNS TABLE (name text, lo date, hi date)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT c.relname::text,
           substring(b FROM 'FROM \(''([0-9-]+)''\)')::date,
           substring(b FROM 'TO \(''([0-9-]+)''\)')::date
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL pg_get_expr(c.relpartbound, c.oid) AS b
    WHERE i.inhparent = p_table::regclass AND b <> 'DEFAULT'
    ORDER BY 3
$$;
REVOKE ALL ON FUNCTION pii_vault_partitions(text) FROM PUBLIC;

-- Creates the monthly partitions of both tables that are missing: the
-- month of each of `p_days`, every month from the database's today through
-- `p_through`, and every month that has rows waiting in the default
-- partition (stored while their month had no partition); only months from
-- 10 years before today to 14 months after it, so no caller can make
-- thousands of tables. Rows waiting in the default partition move into
-- their new partition before it is attached, since ATTACH refuses a range
-- the default partition still holds rows of.
--
-- Online: each partition is created as a plain table and attached, which
-- takes SHARE UPDATE EXCLUSIVE on the parent (writers and readers go on);
-- only the default partition is locked while it is checked. An advisory
-- lock serialises two callers (two workers starting at once).
--
-- Returns every range partition of `vault` (the same months as
-- user_logins'; `lo` 0001-01-01 for the one that starts at MINVALUE): a
-- worker need not call again for rows of those months.
CREATE OR REPLACE FUNCTION pii_vault_partitions_ensure(p_days date[], p_through date)
RETURNS TABLE (lo date, hi date)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
#variable_conflict use_column
DECLARE
    today date := (clock_timestamp() AT TIME ZONE 'UTC')::date;
    cap date := (date_trunc('month', today) + interval '14 months')::date;
    floor date := (date_trunc('month', today) - interval '10 years')::date;
    t text;
    m date;
BEGIN
    IF cardinality(p_days) > 120 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'at most 120 days at a time';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pii_vault_partitions_ensure'));
    FOREACH t IN ARRAY ARRAY['user_logins', 'vault'] LOOP
        FOR m IN
            SELECT date_trunc('month', d)::date FROM unnest(p_days) d
            UNION
            SELECT g::date FROM generate_series(date_trunc('month', today), least(coalesce(p_through, today), cap - 1),
                                                interval '1 month') g
            UNION
            SELECT month FROM pii_vault_undated_months(t) month
            ORDER BY 1
        LOOP
            IF m >= floor AND m < cap AND NOT EXISTS (
                SELECT 1 FROM pii_vault_partitions(t) p WHERE coalesce(p.lo, '-infinity') <= m AND p.hi > m
            ) THEN
                PERFORM pii_vault_partition_add(t, m);
            END IF;
        END LOOP;
    END LOOP;
    RETURN QUERY SELECT coalesce(p.lo, '0001-01-01'), p.hi FROM pii_vault_partitions('vault') p;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_partitions_ensure(date[], date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_partitions_ensure(date[], date) TO pii_vault_worker, pii_vault_rotator;

-- The months of the dated rows waiting in `p_table`'s default partition.
CREATE OR REPLACE FUNCTION pii_vault_undated_months(p_table text) RETURNS SETOF date
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF p_table NOT IN ('user_logins', 'vault') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'only user_logins and vault are partitioned';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT DISTINCT date_trunc(''month'', create_date)::date FROM %I WHERE create_date IS NOT NULL',
        p_table || '_undated');
END
$$;
REVOKE ALL ON FUNCTION pii_vault_undated_months(text) FROM PUBLIC;

-- One month's partition of `p_table`: a plain table like the parent, the
-- month's rows moved in from the default partition, then attached. Only
-- pii_vault_partitions_ensure calls it.
CREATE OR REPLACE FUNCTION pii_vault_partition_add(p_table text, p_month date) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    lo date := date_trunc('month', p_month)::date;
    hi date := (date_trunc('month', p_month) + interval '1 month')::date;
    name text := format('%s_y%sm%s', p_table, to_char(lo, 'YYYY'), to_char(lo, 'MM'));
BEGIN
    IF p_table NOT IN ('user_logins', 'vault') THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'only user_logins and vault are partitioned';
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)',
                   name, p_table);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (create_date IS NOT NULL AND create_date >= %L AND create_date < %L)',
                   name, name || '_month', lo, hi);
    EXECUTE format('WITH d AS (DELETE FROM %I WHERE create_date >= %L AND create_date < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM d', p_table || '_undated', lo, hi, name);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', p_table, name, lo, hi);
END
$$;
REVOKE ALL ON FUNCTION pii_vault_partition_add(text, date) FROM PUBLIC;

-- The first-load days of lines `p_lines` of input `p_source`, which a
-- worker reads on `p_day` (migration 0019): the ranges of line numbers
-- that cover them, those already stored (their day, the first load's) and
-- those added now (p_day) for the lines in none; then, for the lines
-- loaded before ranges existed, their day in line_dates by message id
-- (`p_ids`; range_first NULL), which wins. A worker loading a file again
-- is thus told the day each line was first stored, so that the line keeps
-- its partition and stays a duplicate. Line numbers and days only.
--
-- One call per batch, not per line: in the common case (lines never
-- loaded) one range is added. A per-source advisory lock, held to the end
-- of the caller's transaction, keeps two loads of one input from both
-- finding the same lines new (the second waits, then finds the first's
-- ranges, or none if it rolled back), so ranges never overlap.
CREATE OR REPLACE FUNCTION pii_vault_line_days(p_source text, p_lines bigint[], p_ids text[], p_day date)
RETURNS TABLE (range_first bigint, range_last bigint, first_day date, legacy_id text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    lo bigint;
    hi bigint;
    r_first bigint[];
    r_last bigint[];
    r_day date[];
BEGIN
    IF p_source IS NULL OR length(p_source) > 1024 OR p_day IS NULL
       OR coalesce(cardinality(p_lines), 0) NOT BETWEEN 1 AND 100000
       OR array_position(p_lines, NULL) IS NOT NULL
       OR coalesce(cardinality(p_ids), 0) > 100000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'a source id of at most 1024 characters, 1 to 100000 line numbers and a day';
    END IF;
    SELECT min(x), max(x) INTO lo, hi FROM unnest(p_lines) x;
    IF lo < 1 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'line numbers start at 1';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pii_vault_line_days'), hashtext(p_source));
    -- The ranges that meet lo..hi: those starting in it, and the last one
    -- starting before it (two index probes, however many ranges there are).
    SELECT coalesce(array_agg(n.first_line ORDER BY n.first_line), '{}'),
           coalesce(array_agg(n.last_line ORDER BY n.first_line), '{}'),
           coalesce(array_agg(n.create_date ORDER BY n.first_line), '{}')
    INTO r_first, r_last, r_day
    FROM (SELECT r.first_line, r.last_line, r.create_date FROM line_ranges r
          WHERE r.source = p_source AND r.first_line BETWEEN lo AND hi
          UNION ALL
          (SELECT r.first_line, r.last_line, r.create_date FROM line_ranges r
           WHERE r.source = p_source AND r.first_line < lo ORDER BY r.first_line DESC LIMIT 1)) n
    WHERE n.last_line >= lo;
    IF cardinality(r_first) = 0 THEN
        INSERT INTO line_ranges (source, first_line, last_line, create_date) VALUES (p_source, lo, hi, p_day);
        range_first := lo;
        range_last := hi;
        first_day := p_day;
        RETURN NEXT;
    ELSE
        RETURN QUERY SELECT f, l, d, NULL::text FROM unnest(r_first, r_last, r_day) k(f, l, d);
        -- The lines in no range, in runs that no stored range splits (a
        -- run is the lines with as many ranges ending before them).
        RETURN QUERY
        WITH runs AS (
            INSERT INTO line_ranges (source, first_line, last_line, create_date)
            SELECT p_source, min(x), max(x), p_day
            FROM (SELECT x, (SELECT count(*) FROM unnest(r_last) e WHERE e < x) AS seg
                  FROM unnest(p_lines) x
                  WHERE NOT EXISTS (SELECT 1 FROM unnest(r_first, r_last) c(f, l) WHERE x BETWEEN c.f AND c.l)) u
            GROUP BY seg
            RETURNING first_line, last_line, create_date)
        SELECT first_line, last_line, create_date, NULL::text FROM runs;
    END IF;
    IF cardinality(p_ids) > 0 AND EXISTS (SELECT 1 FROM line_dates) THEN
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, d.create_date, d.message_id
                     FROM line_dates d WHERE d.message_id = ANY (p_ids);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION pii_vault_line_days(text, bigint[], text[], date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_vault_line_days(text, bigint[], text[], date) TO pii_vault_worker;
