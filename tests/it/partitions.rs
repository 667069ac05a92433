//! The monthly partitions of `vault` and `user_logins` (migration 0017):
//! made ahead of need, a month without one still stored, exactly-once
//! across months with the clock moved (`PII_VAULT_CLOCK`), retention that
//! drops whole months and cuts one, reveal and erasure across months, and
//! a database of the single-table layout partitioned in place.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{Datelike, Months, NaiveDate, Utc};
use futures::future::BoxFuture;
use futures::StreamExt;
use sqlx::migrate::{Migration, MigrationSource, Migrator};

use crate::common::app::{Bin, TestApp, ANALYST, REVEALER, ROTATOR, WORKER};
use crate::common::{self, pg::with_database};

pub(crate) fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap()
}

pub(crate) fn partition(table: &str, d: NaiveDate) -> String {
    format!("{table}_y{}m{:02}", d.year(), d.month())
}

/// `n` events whose user ids are `<tag>-<i>`, and the first line's user
/// replaced by `span` when given (a user that appears in several loads).
pub(crate) fn events(tag: &str, n: usize, seed: u64, span: Option<&str>) -> String {
    let base = common::gen_events(&["-n", &n.to_string(), "--seed", &seed.to_string()]);
    let mut text = String::new();
    for (i, line) in base.lines().enumerate() {
        let mut ev: serde_json::Value = serde_json::from_str(line).unwrap();
        ev["user_id"] = match (i, span) {
            (0, Some(s)) => s.to_string(),
            _ => format!("{tag}-{i}"),
        }
        .into();
        text.push_str(&ev.to_string());
        text.push('\n');
    }
    text
}

/// Loads `file` as the worker `bin` on `day` (the worker's clock set to it);
/// returns (stored, duplicates, rejected).
pub(crate) fn load_on(bin: &Bin, file: &str, day: NaiveDate) -> (u64, u64, u64) {
    let stderr = bin.env("PII_VAULT_CLOCK", &day.to_string()).ok(&[
        "run",
        "--from-file",
        file,
        "--no-progress",
    ]);
    common::try_summary(&stderr).unwrap_or_else(|| panic!("no summary: {stderr}"))
}

/// Rows per partition of `table`.
pub(crate) async fn by_partition(app: &TestApp, table: &str) -> BTreeMap<String, i64> {
    sqlx::query_as(&format!(
        "SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap()
    .into_iter()
    .collect()
}

pub(crate) async fn partitions(app: &TestApp, table: &str) -> Vec<String> {
    app.strings(&format!(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = '{table}'::regclass ORDER BY 1"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn months_get_partitions_ahead_and_a_file_loaded_again_later_is_stored_once() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let today = Utc::now().date_naive();
    let this_month = month_start(today);
    // `migrate` made this month and three ahead, and the default partition.
    let made = partitions(&app, "vault").await;
    for m in 0..4 {
        let want = partition("vault", this_month + Months::new(m));
        assert!(made.contains(&want), "{want} in {made:?}");
    }
    assert!(made.contains(&"vault_undated".to_string()));
    assert!(!made.contains(&partition("vault", this_month + Months::new(5))));
    let status = String::from_utf8(app.ok_output(&["migrate", "--status"]).stdout).unwrap();
    let want = format!(
        "vault and user_logins: 4 monthly partitions, {} to {}; 0 vault row(s) waiting in the default partition",
        this_month.format("%Y-%m"),
        (this_month + Months::new(3)).format("%Y-%m")
    );
    assert!(status.contains(&want), "{status}");

    let worker = app.as_login(&app.login_as(WORKER).await);
    let first = events("once", 200, 61, None);
    let file = app.write("export.jsonl", &first);
    assert_eq!(load_on(&worker, &file, today), (200, 0, 0));
    let home = partition("user_logins", this_month);
    assert_eq!(
        by_partition(&app, "user_logins").await,
        BTreeMap::from([(home.clone(), 200)])
    );

    // The same file five months later: the worker (its clock moved) makes
    // the partitions it will need, and every line is a duplicate of its
    // first load, found in its first month.
    let later = today + Months::new(5);
    assert_eq!(load_on(&worker, &file, later), (0, 200, 0));
    assert_eq!(app.count("user_logins").await, 200);
    assert_eq!(app.count("vault").await, 200);
    let made = partitions(&app, "user_logins").await;
    for m in 5..8 {
        let want = partition("user_logins", this_month + Months::new(m));
        assert!(
            made.contains(&want),
            "made ahead of need: {want} in {made:?}"
        );
    }

    // New lines appended: only they are stored, dated that later day, in
    // that month's partition; the old lines stay duplicates.
    let file = app.write(
        "export.jsonl",
        &format!("{first}{}", events("more", 50, 62, None)),
    );
    assert_eq!(load_on(&worker, &file, later), (50, 200, 0));
    let parts = by_partition(&app, "user_logins").await;
    assert_eq!(parts[&home], 200);
    assert_eq!(parts[&partition("user_logins", later)], 50);
    assert_eq!(
        by_partition(&app, "vault").await[&partition("vault", later)],
        50
    );

    // A month no partition will be made for yet (beyond 14 months ahead):
    // stored, in the default partition, not lost and not an error.
    let far = today + Months::new(20);
    let file = app.write("far.jsonl", &events("far", 30, 63, None));
    assert_eq!(load_on(&worker, &file, far), (30, 0, 0));
    assert_eq!(
        app.scalar("SELECT count(*) FROM user_logins_undated WHERE create_date IS NOT NULL")
            .await,
        30
    );
    assert_eq!(app.scalar("SELECT count(*) FROM vault_undated").await, 30);
    // Loaded again that day: still once.
    assert_eq!(load_on(&worker, &file, far), (0, 30, 0));

    // The worker's login reaches the partitions only through their parent,
    // and the first-load days only through the function.
    let login = app.login_as(WORKER).await;
    let pool = sqlx::PgPool::connect(&login.url).await.unwrap();
    for sql in [
        format!("INSERT INTO {home} (message_id, create_date) VALUES ('m-x', '{today}')"),
        format!("SELECT count(*) FROM {home}"),
        "SELECT count(*) FROM user_logins_undated".to_string(),
        "SELECT count(*) FROM line_dates".to_string(),
        "SELECT count(*) FROM line_ranges".to_string(),
        format!("INSERT INTO line_ranges VALUES ('export.jsonl', 1, 9, '{today}')"),
        "DELETE FROM line_ranges".to_string(),
        format!(
            "ALTER TABLE vault DETACH PARTITION {}",
            partition("vault", this_month)
        ),
        format!("DROP TABLE {}", partition("vault", this_month)),
    ] {
        crate::roles::refused(&pool, &sql, "42501").await;
    }
    first_load_days_race_and_roll_back(&app, &pool, today).await;

    // Two sessions of one worker login making the same new month at once:
    // the second waits for the first (an advisory lock), then finds it made;
    // one partition, no error. A session that rolls back leaves none.
    let month = this_month - Months::new(30);
    let ensure = "SELECT count(*) FROM pii_vault_partitions_ensure(ARRAY[$1::date], $1::date)";
    let mut undone = pool.begin().await.unwrap();
    sqlx::query(ensure)
        .bind(month)
        .execute(&mut *undone)
        .await
        .unwrap();
    undone.rollback().await.unwrap();
    assert!(!partitions(&app, "vault")
        .await
        .contains(&partition("vault", month)));
    let mut first = pool.begin().await.unwrap();
    sqlx::query(ensure)
        .bind(month)
        .execute(&mut *first)
        .await
        .unwrap();
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar::<_, i64>(ensure)
                .bind(month)
                .fetch_one(&pool)
                .await
        })
    };
    one_session_waits_on_an_advisory_lock(&app, "the second session waits").await;
    first.commit().await.unwrap();
    second.await.unwrap().unwrap();
    let made = partitions(&app, "vault").await;
    assert_eq!(
        made.iter()
            .filter(|p| **p == partition("vault", month))
            .count(),
        1
    );
    pool.close().await;

    // The analyst reads the months through user_logins, never one directly.
    let analyst = sqlx::PgPool::connect(&app.login_as(ANALYST).await.url)
        .await
        .unwrap();
    crate::roles::refused(&analyst, &format!("SELECT count(*) FROM {home}"), "42501").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE create_date >= $1")
        .bind(later)
        .fetch_one(&analyst)
        .await
        .unwrap();
    assert_eq!(n, 80, "50 logins of the later month and 30 of the far one");
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT count(*) FROM user_logins WHERE create_date >= $1 AND create_date < $2",
    )
    .bind(month_start(later))
    .bind(month_start(later) + Months::new(1))
    .fetch_all(&analyst)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains(&partition("user_logins", later)), "{plan}");
    assert!(
        !plan.contains(&home),
        "a query by date reads only its months: {plan}"
    );
    analyst.close().await;
    app.finish().await;
}

/// Returns once exactly one session of the test's database waits for an
/// advisory lock (`what` names it if that never happens).
async fn one_session_waits_on_an_advisory_lock(app: &TestApp, what: &str) {
    crate::common::wait_until(std::time::Duration::from_secs(30), what, || async move {
        let waiting = app
            .scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
            )
            .await;
        (waiting == 1).then_some(())
    })
    .await;
}

/// The ranges `pii_vault_line_days` answers for lines `lines` of `source`
/// read on `day`, as (first, last, day), in order.
async fn line_days<'c>(
    on: impl sqlx::PgExecutor<'c>,
    source: &str,
    lines: impl IntoIterator<Item = i64>,
    day: NaiveDate,
) -> Result<Vec<(i64, i64, NaiveDate)>, sqlx::Error> {
    let mut got: Vec<(i64, i64, NaiveDate)> = sqlx::query_as(
        "SELECT range_first, range_last, first_day FROM pii_vault_line_days($1, $2, NULL, $3)",
    )
    .bind(source)
    .bind(lines.into_iter().collect::<Vec<i64>>())
    .bind(day)
    .fetch_all(on)
    .await?;
    got.sort_unstable();
    Ok(got)
}

/// As the worker's own login: the first-load days of file lines, by
/// ranges. A range rolled back is gone; two sessions loading one input at
/// once are serialised (the second waits, then gets the first's days);
/// lines past the stored ranges start a new one; bad calls are refused.
async fn first_load_days_race_and_roll_back(app: &TestApp, pool: &sqlx::PgPool, today: NaiveDate) {
    let later = today + Months::new(2);
    let mut undone = pool.begin().await.unwrap();
    let got = line_days(&mut *undone, "race.jsonl", 1..=10, later)
        .await
        .unwrap();
    assert_eq!(got, vec![(1, 10, later)]);
    undone.rollback().await.unwrap();

    let mut first = pool.begin().await.unwrap();
    let got = line_days(&mut *first, "race.jsonl", 1..=10, today)
        .await
        .unwrap();
    assert_eq!(got, vec![(1, 10, today)], "the rolled-back range is gone");
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move { line_days(&pool, "race.jsonl", 5..=15, later).await })
    };
    one_session_waits_on_an_advisory_lock(app, "the second load of the input waits").await;
    first.commit().await.unwrap();
    assert_eq!(
        second.await.unwrap().unwrap(),
        vec![(1, 10, today), (11, 15, later)],
        "lines 5-10 keep the first load's day; 11-15 are new"
    );
    // Another input's same line numbers are its own.
    assert_eq!(
        line_days(pool, "other.jsonl", 1..=3, later).await.unwrap(),
        vec![(1, 3, later)]
    );
    assert_eq!(
        app.scalar("SELECT count(*) FROM line_ranges WHERE source = 'race.jsonl'")
            .await,
        2
    );
    for (lines, why) in [(vec![0, 1, 2], "line 0"), (vec![], "no lines")] {
        let err = line_days(pool, "race.jsonl", lines, today)
            .await
            .unwrap_err();
        assert_eq!(
            err.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("22023"),
            "{why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_months_cuts_one_and_reveal_and_forget_reach_every_month() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let rotator = app.as_login(&app.login_as(ROTATOR).await);
    let revealer = app.as_login(&app.login_as(REVEALER).await);
    let this_month = month_start(Utc::now().date_naive());
    // Four past months, 100 logins each, loaded (backfilled) on the 10th;
    // "span" has a login in each of them.
    let months: Vec<NaiveDate> = (1..=4).rev().map(|k| this_month - Months::new(k)).collect();
    for (i, m) in months.iter().enumerate() {
        let file = app.write(
            &format!("m{i}.jsonl"),
            &events(&format!("m{i}"), 100, 70 + i as u64, Some("span")),
        );
        assert_eq!(
            load_on(&worker, &file, *m + chrono::Days::new(9)),
            (100, 0, 0)
        );
    }
    let parts = by_partition(&app, "vault").await;
    for m in &months {
        assert_eq!(parts[&partition("vault", *m)], 100, "{parts:?}");
    }

    // Reveal reaches every month: four logins of "span", one per month.
    let out = revealer.ok_output(&[
        "reveal",
        "--user-id",
        "span",
        "--reason",
        "ticket 22",
        "--format",
        "json",
    ]);
    let days: Vec<NaiveDate> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["ip"].as_str().is_some(), "{v}");
            v["create_date"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    let mut seen: Vec<NaiveDate> = days.iter().map(|d| month_start(*d)).collect();
    seen.sort();
    assert_eq!(seen, months);

    // Retention before the 20th of the third month: the two months wholly
    // before it are dropped, the third is cut (its logins are of the 10th).
    let before = months[2] + chrono::Days::new(19);
    let out = rotator.ok(&[
        "forget",
        "--before",
        &before.to_string(),
        "--reason",
        "retention",
    ]);
    assert!(out.contains("erased 300 vault row(s)"), "{out}");
    assert!(
        out.contains("2 monthly vault partition(s) dropped whole"),
        "{out}"
    );
    let left = partitions(&app, "vault").await;
    assert!(!left.contains(&partition("vault", months[0])), "{left:?}");
    // Dropped, not only detached: no table of the months is left.
    assert!(app
        .strings("SELECT relname::text FROM pg_class WHERE relname LIKE 'vault\\_y%\\_erased\\_%'")
        .await
        .is_empty());
    assert_eq!(app.count("retention_drops").await, 0);
    assert!(!left.contains(&partition("vault", months[1])), "{left:?}");
    let parts = by_partition(&app, "vault").await;
    assert_eq!(
        parts.get(&partition("vault", months[2])),
        None,
        "cut: {parts:?}"
    );
    assert_eq!(parts[&partition("vault", months[3])], 100);
    assert!(
        left.contains(&partition("vault", months[2])),
        "the cut month stays"
    );
    // The first-load days of the erased lines go with them; the last
    // month's load keeps its range.
    assert_eq!(
        app.scalar(&format!(
            "SELECT count(*) FROM line_ranges WHERE create_date < '{before}'"
        ))
        .await,
        0
    );
    assert!(app.scalar("SELECT count(*) FROM line_ranges").await > 0);
    // The analysts' table is not retention's: all 400 logins stay.
    assert_eq!(app.count("user_logins").await, 400);
    // Audited with the count, each user's share in the subject ledger.
    let (target, rows): (String, i64) =
        sqlx::query_as("SELECT target, row_count FROM audit_log WHERE action = 'retention'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(target.ends_with("partitions_dropped=2"), "{target}");
    assert_eq!(rows, 300);
    assert_eq!(
        app.scalar(
            "SELECT sum(rows)::bigint FROM erasure_subjects s JOIN audit_log a ON a.id = s.record \
             WHERE a.action = 'retention'"
        )
        .await,
        300
    );
    assert_eq!(
        app.scalar(
            "SELECT rows FROM erasure_subjects s JOIN audit_log a ON a.id = s.record \
             WHERE a.action = 'retention' AND s.user_id = 'span'"
        )
        .await,
        3
    );
    // The data keys that sealed only the dropped months are destroyed; the
    // one the kept month still needs is not.
    let destroyed = app
        .scalar("SELECT count(*) FROM vault_keys WHERE purpose = 'vault' AND state = 'destroyed'")
        .await;
    let referenced_destroyed = app
        .scalar(
            "SELECT count(*) FROM vault_keys k WHERE k.state = 'destroyed' \
             AND EXISTS (SELECT 1 FROM vault v WHERE v.key_id = k.id)",
        )
        .await;
    assert_eq!(referenced_destroyed, 0);
    assert!(
        destroyed >= 3,
        "the first three loads' keys sealed nothing left: {destroyed}"
    );

    // forget --user-id reaches the month that is left.
    let out = rotator.ok(&["forget", "--user-id", "span", "--reason", "GDPR 17"]);
    assert!(out.contains("1 vault row"), "{out}");
    assert_eq!(
        app.scalar("SELECT count(*) FROM vault WHERE user_id = 'span'")
            .await,
        0
    );
    app.finish().await;
}

/// Migrations 0001–0016: the single-table layout of the previous release.
#[derive(Debug)]
struct Before(Vec<Migration>);

impl MigrationSource<'static> for Before {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_table_database_is_partitioned_in_place_without_a_rewrite() {
    let Some(admin) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let source = TestApp::postgres_on(&admin).await;
    // `old`: a database of the previous release, in the same cluster, run
    // from the same directory (the same local KEK).
    let fresh = crate::common::pg::FreshDb::create(&admin).await;
    let pool = sqlx::PgPool::connect(&fresh.url).await.unwrap();
    let on_old = |login: &str| with_database(login, &fresh.name);
    let shipped: Migrator = sqlx::migrate!("migrations/postgres");
    let before: Vec<Migration> = shipped
        .iter()
        .filter(|m| m.version <= 16)
        .map(|m| Migration {
            sql: Cow::Owned(m.sql.to_string()),
            ..m.clone()
        })
        .collect();
    Migrator::new(Before(before))
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    let kind: String =
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE relname = 'vault'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(kind, "r");

    // Its rows as that release wrote them: sealed and tokenised under the
    // same keys, spread over three months, and legacy logins without a
    // date or a vault row.
    let text = events("up", 300, 81, Some("span-up"));
    let file = source.write("up.jsonl", &text);
    source.ok(&["migrate"]);
    source.ok(&["run", "--from-file", &file, "--no-progress"]);
    for table in ["kms_allowlist", "vault_keys", "user_logins", "vault"] {
        let cols = source
            .strings(&format!(
                "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
                 WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
            ))
            .await
            .remove(0);
        let mut from = source.pool().acquire().await.unwrap();
        let mut out = from
            .copy_out_raw(&format!(
                "COPY (SELECT {cols} FROM {table}) TO STDOUT (FORMAT binary)"
            ))
            .await
            .unwrap();
        let mut data = Vec::new();
        while let Some(chunk) = out.next().await {
            data.extend_from_slice(&chunk.unwrap());
        }
        drop(out);
        // Copied as it stands, its triggers off: the loading worker has
        // retired its data key since, which the fence would refuse.
        let mut to = pool.acquire().await.unwrap();
        sqlx::query("SET session_replication_role = replica")
            .execute(&mut *to)
            .await
            .unwrap();
        let mut copy = to
            .copy_in_raw(&format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)"))
            .await
            .unwrap();
        copy.send(data).await.unwrap();
        copy.finish().await.unwrap();
        sqlx::query("RESET session_replication_role")
            .execute(&mut *to)
            .await
            .unwrap();
    }
    sqlx::query("SELECT setval(pg_get_serial_sequence('user_logins', 'id'), (SELECT max(id) FROM user_logins))")
        .execute(&pool)
        .await
        .unwrap();
    let this_month = month_start(Utc::now().date_naive());
    // History rewritten by hand, the same way.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for (share, day) in [
        (0, this_month - Months::new(2)),
        (1, this_month - Months::new(1)),
    ] {
        for sql in [
            format!("UPDATE user_logins SET create_date = '{day}' WHERE id % 3 = {share}"),
            "UPDATE vault v SET create_date = l.create_date FROM user_logins l \
             WHERE l.message_id = v.message_id AND v.create_date IS DISTINCT FROM l.create_date"
                .to_string(),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    sqlx::query(
        "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, app_version) \
         SELECT 'legacy-' || g, 'legacy-user', 'web', 't1_x', 't1_y', '1' FROM generate_series(1, 3) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let files: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT relname::text, relfilenode::bigint FROM pg_class WHERE relname IN ('user_logins', 'vault')",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let columns_sql = "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
                       WHERE attrelid = 'user_logins'::regclass AND attnum > 0 AND NOT attisdropped";
    let columns: String = sqlx::query_scalar(columns_sql)
        .fetch_one(&pool)
        .await
        .unwrap();

    // The upgrade: the indexes built online first (twice: the second run
    // finds them), then this release's migrate, as the owner.
    let owner = source.bin().env("DATABASE_URL", &fresh.url);
    let out = owner.ok(&["migrate", "--prepare-partitions"]);
    assert!(out.contains("(3 index(es) built now)"), "{out}");
    let out = owner.ok(&["migrate", "--prepare-partitions"]);
    assert!(out.contains("(0 index(es) built now)"), "{out}");
    let prepared: BTreeMap<String, i64> = sqlx::query_as(
        "SELECT relname::text, relfilenode::bigint FROM pg_class \
         WHERE relname IN ('user_logins_dated_key', 'vault_dated_key', 'user_logins_by_id')",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(prepared.len(), 3);
    owner.ok(&["migrate"]);
    // Adopted as they were by the partitioned tables' indexes, not built again.
    let adopted: Vec<(i64, String)> = sqlx::query_as(
        "SELECT c.relfilenode::bigint, i.inhparent::regclass::text FROM pg_class c \
         JOIN pg_inherits i ON i.inhrelid = c.oid WHERE c.relfilenode = ANY($1) ORDER BY 2",
    )
    .bind(prepared.values().copied().collect::<Vec<_>>())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        adopted.iter().map(|a| a.1.as_str()).collect::<Vec<_>>(),
        [
            "user_logins_id",
            "user_logins_message_id_key",
            "vault_message_id_key"
        ],
        "{adopted:?}"
    );
    let out = owner.ok(&["migrate", "--prepare-partitions"]);
    assert!(out.contains("partitioned already"), "{out}");
    let cutoff = this_month + Months::new(1);
    let rows_by_partition = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(&format!(
                "SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"
            ))
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect::<BTreeMap<String, i64>>()
        }
    };
    for table in ["user_logins", "vault"] {
        let kept = partition(&format!("{table}_before"), cutoff);
        let (kind, file): (String, i64) = sqlx::query_as(&format!(
            "SELECT relkind::text, relfilenode::bigint FROM pg_class WHERE relname = '{kept}'"
        ))
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{kept}: {e}"));
        assert_eq!(kind, "r");
        assert_eq!(
            file, files[table],
            "{table} attached as it was, not rewritten"
        );
        let parts = rows_by_partition(table).await;
        assert_eq!(parts[&kept], 300, "{parts:?}");
    }
    assert_eq!(
        rows_by_partition("user_logins").await["user_logins_undated"],
        3,
        "the undated legacy logins"
    );
    let after: String = sqlx::query_scalar(columns_sql)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        after, columns,
        "select * reads the same columns in the same order"
    );

    // Loaded again today by a worker: every line a duplicate, found in the
    // month it was stored in (the first-load days came from the old table).
    let worker = source
        .bin()
        .env("DATABASE_URL", &on_old(&source.login_as(WORKER).await.url));
    assert_eq!(
        load_on(&worker, &file, Utc::now().date_naive()),
        (0, 300, 0)
    );
    // The revealer opens what the previous release sealed.
    let revealer = source.bin().env(
        "DATABASE_URL",
        &on_old(&source.login_as(REVEALER).await.url),
    );
    let out = revealer.ok_output(&[
        "reveal",
        "--user-id",
        "span-up",
        "--reason",
        "ticket 23",
        "--format",
        "json",
    ]);
    let revealed: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let original: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(revealed["device_id"], original["device_id"]);
    pool.close().await;
    fresh.drop_database().await;
    source.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_waiting_in_the_default_partition_move_into_their_month_when_it_is_made() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let this_month = month_start(Utc::now().date_naive());
    let file = app.write("now.jsonl", &events("now", 40, 91, None));
    assert_eq!(load_on(&worker, &file, Utc::now().date_naive()), (40, 0, 0));
    // Rows of a month that has no partition, as a worker whose call to make
    // it failed would have left them (moved there by the owner here, with
    // the fences off: the fixture, not a worker's write).
    let old = this_month - Months::new(40);
    let mut tx = app.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for table in ["user_logins", "vault"] {
        sqlx::query(&format!(
            "UPDATE {table} SET create_date = $1 WHERE message_id IN \
             (SELECT message_id FROM user_logins ORDER BY message_id LIMIT 15)"
        ))
        .bind(old + chrono::Days::new(3))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(by_partition(&app, "vault").await["vault_undated"], 15);
    assert_eq!(
        by_partition(&app, "user_logins").await["user_logins_undated"],
        15
    );

    // The next call for any month (here a worker's, for this month) makes
    // the waiting rows' month and moves them in.
    let login = app.login_as(WORKER).await;
    let pool = sqlx::PgPool::connect(&login.url).await.unwrap();
    sqlx::query(
        "SELECT count(*) FROM pii_vault_partitions_ensure(ARRAY[current_date], current_date)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    for table in ["user_logins", "vault"] {
        let parts = by_partition(&app, table).await;
        assert_eq!(parts.get(&format!("{table}_undated")), None, "{parts:?}");
        assert_eq!(parts[&partition(table, old)], 15, "{parts:?}");
        assert_eq!(parts.values().sum::<i64>(), 40);
    }
    // And a reveal still finds them (their vault rows moved with them).
    let revealer = app.as_login(&app.login_as(REVEALER).await);
    let moved: String = sqlx::query_scalar(
        "SELECT user_id FROM user_logins WHERE create_date = $1 ORDER BY message_id LIMIT 1",
    )
    .bind(old + chrono::Days::new(3))
    .fetch_one(app.pool())
    .await
    .unwrap();
    let out = revealer.ok_output(&[
        "reveal",
        "--user-id",
        &moved,
        "--reason",
        "ticket 24",
        "--format",
        "json",
    ]);
    let line = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(v["ip"].as_str().is_some(), "{v}");
    app.finish().await;
}

/// Retention waits for the lock its DETACH needs no longer than 10 s: with
/// a long transaction reading the vault, it gives up, says so without a
/// value, and changes nothing (the month, its rows, its keys and the audit
/// trail as they were); once that transaction ends, the same command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_past_lock_timeout_changes_nothing_and_says_so() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    app.ok(&["migrate"]);
    let worker = app.as_login(&app.login_as(WORKER).await);
    let rotator = app.as_login(&app.login_as(ROTATOR).await);
    let month = month_start(Utc::now().date_naive()) - Months::new(2);
    let file = app.write("old.jsonl", &events("old", 50, 91, None));
    assert_eq!(
        load_on(&worker, &file, month + chrono::Days::new(3)),
        (50, 0, 0)
    );
    let key_states = "SELECT id || ':' || state FROM vault_keys ORDER BY id";
    let keys_before = app.strings(key_states).await;

    // A long transaction that has read the vault (ACCESS SHARE on it).
    let mut holder = app.hold_open("SELECT count(*) FROM vault").await;

    let before = (month + Months::new(1)).to_string();
    let args = ["forget", "--before", &before, "--reason", "retention"];
    let out = rotator.tokio_command(&args).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for said in [
        "SQLSTATE 55P03",
        "stayed held by another session past lock_timeout",
        "nothing of this transaction was written",
    ] {
        assert!(
            err.contains(said),
            "the error does not say {said:?}:\n{err}"
        );
    }
    assert!(!err.contains("old-"), "a user id in the error:\n{err}");
    // Rolled back whole.
    assert!(partitions(&app, "vault")
        .await
        .contains(&partition("vault", month)));
    assert_eq!(app.count("vault").await, 50);
    assert_eq!(
        app.scalar("SELECT count(*) FROM audit_log WHERE action = 'retention'")
            .await,
        0
    );
    assert_eq!(app.strings(key_states).await, keys_before);

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    sqlx::Connection::close(holder).await.unwrap();
    let out = rotator.ok(&args);
    assert!(out.contains("erased 50 vault row(s)"), "{out}");
    app.finish().await;
}
