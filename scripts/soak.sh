#!/usr/bin/env bash
# Soak benchmark of the SQS worker (a benchmark, not a test).
#
# Usage: scripts/soak.sh [options] [MINUTES]
#     MINUTES              how long the producer sends [30]
#     --rate N             messages a second sent to SQS [500]
#     --rotate-every M     a rotation every M minutes, data-keys and token-key
#                          in turn; 0: none [3]
#     --restart-every M    a Postgres restart (pg_ctl restart -m fast), 30 s
#                          into every M-th minute; 0: none [10]
#     --warmup M           minutes of warm-up for the RSS verdict [3]
#     --rss-limit PCT      most RSS growth after warm-up that passes [10]
#     -h, --help           this text
# The same settings from the environment: PII_VAULT_SOAK_RATE,
# PII_VAULT_SOAK_ROTATE_EVERY, PII_VAULT_SOAK_RESTART_EVERY,
# PII_VAULT_SOAK_WARMUP, PII_VAULT_SOAK_RSS_LIMIT; also
# PII_VAULT_SOAK_MALFORMED_PCT (share of malformed events [1]),
# PII_VAULT_SOAK_CONCURRENCY (the worker's receive loops [4]) and
# PII_VAULT_SOAK_KEEP=1 (keep the work directory and its logs).
#
# Starts its own PostgreSQL (fsync, synchronous_commit and full_page_writes
# on, as production runs) and LocalStack (SQS + KMS) through
# scripts/services.sh, so that restarting Postgres disturbs nobody else, and
# builds with `cargo build --release`. Then:
# - migrates a database as its owner with a LocalStack KMS key, and makes a
#   worker login (pii_vault_worker) and a rotator login (pii_vault_rotator);
# - runs one worker, `pii-vault run --queue-url ... --metrics-addr ...`, as
#   the worker login, for the whole soak;
# - sends MINUTES x 60 x rate generated events (1% malformed) at a steady
#   rate, recording the SQS message id of every one it sent;
# - runs `pii-vault rotate data-keys` / `rotate token-key` as the rotator
#   every few minutes, and restarts Postgres every ten, under load; a
#   rotation that fails (e.g. cut by the restart) is run again, as the
#   README tells operators;
# - prints one line a minute (scripts/soak.d/drive.py): messages sent;
#   logins stored, duplicates and quarantined that minute (the worker's
#   /metrics counters); messages completed a second; p50 and p99 batch
#   latency of that minute, interpolated linearly inside the buckets of
#   pii_vault_batch_seconds (5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5,
#   10 s), so only as fine as the bucket; the worker's largest RSS sample
#   (VmRSS every 5 s); the queue's backlog (visible + in flight); database
#   retries and WARN lines the worker logged; what happened that minute;
# - stops sending, waits for the queue to drain, stops the worker with
#   SIGTERM, and checks exactly-once against the producer's record: every
#   valid event sent is in user_logins exactly once (and has its vault row),
#   nothing else is, every malformed one is in quarantine, the queue is
#   empty (visible and in flight), the worker exited 0.
# - RSS verdict: the largest RSS sample of the last half of the minutes
#   against the largest of the warm-up minutes; PASS below the limit.
#
# Exit status: 0 when both verdicts pass, 1 when exactly-once fails (or
# the run breaks), 3 when only the RSS verdict fails, 2 on bad usage.
# Figures are only as steady as the machine: on a shared machine, other
# load shows in the latencies.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

MINUTES=30
RATE="${PII_VAULT_SOAK_RATE:-500}"
ROTATE_EVERY="${PII_VAULT_SOAK_ROTATE_EVERY:-3}"
RESTART_EVERY="${PII_VAULT_SOAK_RESTART_EVERY:-10}"
WARMUP="${PII_VAULT_SOAK_WARMUP:-3}"
RSS_LIMIT="${PII_VAULT_SOAK_RSS_LIMIT:-10}"
MALFORMED_PCT="${PII_VAULT_SOAK_MALFORMED_PCT:-1}"
CONCURRENCY="${PII_VAULT_SOAK_CONCURRENCY:-4}"
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --rate) RATE="${2:-}"; shift 2 ;;
    --rotate-every) ROTATE_EVERY="${2:-}"; shift 2 ;;
    --restart-every) RESTART_EVERY="${2:-}"; shift 2 ;;
    --warmup) WARMUP="${2:-}"; shift 2 ;;
    --rss-limit) RSS_LIMIT="${2:-}"; shift 2 ;;
    -*) usage >&2; exit 2 ;;
    *) MINUTES="$1"; shift ;;
    esac
done
for v in MINUTES RATE ROTATE_EVERY RESTART_EVERY WARMUP CONCURRENCY; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "soak: $v must be a whole number, not '${!v}'" >&2
        usage >&2
        exit 2
    fi
done
if [ "$MINUTES" -lt 1 ] || [ "$RATE" -lt 1 ] || [ "$CONCURRENCY" -lt 1 ]; then
    usage >&2
    exit 2
fi

echo "== building (release)" >&2
cargo build --release --bin pii-vault --example sqs_drain >&2
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/pii-vault"
SQS="${CARGO_TARGET_DIR:-$REPO/target}/release/examples/sqs_drain"
PY="$REPO/.cache/localstack/bin/python" # has boto3; made by services.sh

export PII_VAULT_PG_FSYNC=on # durable commits, as in production
export PII_VAULT_SERVICES="pg aws"
# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start
work="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-soak.XXXXXX")"
WORKER_PID=""
DRIVE_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$DRIVE_PID" ] && kill -0 "$DRIVE_PID" 2>/dev/null; then
        # Its own process group: the producer and any rotation it started.
        kill -TERM -- "-$DRIVE_PID" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$DRIVE_PID" 2>/dev/null || true
    fi
    if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    services_stop
    if [ "${PII_VAULT_SOAK_KEEP:-}" = 1 ]; then
        echo "soak: logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cd "$work"
export PII_VAULT_ACTOR=soak
export PII_VAULT_LOG="${PII_VAULT_LOG:-info}"

# ------------------------------------------------------------------ set-up
N=$((RATE * MINUTES * 60))
echo "== generating $N events ($MALFORMED_PCT% malformed)" >&2
python3 "$REPO/scripts/gen-events.py" -n "$N" --seed 20 --malformed-pct "$MALFORMED_PCT" \
    --manifest "$work/gen-manifest.json" >"$work/events.jsonl"
KEY="$("$SQS" create-key)"
QUEUE="$("$SQS" create-queue --prefix pii-vault-soak)"

psql "$PII_VAULT_TEST_PG" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE soak" >/dev/null
OWNER_URL="${PII_VAULT_TEST_PG%/*}/soak"
"$BIN" --database-url "$OWNER_URL" --kms-key-id "$KEY" migrate >"$work/migrate.out" 2>&1 || {
    cat "$work/migrate.out" >&2
    exit 1
}
psql "$OWNER_URL" -qX -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE ROLE soak_worker LOGIN;
GRANT pii_vault_worker TO soak_worker;
CREATE ROLE soak_rotator LOGIN;
GRANT pii_vault_rotator TO soak_rotator;
SQL
WORKER_URL="${OWNER_URL/postgres@/soak_worker@}"
ROTATOR_URL="${OWNER_URL/postgres@/soak_rotator@}"
METRICS_PORT="$(_svc_free_port)"

echo "== worker: pii-vault run --queue-url ... (as soak_worker, concurrency $CONCURRENCY)" >&2
"$BIN" --database-url "$WORKER_URL" --kms-key-id "$KEY" run --queue-url "$QUEUE" \
    --concurrency "$CONCURRENCY" --metrics-addr "127.0.0.1:$METRICS_PORT" --no-progress \
    </dev/null >"$work/worker.out" 2>"$work/worker.err" &
WORKER_PID=$!
for i in $(seq 1 120); do
    if _svc_http_ok "http://127.0.0.1:$METRICS_PORT/readyz"; then break; fi
    if ! kill -0 "$WORKER_PID" 2>/dev/null || [ "$i" = 120 ]; then
        echo "!! the worker did not become ready; its log:" >&2
        tail -n 30 "$work/worker.err" >&2
        exit 1
    fi
    sleep 0.5
done

pg_version="$(psql "$OWNER_URL" -qXtA -c 'SHOW server_version')"
pg_durability="$(psql "$OWNER_URL" -qXtA -F ' ' -c "SELECT current_setting('fsync'), current_setting('synchronous_commit'), current_setting('full_page_writes')")"
echo
echo "pii-vault soak: $MINUTES min at $RATE msg/s ($N events, $MALFORMED_PCT% malformed), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "PostgreSQL $pg_version (fsync, synchronous_commit, full_page_writes: $pg_durability), LocalStack SQS + KMS; worker concurrency $CONCURRENCY"
echo "rotation every $ROTATE_EVERY min (data-keys, token-key in turn; 0 = none), Postgres restart every $RESTART_EVERY min at :30 (0 = none)"
echo "columns: logins stored, duplicates, quarantined that minute; msg/s completed (acked); p50/p99 batch latency interpolated in histogram buckets; largest RSS sample; queue backlog at the minute's end; database retries; worker WARN lines"
echo

# ------------------------------------------------------------------ soak
setsid "$PY" "$REPO/scripts/soak.d/drive.py" \
    --queue-url "$QUEUE" --events "$work/events.jsonl" --manifest "$work/gen-manifest.json" \
    --rate "$RATE" --minutes "$MINUTES" --rotate-every "$ROTATE_EVERY" --restart-every "$RESTART_EVERY" \
    --warmup "$WARMUP" --rss-limit-pct "$RSS_LIMIT" \
    --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" --worker-pid "$WORKER_PID" \
    --worker-log "$work/worker.err" --bin "$BIN" --rotator-url "$ROTATOR_URL" --kms-key-id "$KEY" \
    --pg-ctl "$PII_VAULT_TEST_PG_CTL" --out "$work" 2>"$work/drive.err" &
DRIVE_PID=$!
drive_rc=0
wait "$DRIVE_PID" || drive_rc=$?
DRIVE_PID=""
if [ "$drive_rc" != 0 ]; then
    echo "!! the soak driver failed ($drive_rc):" >&2
    tail -n 30 "$work/drive.err" >&2
    exit 1
fi

# ------------------------------------------------------------------ check
kill -TERM "$WORKER_PID"
worker_rc=0
wait "$WORKER_PID" || worker_rc=$?
WORKER_PID=""
worker_summary="$(grep ' stored, ' "$work/worker.err" | tail -n 1 || true)"
queue_left="$("$SQS" count --queue-url "$QUEUE")"

psql "$OWNER_URL" -qX -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE soak_sent (message_id text, line bigint, kind text)" \
    -c "\\copy soak_sent FROM '$work/sent.tsv'" >/dev/null
read -r sent_valid sent_malformed sent_distinct logins logins_distinct missing unexpected \
    vault_rows without_vault quarantined malformed_missing quarantine_unexpected < <(
    psql "$OWNER_URL" -qXtA -F ' ' -v ON_ERROR_STOP=1 -c "
SELECT (SELECT count(*) FROM soak_sent WHERE kind = ''),
       (SELECT count(*) FROM soak_sent WHERE kind <> ''),
       (SELECT count(DISTINCT message_id) FROM soak_sent),
       (SELECT count(*) FROM user_logins),
       (SELECT count(DISTINCT message_id) FROM user_logins),
       (SELECT count(*) FROM soak_sent s WHERE kind = ''
            AND NOT EXISTS (SELECT 1 FROM user_logins u WHERE u.message_id = s.message_id)),
       (SELECT count(*) FROM user_logins u
            WHERE NOT EXISTS (SELECT 1 FROM soak_sent s WHERE s.kind = '' AND s.message_id = u.message_id)),
       (SELECT count(*) FROM vault),
       (SELECT count(*) FROM user_logins u
            WHERE NOT EXISTS (SELECT 1 FROM vault v WHERE v.message_id = u.message_id)),
       (SELECT count(*) FROM quarantine),
       (SELECT count(*) FROM soak_sent s WHERE kind <> ''
            AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.message_id = s.message_id)),
       (SELECT count(*) FROM quarantine q
            WHERE NOT EXISTS (SELECT 1 FROM soak_sent s WHERE s.kind <> '' AND s.message_id = q.message_id))")

fail=0
check() { # check LABEL OK(0|1) DETAIL
    printf '    %-58s %s  %s\n' "$1" "$([ "$2" = 1 ] && echo ok || echo FAIL)" "$3"
    [ "$2" = 1 ] || fail=1
}
is() { [ "$1" = "$2" ] && echo 1 || echo 0; }
sent_total=$((sent_valid + sent_malformed))
echo
echo "exactly-once check (against the producer's record of $sent_total message ids)"
check "message ids sent are distinct" "$(is "$sent_distinct" "$sent_total")" "$sent_distinct of $sent_total"
check "every valid event sent is in user_logins" "$(is "$missing" 0)" "$((sent_valid - missing)) of $sent_valid ($missing missing)"
check "user_logins holds each once, and nothing else" \
    "$([ "$logins" = "$logins_distinct" ] && [ "$logins" = "$sent_valid" ] && [ "$unexpected" = 0 ] && echo 1 || echo 0)" \
    "$logins rows, $logins_distinct distinct message ids, $unexpected not sent as valid"
check "every login has its vault row" "$([ "$without_vault" = 0 ] && [ "$vault_rows" = "$logins" ] && echo 1 || echo 0)" \
    "$vault_rows vault rows, $without_vault logins without one"
check "every malformed event sent is in quarantine, nothing else" \
    "$([ "$malformed_missing" = 0 ] && [ "$quarantine_unexpected" = 0 ] && echo 1 || echo 0)" \
    "$quarantined quarantined of $sent_malformed malformed ($malformed_missing missing, $quarantine_unexpected unexpected)"
check "queue empty (visible, in flight)" "$(is "$queue_left" "0 0")" "$queue_left"
check "worker exited 0 on SIGTERM" "$(is "$worker_rc" 0)" "exit $worker_rc: ${worker_summary#pii-vault: }"
errors="$(grep -c '\bERROR\b' "$work/worker.err" || true)"
warns="$(grep -c '\bWARN\b' "$work/worker.err" || true)"
echo "    worker log: $warns WARN, $errors ERROR lines; by message:"
grep -E '\b(WARN|ERROR)\b' "$work/worker.err" | sed -E 's/^[^ ]+ +//; s/ (error|attempt|messages|batch)=.*//' |
    sort | uniq -c | sort -rn | head -n 8 | sed 's/^/      /' || true
if [ "$fail" = 0 ]; then
    echo "exactly-once: PASS"
else
    echo "exactly-once: FAIL"
    exit 1
fi
rss_pass="$(python3 -c 'import json, sys; print(int(json.load(open(sys.argv[1])).get("rss_pass", True)))' "$work/summary.json")"
[ "$rss_pass" = 1 ] || exit 3
