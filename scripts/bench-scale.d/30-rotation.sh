# Part of scripts/bench-scale.sh (sourced, not run): the two rotations that
# rewrite every row, beside their ceiling, measured in the same run. The
# rows are first spread over a year of monthly partitions (below), so the
# rotations rewrite the closed months and update this one in place.
#
#   pii-vault rotate data-keys --jobs J   and   rotate token-key --jobs J
#   on the loaded database PG_URL, against the ceiling: a copy of the same
#   rows in a scratch database with the same columns and indexes (no
#   triggers, no foreign keys), and J psql connections each running one
#   raw `UPDATE … FROM` over a disjoint key range of it (split at exact
#   quantiles), the new values prepared in a table before the clock starts.
#   Vault shape: new key id, nonce and ciphertext of the same sizes; logins
#   shape: new tokens of the same sizes. Before each timed step both
#   databases are settled: VACUUM ANALYZE of the two tables (the step before
#   left a million dead rows, which autovacuum would otherwise clean up
#   during whichever step came next, in either database), then CHECKPOINT.
#
# The machine's noise moves one step's time by a tenth either way, so the
# four steps run PII_VAULT_BENCH_ROUNDS [3] times in turn (ceiling, rotation,
# ceiling, rotation, ...), each round's figures are printed and the median
# of each rotation's ratio to its ceiling in the same round is the figure.
#
# J is PII_VAULT_BENCH_JOBS [2]. Leaves PG_URL's rows readable (rotated).
# Uses from the driver: REPO BIN work PG_URL PII_VAULT_TEST_PG year_of_days_sql
# now rate ratio per_sec run_measured new_raw_copy_db
# report section.

rot_jobs="${PII_VAULT_BENCH_JOBS:-2}"
rot_rounds="${PII_VAULT_BENCH_ROUNDS:-3}"
rot_sql() { psql "$1" -qXtA -v ON_ERROR_STOP=1 -c "$2"; }
# Settles both databases before a timed step (see the head of this file);
# rot_raw_url is set below, before the first call.
rot_settle() {
    local url
    for url in "$PG_URL" "$rot_raw_url"; do
        psql "$url" -qX -v ON_ERROR_STOP=1 -c "VACUUM ANALYZE user_logins" -c "VACUUM ANALYZE vault" >/dev/null
    done
    psql "$PII_VAULT_TEST_PG" -qX -c CHECKPOINT >/dev/null
}

# A year of logins: the loaded rows all carry today's date, so both tables
# are written again with their days spread over the past 365 days in load
# order (the same days 40-retention gives the vault), each month in its
# partition. Untimed. Most rows are then in closed months, which the
# rotations rewrite; this month's are rotated in place.
echo "== (rotation) dating the logins over the past 365 days (untimed)" >&2
{
    printf '%s\n' "$year_of_days_sql"
    cat <<'SQL'
CREATE TEMP TABLE logins_again AS SELECT * FROM user_logins;
UPDATE logins_again l SET create_date = d.day FROM dated d WHERE d.message_id = l.message_id;
CREATE TEMP TABLE vault_again AS SELECT * FROM vault;
UPDATE vault_again v SET create_date = d.day FROM dated d WHERE d.message_id = v.message_id;
TRUNCATE user_logins, vault;
INSERT INTO user_logins SELECT * FROM logins_again ORDER BY create_date, id;
INSERT INTO vault SELECT * FROM vault_again ORDER BY create_date, message_id;
SQL
} | psql "$PG_URL" -qX -v ON_ERROR_STOP=1 >/dev/null
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 -c "VACUUM ANALYZE user_logins" -c "VACUUM ANALYZE vault" >/dev/null

# The scratch copy of the rows: same tables and indexes as PG_URL.
echo "== (rotation) scratch copy of the rows for the raw ceiling" >&2
rot_raw_url="$(new_raw_copy_db scale_rot_raw)"
psql "$PG_URL" -qX -v ON_ERROR_STOP=1 \
    -c "\\copy (SELECT * FROM user_logins) TO '$work/rot-logins.bin' WITH (FORMAT binary)" \
    -c "\\copy (SELECT * FROM vault) TO '$work/rot-vault.bin' WITH (FORMAT binary)" >/dev/null
psql "$rot_raw_url" -qX -v ON_ERROR_STOP=1 \
    -c "\\copy user_logins FROM '$work/rot-logins.bin' WITH (FORMAT binary)" \
    -c "\\copy vault FROM '$work/rot-vault.bin' WITH (FORMAT binary)" >/dev/null
rm -f "$work/rot-logins.bin" "$work/rot-vault.bin"
# New values of the same sizes, prepared before the clock starts: other ones
# for every round, since a round that wrote the values already there would
# change no indexed column, and Postgres would then update in place (HOT),
# which no rotation can.
for ((rot_round = 1; rot_round <= rot_rounds; rot_round++)); do
    psql "$rot_raw_url" -qX -v ON_ERROR_STOP=1 -v r="$rot_round" >/dev/null <<'SQL'
CREATE TABLE new_vault_:r AS
    SELECT message_id, format('dek-00000000-0000-4000-8000-%s', lpad(:'r', 12, '0')) AS key_id,
           substring(sha256(nonce || :'r'::bytea) FROM 1 FOR length(nonce)) AS nonce,
           overlay(ciphertext PLACING sha256(ciphertext || :'r'::bytea) FROM 1 FOR least(32, length(ciphertext))) AS ciphertext
    FROM vault;
CREATE TABLE new_tokens_:r AS
    SELECT id, overlay(masked_ip PLACING 't' || (:r % 8 + 2) FROM 1 FOR 2) AS ip,
           overlay(masked_device_id PLACING 't' || (:r % 8 + 2) FROM 1 FOR 2) AS dev
    FROM user_logins;
SQL
done
rot_sql "$rot_raw_url" "VACUUM ANALYZE" >/dev/null

# rot_raw_update NAME SPLIT_QUERY UPDATE_TEMPLATE: J psql connections, each
# one UPDATE over (lo, hi]; prints "rows t0 t1".
rot_raw_update() {
    local name="$1" splits="$2" template="$3" lo hi i pids=() t0 t1 n=0 out
    mapfile -t bounds < <(rot_sql "$rot_raw_url" "$splits")
    rot_settle
    t0="$(now)"
    for ((i = 0; i < ${#bounds[@]}; i++)); do
        lo="${bounds[$i]}"
        hi="${bounds[$((i + 1))]:-}"
        local cond="n.k > '$lo'"
        [ -n "$hi" ] && cond="$cond AND n.k <= '$hi'"
        psql "$rot_raw_url" -XtA -v ON_ERROR_STOP=1 -c "${template//@COND@/$cond}" >"$work/$name.$i.out" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || {
            echo "!! $name: connection $i failed:" >&2
            cat "$work/$name.$i.out" >&2
            return 1
        }
    done
    t1="$(now)"
    for out in "$work/$name".*.out; do
        n=$((n + $(awk '/^UPDATE/ { print $2 }' "$out")))
    done
    echo "$n $t0 $t1"
}

# Bounds: the start, then J-1 exact quantiles. Message ids compare as text
# (a quoted literal either way); login ids as numbers.
rot_vault_splits="SELECT '' UNION ALL SELECT unnest(percentile_disc(ARRAY(SELECT g::float8 / $rot_jobs FROM generate_series(1, $rot_jobs - 1) g)) WITHIN GROUP (ORDER BY message_id)) FROM new_vault_1"
rot_login_splits="SELECT '0' UNION ALL SELECT unnest(percentile_disc(ARRAY(SELECT g::float8 / $rot_jobs FROM generate_series(1, $rot_jobs - 1) g)) WITHIN GROUP (ORDER BY id))::text FROM new_tokens_1"

# median: of the numbers on stdin, one a line.
rot_median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# rot_step KIND VERB UNIT ROWS RAW_N RAW_T0 RAW_T1: one timed
# `pii-vault rotate KIND` of round $rot_round after rot_settle, which must
# say "VERB ROWS UNIT"; beside the ceiling's RAW_N rows in RAW_T0..RAW_T1
# it sets rot_ratio and rot_line (and run_measured sets PEAK_RSS_KB).
# Called in this shell, not in $( ), so that a failed step ends the script.
rot_step() {
    local kind="$1" verb="$2" unit="$3" rows="$4" raw_n="$5" raw_t0="$6" raw_t1="$7"
    local name="rotate_${kind//-/_}_$rot_round" t0 t1 done_n
    rot_settle
    t0="$(now)"
    run_measured "$name" "$BIN" --database-url "$PG_URL" rotate "$kind" --jobs "$rot_jobs" --reason "scale benchmark"
    t1="$(now)"
    done_n="$(sed -n "s/.*$verb \\([0-9]*\\) $unit.*/\\1/p" "$work/$name.err")"
    [ "${done_n:-0}" = "$rows" ] || echo "!! $verb ${done_n:-?} of $rows $unit" >&2
    rot_ratio="$(ratio "$(per_sec "$done_n" "$t0" "$t1")" "$(per_sec "$raw_n" "$raw_t0" "$raw_t1")")"
    rot_line="$(rate "$done_n" "$t0" "$t1") vs $(rate "$raw_n" "$raw_t0" "$raw_t1"): $rot_ratio"
}

vault_rows="$(rot_sql "$PG_URL" 'SELECT (SELECT count(*) FROM vault) + (SELECT count(*) FROM quarantine)')"
login_rows="$(rot_sql "$PG_URL" 'SELECT count(*) FROM user_logins')"
rot_data_lines=()
rot_token_lines=()
rot_data_ratios=()
rot_token_ratios=()
data_rss_kb=0
token_rss_kb=0
for ((rot_round = 1; rot_round <= rot_rounds; rot_round++)); do
    echo "== (rotation) round $rot_round/$rot_rounds: ceiling, raw UPDATE … FROM of the vault rows, $rot_jobs connections" >&2
    read -r raw_v_n raw_v_t0 raw_v_t1 < <(rot_raw_update rot_raw_vault "$rot_vault_splits" \
        "UPDATE vault v SET key_id = n.key_id, nonce = n.nonce, ciphertext = n.ciphertext
         FROM (SELECT message_id AS k, * FROM new_vault_$rot_round) n WHERE v.message_id = n.k AND @COND@")

    echo "== (rotation) round $rot_round: pii-vault rotate data-keys --jobs $rot_jobs ($vault_rows rows)" >&2
    rot_step data-keys "re-encrypted" "row(s)" "$vault_rows" "$raw_v_n" "$raw_v_t0" "$raw_v_t1"
    [ "$PEAK_RSS_KB" -gt "$data_rss_kb" ] && data_rss_kb="$PEAK_RSS_KB"
    rot_data_ratios+=("$rot_ratio")
    rot_data_lines+=("$rot_line")

    echo "== (rotation) round $rot_round: ceiling, raw UPDATE … FROM of the login tokens, $rot_jobs connections" >&2
    read -r raw_l_n raw_l_t0 raw_l_t1 < <(rot_raw_update rot_raw_logins "$rot_login_splits" \
        "UPDATE user_logins u SET masked_ip = n.ip, masked_device_id = n.dev
         FROM (SELECT id AS k, * FROM new_tokens_$rot_round) n WHERE u.id = n.k AND @COND@")

    echo "== (rotation) round $rot_round: pii-vault rotate token-key --jobs $rot_jobs ($login_rows logins)" >&2
    rot_step token-key "re-tokenised" "login(s)" "$login_rows" "$raw_l_n" "$raw_l_t0" "$raw_l_t1"
    [ "$PEAK_RSS_KB" -gt "$token_rss_kb" ] && token_rss_kb="$PEAK_RSS_KB"
    rot_token_ratios+=("$rot_ratio")
    rot_token_lines+=("$rot_line")
done
psql "$PII_VAULT_TEST_PG" -qX -c "DROP DATABASE scale_rot_raw" >/dev/null

section "rotations: $rot_jobs connections each, closed months rewritten and this month in place, beside a raw parallel UPDATE … FROM ($rot_rounds rounds, each step alone)"
for i in "${!rot_data_lines[@]}"; do
    report "rotate data-keys, round $((i + 1)) ($vault_rows rows):" "${rot_data_lines[$i]}"
done
report "rotate data-keys / raw UPDATE, median:" "$(printf '%s\n' "${rot_data_ratios[@]}" | rot_median), peak RSS $((data_rss_kb / 1024)) MiB"
for i in "${!rot_token_lines[@]}"; do
    report "rotate token-key, round $((i + 1)) ($login_rows logins):" "${rot_token_lines[$i]}"
done
report "rotate token-key / raw UPDATE, median:" "$(printf '%s\n' "${rot_token_ratios[@]}" | rot_median), peak RSS $((token_rss_kb / 1024)) MiB"
