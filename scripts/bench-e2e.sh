#!/usr/bin/env bash
# End-to-end benchmark of the worker, against its ceilings, on this machine.
#
# Usage: scripts/bench-e2e.sh [N] [CONCURRENCY] [FILE_N]
#     N            events to push through SQS [20000]
#     CONCURRENCY  receive loops, for the worker and the baseline alike [4]
#     FILE_N       events for the file -> Postgres part [100000]; large
#                  enough that start-up (key set-up with KMS) is noise
#
# (a) SQS -> Postgres: N events are loaded into a fresh LocalStack queue and
#     drained by examples/sqs_drain (receive 10 + DeleteMessageBatch, no
#     processing): the ceiling. The same N events are loaded again and
#     `pii-vault run --queue-url ... --until-empty` consumes them into
#     Postgres with a KMS key. Prints messages/s of both, the ratio, and the
#     worker's peak RSS.
# (b) file -> Postgres: `pii-vault run --from-file` of the N events into a
#     fresh database, against raw `\copy` of equivalent rows into
#     equivalent tables, timed in the same run: (1) user_logins alone (same
#     columns, the three secondary indexes and unique message_id), the figure
#     the targets are stated against, and (2) user_logins plus the vault
#     table (same-sized nonces and ciphertexts, same indexes), which is what
#     pii-vault actually writes. Prints rows/s of each and the ratios. The
#     same load is also run into a database whose rotation fences (the
#     statement triggers of migration 0003) are switched off, to show what
#     they cost, and into one with network tokens off (`migrate
#     --no-network-tokens`), to show what `masked_ip_net` costs.
#
# Starts and stops its own PostgreSQL (with fsync on) and LocalStack through
# scripts/services.sh, and builds with `cargo build --release`. Not part of
# the test command. Until the Postgres store works, (a) runs against SQLite
# and (b) is skipped, saying so.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

N="${1:-20000}"
C="${2:-4}"
FILE_N="${3:-100000}"
if ! [[ "$N" =~ ^[0-9]+$ && "$N" -gt 0 && "$C" =~ ^[0-9]+$ && "$C" -gt 0 && "$FILE_N" =~ ^[0-9]+$ && "$FILE_N" -gt 0 ]]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0" >&2
    exit 2
fi
# Bound on any single timed step.
STEP_TIMEOUT="${PII_VAULT_BENCH_STEP_TIMEOUT:-1800}"

echo "== building (release)" >&2
cargo build --release --bin pii-vault --example sqs_drain >&2
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/pii-vault"
SQS="${CARGO_TARGET_DIR:-$REPO/target}/release/examples/sqs_drain"

export PII_VAULT_PG_FSYNC=on # durable commits, as in production
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
work="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-bench.XXXXXX")"
trap 'services_stop; rm -rf "$work"' EXIT
cd "$work" # the worker's working directory (it writes nothing here with KMS)
export PII_VAULT_LOG=warn

now() { date +%s.%N; }
# rate COUNT START END -> per second, and the seconds
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f/s (%.2fs)", n / (b - a), b - a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
per_sec() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }

# A fresh database in the test cluster; prints its URL.
new_pg_db() {
    psql "$PII_VAULT_TEST_PG" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE $1" >/dev/null
    echo "${PII_VAULT_TEST_PG%/*}/$1"
}

# Runs a command with stdout/stderr to $work/$1.out/.err, bounded in time;
# sets PEAK_RSS_KB.
run_measured() {
    local name="$1"
    shift
    PEAK_RSS_KB=0
    if [ -x /usr/bin/time ]; then
        timeout "$STEP_TIMEOUT" /usr/bin/time -v -o "$work/$name.time" "$@" >"$work/$name.out" 2>"$work/$name.err" || {
            echo "!! $name failed:" >&2
            tail -n 30 "$work/$name.err" >&2
            return 1
        }
        PEAK_RSS_KB="$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/$name.time")"
    else
        "$@" >"$work/$name.out" 2>"$work/$name.err" &
        local pid=$! hwm i
        for ((i = 0; i < STEP_TIMEOUT * 10; i++)); do # poll every 0.1 s
            hwm="$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
            if [ -n "$hwm" ] && [ "$hwm" -gt "$PEAK_RSS_KB" ]; then PEAK_RSS_KB="$hwm"; fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" || {
            echo "!! $name failed:" >&2
            tail -n 30 "$work/$name.err" >&2
            return 1
        }
    fi
}

echo "== generating $N events" >&2
python3 "$REPO/scripts/gen-events.py" -n "$N" --seed 7 >"$work/events.jsonl"
python3 "$REPO/scripts/gen-events.py" -n "$FILE_N" --seed 8 >"$work/file-events.jsonl"
KEY="$("$SQS" create-key)"
QUEUE="$("$SQS" create-queue)"

# Which store: Postgres when the binary can migrate it, SQLite otherwise.
STORE=postgres
SQS_DB="$(new_pg_db bench_sqs)"
if ! "$BIN" --database-url "$SQS_DB" --kms-key-id "$KEY" migrate >/dev/null 2>"$work/migrate.err"; then
    echo "!! the Postgres store does not work yet ($(tail -n 1 "$work/migrate.err")): using SQLite for (a), skipping (b)" >&2
    STORE=sqlite
    SQS_DB="sqlite:$work/bench_sqs.db"
fi

# ------------------------------------------------------------------ (a)
echo "== (a) SQS -> $STORE, concurrency $C" >&2
"$SQS" load --queue-url "$QUEUE" --file "$work/events.jsonl"
t0="$(now)"
timeout "$STEP_TIMEOUT" "$SQS" drain --queue-url "$QUEUE" --concurrency "$C" >"$work/drain.out"
t1="$(now)"
drained="$(awk '{ print $2 }' "$work/drain.out")"
[ "$drained" = "$N" ] || echo "!! the baseline drained $drained of $N messages" >&2

"$SQS" load --queue-url "$QUEUE" --file "$work/events.jsonl"
t2="$(now)"
run_measured worker "$BIN" --database-url "$SQS_DB" --kms-key-id "$KEY" \
    run --queue-url "$QUEUE" --until-empty --concurrency "$C" --no-progress
t3="$(now)"
worker_rss_kb="$PEAK_RSS_KB"
worker_summary="$(grep ' stored, ' "$work/worker.err" || true)"
left="$("$SQS" count --queue-url "$QUEUE")"
[ "$left" = "0 0" ] || echo "!! messages left in the queue after the worker (visible, in flight): $left" >&2

# ------------------------------------------------------------------ (b)
if [ "$STORE" = postgres ]; then
    echo "== (b) file -> Postgres" >&2
    FILE_DB="$(new_pg_db bench_file)"
    "$BIN" --database-url "$FILE_DB" --kms-key-id "$KEY" migrate >"$work/migrate.out" 2>&1 || {
        cat "$work/migrate.out" >&2
        exit 1
    }
    t4="$(now)"
    run_measured file "$BIN" --database-url "$FILE_DB" --kms-key-id "$KEY" \
        run --from-file "$work/file-events.jsonl" --no-progress
    t5="$(now)"
    file_summary="$(grep ' stored, ' "$work/file.err" || true)"
    file_rss_kb="$PEAK_RSS_KB"

    # The same load with the database's rotation fences switched off (the
    # statement triggers that check every insert names active keys and count
    # key usage): what the fences cost, per batch, in the same run.
    NOFENCE_DB="$(new_pg_db bench_nofence)"
    "$BIN" --database-url "$NOFENCE_DB" --kms-key-id "$KEY" migrate >"$work/migrate2.out" 2>&1 || {
        cat "$work/migrate2.out" >&2
        exit 1
    }
    psql "$NOFENCE_DB" -qX -v ON_ERROR_STOP=1 \
        -c "ALTER TABLE user_logins DISABLE TRIGGER user_logins_fence_insert" \
        -c "ALTER TABLE vault DISABLE TRIGGER vault_fence_insert" \
        -c "ALTER TABLE quarantine DISABLE TRIGGER quarantine_fence_insert"
    t10="$(now)"
    run_measured nofence "$BIN" --database-url "$NOFENCE_DB" --kms-key-id "$KEY" \
        run --from-file "$work/file-events.jsonl" --no-progress
    t11="$(now)"

    # What the network token (masked_ip_net) costs: the same load into
    # fresh databases with network tokens on and off (`migrate
    # --no-network-tokens`), in the order off, on, on, off so that a
    # machine warming up or slowing down favours neither; the times of each
    # setting are summed.
    net_s=(0 0)
    n=0
    for mode in off on on off; do
        n=$((n + 1))
        NET_DB="$(new_pg_db "bench_net_${mode}_$n")"
        flag=()
        [ "$mode" = off ] && flag=(--no-network-tokens)
        "$BIN" --database-url "$NET_DB" --kms-key-id "$KEY" migrate "${flag[@]}" \
            >"$work/migrate-net.out" 2>&1 || {
            cat "$work/migrate-net.out" >&2
            exit 1
        }
        ta="$(now)"
        run_measured "net-$mode" "$BIN" --database-url "$NET_DB" --kms-key-id "$KEY" \
            run --from-file "$work/file-events.jsonl" --no-progress
        tb="$(now)"
        i=0
        [ "$mode" = off ] && i=1
        net_s[i]="$(python3 -c "print(${net_s[i]} + $tb - $ta)")"
    done
    # Equivalent rows: the same columns with values of the same shapes (a
    # 37-character line id, 46-character tokens), made before the clock starts.
    python3 - "$work/file-events.jsonl" "$work/rows.csv" "$work/vault.csv" <<'EOF'
import base64, csv, datetime, hashlib, ipaddress, json, os, sys
today = datetime.date.today().isoformat()
def net(ip):
    a = ipaddress.ip_address(ip.strip().strip("[]"))
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    return str(ipaddress.ip_network(f"{a}/{24 if a.version == 4 else 48}", strict=False))
def tok(field, v):
    d = hashlib.sha256(f"{field}\0{v}".encode()).digest()
    return "t1_" + base64.urlsafe_b64encode(d).decode().rstrip("=")
with open(sys.argv[1]) as f, open(sys.argv[2], "w", newline="") as out, open(sys.argv[3], "w", newline="") as vout:
    w = csv.writer(out)
    vw = csv.writer(vout)
    for i, line in enumerate(f, 1):
        e = json.loads(line)
        mid = "line-" + hashlib.md5(f"{i}:{line}".encode()).hexdigest()
        w.writerow([
            mid, e["user_id"], e["device_type"],
            tok("ip", e["ip"]), tok("device_id", e["device_id"]), tok("ip-net", net(e["ip"])),
            e["locale"] if e["locale"] is not None else "", str(e["app_version"]), today,
        ])
        # A vault row: the sealed {"ip":...,"device_id":...} is its JSON length + 16.
        plain = len(json.dumps({"ip": e["ip"], "device_id": e["device_id"]}, separators=(",", ":")))
        vw.writerow([mid, e["user_id"], "dek-00000000-0000-4000-8000-000000000000",
                     "\\x" + os.urandom(12).hex(), "\\x" + os.urandom(plain + 16).hex()])
EOF
    RAW_DB="$(new_pg_db bench_raw)"
    psql "$RAW_DB" -qX -v ON_ERROR_STOP=1 >/dev/null <<'EOF'
CREATE TABLE user_logins (
    id               bigserial PRIMARY KEY,
    message_id       text NOT NULL UNIQUE,
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    masked_ip_net    text,
    locale           varchar(32),
    app_version      text,
    create_date      date
);
CREATE INDEX ON user_logins (user_id);
CREATE INDEX ON user_logins (masked_ip);
CREATE INDEX ON user_logins (masked_device_id);
EOF
    t6="$(now)"
    timeout "$STEP_TIMEOUT" psql "$RAW_DB" -qX -v ON_ERROR_STOP=1 -c "\\copy user_logins \
(message_id, user_id, device_type, masked_ip, masked_device_id, masked_ip_net, locale, app_version, create_date) \
FROM '$work/rows.csv' WITH (FORMAT csv)" >/dev/null
    t7="$(now)"
    copied="$(psql "$RAW_DB" -qXtA -c 'SELECT count(*) FROM user_logins')"

    # (2) Both tables pii-vault writes, in one transaction as its batches are.
    RAW2_DB="$(new_pg_db bench_raw2)"
    psql "$RAW2_DB" -qX -v ON_ERROR_STOP=1 >/dev/null <<'EOF'
CREATE TABLE user_logins (
    id               bigserial PRIMARY KEY,
    message_id       text NOT NULL UNIQUE,
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    masked_ip_net    text,
    locale           varchar(32),
    app_version      text,
    create_date      date
);
CREATE INDEX ON user_logins (user_id);
CREATE INDEX ON user_logins (masked_ip);
CREATE INDEX ON user_logins (masked_device_id);
CREATE TABLE vault (
    message_id text PRIMARY KEY,
    user_id    varchar(128) NOT NULL,
    key_id     text NOT NULL,
    nonce      bytea NOT NULL,
    ciphertext bytea NOT NULL
);
CREATE INDEX ON vault (user_id);
CREATE INDEX ON vault (key_id);
EOF
    t8="$(now)"
    timeout "$STEP_TIMEOUT" psql "$RAW2_DB" -qX -v ON_ERROR_STOP=1 >/dev/null <<EOF
BEGIN;
\copy user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, masked_ip_net, locale, app_version, create_date) FROM '$work/rows.csv' WITH (FORMAT csv)
\copy vault (message_id, user_id, key_id, nonce, ciphertext) FROM '$work/vault.csv' WITH (FORMAT csv)
COMMIT;
EOF
    t9="$(now)"
    copied2="$(psql "$RAW2_DB" -qXtA -c 'SELECT count(*) FROM vault')"

    # (3) The same, on two connections at once (each its half of the rows,
    # both tables, one transaction): the machine's ceiling for these rows,
    # as pii-vault's writers load on several connections.
    RAW3_DB="$(new_pg_db bench_raw3)"
    pg_dump --schema-only "$RAW2_DB" | psql "$RAW3_DB" -qX -v ON_ERROR_STOP=1 >/dev/null
    half=$(((FILE_N + 1) / 2))
    head -n "$half" "$work/rows.csv" >"$work/rows.1.csv"
    head -n "$half" "$work/vault.csv" >"$work/vault.1.csv"
    tail -n +"$((half + 1))" "$work/rows.csv" >"$work/rows.2.csv"
    tail -n +"$((half + 1))" "$work/vault.csv" >"$work/vault.2.csv"
    copies=()
    t14="$(now)"
    for part in 1 2; do
        printf '%s\n' "BEGIN;" \
            "\\copy user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, masked_ip_net, locale, app_version, create_date) FROM '$work/rows.$part.csv' WITH (FORMAT csv)" \
            "\\copy vault (message_id, user_id, key_id, nonce, ciphertext) FROM '$work/vault.$part.csv' WITH (FORMAT csv)" \
            "COMMIT;" |
            timeout "$STEP_TIMEOUT" psql "$RAW3_DB" -qX -v ON_ERROR_STOP=1 >/dev/null &
        copies+=($!)
    done
    # Only the two copies: LocalStack runs in the background of this shell.
    wait "${copies[@]}"
    t15="$(now)"
    copied3="$(psql "$RAW3_DB" -qXtA -c 'SELECT count(*) FROM vault')"
fi

# ------------------------------------------------------------------ report
line() { printf '    %-44s %s\n' "$1" "$2"; }
echo
echo "pii-vault end-to-end benchmark: $N events, concurrency $C, store $STORE, $(nproc) cores"
echo "(a) SQS (LocalStack) -> $STORE, KMS key on LocalStack"
line "drain only (receive + DeleteMessageBatch):" "$(rate "$drained" "$t0" "$t1")"
line "pii-vault run --queue-url --until-empty:" "$(rate "$N" "$t2" "$t3"), peak RSS $((worker_rss_kb / 1024)) MiB"
line "worker / drain:" "$(ratio "$(per_sec "$N" "$t2" "$t3")" "$(per_sec "$drained" "$t0" "$t1")")"
line "worker's summary:" "$worker_summary"
if [ "$STORE" = postgres ]; then
    echo "(b) file -> Postgres"
    line "pii-vault run --from-file ($FILE_N events):" "$(rate "$FILE_N" "$t4" "$t5"), peak RSS $((file_rss_kb / 1024)) MiB"
    line "same, database fences switched off:" "$(rate "$FILE_N" "$t10" "$t11")"
    line "with fences / without:" "$(ratio "$(per_sec "$FILE_N" "$t4" "$t5")" "$(per_sec "$FILE_N" "$t10" "$t11")")"
    line "network tokens on (2 loads, off-on-on-off):" "$(rate $((2 * FILE_N)) 0 "${net_s[0]}")"
    line "network tokens off (2 loads):" "$(rate $((2 * FILE_N)) 0 "${net_s[1]}")"
    line "with network tokens / without:" "$(ratio "$(per_sec $((2 * FILE_N)) 0 "${net_s[0]}")" "$(per_sec $((2 * FILE_N)) 0 "${net_s[1]}")")"
    line "psql \\copy, user_logins only ($copied rows):" "$(rate "$copied" "$t6" "$t7")"
    line "pii-vault / copy (user_logins only):" "$(ratio "$(per_sec "$FILE_N" "$t4" "$t5")" "$(per_sec "$copied" "$t6" "$t7")")"
    line "psql \\copy, user_logins + vault ($copied2):" "$(rate "$copied2" "$t8" "$t9")"
    line "pii-vault / copy (both tables):" "$(ratio "$(per_sec "$FILE_N" "$t4" "$t5")" "$(per_sec "$copied2" "$t8" "$t9")")"
    line "psql \\copy, both tables, 2 connections ($copied3):" "$(rate "$copied3" "$t14" "$t15")"
    line "pii-vault / copy (both tables, 2 conn.):" "$(ratio "$(per_sec "$FILE_N" "$t4" "$t5")" "$(per_sec "$copied3" "$t14" "$t15")")"
    line "worker's summary:" "$file_summary"
else
    echo "(b) skipped: the Postgres store does not work yet"
fi
