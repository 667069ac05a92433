# Part of scripts/bench-scale.sh (sourced): retention, `forget --before`,
# beside a raw DELETE of the same rows in the same run.
#
# The loaded rows all carry today's date (a file has no send time), so they
# are first spread over the past 365 days in load order, as a year of
# logins would lie (each month in its partition), the vault written again in
# date order, as a table filled over a year is. Only the
# vault's dates are changed (retention reads no other); this is the last
# part, so nothing after it sees the difference. Untimed. Then:
#   * the ceiling: a copy of the vault in one table with the same indexes (no
#     triggers), `DELETE ... WHERE create_date < cut-off`, one statement;
#   * `pii-vault forget --before cut-off --reason ...` as a whole process
#     (function call, the settled months' ledgers handed to its record,
#     partitions wholly before the cut-off dropped, the one it cuts deleted
#     from, audit row, destroying keys left with nothing).
# The cut-off is 30 days ago: about 92% of the rows go.
# Before it, the months that ended 15 days ago or more are settled (their
# rows counted by user for the subject ledger), as the workers do once a
# month; timed apart and reported beside retention, since that is where
# the per-row cost of the ledger went.
# Each timed step starts after a CHECKPOINT. With
# PII_VAULT_BENCH_RETENTION_CACHE=cold [warm], each also starts with nothing
# of the vault in memory (the server restarted, the kernel's page cache
# dropped: root only), as months old enough for retention lie in
# production; warm, they are in memory, as just written here. Dropping a
# partition frees its cached pages at COMMIT, which a DELETE does not, so
# the two conditions give both sides different costs: the report names
# the one measured.

retention_cache="${PII_VAULT_BENCH_RETENTION_CACHE:-warm}" # checked by bench-scale.sh
retention_where="in memory"
[ "$retention_cache" = warm ] || retention_where="not in memory"
# Before each timed step: the dirty pages written out, and if cold, the
# server's buffers and the kernel's page cache emptied.
retention_start() {
    psql "$PII_VAULT_TEST_PG" -qX -c CHECKPOINT >/dev/null
    [ "$retention_cache" = cold ] || return 0
    # pg_ctl runs as the server's user, who may not enter the work
    # directory; the variable is a command line, split on purpose.
    # shellcheck disable=SC2086
    (cd / && $PII_VAULT_TEST_PG_CTL restart -m fast >/dev/null)
    sync
    echo 3 >/proc/sys/vm/drop_caches
    psql "$PG_URL" -qXtA -c 'SELECT 1' >/dev/null # a first connection, untimed
}

echo "== retention: dating the vault over the past 365 days (untimed)" >&2
{
    printf '%s\n' "$year_of_days_sql"
    cat <<'SQL'
-- Written again in date order (cheaper than an UPDATE that moves every row
-- to another partition, and already in the physical order of a year).
CREATE TEMP TABLE redated AS
SELECT v.message_id, v.user_id, v.key_id, v.nonce, v.ciphertext, d.day AS create_date
FROM vault v JOIN dated d USING (message_id);
TRUNCATE vault;
INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext, create_date)
SELECT * FROM redated ORDER BY create_date, message_id;
SQL
} | psql "$PG_URL" -qX -v ON_ERROR_STOP=1 >/dev/null
# VACUUM, as autovacuum would have left closed months (all-visible, so
# their user ids read from the index).
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 -c "VACUUM ANALYZE vault" >/dev/null
cut="$(date -u -d '30 days ago' +%F)"
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE TABLE bench_vault_raw (LIKE vault INCLUDING ALL);
INSERT INTO bench_vault_raw SELECT * FROM vault ORDER BY create_date, message_id;
VACUUM ANALYZE bench_vault_raw;
SQL
would="$(psql "$PG_URL" -qXtA -c "SELECT count(*) FROM vault WHERE create_date < '$cut'")"

echo "== retention: settling the months that ended 15 days ago or more" >&2
t_settle0="$(now)"
settled=0
while [ -n "$(psql "$PG_URL" -qXtA -v ON_ERROR_STOP=1 -c 'SELECT pii_vault_month_settle_next()')" ]; do
    settled=$((settled + 1))
done
t_settle1="$(now)"
settled_rows="$(psql "$PG_URL" -qXtA -c "SELECT coalesce(sum(rows), 0) FROM vault_month_ledgers")"

echo "== retention: raw DELETE of $would rows ($retention_cache)" >&2
retention_start
t0="$(now)"
raw_deleted="$(psql "$PG_URL" -qXtA -v ON_ERROR_STOP=1 \
    -c "WITH d AS (DELETE FROM bench_vault_raw WHERE create_date < '$cut' RETURNING 1) SELECT count(*) FROM d")"
t1="$(now)"
psql "$PG_URL" -qX -c "DROP TABLE bench_vault_raw" >/dev/null

echo "== retention: pii-vault forget --before $cut ($retention_cache)" >&2
retention_start
t2="$(now)"
run_measured retention "$BIN" --database-url "$PG_URL" forget --before "$cut" --reason "retention: 30 days (benchmark)"
t3="$(now)"
erased="$(sed -n 's/.*erased \([0-9]*\) vault row.*/\1/p' "$work/retention.err" | head -n 1)"
left="$(psql "$PG_URL" -qXtA -c "SELECT count(*) FROM vault WHERE create_date < '$cut'")"
[ "$erased" = "$would" ] && [ "$left" = 0 ] || echo "!! retention erased ${erased:-?} of $would rows; $left left" >&2
audited="$(psql "$PG_URL" -qXtA -c "SELECT row_count FROM audit_log WHERE action = 'retention' ORDER BY id DESC LIMIT 1")"

section "retention: forget --before (cut-off 30 days ago, a year of $ROWS logins, $retention_cache: the vault $retention_where)"
report "raw DELETE of the same rows ($raw_deleted):" "$(rate "$raw_deleted" "$t0" "$t1")"
report "pii-vault forget --before ($erased, audited $audited):" "$(rate "${erased:-0}" "$t2" "$t3"), peak RSS $((PEAK_RSS_KB / 1024)) MiB"
report "settling $settled months first ($settled_rows rows):" "$(rate "$settled_rows" "$t_settle0" "$t_settle1"), once a month by the workers"
report "pii-vault / raw DELETE:" "$(ratio "$(per_sec "${erased:-0}" "$t2" "$t3")" "$(per_sec "$raw_deleted" "$t0" "$t1")")"
