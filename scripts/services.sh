#!/usr/bin/env bash
# Throwaway services for tests and benchmarks: a PostgreSQL cluster and
# LocalStack (SQS + KMS), both on free loopback ports, no Docker needed.
#
# Usage, from a script (services stop when the script exits):
#     source scripts/services.sh
#     services_start            # exports the variables below; traps EXIT
#     ...
#     services_stop             # optional: also runs on exit
#
# Usage, by hand (services keep running until you stop them):
#     eval "$(scripts/services.sh start)"   # start, and export the variables
#     scripts/services.sh env               # print the exports again
#     scripts/services.sh status
#     scripts/services.sh stop
#
# Exported:
#     PII_VAULT_TEST_PG        postgres://postgres@127.0.0.1:PORT/postgres (trust auth)
#     PII_VAULT_TEST_PG_DATA   the cluster's data directory
#     PII_VAULT_TEST_PG_CTL    a pg_ctl command line for that cluster, run as the
#                              postgres user; append `stop -m immediate` or `start`
#     PII_VAULT_TEST_PG_CA     the PEM certificate of the throwaway CA that signed the
#                              cluster's server certificate (SAN DNS:localhost only)
#     PII_VAULT_PG_BIN_DIR     the directory of the PostgreSQL binaries in use (initdb,
#                              pg_ctl, pg_dump), found as described below
#     AWS_ENDPOINT_URL         http://127.0.0.1:PORT (LocalStack)
#     AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
#     PII_VAULT_TEST_AWS=1
#
# Settings (environment):
#     PII_VAULT_SERVICES      which to start: "pg aws" (default), "pg" or "aws"
#     PII_VAULT_PG_BIN        directory of the PostgreSQL server binaries [found]
#     PII_VAULT_PG_FSYNC      fsync of the test cluster [off]; the benchmark sets on
#     PII_VAULT_PG_SHARED_BUFFERS  shared_buffers of the test cluster [256MB]
#     PII_VAULT_PG_MAX_WAL_SIZE    max_wal_size of the test cluster [1GB, Postgres's
#                                  default]; the benchmark sets 8GB
#     PII_VAULT_PG_CHECKPOINT_TIMEOUT  checkpoint_timeout of the test cluster
#                                  [5min, Postgres's default]
#
# The PostgreSQL server binaries (initdb and pg_ctl) are the first found of:
# PII_VAULT_PG_BIN; `pg_config --bindir`; the directory of `initdb` on PATH;
# the newest /usr/lib/postgresql/*/bin (Debian, Ubuntu); /usr/bin and the
# newest /usr/pgsql-*/bin (Fedora, PGDG packages).
#
# Needs python3 and openssl too (and python3's venv module to install
# LocalStack); a missing tool is named in one line, with how to get it.
#
# LocalStack runs from a project-local virtualenv, .cache/localstack, that is
# created on first use (about 2 minutes). See DEVELOPERS.md.

# No `set -euo pipefail` at file level: this file is also sourced into
# interactive shells. Every function below is written to be safe under it.

SERVICES_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The PostgreSQL binaries in use; set by services_find_pg_bin.
SERVICES_PG_BIN=""
SERVICES_LS_VENV="$SERVICES_REPO_ROOT/.cache/localstack"
SERVICES_LS_VERSION="4.9.2"
# The state of services started by hand (`scripts/services.sh start`).
SERVICES_CURRENT="$SERVICES_REPO_ROOT/.cache/services.current"

_svc_log() { echo "services: $*" >&2; }

# Whether DIR holds the PostgreSQL server binaries this script runs.
_svc_is_pg_bin() {
    [ -n "$1" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ]
}

# Finds the PostgreSQL server binaries (see the top of this file), sets
# SERVICES_PG_BIN and prints nothing; or names what is missing in one line
# and returns 1.
services_find_pg_bin() {
    local dir initdb real
    SERVICES_PG_BIN=""
    if [ -n "${PII_VAULT_PG_BIN:-}" ]; then
        if _svc_is_pg_bin "$PII_VAULT_PG_BIN"; then
            SERVICES_PG_BIN="$PII_VAULT_PG_BIN"
            return 0
        fi
        _svc_log "PII_VAULT_PG_BIN=$PII_VAULT_PG_BIN does not hold initdb and pg_ctl: point it at the bin directory of a PostgreSQL server installation, or unset it to search the usual places"
        return 1
    fi
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if _svc_is_pg_bin "$dir"; then
            SERVICES_PG_BIN="$dir"
            return 0
        fi
    fi
    if initdb="$(command -v initdb 2>/dev/null)" && [ -n "$initdb" ]; then
        # A symlink's target directory first: it also holds pg_dump.
        real="$(readlink -f "$initdb" 2>/dev/null || true)"
        for dir in "${real%/*}" "${initdb%/*}"; do
            if _svc_is_pg_bin "$dir"; then
                SERVICES_PG_BIN="$dir"
                return 0
            fi
        done
    fi
    # Newest version first: sort -V orders 9.6 < 10 < 15 < 16.
    while IFS= read -r dir; do
        if _svc_is_pg_bin "$dir"; then
            SERVICES_PG_BIN="$dir"
            return 0
        fi
    done < <(
        printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV
        echo /usr/bin
        printf '%s\n' /usr/pgsql-*/bin | sort -rV
    )
    _svc_log "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql (Debian/Ubuntu: apt-get install postgresql; Fedora: dnf install postgresql-server) or set PII_VAULT_PG_BIN"
    return 1
}

# Whether the commands the chosen services need are installed; names the
# first one missing, in one line.
_svc_check_tools() {
    local want="$1"
    if ! command -v python3 >/dev/null 2>&1; then
        _svc_log "python3 not found (needed to run LocalStack and to pick free ports): install Python 3 (Debian/Ubuntu: apt-get install python3 python3-venv; Fedora: dnf install python3)"
        return 1
    fi
    case " $want " in *" pg "*)
        if ! command -v openssl >/dev/null 2>&1; then
            _svc_log "openssl not found (needed for the test cluster's TLS certificates): install openssl (Debian/Ubuntu: apt-get install openssl; Fedora: dnf install openssl)"
            return 1
        fi
        ;;
    esac
}

# A free TCP port on 127.0.0.1 (the kernel picks it; tiny race, fine for tests).
_svc_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether URL answers 200 within 2 seconds.
_svc_http_ok() {
    python3 - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

# Runs a command as the postgres user when we are root (PostgreSQL refuses
# to run as root), as ourselves otherwise.
_svc_as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# ---------------------------------------------------------------- LocalStack

# Creates .cache/localstack if it is missing or holds another version.
services_install_localstack() {
    mkdir -p "$SERVICES_REPO_ROOT/.cache"
    (
        # One installer at a time (a test run and a benchmark may race).
        flock -w 900 9 || { _svc_log "timed out waiting for another LocalStack install"; exit 1; }
        if "$SERVICES_LS_VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('localstack-core') != '$SERVICES_LS_VERSION')" >/dev/null 2>&1; then
            exit 0
        fi
        if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
            _svc_log "python3 cannot make a virtualenv (needed for LocalStack): install its venv module (Debian/Ubuntu: apt-get install python3-venv; Fedora: dnf install python3)"
            exit 1
        fi
        _svc_log "installing LocalStack $SERVICES_LS_VERSION into .cache/localstack (about 2 minutes)"
        if ! {
            python3 -m venv "$SERVICES_LS_VENV" &&
                "$SERVICES_LS_VENV/bin/pip" install --quiet \
                    "localstack-core[runtime]==$SERVICES_LS_VERSION" "cryptography==43.0.3" \
                    "pyOpenSSL<24.3" "service_identity==24.1.0" "cbor2<5.7"
        } >"$SERVICES_REPO_ROOT/.cache/ls-install.log" 2>&1; then
            _svc_log "LocalStack install failed; its log:"
            tail -n 50 "$SERVICES_REPO_ROOT/.cache/ls-install.log" >&2
            exit 1
        fi
    ) 9>"$SERVICES_REPO_ROOT/.cache/localstack.lock"
}

# Starts LocalStack in its own session (so its whole process group can be
# stopped) without waiting for it; _svc_wait_localstack waits.
_svc_start_localstack() {
    local dir="$1" port
    port="$(_svc_free_port)"
    mkdir -p "$dir/volume"
    echo "$port" >"$dir/ls.port"
    # setsid: a new session and process group whose id is the pid written
    # to ls.pid, so that stopping kills every process LocalStack started.
    # DNS_ADDRESS=0: no DNS server (it would bind port 53 on every interface).
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
    GATEWAY_LISTEN="127.0.0.1:$port" \
        LOCALSTACK_HOST="127.0.0.1:$port" \
        SERVICES=sqs,kms \
        SQS_ENDPOINT_STRATEGY=off \
        LOCALSTACK_VOLUME_DIR="$dir/volume" \
        SKIP_SSL_CERT_DOWNLOAD=1 \
        DISABLE_EVENTS=1 \
        DNS_ADDRESS=0 \
        setsid bash -c 'echo $$ >"$1/ls.pid"; shift; exec "$@"' _ "$dir" \
        "$SERVICES_LS_VENV/bin/python" -m localstack.runtime.main \
        </dev/null >"$dir/localstack.log" 2>&1 &
}

_svc_wait_localstack() {
    local dir="$1" port i
    port="$(cat "$dir/ls.port")"
    for i in $(seq 1 180); do # 180 x 0.5 s = 90 s at most
        if _svc_http_ok "http://127.0.0.1:$port/_localstack/health"; then
            export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
            export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
            export PII_VAULT_TEST_AWS=1
            _svc_log "LocalStack (SQS, KMS) on $AWS_ENDPOINT_URL after ${i}x0.5s"
            return 0
        fi
        if [ -f "$dir/ls.pid" ] && ! kill -0 "$(cat "$dir/ls.pid")" 2>/dev/null; then
            break # it died
        fi
        sleep 0.5
    done
    _svc_log "LocalStack did not come up; its log:"
    tail -n 80 "$dir/localstack.log" >&2
    return 1
}

_svc_stop_localstack() {
    local dir="$1" pgid i
    [ -f "$dir/ls.pid" ] || return 0
    pgid="$(cat "$dir/ls.pid")"
    [ -n "$pgid" ] || return 0
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for i in $(seq 1 50); do # up to 10 s for a clean exit
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

# ---------------------------------------------------------------- PostgreSQL

# A throwaway CA and a server certificate signed by it, in DIR/tls, for the
# test cluster's `ssl = on`. The server certificate names DNS:localhost only
# (not 127.0.0.1), so that verify-full succeeds against host localhost and
# fails against 127.0.0.1. The CA's key is deleted once it has signed: nothing
# else can ever be signed by it. The server's files belong to the postgres
# user, its key with mode 0600, as PostgreSQL demands.
_svc_make_tls() {
    local dir="$1" tls="$1/tls" serial
    mkdir -m 700 "$tls"
    serial="0x$(openssl rand -hex 16)" || return 1
    if ! (
        umask 077
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -subj "/CN=pii-vault test CA" -keyout "$tls/ca.key" -out "$tls/ca.crt" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" &&
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                -subj "/CN=localhost" -keyout "$tls/server.key" -out "$tls/server.csr" &&
            printf '%s\n' "subjectAltName=DNS:localhost" "basicConstraints=critical,CA:FALSE" \
                "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$tls/server.ext" &&
            openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
                -set_serial "$serial" -days 2 -extfile "$tls/server.ext" -out "$tls/server.crt"
    ) >"$dir/openssl.log" 2>&1; then
        _svc_log "cannot make the test certificates:"
        cat "$dir/openssl.log" >&2
        return 1
    fi
    rm -f "$tls/ca.key" "$tls/server.csr" "$tls/server.ext"
    chmod 644 "$tls/ca.crt" "$tls/server.crt"
    chmod 600 "$tls/server.key"
    if [ "$(id -u)" = 0 ]; then
        chown -R postgres: "$tls"
    fi
}

_svc_start_pg() {
    local dir="$1" avoid="${2:-}" port data i version
    for i in 1 2 3 4 5; do # not the port just handed to LocalStack
        port="$(_svc_free_port)"
        [ "$port" != "$avoid" ] && break
    done
    data="$dir/data"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    chmod 700 "$dir"
    _svc_as_pg "$SERVICES_PG_BIN/initdb" -D "$data" -U postgres --auth=trust \
        --encoding=UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1 || {
        _svc_log "initdb failed:"
        cat "$dir/initdb.log" >&2
        return 1
    }
    _svc_make_tls "$dir" || return 1
    # Settings live in the cluster, so that PII_VAULT_TEST_PG_CTL can
    # stop and start it again with nothing else to remember.
    _svc_as_pg tee -a "$data/postgresql.conf" >/dev/null <<EOF

# pii-vault test cluster
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
shared_buffers = ${PII_VAULT_PG_SHARED_BUFFERS:-256MB}
max_wal_size = ${PII_VAULT_PG_MAX_WAL_SIZE:-1GB}
checkpoint_timeout = ${PII_VAULT_PG_CHECKPOINT_TIMEOUT:-5min}
fsync = ${PII_VAULT_PG_FSYNC:-off}
synchronous_commit = ${PII_VAULT_PG_FSYNC:-off}
full_page_writes = ${PII_VAULT_PG_FSYNC:-off}
log_min_messages = warning
# TLS for the tests of sslmode; the host lines of pg_hba.conf (trust) still
# accept plain connections too.
ssl = on
ssl_cert_file = '$dir/tls/server.crt'
ssl_key_file = '$dir/tls/server.key'
EOF
    local ctl="$SERVICES_PG_BIN/pg_ctl -D $data -l $dir/postgres.log -w -t 60"
    if [ "$(id -u)" = 0 ]; then
        ctl="runuser -u postgres -- $ctl"
    fi
    # shellcheck disable=SC2086 # ctl is a word list by design
    $ctl start >/dev/null || {
        _svc_log "PostgreSQL did not start; its log:"
        tail -n 40 "$dir/postgres.log" >&2
        return 1
    }
    export PII_VAULT_TEST_PG="postgres://postgres@127.0.0.1:$port/postgres"
    export PII_VAULT_TEST_PG_DATA="$data"
    export PII_VAULT_TEST_PG_CTL="$ctl"
    export PII_VAULT_TEST_PG_CA="$dir/tls/ca.crt"
    export PII_VAULT_PG_BIN_DIR="$SERVICES_PG_BIN"
    # "pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> 15.18
    version="$("$SERVICES_PG_BIN/pg_ctl" --version 2>/dev/null | awk '{ print $3 }' || true)"
    _svc_log "PostgreSQL $version on 127.0.0.1:$port (data $data, binaries $SERVICES_PG_BIN)"
}

_svc_stop_pg() {
    local dir="$1"
    [ -f "$dir/data/postmaster.pid" ] || return 0
    if [ -z "$SERVICES_PG_BIN" ]; then
        services_find_pg_bin 2>/dev/null || return 0
    fi
    _svc_as_pg "$SERVICES_PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- both

# Starts the services and exports their variables. In the calling shell it
# also installs an EXIT trap that stops them, unless $1 is --keep.
services_start() {
    local keep="${1:-}" want="${PII_VAULT_SERVICES:-pg aws}"
    if [ -n "${SERVICES_PG_DIR:-}${SERVICES_LS_DIR:-}" ]; then
        _svc_log "already started in this shell"
        return 0
    fi
    # Everything needed is checked before anything starts.
    _svc_check_tools "$want" || return 1
    case " $want " in *" pg "*)
        services_find_pg_bin || return 1
        ;;
    esac
    if [ "$keep" != --keep ]; then
        trap services_stop EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    case " $want " in *" aws "*)
        services_install_localstack || return 1
        SERVICES_LS_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-localstack.XXXXXX")"
        _svc_start_localstack "$SERVICES_LS_DIR"
        ;;
    esac
    case " $want " in *" pg "*)
        SERVICES_PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pii-vault-pg.XXXXXX")"
        local ls_port=""
        if [ -n "${SERVICES_LS_DIR:-}" ]; then ls_port="$(cat "$SERVICES_LS_DIR/ls.port")"; fi
        _svc_start_pg "$SERVICES_PG_DIR" "$ls_port" || { services_stop; return 1; }
        ;;
    esac
    if [ -n "${SERVICES_LS_DIR:-}" ]; then
        _svc_wait_localstack "$SERVICES_LS_DIR" || { services_stop; return 1; }
    fi
}

# Stops whatever services_start started in this shell and removes its
# files. Safe to call twice.
services_stop() {
    if [ -n "${SERVICES_LS_DIR:-}" ]; then
        _svc_stop_localstack "$SERVICES_LS_DIR"
        rm -rf "$SERVICES_LS_DIR"
        _svc_log "LocalStack stopped"
    fi
    if [ -n "${SERVICES_PG_DIR:-}" ]; then
        _svc_stop_pg "$SERVICES_PG_DIR"
        rm -rf "$SERVICES_PG_DIR"
        _svc_log "PostgreSQL stopped"
    fi
    SERVICES_LS_DIR="" SERVICES_PG_DIR=""
    unset PII_VAULT_TEST_PG PII_VAULT_TEST_PG_DATA PII_VAULT_TEST_PG_CTL PII_VAULT_TEST_PG_CA PII_VAULT_PG_BIN_DIR \
        PII_VAULT_TEST_AWS AWS_ENDPOINT_URL
}

# The exports of the running services, as shell lines.
services_env() {
    local v
    for v in PII_VAULT_TEST_PG PII_VAULT_TEST_PG_DATA PII_VAULT_TEST_PG_CTL PII_VAULT_TEST_PG_CA PII_VAULT_PG_BIN_DIR \
        AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION PII_VAULT_TEST_AWS; do
        if [ -n "${!v:-}" ]; then
            printf 'export %s=%q\n' "$v" "${!v}"
        fi
    done
}

# ---------------------------------------------------------------- by hand

_svc_main() {
    set -euo pipefail
    case "${1:-}" in
    start)
        if [ -f "$SERVICES_CURRENT" ]; then
            _svc_log "already running (scripts/services.sh stop first); its variables:"
            cat "$SERVICES_CURRENT"
            return 0
        fi
        trap services_stop EXIT # undone below once everything is up
        services_start --keep
        mkdir -p "$(dirname "$SERVICES_CURRENT")" # absent when only PostgreSQL is wanted
        {
            services_env
            printf 'SERVICES_LS_DIR=%q\nSERVICES_PG_DIR=%q\n' "${SERVICES_LS_DIR:-}" "${SERVICES_PG_DIR:-}"
        } >"$SERVICES_CURRENT"
        trap - EXIT
        services_env
        ;;
    env)
        [ -f "$SERVICES_CURRENT" ] || { _svc_log "not running"; return 1; }
        grep '^export ' "$SERVICES_CURRENT"
        ;;
    status)
        [ -f "$SERVICES_CURRENT" ] || { _svc_log "not running"; return 1; }
        # shellcheck disable=SC1090
        source "$SERVICES_CURRENT"
        SERVICES_PG_BIN="${PII_VAULT_PG_BIN_DIR:-}"
        if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
            if _svc_http_ok "$AWS_ENDPOINT_URL/_localstack/health"; then
                _svc_log "LocalStack up at $AWS_ENDPOINT_URL"
            else
                _svc_log "LocalStack DOWN at $AWS_ENDPOINT_URL"
            fi
        fi
        if [ -n "${PII_VAULT_TEST_PG_DATA:-}" ]; then
            [ -n "$SERVICES_PG_BIN" ] || services_find_pg_bin || return 1
            if _svc_as_pg "$SERVICES_PG_BIN/pg_ctl" -D "$PII_VAULT_TEST_PG_DATA" status >/dev/null; then
                _svc_log "PostgreSQL up at $PII_VAULT_TEST_PG"
            else
                _svc_log "PostgreSQL DOWN at $PII_VAULT_TEST_PG"
            fi
        fi
        ;;
    stop)
        [ -f "$SERVICES_CURRENT" ] || { _svc_log "not running"; return 0; }
        # shellcheck disable=SC1090
        source "$SERVICES_CURRENT"
        SERVICES_PG_BIN="${PII_VAULT_PG_BIN_DIR:-}"
        services_stop
        rm -f "$SERVICES_CURRENT"
        ;;
    install)
        services_install_localstack
        ;;
    *)
        sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
        return 2
        ;;
    esac
}

# Run as a command (not sourced): dispatch.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    _svc_main "$@"
fi
