#!/usr/bin/env bash
# The project's test command: starts throwaway PostgreSQL and LocalStack
# (scripts/services.sh), runs every test with cargo-nextest, stops the
# services and exits with the tests' status.
#
# Usage: scripts/test.sh [NEXTEST_ARGS...]
#     scripts/test.sh                      # everything
#     scripts/test.sh -E 'test(/^aws::/)'  # one group (a module of tests/it/)
#     scripts/test.sh -E 'test(sqs_)'      # tests whose names match
#
# Needs cargo-nextest (cargo install cargo-nextest --locked), and what
# scripts/services.sh needs: the PostgreSQL server binaries, python3, openssl.
# A missing one is named in one line, before anything starts.
#
# Tests that need a service fail without it (they skip only under an
# explicit PII_VAULT_SKIP_SERVICES=1, which this script clears). Limits: 5 minutes a test (unless
# .config/nextest.toml says otherwise), PII_VAULT_TEST_TIMEOUT seconds for
# each cargo run, build included [4500].
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The test runner, before any service starts (scripts/services.sh checks the
# rest: PostgreSQL, python3, openssl).
if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found: install Rust (https://rustup.rs), then cargo install cargo-nextest --locked" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test.sh: cargo-nextest not found: install it with cargo install cargo-nextest --locked" >&2
    exit 1
fi

# shellcheck source=scripts/services.sh
source scripts/services.sh
services_start # exports PII_VAULT_TEST_PG, AWS_ENDPOINT_URL, ...; stops them on exit
unset PII_VAULT_SKIP_SERVICES

limit="${PII_VAULT_TEST_TIMEOUT:-4500}"
work="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-test.XXXXXX")"
log="$work/output.log"
child=""

# On Ctrl-C or SIGTERM: stop the cargo run in hand (timeout passes the signal
# on to its process group), then exit, which stops the services.
# shellcheck disable=SC2317,SC2329 # called from the traps below
on_signal() {
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'services_stop; rm -rf "$work"' EXIT

# Runs a command bounded in time, its output shown and kept in $log. In the
# background with `wait`, so that a signal is handled at once; the output
# goes through a FIFO to tee, so that both are children of this shell.
run_step() {
    local rc=0 fifo="$work/fifo" tee_pid
    rm -f "$fifo"
    mkfifo "$fifo"
    tee -a "$log" <"$fifo" &
    tee_pid=$!
    timeout --kill-after=30 "$limit" "$@" >"$fifo" 2>&1 &
    child=$!
    wait "$child" || rc=$?
    child=""
    wait "$tee_pid" || true
    return "$rc"
}

# Whether any doc comment under src/ opens a Rust code block (a doc test);
# ```text and the like are not tests.
has_doc_tests() {
    find src -name '*.rs' -exec awk '
        FNR == 1 { open = 0 }
        /^[[:space:]]*\/\/[\/!][[:space:]]*```/ {
            info = $0
            sub(/^[[:space:]]*\/\/[\/!][[:space:]]*```[[:space:]]*/, "", info)
            if (!open) {
                open = 1
                if (info == "" || info ~ /^(rust|should_panic|no_run|compile_fail|edition)/) found = 1
            } else {
                open = 0
            }
        }
        END { exit found ? 0 : 1 }' {} +
}

# Every target, unless the arguments choose some.
targets=(--all-targets)
for arg in "$@"; do
    case "$arg" in
    --lib | --bin | --bin=* | --bins | --test | --test=* | --tests | --example | --example=* | --examples | \
        --bench | --bench=* | --benches | --all-targets)
        targets=()
        ;;
    esac
done

status=0

# Doc tests first (nextest does not run them), only for a full run and only
# when some exist, so that the last test summary printed is nextest's.
if [ $# -eq 0 ] && has_doc_tests; then
    run_step cargo test --doc || status=$?
fi

# A hung test is stopped after 5 minutes instead of eating the whole
# budget. As a tool config, .config/nextest.toml (if any) overrides it.
printf '[profile.default]\nslow-timeout = { period = "60s", terminate-after = 5 }\n' >"$work/nextest.toml"
run_step cargo nextest run --tool-config-file "pii-vault-test:$work/nextest.toml" \
    "${targets[@]}" --no-fail-fast "$@" || status=$?

services_stop

# Repeat the runner's closing line, so that it stays the last word.
summary="$(grep -E '^\s*Summary \[|^test result:' "$log" | tail -n 1 || true)"
if [ -n "$summary" ]; then
    echo "$summary"
fi
exit "$status"
