//! The privilege catalogue: what each role holds on every table, column,
//! sequence and function of the schema, read from the catalogue (`pg_proc`
//! included), so that an over-broad grant fails here even where no
//! behaviour test thought to try it; and the documented deployment, where
//! a non-superuser owns the database.

use super::{dek_id, denied, login, new_key, random_bytes, TEST_KEK};
use super::{ANALYST, AUDITOR, REVEALER, ROLES, ROTATOR, SEARCHER, WORKER};
use crate::common::app::{with_user, TestApp};
use crate::common::seed::Owner;
use crate::common::{self, pg};

use pii_vault::crypto::{KeyPurpose, WrappedKey};
use pii_vault::store::postgres::PgStore;
use pii_vault::store::{Batch, Ingest, Keys, Store};
use sqlx::{Connection, PgConnection};

/// What each role holds on each table, as `has_*_privilege` sees it (a
/// column grant counts for SELECT, INSERT, UPDATE and REFERENCES). Anything
/// not listed must be absent: this catches an over-broad grant that the
/// behaviour tests above would not think to try.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    (WORKER, "user_logins", &["SELECT", "INSERT"]),
    (WORKER, "vault", &["INSERT"]),
    (WORKER, "quarantine", &["INSERT"]),
    (WORKER, "vault_keys", &["SELECT"]),
    (WORKER, "audit_log", &[]),
    (WORKER, "kms_allowlist", &["SELECT"]),
    (WORKER, "reveal_requests", &[]),
    (ANALYST, "user_logins", &["SELECT"]),
    (ANALYST, "vault", &[]),
    (ANALYST, "quarantine", &[]),
    (ANALYST, "vault_keys", &[]),
    (ANALYST, "audit_log", &[]),
    (ANALYST, "kms_allowlist", &[]),
    (ANALYST, "reveal_requests", &[]),
    (REVEALER, "user_logins", &["SELECT"]),
    (REVEALER, "vault", &[]),
    (REVEALER, "quarantine", &[]),
    (REVEALER, "vault_keys", &["SELECT"]),
    (REVEALER, "audit_log", &["SELECT"]),
    (REVEALER, "kms_allowlist", &["SELECT"]),
    (REVEALER, "reveal_requests", &[]),
    // No write of its own anywhere: rotations, erasures and key set-up go
    // through the functions of migrations/postgres/functions/.
    (ROTATOR, "user_logins", &["SELECT"]),
    (ROTATOR, "vault", &["SELECT"]),
    (ROTATOR, "quarantine", &["SELECT"]),
    (ROTATOR, "vault_keys", &["SELECT"]),
    (ROTATOR, "audit_log", &[]),
    (ROTATOR, "kms_allowlist", &["SELECT"]),
    (ROTATOR, "reveal_requests", &[]),
    (REVEALER, "reveal_policy", &["SELECT"]),
    (REVEALER, "pii_vault_pending_requests", &["SELECT"]),
    (REVEALER, "honeytokens", &[]),
    (REVEALER, "audit_alarms", &[]),
    (WORKER, "reveal_policy", &[]),
    (WORKER, "pii_vault_pending_requests", &[]),
    (WORKER, "honeytokens", &[]),
    (WORKER, "audit_alarms", &[]),
    (ANALYST, "reveal_policy", &[]),
    (ANALYST, "pii_vault_pending_requests", &[]),
    (ANALYST, "honeytokens", &[]),
    (ANALYST, "audit_alarms", &[]),
    (ROTATOR, "reveal_policy", &[]),
    (ROTATOR, "pii_vault_pending_requests", &[]),
    (ROTATOR, "honeytokens", &[]),
    (ROTATOR, "audit_alarms", &[]),
    (WORKER, "rotation_jobs", &[]),
    (WORKER, "rotation_ranges", &[]),
    (ANALYST, "rotation_jobs", &[]),
    (ANALYST, "rotation_ranges", &[]),
    (REVEALER, "rotation_jobs", &[]),
    (REVEALER, "rotation_ranges", &[]),
    (ROTATOR, "rotation_jobs", &[]),
    (ROTATOR, "rotation_ranges", &[]),
    (WORKER, "rotation_rewrites", &[]),
    (ANALYST, "rotation_rewrites", &[]),
    (REVEALER, "rotation_rewrites", &[]),
    (ROTATOR, "rotation_rewrites", &[]),
    (AUDITOR, "rotation_rewrites", &[]),
    (SEARCHER, "rotation_rewrites", &[]),
    // The auditor: the trail, both chains, the checkpoints, the alarms, the
    // requests (with the users each returned) and the erasures' users;
    // nothing of the data, the tokens or the keys.
    (AUDITOR, "audit_log", &["SELECT"]),
    (AUDITOR, "audit_chain", &["SELECT"]),
    (AUDITOR, "audit_checkpoints", &["SELECT"]),
    (AUDITOR, "reveal_requests", &["SELECT"]),
    (AUDITOR, "erasure_subjects", &["SELECT"]),
    (AUDITOR, "audit_alarms", &["SELECT"]),
    (AUDITOR, "reveal_policy", &["SELECT"]),
    (AUDITOR, "user_logins", &[]),
    (AUDITOR, "vault", &[]),
    (AUDITOR, "quarantine", &[]),
    (AUDITOR, "vault_keys", &[]),
    (AUDITOR, "kms_allowlist", &[]),
    (AUDITOR, "honeytokens", &[]),
    (AUDITOR, "pii_vault_pending_requests", &[]),
    (AUDITOR, "rotation_jobs", &[]),
    (AUDITOR, "rotation_ranges", &[]),
    // The others hold nothing of the chains and checkpoints.
    (WORKER, "audit_chain", &[]),
    (ANALYST, "audit_chain", &[]),
    (REVEALER, "audit_chain", &[]),
    (ROTATOR, "audit_chain", &[]),
    (WORKER, "audit_checkpoints", &[]),
    (ANALYST, "audit_checkpoints", &[]),
    (REVEALER, "audit_checkpoints", &[]),
    (ROTATOR, "audit_checkpoints", &[]),
    (WORKER, "erasure_subjects", &[]),
    (ANALYST, "erasure_subjects", &[]),
    (REVEALER, "erasure_subjects", &[]),
    (ROTATOR, "erasure_subjects", &[]),
    // `quarantine list`: the rejects without bodies, for the operators.
    (WORKER, "pii_vault_quarantine_list", &["SELECT"]),
    (REVEALER, "pii_vault_quarantine_list", &["SELECT"]),
    (ROTATOR, "pii_vault_quarantine_list", &["SELECT"]),
    (ANALYST, "pii_vault_quarantine_list", &[]),
    (AUDITOR, "pii_vault_quarantine_list", &[]),
    // The searcher: the wrapped token keys and the allow-list, to unwrap
    // the token key (`tokenize`); searches only through
    // pii_vault_search_record. Nothing of the data, the tokens or the trail.
    (SEARCHER, "vault_keys", &["SELECT"]),
    (SEARCHER, "kms_allowlist", &["SELECT"]),
    (SEARCHER, "user_logins", &[]),
    (SEARCHER, "vault", &[]),
    (SEARCHER, "quarantine", &[]),
    (SEARCHER, "audit_log", &[]),
    (SEARCHER, "reveal_requests", &[]),
    (SEARCHER, "reveal_policy", &[]),
    (SEARCHER, "pii_vault_pending_requests", &[]),
    (SEARCHER, "honeytokens", &[]),
    (SEARCHER, "audit_alarms", &[]),
    (SEARCHER, "audit_chain", &[]),
    (SEARCHER, "audit_checkpoints", &[]),
    (SEARCHER, "erasure_subjects", &[]),
    (SEARCHER, "rotation_jobs", &[]),
    (SEARCHER, "rotation_ranges", &[]),
    (SEARCHER, "pii_vault_quarantine_list", &[]),
    // Which search matched a honeytoken: the owner's (through audit_alarms,
    // the auditor's too), no other role's.
    (WORKER, "searches", &[]),
    (ANALYST, "searches", &[]),
    (REVEALER, "searches", &[]),
    (ROTATOR, "searches", &[]),
    (AUDITOR, "searches", &[]),
];

/// Tables no role touches directly.
const OWNER_ONLY: &[&str] = &[
    "job_leases",
    "reveal_request_rows",
    "reveal_quota",
    "honeytoken_logins",
    "honeytokens",
    "rotation_jobs",
    "rotation_ranges",
    "rotation_rewrites",
    "quarantine_reveals",
    "quarantine_replays",
    "quarantine_replay_rows",
    "searches",
    // The first-load days of file lines: ranges only through
    // pii_vault_line_days; the per-line table of 0017 is read-only.
    "line_ranges",
    "line_dates",
    // The subject ledger's tables behind the erasure_subjects view, and
    // the closed months' counts (0020): only through functions.
    "erasure_subject_rows",
    "vault_month_ledgers",
    "vault_month_users",
    // Months retention detached, waiting for their drops (0021).
    "retention_drops",
];

/// Columns holding ciphertext or wrapped keys, and who may read them
/// directly (everyone else only through the audited functions).
const SEALED_COLUMNS: &[(&str, &str, &[&str])] = &[
    ("vault", "nonce", &[]),
    ("vault", "ciphertext", &[]),
    ("quarantine", "nonce", &[]),
    ("quarantine", "ciphertext", &[]),
    (
        "vault_keys",
        "wrapped",
        &[WORKER, REVEALER, ROTATOR, SEARCHER],
    ),
    // A request's hash could be tested for "touched a honeytoken" by whoever
    // knows its other fields: only the auditor reads the requests' chain.
    ("reveal_requests", "hash", &[AUDITOR]),
    ("reveal_requests", "honeytokens", &[AUDITOR]),
];

const PRIVILEGES: [&str; 7] = [
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];

/// Every function of the schema, and the roles that may call it. The
/// catalogue test reads the functions from `pg_proc`, not from this list:
/// a function added without a line here fails it, and so does one whose
/// EXECUTE is held by anyone else (PUBLIC included). Functions no role
/// calls are called by other functions or fire as triggers.
const FUNCTIONS: &[(&str, &[&str])] = &[
    ("pii_vault_register_data_key(text,text,bytea)", &[WORKER]),
    ("pii_vault_retire_data_key(text)", &[WORKER]),
    ("pii_vault_honeytokens_due(integer)", &[WORKER]),
    ("pii_vault_reveal_request(text,text,text,text)", &[REVEALER]),
    ("pii_vault_reveal_fetch(bigint)", &[REVEALER]),
    ("pii_vault_approve(bigint,text,text)", &[REVEALER]),
    ("pii_vault_reveal_claim(bigint,text)", &[REVEALER]),
    ("pii_vault_keys_init(text,text,bytea,text,bytea,text)", &[ROTATOR]),
    ("pii_vault_record(text,text,text,text,bigint)", &[ROTATOR]),
    ("pii_vault_job_release(bigint)", &[ROTATOR]),
    ("pii_vault_rotation_job_resume(bigint,text)", &[ROTATOR]),
    ("pii_vault_rotation_start_data_keys(bigint,text[])", &[ROTATOR]),
    (
        "pii_vault_rotation_start_token_key(bigint,text[],text,bigint,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_start_kek(bigint)", &[ROTATOR]),
    ("pii_vault_rotation_job_ranges(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_rotation_range_done(bigint,bigint,integer)", &[ROTATOR]),
    (
        "pii_vault_rotation_new_data_key(bigint,bigint,text,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_retire_key(bigint,bigint,text)", &[ROTATOR]),
    (
        "pii_vault_rotation_vault_chunk(bigint,bigint,text,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_quarantine_chunk(bigint,bigint,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_reseal(bigint,bigint,integer,text,text[],text[],text[],bytea[],bytea[])",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_logins_by_message(bigint,bigint,text,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_sweep_chunk(bigint,bigint,bigint,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_tokens(bigint,bigint,integer,text,bigint[],text[],text[],text[])",
        &[ROTATOR],
    ),
    (
        "pii_vault_rotation_rewrap(bigint,bigint,text,text,bytea)",
        &[ROTATOR],
    ),
    ("pii_vault_rotation_retire_data_keys(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_rotation_finish(bigint,bigint)", &[ROTATOR]),
    // Closed partitions rewritten by a rotation (functions/45_rewrite.sql).
    ("pii_vault_rewrite_list(bigint,bigint)", &[ROTATOR]),
    ("pii_vault_rewrite_begin(bigint,bigint,text)", &[ROTATOR]),
    (
        "pii_vault_rewrite_vault_chunk(bigint,bigint,text,text,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rewrite_vault_write(bigint,bigint,text,text[],text[],text[],bytea[],bytea[],text[])",
        &[ROTATOR],
    ),
    (
        "pii_vault_rewrite_logins_chunk(bigint,bigint,text,bigint,integer)",
        &[ROTATOR],
    ),
    (
        "pii_vault_rewrite_logins_write(bigint,bigint,text,bigint[],text[],text[],text[],bigint[])",
        &[ROTATOR],
    ),
    ("pii_vault_rewrite_index(bigint,bigint,text)", &[ROTATOR]),
    ("pii_vault_rewrite_swap(bigint,bigint,text)", &[ROTATOR]),
    // Settled months' counts for the subject ledger (48_month_ledgers.sql).
    ("pii_vault_month_settle_next()", &[WORKER]),
    ("pii_vault_month_settle(text,date,date)", &[]),
    ("pii_vault_month_settle_grace()", &[]),
    ("pii_vault_month_ledger_count()", &[]),
    ("pii_vault_month_ledger_take(date,text[],bigint[])", &[]),
    ("pii_vault_month_ledger_arm(text,date)", &[]),
    ("pii_vault_forget(text,text,text)", &[ROTATOR]),
    ("pii_vault_retention(date,text,text)", &[ROTATOR]),
    ("pii_vault_retention_preview(date)", &[ROTATOR]),
    // Drops only what retention detached (0021).
    ("pii_vault_retention_drop_next()", &[ROTATOR]),
    ("pii_vault_retention_drops_left()", &[ROTATOR]),
    ("pii_vault_checkpoint_store(bigint,timestamp with time zone,text)", &[AUDITOR]),
    ("pii_vault_subject_ledger(text,text,text)", &[AUDITOR]),
    // The archive: the owner only.
    ("pii_vault_archive_plan(timestamp with time zone)", &[]),
    ("pii_vault_audit_archive(bigint,bigint,text,text)", &[]),
    ("pii_vault_archive_cut(bigint)", &[]),
    ("pii_vault_archive_point(bigint)", &[]),
    ("pii_vault_subject_rows(text)", &[]),
    // The chains' encoding.
    ("pii_vault_trail_bytes(audit_log)", &[]),
    ("pii_vault_request_bytes(reveal_requests)", &[]),
    ("pii_vault_check_record(bigint,text[],interval)", &[]),
    ("pii_vault_fresh_call()", &[]),
    // Quarantine tools: a body shown under a committed record (revealer),
    // bodies replayed under one (rotator).
    ("pii_vault_quarantine_show_request(text,text,text)", &[REVEALER]),
    ("pii_vault_quarantine_show_fetch(bigint)", &[REVEALER]),
    ("pii_vault_quarantine_show_key(bigint)", &[REVEALER]),
    (
        "pii_vault_quarantine_replay_request(text[],text,text,bytea,text,text)",
        &[ROTATOR],
    ),
    ("pii_vault_quarantine_replay_check(bigint)", &[]),
    ("pii_vault_quarantine_replay_fetch(bigint)", &[ROTATOR]),
    (
        "pii_vault_quarantine_replay_store(bigint,text[],text[],text[],text[],text[],text[],text[],text[],date[],bytea[],bytea[])",
        &[ROTATOR],
    ),
    ("pii_vault_quarantine_replay_finish(bigint)", &[ROTATOR]),
    // Searches (`tokenize`): recorded before the tokens are printed.
    ("pii_vault_search_record(text,text[],text,text)", &[SEARCHER]),
    ("pii_vault_lease_live(job_leases)", &[]),
    ("pii_vault_check_lease(text,bigint)", &[]),
    ("pii_vault_rotation_job_check(bigint,bigint)", &[]),
    ("pii_vault_rotation_job_is(rotation_jobs,text)", &[]),
    ("pii_vault_rotation_check_keys(rotation_jobs,text[],text[])", &[]),
    (
        "pii_vault_rotation_check_tokens(rotation_jobs,bigint[],text[],text[],text[])",
        &[],
    ),
    (
        "pii_vault_rotation_job_new(bigint,text,text,text[],text[],bigint,text)",
        &[],
    ),
    (
        "pii_vault_rotation_advance(bigint,integer,text,bigint,boolean)",
        &[],
    ),
    ("pii_vault_honeytokens_among(text[])", &[]),
    ("pii_vault_reveals_today()", &[]),
    ("pii_vault_destroy_unreferenced_data_keys()", &[]),
    ("pii_vault_rewrite_plan(bigint,text)", &[]),
    ("pii_vault_rewrite_oids(bigint)", &[]),
    ("pii_vault_rewrite_new_name(text)", &[]),
    (
        "pii_vault_rewrite_check(bigint,bigint,text,text[],text)",
        &[],
    ),
    ("pii_vault_rewrite_columns(text,text,text[])", &[]),
    // Monthly partitions: made ahead of need by migrate, workers (their
    // next months) and rotators; listed and added by those only.
    ("pii_vault_partitions_ensure(date[],date)", &[WORKER, ROTATOR]),
    ("pii_vault_undated_months(text)", &[]),
    ("pii_vault_partitions(text)", &[]),
    ("pii_vault_partition_add(text,date)", &[]),
    ("pii_vault_line_days(text,bigint[],text[],date)", &[WORKER]),
    // Trigger functions.
    ("audit_log_append_only()", &[]),
    ("pii_vault_audit_stamp()", &[]),
    ("pii_vault_request_chain()", &[]),
    ("pii_vault_policy_changed()", &[]),
    ("pii_vault_allowlist_guard()", &[]),
    ("pii_vault_keys_guard()", &[]),
    ("pii_vault_keys_no_delete()", &[]),
    ("pii_vault_fence_data_keys()", &[]),
    ("pii_vault_fence_token_keys()", &[]),
];

/// A function's signature without spaces, as both spellings compare.
fn normalize(f: &str) -> String {
    f.chars().filter(|c| !c.is_whitespace()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_holds_exactly_its_privileges_and_none_may_alter_the_audit_trail() {
    let Some(app) = TestApp::postgres().await else {
        return;
    };
    let pool = app.pool();

    let logins: Vec<(String, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles WHERE rolname = ANY($1) ORDER BY 1",
    )
    .bind(&ROLES[..])
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(logins.len(), ROLES.len(), "every role exists: {logins:?}");
    assert!(
        logins.iter().all(|(_, login)| !login),
        "group roles are NOLOGIN: {logins:?}"
    );

    for (role, table, want) in EXPECTED {
        for privilege in PRIVILEGES {
            let has: bool = sqlx::query_scalar(
                "SELECT CASE WHEN $3 IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') \
                 THEN has_any_column_privilege($1, $2, $3) ELSE has_table_privilege($1, $2, $3) END",
            )
            .bind(role)
            .bind(table)
            .bind(privilege)
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(
                has,
                want.contains(&privilege),
                "{role} {privilege} on {table}"
            );
        }
    }
    for (table, column, readers) in SEALED_COLUMNS {
        for role in ROLES {
            let has: bool = sqlx::query_scalar("SELECT has_column_privilege($1, $2, $3, 'SELECT')")
                .bind(role)
                .bind(table)
                .bind(column)
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(
                has,
                readers.contains(&role),
                "{role} reads {table}.{column}"
            );
        }
    }
    // Every function of the schema, as the catalogue has them.
    let found: Vec<(String, bool, Vec<String>, Option<String>)> = sqlx::query_as(
        "SELECT p.proname || '(' || oidvectortypes(p.proargtypes) || ')', p.prosecdef, \
                coalesce(p.proconfig, '{}'), \
                (SELECT string_agg(CASE WHEN a.grantee = 0 THEN 'public' ELSE a.grantee::regrole::text END, ',' \
                                   ORDER BY 1) \
                 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
                 WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner) \
         FROM pg_proc p WHERE p.pronamespace = current_schema()::regnamespace",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let listed: Vec<String> = FUNCTIONS.iter().map(|(f, _)| normalize(f)).collect();
    let mut names: Vec<String> = found.iter().map(|f| normalize(&f.0)).collect();
    names.sort();
    let mut want = listed.clone();
    want.sort();
    assert_eq!(names, want, "the schema's functions and FUNCTIONS differ");
    for (function, definer, config, executors) in &found {
        let (_, callers) = FUNCTIONS
            .iter()
            .find(|(f, _)| normalize(f) == normalize(function))
            .expect("listed");
        assert!(definer, "{function} is SECURITY DEFINER");
        assert!(
            config
                .iter()
                .any(|c| c.starts_with("search_path=") && c.ends_with("pg_temp")),
            "{function} pins a search_path ending in pg_temp: {config:?}"
        );
        // Held by exactly the intended roles: PUBLIC and the cluster's
        // other roles included.
        let mut have: Vec<&str> = executors
            .as_deref()
            .map(|e| e.split(',').collect())
            .unwrap_or_default();
        have.sort();
        let mut intended: Vec<&str> = callers.to_vec();
        intended.sort();
        assert_eq!(have, intended, "EXECUTE on {function}");
    }

    // Nobody but the owner holds UPDATE, DELETE or TRUNCATE on audit_log,
    // on the table or on any column: not PUBLIC, not any role of the cluster.
    let holders: Vec<(String, String)> = sqlx::query_as(
        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type \
         FROM pg_class c, aclexplode(c.relacl) a \
         WHERE c.oid = 'audit_log'::regclass AND a.grantee <> c.relowner \
           AND a.privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE') \
         UNION ALL \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type \
         FROM pg_attribute t, aclexplode(t.attacl) a \
         WHERE t.attrelid = 'audit_log'::regclass AND a.privilege_type = 'UPDATE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(holders.is_empty(), "may alter audit_log: {holders:?}");

    // Partitions are reached through their parent only, whose statement
    // triggers are the fences: no role holds anything on a partition, as on
    // the owner's own tables; the ones `migrate` made ahead (and the
    // default) are there.
    let partitions: Vec<String> = sqlx::query_scalar(
        "SELECT inhrelid::regclass::text FROM pg_inherits \
         WHERE inhparent IN ('vault'::regclass, 'user_logins'::regclass) ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        partitions.len() >= 10,
        "a default and four months ahead per table: {partitions:?}"
    );
    assert!(partitions.contains(&"vault_undated".to_string()));
    assert!(partitions.contains(&"user_logins_undated".to_string()));
    let untouched = OWNER_ONLY.iter().map(|t| t.to_string()).chain(partitions);
    for table in untouched {
        for role in ROLES {
            for privilege in PRIVILEGES {
                let has: bool = sqlx::query_scalar(
                    "SELECT CASE WHEN $3 IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') \
                     THEN has_any_column_privilege($1, $2, $3) ELSE has_table_privilege($1, $2, $3) END",
                )
                .bind(role)
                .bind(&table)
                .bind(privilege)
                .fetch_one(pool)
                .await
                .unwrap();
                assert!(!has, "{role} {privilege} on {table}");
            }
        }
    }
    // No role takes numbers from a sequence of the trail or the jobs (gaps
    // at will); the worker numbers the logins it inserts.
    let sequences: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, r.rolname::text FROM pg_class c CROSS JOIN pg_roles r \
         WHERE c.relkind = 'S' AND c.relnamespace = current_schema()::regnamespace \
           AND r.rolname = ANY($1) AND has_sequence_privilege(r.rolname, c.oid, 'USAGE')",
    )
    .bind(&ROLES[..])
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        sequences,
        [("user_logins_id_seq".to_string(), WORKER.to_string())]
    );

    // PUBLIC holds nothing on pii-vault's tables, and no role can read the
    // migration bookkeeping.
    for table in [
        "user_logins",
        "vault",
        "quarantine",
        "vault_keys",
        "audit_log",
        "kms_allowlist",
        "reveal_requests",
        "reveal_policy",
        "honeytokens",
        "audit_alarms",
        "rotation_jobs",
        "rotation_ranges",
        "rotation_rewrites",
        "job_leases",
        "reveal_request_rows",
        "reveal_quota",
        "honeytoken_logins",
        "audit_chain",
        "audit_checkpoints",
        "erasure_subjects",
        "erasure_subject_rows",
        "vault_month_ledgers",
        "vault_month_users",
        "quarantine_reveals",
        "quarantine_replays",
        "quarantine_replay_rows",
        "pii_vault_quarantine_list",
        "searches",
        "line_dates",
        "line_ranges",
        "retention_drops",
        "_sqlx_migrations",
        "vault_settings",
    ] {
        let public: Option<String> = sqlx::query_scalar(
            "SELECT string_agg(a.privilege_type, ',') FROM pg_class c, aclexplode(c.relacl) a \
             WHERE c.oid = $1::regclass AND a.grantee = 0",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(public, None, "PUBLIC on {table}");
    }
    for role in ROLES {
        for table in ["_sqlx_migrations", "vault_settings"] {
            let any: bool =
                sqlx::query_scalar("SELECT has_any_column_privilege($1, $2::regclass, 'SELECT')")
                    .bind(role)
                    .bind(table)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            assert!(!any, "{role} reads {table}");
        }
    }
    app.finish().await;
}

/// The documented deployment: a non-superuser that owns the database (and
/// may create roles) runs the migrations; the roles then work as above.
///
/// Not on [`TestApp`]: the point is a database that the cluster's
/// superuser has not migrated, owned by a role of its own, which makes the
/// login user itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_superuser_database_owner_can_migrate_and_grant_the_roles() {
    let Some(admin_url) = common::service_env("PII_VAULT_TEST_PG") else {
        return;
    };
    let fresh = pg::FreshDb::create(&admin_url).await;
    let owner_name = format!("{}_owner", fresh.name);
    let worker_name = format!("{}_worker", fresh.name);
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    for sql in [
        format!("CREATE ROLE {owner_name} LOGIN CREATEROLE PASSWORD 'owner'"),
        format!("ALTER DATABASE {} OWNER TO {owner_name}", fresh.name),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }

    let owner = PgStore::connect(&with_user(&fresh.url, &owner_name, "owner"))
        .await
        .unwrap();
    owner.migrate().await.unwrap();
    let raw = Owner::Pg(owner.pool());
    raw.allow_kek(TEST_KEK).await;
    assert!(
        raw.insert_key(&new_key("tok-1", KeyPurpose::Token, 1))
            .await
    );
    // The owner makes the login user, as a deployment's DBA script would.
    for sql in [
        format!("CREATE ROLE {worker_name} LOGIN PASSWORD 'worker'"),
        format!("GRANT {WORKER} TO {worker_name}"),
    ] {
        sqlx::query(&sql).execute(owner.pool()).await.unwrap();
    }
    let worker = PgStore::connect(&with_user(&fresh.url, &worker_name, "worker"))
        .await
        .unwrap();
    let dek = dek_id();
    worker
        .register_data_key(
            &dek,
            &WrappedKey {
                kek_id: TEST_KEK.into(),
                blob: random_bytes(60),
            },
        )
        .await
        .unwrap();
    let batch = Batch {
        logins: vec![login("alice", &dek)],
        ..Batch::default()
    };
    assert_eq!(worker.write_batch(&batch).await.unwrap().stored, 1);
    denied(worker.pool(), "SELECT * FROM vault").await;

    worker.pool().close().await;
    owner.pool().close().await;
    fresh.drop_database().await;
    for user in [&worker_name, &owner_name] {
        sqlx::query(&format!("DROP ROLE {user}"))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    admin.close().await.ok();
}
