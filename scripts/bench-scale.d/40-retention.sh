# Part of scripts/bench-scale.sh (sourced): retention, `forget --before`,
# beside a raw DELETE of the same rows in the same run.
#
# The loaded rows all carry today's date (a file has no send time), so they
# are first spread over the past 365 days in load order, as a year of
# logins would lie (each month in its partition), the vault written again in
# date order, as a table filled over a year is. Only the
# vault's dates are changed (retention reads no other); this is the last
# part, so nothing after it sees the difference. Untimed. Then two
# cut-offs, each timed beside its own ceiling:
#   * whole months: the first day of the month that began 30 or more days
#     ago (on 7 December, 1 November: eleven months of the year go, about
#     90% of the rows). `forget --before` drops their partitions whole.
#     Ceiling: a copy of the vault in one table with the same indexes (no
#     triggers), `DELETE ... WHERE create_date < cut-off`, one statement;
#   * then the days of the month the cut-off "30 days ago" falls in (on 7
#     December, 1 to 6 November): `forget --before` deletes them from that
#     month's partition, as a daily retention job does. Ceiling: the same
#     DELETE from one table holding what the first step left. Skipped on
#     a day when both cut-offs are the same day.
# Each `forget --before` is timed as a whole process (function call, the
# settled months' ledgers handed to its record, partitions dropped, rows
# deleted with their users counted for the record, audit row, destroying
# keys left with nothing).
# Before them, the months that ended 15 days ago or more are settled (their
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
day_cut="$(date -u -d '30 days ago' +%F)"
month_cut="${day_cut%-*}-01"
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE TABLE bench_vault_raw (LIKE vault INCLUDING ALL);
INSERT INTO bench_vault_raw SELECT * FROM vault ORDER BY create_date, message_id;
VACUUM ANALYZE bench_vault_raw;
CREATE TABLE bench_vault_raw_rest (LIKE vault INCLUDING ALL);
INSERT INTO bench_vault_raw_rest SELECT * FROM vault WHERE create_date >= '$month_cut' ORDER BY create_date, message_id;
VACUUM ANALYZE bench_vault_raw_rest;
SQL
count_before() { psql "$PG_URL" -qXtA -c "SELECT count(*) FROM vault WHERE create_date < '$1'"; }
would_months="$(count_before "$month_cut")"
would_days=$(($(count_before "$day_cut") - would_months))

echo "== retention: settling the months that ended 15 days ago or more" >&2
t_settle0="$(now)"
settled=0
while [ -n "$(psql "$PG_URL" -qXtA -v ON_ERROR_STOP=1 -c 'SELECT pii_vault_month_settle_next()')" ]; do
    settled=$((settled + 1))
done
t_settle1="$(now)"
settled_rows="$(psql "$PG_URL" -qXtA -c "SELECT coalesce(sum(rows), 0) FROM vault_month_ledgers")"

# raw_delete TABLE CUT-OFF: times a DELETE of the rows before CUT-OFF;
# sets RAW_DELETED, RAW_T0, RAW_T1.
raw_delete() {
    echo "== retention: raw DELETE from $1 before $2 ($retention_cache)" >&2
    retention_start
    RAW_T0="$(now)"
    RAW_DELETED="$(psql "$PG_URL" -qXtA -v ON_ERROR_STOP=1 \
        -c "WITH d AS (DELETE FROM $1 WHERE create_date < '$2' RETURNING 1) SELECT count(*) FROM d")"
    RAW_T1="$(now)"
}
# forget_before NAME CUT-OFF EXPECTED: times `forget --before CUT-OFF` and
# checks it erased EXPECTED rows and left none before CUT-OFF; sets ERASED,
# AUDITED, DROPPED, T0, T1.
forget_before() {
    echo "== retention: pii-vault forget --before $2 ($retention_cache)" >&2
    retention_start
    T0="$(now)"
    run_measured "$1" "$BIN" --database-url "$PG_URL" forget --before "$2" --reason "retention: 30 days (benchmark)"
    T1="$(now)"
    ERASED="$(sed -n 's/.*erased \([0-9]*\) vault row.*/\1/p' "$work/$1.err" | head -n 1)"
    DROPPED="$(sed -n 's/.* \([0-9]*\) monthly vault partition(s) dropped.*/\1/p' "$work/$1.err" | head -n 1)"
    local left
    left="$(count_before "$2")"
    [ "$ERASED" = "$3" ] && [ "$left" = 0 ] || echo "!! retention erased ${ERASED:-?} of $3 rows; $left left" >&2
    AUDITED="$(psql "$PG_URL" -qXtA -c "SELECT row_count FROM audit_log WHERE action = 'retention' ORDER BY id DESC LIMIT 1")"
}

# report_step HEADING: the last raw_delete and forget_before side by side.
report_step() {
    report "$1" ""
    report "  raw DELETE of the same rows ($RAW_DELETED):" "$(rate "$RAW_DELETED" "$RAW_T0" "$RAW_T1")"
    report "  pii-vault ($ERASED, audited $AUDITED, ${DROPPED:-0} months dropped):" "$(rate "${ERASED:-0}" "$T0" "$T1"), peak RSS $((PEAK_RSS_KB / 1024)) MiB"
    report "  pii-vault / raw DELETE:" "$(ratio "$(per_sec "${ERASED:-0}" "$T0" "$T1")" "$(per_sec "$RAW_DELETED" "$RAW_T0" "$RAW_T1")")"
}

raw_delete bench_vault_raw "$month_cut"
psql "$PG_URL" -qX -c "DROP TABLE bench_vault_raw" >/dev/null
forget_before retention-months "$month_cut" "$would_months"
section "retention: forget --before, a year of $ROWS logins, $retention_cache (the vault $retention_where)"
report_step "whole months: before $month_cut"
if [ "$day_cut" != "$month_cut" ]; then
    raw_delete bench_vault_raw_rest "$day_cut"
    forget_before retention-days "$day_cut" "$would_days"
    report_step "then the month the cut-off 30 days ago falls in: before $day_cut"
else
    report "then the month the cut-off 30 days ago falls in:" "none today (30 days ago is the first of a month)"
fi
psql "$PG_URL" -qX -c "DROP TABLE bench_vault_raw_rest" >/dev/null
report "settling $settled months first ($settled_rows rows):" "$(rate "$settled_rows" "$t_settle0" "$t_settle1"), once a month by the workers"
