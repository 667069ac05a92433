# Part of scripts/bench-scale.sh (sourced, not executed): reveal at scale.
#
# Against the loaded database (PG_URL, ROWS events), as its owner, with the
# reveal policy raised for the run (and put back afterwards):
# 1. `reveal --user-id U --format json` as a whole process, for 21 users
#    picked at random (after one warm-up run): median and p90 wall time,
#    with PG_URL as given and again with sslmode=disable.
# 2. The plans of the two queries the reveal functions run (the policy's
#    count of logins and distinct users, and the fetch), for each selector:
#    any sequential scan other than of the small honeytokens table is named.
# 3. A masked IP shared by 5,000 and by 50,000 logins (extra events loaded
#    with one IP each, under their own source ids): `reveal --masked-ip`
#    as JSON lines, and the larger also as a table: rows/s and peak RSS of
#    each. Memory that stays flat as the reveal grows tenfold is bounded.
# The extra events are deleted afterwards (and the tables vacuumed), so the
# parts after this one see ROWS events again.
# shellcheck shell=bash
# shellcheck disable=SC2154 # BIN, PG_URL, ROWS, REPO, work: set by bench-scale.sh

reveal_db() { "$BIN" --database-url "$PG_URL" "$@"; }
reveal_sql() { psql "$PG_URL" -qXtA -v ON_ERROR_STOP=1 -c "$1"; }

# reveal_measure OUT cmd...: runs cmd with stdout to OUT and stderr to
# OUT.err; prints "WALL_SECONDS PEAK_RSS_KB" of that one process (its own
# rusage, not sampled); fails as the command does.
cat >"$work/reveal-measure.py" <<'EOF'
import resource, subprocess, sys, time
out = sys.argv[1]
with open(out, "wb") as o, open(out + ".err", "wb") as e:
    t0 = time.perf_counter()
    rc = subprocess.run(sys.argv[2:], stdout=o, stderr=e).returncode
    wall = time.perf_counter() - t0
print("%.6f %d" % (wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
EOF
reveal_measure() {
    python3 "$work/reveal-measure.py" "$@" || {
        echo "!! $* failed:" >&2
        tail -n 20 "$1.err" >&2
        return 1
    }
}

# "revealed N login(s)" of a reveal's stderr.
reveal_count() { sed -n 's/^pii-vault: revealed \([0-9]*\) login(s).*/\1/p' "$1" | head -n 1; }

reveal_policy_before="$(reveal_db policy show --format json)"
reveal_db policy set --max-users-per-reveal 1000000 --max-reveals-per-day 1000000 >/dev/null 2>&1

# ------------------------------------------------------- 1. one user
echo "== (reveal) reveal --user-id, 21 users" >&2
mapfile -t reveal_users < <(reveal_sql "SELECT user_id FROM (SELECT DISTINCT user_id FROM user_logins) u \
    ORDER BY md5(user_id) LIMIT 43")
reveal_measure "$work/reveal-user-warm.out" "$BIN" --database-url "$PG_URL" \
    reveal --user-id "${reveal_users[42]}" --reason "bench warm-up" --format json >/dev/null
# reveal_users_timed URL FIRST: 21 whole-process reveals, of users FIRST to
# FIRST+20; sets reveal_sorted (milliseconds, ascending) and reveal_rows.
reveal_users_timed() {
    local i n wall ms=()
    reveal_rows=0
    for ((i = 0; i < 21; i++)); do
        read -r wall _ < <(reveal_measure "$work/reveal-user-$i.out" "$BIN" --database-url "$1" \
            reveal --user-id "${reveal_users[$(($2 + i))]}" --reason "bench: one user" --format json)
        n="$(wc -l <"$work/reveal-user-$i.out")"
        [ "$n" -gt 0 ] && [ "$n" = "$(reveal_count "$work/reveal-user-$i.out.err")" ] ||
            echo "!! reveal of user $i printed $n line(s): $(tail -n 2 "$work/reveal-user-$i.out.err")" >&2
        reveal_rows=$((reveal_rows + n))
        ms+=("$(awk -v s="$wall" 'BEGIN { printf "%.1f", s * 1000 }')")
    done
    mapfile -t reveal_sorted < <(printf '%s\n' "${ms[@]}" | sort -n)
}
reveal_users_timed "$PG_URL" 0
reveal_user_line="median ${reveal_sorted[10]} ms, p90 ${reveal_sorted[18]} ms, max ${reveal_sorted[20]} ms ($reveal_rows rows)"
# The same without TLS: the client's TLS set-up is a fixed cost per process
# that dwarfs the queries, so it is shown apart.
case "$PG_URL" in
*\?*) reveal_plain_url="$PG_URL&sslmode=disable" ;;
*) reveal_plain_url="$PG_URL?sslmode=disable" ;;
esac
reveal_users_timed "$reveal_plain_url" 21
reveal_user_plain_line="median ${reveal_sorted[10]} ms, p90 ${reveal_sorted[18]} ms, max ${reveal_sorted[20]} ms ($reveal_rows rows)"

# ------------------------------------------------------- 2. query plans
echo "== (reveal) query plans" >&2
# The scans of the plan of $1: "Index Scan using x, Bitmap Index Scan on y".
reveal_scans() {
    reveal_sql "EXPLAIN $1" |
        sed -n 's/^[ ->]*\(\(Parallel \)\{0,1\}\(Seq\|Index\|Index Only\|Bitmap Index\|Bitmap Heap\) Scan\( using\| on\) [a-z_0-9]*\).*/\1/p' |
        sort -u | paste -sd, - | sed 's/,/, /g'
}
reveal_plans_ok=yes
reveal_plan_lines=()
for sel in user_id masked_ip masked_device_id; do
    value="$(reveal_sql "SELECT $sel FROM user_logins WHERE user_id = '${reveal_users[0]}' LIMIT 1")"
    count_scans="$(reveal_scans "SELECT count(*), count(DISTINCT l.user_id), count(DISTINCT h.user_id) \
        FROM user_logins l LEFT JOIN honeytokens h ON h.user_id = l.user_id WHERE l.$sel = '$value'")"
    fetch_scans="$(reveal_scans "SELECT l.message_id, l.user_id::text, l.device_type::text, l.masked_ip::text, \
        l.masked_device_id::text, l.locale::text, l.app_version, l.create_date, v.key_id, v.nonce, v.ciphertext \
        FROM user_logins l LEFT JOIN vault v ON v.message_id = l.message_id \
        WHERE l.$sel = '$value' ORDER BY l.create_date, l.id")"
    echo "== (reveal) $sel: count: $count_scans; fetch: $fetch_scans" >&2
    if printf '%s\n%s\n' "$count_scans" "$fetch_scans" | tr ',' '\n' | grep 'Seq Scan' | grep -vq 'honeytokens'; then
        reveal_plans_ok=no
        reveal_plan_lines+=("$sel: count: $count_scans; fetch: $fetch_scans")
    fi
done

# ------------------------------------------------------- 3. a shared IP
reveal_shared=()
reveal_ip_lines=()
reveal_ip_figures=()
reveal_ip_rss=()
for size in 5000 50000; do
    echo "== (reveal) loading $size events that share one IP" >&2
    python3 "$REPO/scripts/gen-events.py" -n "$size" --ips 1 --seed "$((7000 + size))" >"$work/reveal-shared-$size.jsonl"
    before="$(reveal_sql "SELECT coalesce(max(id), 0) FROM user_logins")"
    reveal_db run --from-file "$work/reveal-shared-$size.jsonl" --source-id "bench-reveal-shared-$size" \
        --no-progress 2>"$work/reveal-load-$size.err" || {
        tail -n 20 "$work/reveal-load-$size.err" >&2
        return 1
    }
    token="$(reveal_sql "SELECT masked_ip FROM user_logins WHERE id > $before \
        GROUP BY masked_ip ORDER BY count(*) DESC LIMIT 1")"
    reveal_shared+=("$token")
    count="$(reveal_sql "SELECT count(*) FROM user_logins WHERE masked_ip = '$token'")"
    for format in json table; do
        [ "$format" = table ] && [ "$size" -lt 50000 ] && continue
        echo "== (reveal) reveal --masked-ip of $count logins, $format" >&2
        name="reveal-ip-$size-$format"
        read -r wall rss < <(reveal_measure "$work/$name.out" "$BIN" --database-url "$PG_URL" \
            reveal --masked-ip "$token" --reason "bench: shared ip" --format "$format")
        lines="$(wc -l <"$work/$name.out")"
        [ "$format" = table ] && lines=$((lines - 2))
        [ "$lines" = "$count" ] && [ "$lines" = "$(reveal_count "$work/$name.out.err")" ] ||
            echo "!! reveal --masked-ip printed $lines of $count logins" >&2
        reveal_ip_lines+=("reveal --masked-ip, $count logins, $format:")
        reveal_ip_figures+=("$(awk -v n="$lines" -v s="$wall" -v r="$rss" \
            'BEGIN { printf "%.0f rows/s (%.2fs), peak RSS %.1f MiB", n / s, s, r / 1024 }')")
        reveal_ip_rss+=("$rss")
        rm -f "$work/$name.out"
    done
done

# ------------------------------------------------------- clean-up
echo "== (reveal) deleting the extra events, putting the policy back" >&2
for token in "${reveal_shared[@]}"; do
    reveal_sql "BEGIN; \
        DELETE FROM vault WHERE message_id IN (SELECT message_id FROM user_logins WHERE masked_ip = '$token'); \
        DELETE FROM user_logins WHERE masked_ip = '$token'; COMMIT" >/dev/null
done
reveal_sql "VACUUM ANALYZE user_logins" >/dev/null
reveal_sql "VACUUM ANALYZE vault" >/dev/null
reveal_left="$(reveal_sql "SELECT count(*) FROM user_logins")"
[ "$reveal_left" = "$ROWS" ] || echo "!! $reveal_left logins left, not $ROWS" >&2
read -r reveal_max_users reveal_max_day < <(python3 -c '
import json, sys
p = json.loads(sys.argv[1])
print(p["max_users_per_reveal"], p["max_reveals_per_day"])' "$reveal_policy_before")
reveal_db policy set --max-users-per-reveal "$reveal_max_users" --max-reveals-per-day "$reveal_max_day" >/dev/null 2>&1

# ------------------------------------------------------- report
section "reveal ($ROWS rows, as the owner, local key)"
report "reveal --user-id, whole process, 21 users, json:" "$reveal_user_line"
report "  the same with sslmode=disable:" "$reveal_user_plain_line"
if [ "$reveal_plans_ok" = yes ]; then
    report "plans (user_id, masked_ip, masked_device_id):" "indexes only, policy count and fetch"
else
    report "plans with a sequential scan:" "${reveal_plan_lines[*]}"
fi
for i in "${!reveal_ip_lines[@]}"; do
    report "${reveal_ip_lines[$i]}" "${reveal_ip_figures[$i]}"
done
report "peak RSS, 50,000 / 5,000 shared logins (json):" "$(ratio "${reveal_ip_rss[1]}" "${reveal_ip_rss[0]}")"
