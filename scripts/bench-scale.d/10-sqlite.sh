# Part of scripts/bench-scale.sh (sourced, not run): the embedded default.
#
# Loads PII_VAULT_BENCH_SQLITE_ROWS [200000] generated events into a fresh
# SQLite file with `pii-vault run --from-file`, as a new user would (no
# flags beyond the input; the local key file). The baseline, in the same
# run: a plain Python loop (stdlib sqlite3, default connection settings)
# inserting the very rows pii-vault wrote, exported from its file before the
# clock starts, into a fresh file migrated by `pii-vault migrate` (same
# tables, indexes, triggers and persistent pragmas), 500 rows a transaction,
# one executemany per table per transaction. Reports both rates, the ratio
# and pii-vault's peak RSS.

SQLITE_ROWS="${PII_VAULT_BENCH_SQLITE_ROWS:-200000}"
sqlite_dir="$work/sqlite"
mkdir -p "$sqlite_dir"

echo "== (sqlite) generating $SQLITE_ROWS events" >&2
python3 "$REPO/scripts/gen-events.py" -n "$SQLITE_ROWS" --seed 13 >"$sqlite_dir/events.jsonl"

echo "== (sqlite) pii-vault run --from-file, $SQLITE_ROWS events" >&2
sqlite_t0="$(now)"
run_measured sqlite_load "$BIN" --database-url "sqlite:$sqlite_dir/pii-vault.db" \
    run --from-file "$sqlite_dir/events.jsonl" --no-progress
sqlite_t1="$(now)"
sqlite_rss_kb="$PEAK_RSS_KB"

echo "== (sqlite) baseline: plain Python loop, the same rows, 500 a transaction" >&2
"$BIN" --database-url "sqlite:$sqlite_dir/baseline.db" migrate >"$work/sqlite_migrate.out" 2>&1 || {
    cat "$work/sqlite_migrate.out" >&2
    return 1
}
# Prints "STORED INSERTED T0 T1": pii-vault's row count, the loop's, and
# the loop's clock (the same clock as `now`), read once the rows are in memory.
sqlite_base="$(python3 - "$sqlite_dir/pii-vault.db" "$sqlite_dir/baseline.db" <<'PY'
import sqlite3, sys, time

src = sqlite3.connect(sys.argv[1])
logins = src.execute(
    "SELECT message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version, "
    "create_date FROM user_logins ORDER BY id").fetchall()
vault = dict((r[0], r) for r in src.execute(
    "SELECT message_id, user_id, key_id, nonce, ciphertext FROM vault"))
keys = src.execute(
    "SELECT id, purpose, version, kek_id, wrapped, state, created_at, usage_count, created_by "
    "FROM vault_keys WHERE purpose = 'vault'").fetchall()
src.close()

dst = sqlite3.connect(sys.argv[2])
# The data keys the vault rows name, so the file is consistent (not timed).
dst.executemany("INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, "
                "usage_count, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", keys)
dst.commit()
chunks = []
for i in range(0, len(logins), 500):
    chunk = logins[i:i + 500]
    chunks.append((chunk, [vault[l[0]] for l in chunk if l[0] in vault]))
t0 = time.time()
for chunk, sealed in chunks:
    dst.executemany("INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, "
                    "masked_device_id, locale, app_version, create_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    chunk)
    dst.executemany("INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext) "
                    "VALUES (?, ?, ?, ?, ?)", sealed)
    dst.commit()
t1 = time.time()
n = dst.execute("SELECT count(*) FROM user_logins").fetchone()[0]
print(len(logins), n, f"{t0:.6f}", f"{t1:.6f}")
PY
)"
read -r sqlite_stored sqlite_copied sqlite_t2 sqlite_t3 <<<"$sqlite_base"
[ "$sqlite_stored" = "$SQLITE_ROWS" ] || echo "!! (sqlite) $sqlite_stored of $SQLITE_ROWS events stored" >&2
[ "$sqlite_copied" = "$sqlite_stored" ] || echo "!! (sqlite) the loop inserted $sqlite_copied of $sqlite_stored rows" >&2

section "embedded default: file -> SQLite ($SQLITE_ROWS events, local key)"
report "pii-vault run --from-file:" "$(rate "$SQLITE_ROWS" "$sqlite_t0" "$sqlite_t1"), peak RSS $((sqlite_rss_kb / 1024)) MiB"
report "plain Python loop, same rows, 500/transaction:" "$(rate "$sqlite_copied" "$sqlite_t2" "$sqlite_t3")"
report "pii-vault / plain loop:" "$(ratio "$(per_sec "$SQLITE_ROWS" "$sqlite_t0" "$sqlite_t1")" "$(per_sec "$sqlite_copied" "$sqlite_t2" "$sqlite_t3")")"
report "worker's summary:" "$(grep ' stored, ' "$work/sqlite_load.err" || true)"
rm -rf "$sqlite_dir"
