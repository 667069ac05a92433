//! [`Maintenance`](admin::Maintenance) on SQLite: keys, jobs, rotation
//! and erasure queries, apart from the write path and reveal of
//! `sqlite.rs`, as `pg_admin.rs` is apart from `postgres.rs`.

use async_trait::async_trait;

use sqlx::{FromRow, QueryBuilder, Row, Sqlite};

use super::sqlite::{insert_audit, os_user, parse_time, sqlite_time, SqliteStore, NOW};
use super::*;
use crate::crypto::WrappedKey;

/// What retention erases (and `--dry-run` counts), `$1` the day as ISO
/// text: vault rows of logins before it, bodies quarantined before it.
/// Dates and times are ISO text here, so they compare as strings; a login's
/// day is on its `user_logins` row (SQLite's vault has none, and stays small
/// enough for the join).
const VAULT_BEFORE: &str =
    "message_id IN (SELECT message_id FROM user_logins WHERE create_date < $1)";
const QUARANTINE_BEFORE: &str = "received_at < $1";

/// A login of `l` whose tokens are not of the version that parameter
/// `$p` (a `LIKE` pattern) names.
fn stale(p: u8) -> String {
    format!("l.masked_ip NOT LIKE ${p} ESCAPE '\\' OR l.masked_device_id NOT LIKE ${p} ESCAPE '\\'")
}

fn push_in_list<'a>(q: &mut QueryBuilder<'a, Sqlite>, ids: &'a [String]) {
    q.push("(");
    let mut sep = q.separated(", ");
    for id in ids {
        sep.push_bind(id);
    }
    q.push(")");
}

/// `(id, vault row)` of a token rotation's chunk read.
fn id_and_vault_row(r: &sqlx::sqlite::SqliteRow) -> Result<(i64, VaultRow), StoreError> {
    Ok((
        r.try_get("id")?,
        VaultRow {
            message_id: r.try_get("message_id")?,
            user_id: r
                .try_get::<Option<String>, _>("user_id")?
                .unwrap_or_default(),
            key_id: r.try_get("key_id")?,
            nonce: r.try_get("nonce")?,
            ciphertext: r.try_get("ciphertext")?,
        },
    ))
}

impl SqliteStore {
    /// The `LIKE` pattern of the tokens of job `job`'s version.
    async fn job_token_like(&self, job: i64) -> Result<String, StoreError> {
        let version: Option<i64> =
            sqlx::query_scalar("SELECT token_version FROM rotation_jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&self.pool)
                .await?;
        Ok(admin::token_like(version.unwrap_or(0)))
    }
}

async fn reseal_in(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    vault: &[(VaultRow, String)],
    quarantine: &[(QuarantineRow, String)],
) -> Result<u64, StoreError> {
    let mut changed = 0;
    for (v, old) in vault {
        changed += sqlx::query(
                "UPDATE vault SET key_id = $1, nonce = $2, ciphertext = $3 WHERE message_id = $4 AND key_id = $5",
            )
            .bind(&v.key_id)
            .bind(&v.nonce)
            .bind(&v.ciphertext)
            .bind(&v.message_id)
            .bind(old)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    }
    for (r, old) in quarantine {
        changed += sqlx::query(
                "UPDATE quarantine SET key_id = $1, nonce = $2, ciphertext = $3 WHERE message_id = $4 AND key_id = $5",
            )
            .bind(&r.key_id)
            .bind(&r.nonce)
            .bind(&r.ciphertext)
            .bind(&r.message_id)
            .bind(old)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    }
    Ok(changed)
}

async fn advance(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    job: i64,
    no: i32,
    cursor: &str,
    rows: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE rotation_ranges SET cursor = $1, rows_done = rows_done + $2 WHERE job_id = $3 AND no = $4",
    )
    .bind(cursor)
    .bind(rows)
    .bind(job)
    .bind(no)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl SqliteStore {
    /// A key row as the owner of the file writes it (the database sets
    /// nothing itself on SQLite).
    async fn insert_key_in(
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        key: &StoredKey,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(&format!(
            "INSERT INTO vault_keys (id, purpose, version, kek_id, wrapped, state, created_at, usage_count, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, {NOW}, 0, $7) ON CONFLICT DO NOTHING"
        ))
        .bind(&key.id)
        .bind(key.purpose.as_str())
        .bind(key.version)
        .bind(&key.wrapped.kek_id)
        .bind((key.state != KeyState::Destroyed).then_some(&key.wrapped.blob))
        .bind(key.state.as_str())
        .bind(os_user())
        .execute(&mut **tx)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The `rotation-done` audit row: what a finished job changed.
    async fn record_done(
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        record: i64,
        note: String,
        rows: i64,
    ) -> Result<(), StoreError> {
        let (reason, claimed): (String, Option<String>) =
            sqlx::query_as("SELECT reason, claimed_actor FROM audit_log WHERE id = $1")
                .bind(record)
                .fetch_one(&mut **tx)
                .await?;
        let audit = AuditEntry {
            claimed_actor: claimed.unwrap_or_default(),
            action: "rotation-done".into(),
            target: note,
            reason,
        };
        insert_audit(tx, &audit, rows).await?;
        Ok(())
    }
}

/// `rotate kek` keeps no job row on SQLite (its table's kinds predate it,
/// and a KEK rotation resumes by itself: keys already under the target are
/// passed over); this id stands for it.
const KEK_JOB: i64 = 0;

/// Retired data keys no row names any more, destroyed; their ids.
async fn destroy_unreferenced(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE vault_keys SET state = 'destroyed', wrapped = NULL \
         WHERE purpose = 'vault' AND state = 'retired' \
         AND NOT EXISTS (SELECT 1 FROM vault v WHERE v.key_id = vault_keys.id) \
         AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.key_id = vault_keys.id) RETURNING id",
    )
    .fetch_all(&mut **tx)
    .await?)
}

fn json_list(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|_| {
        StoreError::Permanent("rotation_jobs holds a key list that is not JSON".into())
    })
}

#[async_trait]
impl admin::Maintenance for SqliteStore {
    async fn init_keys(
        &self,
        kek: &str,
        token: Option<&StoredKey>,
        line_ids: Option<&StoredKey>,
        claimed_actor: &str,
    ) -> Result<admin::Initialised, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut done = admin::Initialised {
            kek_added: sqlx::query(
                "INSERT INTO kms_allowlist (kek_id, added_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(kek)
            .bind(os_user())
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1,
            ..Default::default()
        };
        if done.kek_added {
            let audit = AuditEntry {
                claimed_actor: claimed_actor.into(),
                action: "allow-kek".into(),
                target: kek.into(),
                reason: "key set-up".into(),
            };
            insert_audit(&mut tx, &audit, 0).await?;
        }
        let have = |purpose: &'static str| {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM vault_keys WHERE purpose = $1 AND ($1 = 'token' OR state <> 'destroyed')",
            )
            .bind(purpose)
        };
        // Under `kek`, whatever the rows say, as on Postgres.
        let under_kek = |k: &StoredKey| StoredKey {
            wrapped: WrappedKey {
                kek_id: kek.to_string(),
                blob: k.wrapped.blob.clone(),
            },
            ..k.clone()
        };
        if let Some(k) = token {
            if have("token").fetch_one(&mut *tx).await? == 0 {
                done.token_key = Self::insert_key_in(&mut tx, &under_kek(k)).await?;
            }
        }
        if let Some(k) = line_ids {
            if have("line-ids").fetch_one(&mut *tx).await? == 0 {
                done.line_id_key = Self::insert_key_in(&mut tx, &under_kek(k)).await?;
            }
        }
        if done.token_key || done.line_id_key {
            let audit = AuditEntry {
                claimed_actor: claimed_actor.into(),
                action: "keys-init".into(),
                target: match (done.token_key, done.line_id_key) {
                    (true, true) => "token key v1, line-id key",
                    (true, false) => "token key v1",
                    _ => "line-id key",
                }
                .into(),
                reason: "initial keys".into(),
            };
            insert_audit(&mut tx, &audit, 0).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn begin_job(
        &self,
        audit: &AuditEntry,
        row_count: i64,
    ) -> Result<admin::Job, StoreError> {
        if !admin::JOB_KINDS.contains(&audit.action.as_str()) {
            return Err(StoreError::Permanent(format!(
                "{} is not a job kind",
                audit.action
            )));
        }
        // A lock file beside the database, one per kind; the lock goes with
        // the process however it ends.
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{}.lock", audit.action));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&name)
            .map_err(|e| {
                StoreError::Permanent(format!("cannot open the job lock file: {}", e.kind()))
            })?;
        if file.try_lock().is_err() {
            return Err(StoreError::Busy(format!(
                "another {} is running on this database; wait for it to finish",
                audit.action
            )));
        }
        let mut tx = self.pool.begin().await?;
        let id = insert_audit(&mut tx, audit, row_count).await?;
        tx.commit().await?;
        Ok(admin::Job::new(id, admin::JobLock::File(file)))
    }

    async fn count_sealed_under(&self, key_ids: &[String]) -> Result<i64, StoreError> {
        if key_ids.is_empty() {
            return Ok(0);
        }
        let mut q = QueryBuilder::new("SELECT (SELECT count(*) FROM vault WHERE key_id IN ");
        push_in_list(&mut q, key_ids);
        q.push(") + (SELECT count(*) FROM quarantine WHERE key_id IN ");
        push_in_list(&mut q, key_ids);
        q.push(")");
        Ok(q.build_query_scalar().fetch_one(&self.pool).await?)
    }

    async fn count_stale_tokens(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id WHERE {}",
            stale(1)
        ))
        .bind(admin::token_like(version))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM user_logins l WHERE {}",
            stale(1)
        ))
        .bind(admin::token_like(version))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn rotation_bounds(&self, _kind: &str, _parts: usize) -> Result<Vec<String>, StoreError> {
        // One writer at a time on SQLite: one range, from the first message id.
        Ok(vec![String::new()])
    }

    async fn resume_rotation(
        &self,
        record: i64,
        kind: &str,
    ) -> Result<Option<admin::RotationJob>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, started_by, old_keys, new_keys, token_version FROM rotation_jobs \
             WHERE kind = $1 AND finished_at IS NULL",
        )
        .bind(kind)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let id: i64 = r.try_get("id")?;
        let old: String = r.try_get("old_keys")?;
        let made: String = r.try_get("new_keys")?;
        sqlx::query("UPDATE rotation_jobs SET held_by = $1 WHERE id = $2")
            .bind(record)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active' \
             AND id IN (SELECT value FROM json_each($1))",
        )
        .bind(&made)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(admin::RotationJob {
            id,
            started_by: r.try_get("started_by")?,
            old_keys: json_list(&old)?,
            token_version: r.try_get("token_version")?,
            kek_target: None,
        }))
    }

    async fn start_rotation(
        &self,
        record: i64,
        start: admin::JobStart<'_>,
    ) -> Result<admin::RotationJob, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (kind, bounds, table, version) = match start {
            admin::JobStart::Kek => {
                let target: String =
                    sqlx::query_scalar("SELECT target FROM audit_log WHERE id = $1")
                        .bind(record)
                        .fetch_one(&mut *tx)
                        .await?;
                sqlx::query(
                    "INSERT INTO kms_allowlist (kek_id, added_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&target)
                .bind(os_user())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(admin::RotationJob {
                    id: KEK_JOB,
                    started_by: record,
                    old_keys: vec![],
                    token_version: None,
                    kek_target: Some(target),
                });
            }
            admin::JobStart::DataKeys { bounds } => {
                sqlx::query(
                    "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active'",
                )
                .execute(&mut *tx)
                .await?;
                ("rotate-data-keys", bounds, "vault", None)
            }
            admin::JobStart::TokenKey { bounds, key } => {
                Self::insert_key_in(&mut tx, key).await?;
                sqlx::query(
                    "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'token' AND state = 'active' AND id <> $1",
                )
                .bind(&key.id)
                .execute(&mut *tx)
                .await?;
                ("rotate-token-key", bounds, "user_logins", Some(key.version))
            }
        };
        let old: Vec<String> = if kind == "rotate-data-keys" {
            sqlx::query_scalar(
                "SELECT id FROM vault_keys WHERE purpose = 'vault' AND state = 'retired' ORDER BY id",
            )
            .fetch_all(&mut *tx)
            .await?
        } else {
            vec![]
        };
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO rotation_jobs (kind, started_by, held_by, old_keys, token_version) \
             VALUES ($1, $2, $2, $3, $4) RETURNING id",
        )
        .bind(kind)
        .bind(record)
        .bind(serde_json::to_string(&old).expect("a list of strings"))
        .bind(version)
        .fetch_one(&mut *tx)
        .await?;
        let mut no = 0;
        for (i, lo) in bounds.iter().enumerate() {
            sqlx::query(
                "INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor) VALUES ($1, $2, $3, $4, $5, $4)",
            )
            .bind(id)
            .bind(no)
            .bind(table)
            .bind(lo)
            .bind(bounds.get(i + 1))
            .execute(&mut *tx)
            .await?;
            no += 1;
        }
        if kind == "rotate-data-keys" {
            sqlx::query(
                "INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor) VALUES ($1, $2, 'quarantine', '', NULL, '')",
            )
            .bind(id)
            .bind(no)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(admin::RotationJob {
            id,
            started_by: record,
            old_keys: old,
            token_version: version,
            kek_target: None,
        })
    }

    async fn rotation_ranges(
        &self,
        _record: i64,
        job: i64,
    ) -> Result<Vec<admin::RotationRange>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT no, tbl, lo, hi, cursor, rows_done, done FROM rotation_ranges WHERE job_id = $1 ORDER BY no",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn rotation_new_data_key(
        &self,
        _record: i64,
        job: i64,
        key: &StoredKey,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::insert_key_in(&mut tx, key).await?;
        sqlx::query(
            "UPDATE rotation_jobs SET new_keys = json_insert(new_keys, '$[#]', $1) WHERE id = $2",
        )
        .bind(&key.id)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotation_retire_key(
        &self,
        _record: i64,
        job: i64,
        key_id: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE id = $1 AND state = 'active' \
             AND id IN (SELECT value FROM json_each((SELECT new_keys FROM rotation_jobs WHERE id = $2)))",
        )
        .bind(key_id)
        .bind(job)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn rotation_range_done(&self, _record: i64, job: i64, no: i32) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotation_ranges SET done = 1 WHERE job_id = $1 AND no = $2")
            .bind(job)
            .bind(no)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_rotation(&self, record: i64, job: i64) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if job == KEK_JOB {
            let target: String = sqlx::query_scalar("SELECT target FROM audit_log WHERE id = $1")
                .bind(record)
                .fetch_one(&mut *tx)
                .await?;
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND kek_id <> $1",
            )
            .bind(&target)
            .fetch_one(&mut *tx)
            .await?;
            if left > 0 {
                return Err(StoreError::Refused(format!(
                    "{left} key(s) under another key-encryption key remain; re-wrap them first"
                )));
            }
            let moved: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM vault_keys WHERE state <> 'destroyed' AND kek_id = $1",
            )
            .bind(&target)
            .fetch_one(&mut *tx)
            .await?;
            Self::record_done(
                &mut tx,
                record,
                format!("rotate-kek: keys under {target}"),
                moved,
            )
            .await?;
            tx.commit().await?;
            return Ok(vec![]);
        }
        let (kind, new_keys, version): (String, String, Option<i64>) =
            sqlx::query_as("SELECT kind, new_keys, token_version FROM rotation_jobs WHERE id = $1")
                .bind(job)
                .fetch_one(&mut *tx)
                .await?;
        let rows: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(rows_done), 0) FROM rotation_ranges WHERE job_id = $1",
        )
        .bind(job)
        .fetch_one(&mut *tx)
        .await?;
        let (gone, note) = if kind == "rotate-data-keys" {
            sqlx::query(
                "UPDATE vault_keys SET state = 'retired' WHERE state = 'active' \
                 AND id IN (SELECT value FROM json_each($1))",
            )
            .bind(&new_keys)
            .execute(&mut *tx)
            .await?;
            let gone = destroy_unreferenced(&mut tx).await?;
            let note = format!(
                "{kind} job {job}: {rows} row(s) re-sealed under {} new data key(s); {} data key(s) destroyed",
                json_list(&new_keys)?.len(),
                gone.len()
            );
            (gone, note)
        } else {
            let version = version.unwrap_or(0);
            let stale: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id WHERE {}",
            stale(1)
            ))
            .bind(admin::token_like(version))
            .fetch_one(&mut *tx)
            .await?;
            let gone: Vec<String> = if stale == 0 {
                sqlx::query_scalar(
                    "UPDATE vault_keys SET state = 'destroyed', wrapped = NULL \
                     WHERE purpose = 'token' AND version < $1 AND state = 'retired' RETURNING id",
                )
                .bind(version)
                .fetch_all(&mut *tx)
                .await?
            } else {
                vec![]
            };
            let note = format!(
                "{kind} job {job}: {rows} login(s) re-tokenised to v{version}; {} token key(s) destroyed",
                gone.len()
            );
            (gone, note)
        };
        sqlx::query(&format!(
            "UPDATE rotation_jobs SET finished_at = {NOW} WHERE id = $1"
        ))
        .bind(job)
        .execute(&mut *tx)
        .await?;
        Self::record_done(&mut tx, record, note, rows).await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(gone)
    }

    async fn vault_chunk(
        &self,
        _record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, user_id, key_id, nonce, ciphertext FROM vault \
             WHERE message_id > $1 AND ($2 IS NULL OR message_id <= $2) \
             AND key_id IN (SELECT value FROM json_each((SELECT old_keys FROM rotation_jobs WHERE id = $3))) \
             ORDER BY message_id LIMIT $4",
        )
        .bind(after)
        .bind(hi)
        .bind(job)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok(VaultRow::from_row(r)?)).collect()
    }

    async fn quarantine_chunk(
        &self,
        _record: i64,
        job: i64,
        after: &str,
        limit: i64,
    ) -> Result<Vec<QuarantineRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT message_id, reason_code, reason, user_id, key_id, nonce, ciphertext, received_at \
             FROM quarantine WHERE message_id > $1 \
             AND key_id IN (SELECT value FROM json_each((SELECT old_keys FROM rotation_jobs WHERE id = $2))) \
             ORDER BY message_id LIMIT $3",
        )
        .bind(after)
        .bind(job)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QuarantineRow {
                    message_id: r.try_get("message_id")?,
                    reason_code: r.try_get("reason_code")?,
                    reason: r.try_get("reason")?,
                    user_id: r.try_get("user_id")?,
                    key_id: r.try_get("key_id")?,
                    nonce: r.try_get("nonce")?,
                    ciphertext: r.try_get("ciphertext")?,
                    received_at: parse_time(&r.try_get::<String, _>("received_at")?)?,
                })
            })
            .collect()
    }

    async fn reseal_chunk(
        &self,
        _record: i64,
        job: i64,
        no: i32,
        cursor: &str,
        vault: &[(VaultRow, String)],
        quarantine: &[(QuarantineRow, String)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = reseal_in(&mut tx, vault, quarantine).await?;
        advance(&mut tx, job, no, cursor, changed as i64).await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn logins_chunk(
        &self,
        _record: i64,
        job: i64,
        after: &str,
        hi: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT l.id, l.message_id, l.user_id, v.key_id, v.nonce, v.ciphertext \
             FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
             WHERE l.message_id > $1 AND ($2 IS NULL OR l.message_id <= $2) AND ({}) \
             ORDER BY l.message_id LIMIT $4",
            stale(3)
        ))
        .bind(after)
        .bind(hi)
        .bind(self.job_token_like(job).await?)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn sweep_chunk(
        &self,
        _record: i64,
        job: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, VaultRow)>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT l.id, l.message_id, l.user_id, v.key_id, v.nonce, v.ciphertext \
             FROM user_logins l JOIN vault v ON v.message_id = l.message_id \
             WHERE l.id > $1 AND ({}) ORDER BY l.id LIMIT $3",
            stale(2)
        ))
        .bind(after)
        .bind(self.job_token_like(job).await?)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(id_and_vault_row).collect()
    }

    async fn tokens_chunk(
        &self,
        _record: i64,
        job: i64,
        range: Option<(i32, &str)>,
        rows: &[(i64, String, String)],
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut changed = 0;
        for (id, ip, dev) in rows {
            changed += sqlx::query(
                "UPDATE user_logins SET masked_ip = $1, masked_device_id = $2 WHERE id = $3",
            )
            .bind(ip)
            .bind(dev)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        if let Some((no, cursor)) = range {
            advance(&mut tx, job, no, cursor, changed as i64).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn rewrap_key(
        &self,
        _record: i64,
        _job: i64,
        key_id: &str,
        wrapped: &WrappedKey,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE vault_keys SET wrapped = $1, kek_id = $2 WHERE id = $3 AND state <> 'destroyed' AND kek_id <> $2",
        )
        .bind(&wrapped.blob)
        .bind(&wrapped.kek_id)
        .bind(key_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn retire_data_keys(&self, _record: i64, _job: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active'",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn forget(
        &self,
        user_id: &str,
        audit: &AuditEntry,
    ) -> Result<admin::Forgotten, StoreError> {
        let mut tx = self.pool.begin().await?;
        let vault_rows = sqlx::query("DELETE FROM vault WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let quarantined = sqlx::query("DELETE FROM quarantine WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let logins_kept: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_logins WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
        insert_audit(&mut tx, audit, (vault_rows + quarantined) as i64).await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(admin::Forgotten {
            vault_rows,
            quarantined,
            logins_kept: logins_kept as u64,
        })
    }

    async fn retention(
        &self,
        before: chrono::NaiveDate,
        audit: &AuditEntry,
    ) -> Result<admin::Retained, StoreError> {
        let day = before.format("%Y-%m-%d").to_string();
        let mut tx = self.pool.begin().await?;
        let vault_rows = sqlx::query(&format!("DELETE FROM vault WHERE {VAULT_BEFORE}"))
            .bind(&day)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let quarantined = sqlx::query(&format!("DELETE FROM quarantine WHERE {QUARANTINE_BEFORE}"))
            .bind(&day)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let undated_kept: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM vault v WHERE NOT EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id AND l.create_date IS NOT NULL)",
        )
        .fetch_one(&mut *tx)
        .await?;
        let keys_destroyed = destroy_unreferenced(&mut tx).await?;
        let audit = AuditEntry {
            target: format!("before={day} keys_destroyed={}", keys_destroyed.len()),
            ..audit.clone()
        };
        insert_audit(&mut tx, &audit, (vault_rows + quarantined) as i64).await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(admin::Retained {
            vault_rows,
            quarantined,
            undated_kept: undated_kept as u64,
            keys_destroyed,
        })
    }

    async fn count_older_than(&self, before: chrono::NaiveDate) -> Result<(u64, u64), StoreError> {
        let day = before.format("%Y-%m-%d").to_string();
        let (vault_rows, quarantined): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM vault WHERE {VAULT_BEFORE}), \
                    (SELECT count(*) FROM quarantine WHERE {QUARANTINE_BEFORE})"
        ))
        .bind(&day)
        .fetch_one(&self.pool)
        .await?;
        Ok((vault_rows as u64, quarantined as u64))
    }

    async fn set_policy(
        &self,
        max_users_per_reveal: Option<i64>,
        max_reveals_per_day: Option<i64>,
    ) -> Result<RevealPolicy, StoreError> {
        let mut tx = self.pool.begin().await?;
        let (old_users, old_day): (i64, i64) =
            sqlx::query_as("SELECT max_users_per_reveal, max_reveals_per_day FROM reveal_policy")
                .fetch_one(&mut *tx)
                .await?;
        let (users, day) = (
            max_users_per_reveal.unwrap_or(old_users),
            max_reveals_per_day.unwrap_or(old_day),
        );
        sqlx::query(&format!(
            "UPDATE reveal_policy SET max_users_per_reveal = $1, max_reveals_per_day = $2, \
             changed_at = {NOW}, changed_by = $3"
        ))
        .bind(users)
        .bind(day)
        .bind(os_user())
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry {
            claimed_actor: os_user(),
            action: "policy-set".into(),
            target: format!("max_users_per_reveal={users} max_reveals_per_day={day}"),
            reason: format!("was max_users_per_reveal={old_users} max_reveals_per_day={old_day}"),
        };
        insert_audit(&mut tx, &audit, 0).await?;
        tx.commit().await?;
        self.policy().await
    }

    async fn plant_honeytokens(
        &self,
        user_ids: &[String],
        logins: &[admin::PlannedLogin],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for id in user_ids {
            sqlx::query("INSERT INTO honeytokens (user_id, planted_by) VALUES ($1, $2)")
                .bind(id)
                .bind(os_user())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "DELETE FROM honeytoken_logins WHERE EXISTS \
             (SELECT 1 FROM user_logins l WHERE l.message_id IN (honeytoken_logins.uuid_id, honeytoken_logins.line_id))",
        )
        .execute(&mut *tx)
        .await?;
        for l in logins {
            sqlx::query(
                "INSERT INTO honeytoken_logins (user_id, uuid_id, line_id, body, due_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&l.user_id)
            .bind(&l.uuid_id)
            .bind(&l.line_id)
            .bind(&l.body)
            .bind(sqlite_time(l.due_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn sample_users(&self, limit: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "WITH s AS (SELECT DISTINCT user_id AS u FROM user_logins \
                        WHERE user_id NOT IN (SELECT user_id FROM honeytokens) \
                        ORDER BY random() LIMIT $1) \
             SELECT s.u, (SELECT count(*) FROM user_logins l WHERE l.user_id = s.u) FROM s",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn existing_users(&self, user_ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut found = Vec::new();
        for u in user_ids {
            let n: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM user_logins WHERE user_id = $1) \
                      + (SELECT count(*) FROM honeytokens WHERE user_id = $1)",
            )
            .bind(u)
            .fetch_one(&self.pool)
            .await?;
            if n > 0 {
                found.push(u.clone());
            }
        }
        Ok(found)
    }

    async fn listen_alarms(&self) -> Result<Box<dyn admin::AlarmListener>, StoreError> {
        Err(StoreError::Permanent(
            "following alarms needs Postgres (LISTEN/NOTIFY); on SQLite run `pii-vault audit --alarms` from a scheduler".into(),
        ))
    }

    async fn alarms(&self, filter: &AuditFilter) -> Result<Vec<Alarm>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, request_id, target, honeytokens FROM audit_alarms \
             WHERE ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR actor = $3) ORDER BY id DESC LIMIT $1",
        )
        .bind(filter.limit)
        .bind(filter.since.map(sqlite_time))
        .bind(filter.actor.as_deref())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Alarm {
                    id: r.try_get("id")?,
                    at: parse_time(&r.try_get::<String, _>("at")?)?,
                    actor: r.try_get("actor")?,
                    action: "alarm",
                    request_id: r.try_get("request_id")?,
                    target: r.try_get("target")?,
                    honeytokens: r.try_get("honeytokens")?,
                })
            })
            .collect()
    }
}
