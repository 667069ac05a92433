#!/usr/bin/env bash
# Scale benchmark: every scale figure of pii-vault beside its ceiling, measured
# in one run on this machine.
#
# Usage: scripts/bench-scale.sh [ROWS]
#     ROWS   events loaded into Postgres [1000000]
#
# 1. Loads ROWS generated events into a fresh Postgres database with
#    `pii-vault run --from-file` (local key file, fsync on), then copies the
#    very rows it wrote into a database with the same two tables and the same
#    indexes (no triggers, no foreign keys) with a raw binary `COPY`, one
#    transaction, and again on two connections (each half the rows): the
#    ceilings of the write path. Prints both rates, the
#    ratio and the worker's peak RSS.
# 2. Runs the parts in scripts/bench-scale.d/*.sh in name order, each against
#    the loaded database (or a database of its own), each printing its figure
#    beside its own ceiling measured in the same run: the SQLite default
#    against a plain loop, reveal latency and memory, rotations against a raw
#    parallel UPDATE ... FROM, retention against a raw DELETE, and table
#    sizes with their extrapolation to 100 M and 1 B rows.
# 3. Prints the report.
#
# Environment: PII_VAULT_BENCH_STEP_TIMEOUT bounds each timed step [3600 s];
# PII_VAULT_BENCH_SQLITE_ROWS, PII_VAULT_BENCH_JOBS and PII_VAULT_BENCH_ROUNDS
# are read by the parts that use them, and so is PII_VAULT_BENCH_RETENTION_CACHE
# (warm or cold: whether the vault is in memory when retention and its
# ceiling start); PII_VAULT_BENCH_PARTS names the parts to run (file names
# without .sh, space-separated, e.g. "30-rotation") [all]. Starts and stops its own PostgreSQL through
# scripts/services.sh (PII_VAULT_PG_SHARED_BUFFERS sizes its buffer cache
# [256MB], PII_VAULT_PG_MAX_WAL_SIZE the WAL between checkpoints [8GB],
# PII_VAULT_PG_CHECKPOINT_TIMEOUT the time between them [5min]; the report
# names all three, and the WAL and checkpoints of each load); builds with
# `cargo build --profile production`, the deployed build (Cargo.toml). A benchmark, not a
# test: the machine's load shows in the absolute figures, the ratios are what
# compare.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

ROWS="${1:-1000000}"
if ! [[ "$ROWS" =~ ^[0-9]+$ && "$ROWS" -gt 0 ]]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
STEP_TIMEOUT="${PII_VAULT_BENCH_STEP_TIMEOUT:-3600}"
# Checked here, not when the retention part starts, after the load.
case "${PII_VAULT_BENCH_RETENTION_CACHE:-warm}" in
warm) ;;
cold)
    if ! [ -w /proc/sys/vm/drop_caches ]; then
        echo "bench-scale: PII_VAULT_BENCH_RETENTION_CACHE=cold drops the kernel's page cache: run as root" >&2
        exit 2
    fi
    ;;
*)
    echo "bench-scale: PII_VAULT_BENCH_RETENTION_CACHE is warm or cold, not ${PII_VAULT_BENCH_RETENTION_CACHE}" >&2
    exit 2
    ;;
esac

echo "== building (the production profile: release with link-time optimisation)" >&2
cargo build --profile production --bin pii-vault >&2
BIN="${CARGO_TARGET_DIR:-$REPO/target}/production/pii-vault"

export PII_VAULT_PG_FSYNC=on # durable commits, as in production
# A server that takes a bulk load is given room between checkpoints, as in
# production: at Postgres's default of 1GB, a 10 M-row load checkpoints
# every 2 seconds ("checkpoints are occurring too frequently", the server
# logs) and nearly every index insert then writes a full-page image to the
# WAL (197 GB of WAL for 10 M rows), which measures the setting, not the
# write path.
export PII_VAULT_PG_MAX_WAL_SIZE="${PII_VAULT_PG_MAX_WAL_SIZE:-8GB}"
export PII_VAULT_SERVICES=pg # no AWS: the local key file, so KMS latency is not measured here
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
work="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-scale.XXXXXX")"
trap 'services_stop; rm -rf "$work"' EXIT
cd "$work"
export PII_VAULT_KEY_DIR="$work/keys"
export PII_VAULT_LOG=warn
export PII_VAULT_ACTOR=bench

now() { date +%s.%N; }
# rate COUNT START END -> "N/s (S s)"
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f/s (%.2fs)", n / (b - a), b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
per_sec() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }

# A fresh database in the cluster; prints its URL.
new_pg_db() {
    psql "$PII_VAULT_TEST_PG" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE $1" >/dev/null
    echo "${PII_VAULT_TEST_PG%/*}/$1"
}

# The server's checkpoints so far (PostgreSQL 17 moved them to their own view).
if [ "$(psql "$PII_VAULT_TEST_PG" -qXtA -c 'SHOW server_version_num')" -ge 170000 ]; then
    CHECKPOINTS="(SELECT num_timed + num_requested FROM pg_stat_checkpointer)"
else
    CHECKPOINTS="(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter)"
fi
# wal_mark: the server's WAL position and its checkpoints so far, for
# wal_since.
wal_mark() {
    psql "$PII_VAULT_TEST_PG" -qXtA -F ' ' -c "SELECT pg_current_wal_lsn(), $CHECKPOINTS"
}
# wal_since MARK: "N GB of WAL, M checkpoints" written since MARK.
wal_since() {
    local lsn="${1% *}" cps="${1#* }"
    psql "$PII_VAULT_TEST_PG" -qXtA -c \
        "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn') / 1e9, 2) || ' GB of WAL, '
                || ($CHECKPOINTS - $cps) || ' checkpoints'"
}

index_count() {
    psql "$1" -qXtA -c "SELECT count(*) FROM pg_index WHERE indrelid IN ('user_logins'::regclass, 'vault'::regclass)"
}

# A fresh database where a ceiling is measured: the tables, partitions,
# sequences and indexes of user_logins and vault as PG_URL has them, without triggers
# (their functions are not there) or foreign keys (vault_keys is not there).
# Prints its URL.
new_raw_copy_db() {
    local url
    url="$(new_pg_db "$1")"
    # The two tables with their monthly partitions (pg_dump 15 has no
    # --table-and-children; the patterns leave vault_keys and the like out).
    "$PII_VAULT_PG_BIN_DIR/pg_dump" --schema-only --no-owner --no-privileges \
        -t user_logins -t 'user_logins_y*' -t user_logins_undated -t 'user_logins_before_*' \
        -t vault -t 'vault_y*' -t vault_undated -t 'vault_before_*' "$PG_URL" >"$work/$1-tables.sql"
    python3 - "$work/$1-tables.sql" >"$work/$1-raw-tables.sql" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
keep = []
for stmt in re.split(r";\n", text):
    body = "\n".join(l for l in stmt.splitlines() if not l.startswith("--")).strip()
    if not body or body.startswith("SET ") or body.startswith("SELECT pg_catalog.set_config"):
        continue
    if "CREATE TRIGGER" in body or "FOREIGN KEY" in body:
        continue
    keep.append(body + ";")
print("\n".join(keep))
PY
    psql "$url" -qX -v ON_ERROR_STOP=1 -f "$work/$1-raw-tables.sql" >/dev/null
    if [ "$(index_count "$PG_URL")" != "$(index_count "$url")" ]; then
        echo "!! $1: the copy's tables do not have the same indexes" >&2
        return 1
    fi
    echo "$url"
}

# Runs a command with stdout/stderr to $work/$1.out/.err, bounded in time;
# sets PEAK_RSS_KB.
run_measured() {
    local name="$1"
    shift
    PEAK_RSS_KB=0
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
    local pid=$! hwm i
    for ((i = 0; i < STEP_TIMEOUT * 20; i++)); do # poll every 0.05 s
        hwm="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
        if [ -n "$hwm" ] && [ "$hwm" -gt "$PEAK_RSS_KB" ]; then PEAK_RSS_KB="$hwm"; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" || {
        echo "!! $name failed:" >&2
        tail -n 30 "$work/$name.err" >&2
        return 1
    }
}

REPORT="$work/report.txt"
: >"$REPORT"
# report LABEL VALUE: one line of the final report.
report() { printf '    %-52s %s\n' "$1" "$2" >>"$REPORT"; }
section() { printf '%s\n' "$1" >>"$REPORT"; }

# ------------------------------------------------------------------ load
echo "== generating $ROWS events" >&2
python3 "$REPO/scripts/gen-events.py" -n "$ROWS" --seed 11 >"$work/events.jsonl"
PG_URL="$(new_pg_db scale)"
"$BIN" --database-url "$PG_URL" migrate >"$work/migrate.out" 2>&1 || {
    cat "$work/migrate.out" >&2
    exit 1
}
echo "== (load) pii-vault run --from-file, $ROWS events" >&2
wal0="$(wal_mark)"
t0="$(now)"
run_measured load "$BIN" --database-url "$PG_URL" run --from-file "$work/events.jsonl" --no-progress
t1="$(now)"
load_wal="$(wal_since "$wal0")"
load_rss_kb="$PEAK_RSS_KB"
stored="$(psql "$PG_URL" -qXtA -c 'SELECT count(*) FROM user_logins')"
[ "$stored" = "$ROWS" ] || echo "!! $stored of $ROWS events stored" >&2

# The ceiling: the same rows into the same tables with the same indexes.
echo "== (load) ceiling: raw COPY of the same rows" >&2
RAW_URL="$(new_raw_copy_db scale_raw_copy)"
ul_cols="$(psql "$PG_URL" -qXtA -c "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
    WHERE attrelid = 'user_logins'::regclass AND attnum > 0 AND NOT attisdropped AND attname <> 'id'")"
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 \
    -c "\\copy (SELECT $ul_cols FROM user_logins ORDER BY id) TO '$work/user_logins.bin' WITH (FORMAT binary)" \
    -c "\\copy (SELECT * FROM vault) TO '$work/vault.bin' WITH (FORMAT binary)" >/dev/null
wal2="$(wal_mark)"
t2="$(now)"
timeout "$STEP_TIMEOUT" psql "$RAW_URL" -qX -v ON_ERROR_STOP=1 >/dev/null <<EOF
BEGIN;
\copy user_logins ($ul_cols) FROM '$work/user_logins.bin' WITH (FORMAT binary)
\copy vault FROM '$work/vault.bin' WITH (FORMAT binary)
COMMIT;
EOF
t3="$(now)"
raw_wal="$(wal_since "$wal2")"
copied="$(psql "$RAW_URL" -qXtA -c 'SELECT count(*) FROM user_logins')"
psql "$PII_VAULT_TEST_PG" -qX -c "DROP DATABASE scale_raw_copy" >/dev/null
rm -f "$work/user_logins.bin" "$work/vault.bin"

# The same on two connections at once, each its half of the rows (split by
# message id, so that each login's vault row is in the same half), each one
# transaction: pii-vault loads on several connections too.
echo "== (load) ceiling: raw COPY of the same rows on two connections" >&2
RAW2_URL="$(new_raw_copy_db scale_raw_copy2)"
for half in 0 1; do
    psql "$PG_URL" -qX -v ON_ERROR_STOP=1 \
        -c "\\copy (SELECT $ul_cols FROM user_logins WHERE abs(hashtext(message_id)) % 2 = $half ORDER BY id) TO '$work/user_logins.$half.bin' WITH (FORMAT binary)" \
        -c "\\copy (SELECT * FROM vault WHERE abs(hashtext(message_id)) % 2 = $half) TO '$work/vault.$half.bin' WITH (FORMAT binary)" >/dev/null
done
copies=()
wal2b="$(wal_mark)"
t2b="$(now)"
for half in 0 1; do
    printf '%s\n' "BEGIN;" \
        "\\copy user_logins ($ul_cols) FROM '$work/user_logins.$half.bin' WITH (FORMAT binary)" \
        "\\copy vault FROM '$work/vault.$half.bin' WITH (FORMAT binary)" \
        "COMMIT;" |
        timeout "$STEP_TIMEOUT" psql "$RAW2_URL" -qX -v ON_ERROR_STOP=1 >/dev/null &
    copies+=($!)
done
wait "${copies[@]}"
t3b="$(now)"
raw2_wal="$(wal_since "$wal2b")"
copied2="$(psql "$RAW2_URL" -qXtA -c 'SELECT count(*) FROM user_logins')"
psql "$PII_VAULT_TEST_PG" -qX -c "DROP DATABASE scale_raw_copy2" >/dev/null
rm -f "$work"/user_logins.?.bin "$work"/vault.?.bin

section "load: file -> Postgres ($ROWS events, fsync on, shared_buffers $(psql "$PII_VAULT_TEST_PG" -qXtA -c 'SHOW shared_buffers'), max_wal_size $(psql "$PII_VAULT_TEST_PG" -qXtA -c 'SHOW max_wal_size'), checkpoint_timeout $(psql "$PII_VAULT_TEST_PG" -qXtA -c 'SHOW checkpoint_timeout'), local key)"
report "pii-vault run --from-file:" "$(rate "$ROWS" "$t0" "$t1"), peak RSS $((load_rss_kb / 1024)) MiB; $load_wal"
report "raw COPY of the same rows, both tables ($copied):" "$(rate "$copied" "$t2" "$t3"); $raw_wal"
report "pii-vault / COPY:" "$(ratio "$(per_sec "$ROWS" "$t0" "$t1")" "$(per_sec "$copied" "$t2" "$t3")")"
report "raw COPY, both tables, 2 connections ($copied2):" "$(rate "$copied2" "$t2b" "$t3b"); $raw2_wal"
report "pii-vault / COPY on 2 connections:" "$(ratio "$(per_sec "$ROWS" "$t0" "$t1")" "$(per_sec "$copied2" "$t2b" "$t3b")")"
report "worker's summary:" "$(grep ' stored, ' "$work/load.err" || true)"

# Sizes as loaded (random message ids leave btree pages partly filled, as
# in production), and the straight line through them to 100 M and 1 B rows.
section "sizes after the load ($ROWS rows), extrapolated in a straight line"
while read -r name table idx; do
    report "$name (table + indexes):" "$(awk -v t="$table" -v i="$idx" -v n="$ROWS" 'BEGIN {
        printf "%.0f + %.0f bytes/row; 100 M rows: %.0f GiB; 1 B rows: %.0f GiB", t / n, i / n,
            (t + i) / n * 1e8 / 2^30, (t + i) / n * 1e9 / 2^30 }')"
done < <(psql "$PG_URL" -qXtA -F ' ' -c "SELECT t, sum(pg_table_size(relid)), sum(pg_indexes_size(relid)) \
    FROM unnest(ARRAY['user_logins', 'vault']) t, pg_partition_tree(t::regclass) GROUP BY t ORDER BY t")

# ------------------------------------------------------------------ parts
# The start of the parts' fixtures that need a year of rows (30-rotation,
# 40-retention), run in the same psql session as the rest of each: the
# year's monthly partitions, as the workers would have made them, and a
# temp table `dated` (message_id, day) that spreads the loaded logins over
# the past 365 days in load order.
year_of_days_sql="$(cat <<'SQL'
SELECT count(*) FROM pii_vault_partitions_ensure(
    ARRAY(SELECT (current_date - 28 * g)::date FROM generate_series(0, 14) g), current_date + 92);
SET session_replication_role = replica; -- the owner's fixture, not a worker's write: no fences
CREATE TEMP TABLE dated AS
SELECT message_id,
       current_date - 365 + (365 * (row_number() OVER (ORDER BY id) - 1) / count(*) OVER ())::int AS day
FROM user_logins;
SQL
)"
for part in "$REPO"/scripts/bench-scale.d/*.sh; do
    [ -e "$part" ] || continue
    if [ -n "${PII_VAULT_BENCH_PARTS:-}" ] && [[ " $PII_VAULT_BENCH_PARTS " != *" $(basename "$part" .sh) "* ]]; then
        continue
    fi
    echo "== part $(basename "$part")" >&2
    # shellcheck source=/dev/null
    source "$part"
done

# ------------------------------------------------------------------ report
echo
echo "pii-vault scale benchmark: $ROWS rows, $(nproc) cores, PostgreSQL $(psql "$PG_URL" -qXtA -c 'SHOW server_version')"
cat "$REPORT"
