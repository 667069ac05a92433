//! [`Jobs`] on SQLite: the same jobs and ranges as on Postgres (one range:
//! one writer), a lock file for the lease, and direct SQL for the rest (the
//! file's one principal runs them all). `rotate kek` keeps no job row here
//! (the table's kinds predate it, and a KEK rotation resumes by itself: keys
//! already under the target are passed over).

use async_trait::async_trait;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::keys::{destroy_unreferenced, insert_key_in};
use super::{insert_audit, SqliteStore, NOW};
use crate::store::jobs::{token_like, LeaseHolder};
use crate::store::{
    AuditEntry, Job, JobKind, JobStart, Jobs, Lease, Requester, RotationRange, StoreError,
    StoredKey,
};

/// The id that stands for a `rotate kek` job, which has no row.
const KEK_JOB: i64 = 0;

/// A login of `l` whose tokens are not of the version that parameter `$p`
/// (a `LIKE` pattern) names.
pub(super) fn stale(p: u8) -> String {
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

fn json_list(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|_| {
        StoreError::Permanent("rotation_jobs holds a key list that is not JSON".into())
    })
}

/// The lease's holder: an exclusive lock on a file beside the database, one
/// per kind, which goes with the process however it ends.
struct FileLease(#[allow(dead_code)] std::fs::File);

#[async_trait]
impl LeaseHolder for FileLease {
    async fn release(self: Box<Self>, _record: i64) {}
}

/// Moves range `no`'s cursor in the transaction of its chunk.
pub(super) async fn advance(
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

/// The `rotation-done` audit row: what a finished job changed.
async fn record_done(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    job: &Job,
    note: String,
    rows: i64,
) -> Result<(), StoreError> {
    let (reason, claimed): (String, Option<String>) =
        sqlx::query_as("SELECT reason, claimed_actor FROM audit_log WHERE id = $1")
            .bind(job.record)
            .fetch_one(&mut **tx)
            .await?;
    let who = Requester {
        claimed_actor: claimed.unwrap_or_default(),
        reason,
    };
    insert_audit(tx, &AuditEntry::new(&who, "rotation-done", note), rows).await?;
    Ok(())
}

impl SqliteStore {
    /// The target KMS key its first audit record named (`rotate kek`).
    async fn kek_target(&self, record: i64) -> Result<String, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT target FROM audit_log WHERE id = $1")
                .bind(record)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Ends a `rotate kek`: refused while a key is under another KEK.
    async fn finish_kek(&self, job: &Job) -> Result<Vec<String>, StoreError> {
        let target = self.kek_target(job.record).await?;
        let mut tx = self.pool.begin().await?;
        let (left, moved): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE kek_id <> $1), count(*) FILTER (WHERE kek_id = $1) \
             FROM vault_keys WHERE state <> 'destroyed'",
        )
        .bind(&target)
        .fetch_one(&mut *tx)
        .await?;
        if left > 0 {
            return Err(StoreError::Refused(format!(
                "{left} key(s) under another key-encryption key remain; re-wrap them first"
            )));
        }
        let note = format!("rotate-kek: keys under {target}");
        record_done(&mut tx, job, note, moved).await?;
        tx.commit().await?;
        Ok(vec![])
    }
}

#[async_trait]
impl Jobs for SqliteStore {
    async fn begin_job(
        &self,
        kind: JobKind,
        target: &str,
        who: &Requester,
        row_count: i64,
    ) -> Result<Lease, StoreError> {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{kind}.lock"));
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
                "another {kind} is running on this database; wait for it to finish"
            )));
        }
        let mut tx = self.pool.begin().await?;
        let audit = AuditEntry::new(who, kind.as_str(), target);
        let record = insert_audit(&mut tx, &audit, row_count).await?;
        tx.commit().await?;
        Ok(Lease::new(record, kind, Box::new(FileLease(file))))
    }

    async fn resume_job(&self, lease: &Lease) -> Result<Option<Job>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT id, started_by, old_keys, new_keys, token_version FROM rotation_jobs \
             WHERE kind = $1 AND finished_at IS NULL",
        )
        .bind(lease.kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let id: i64 = r.try_get("id")?;
        sqlx::query("UPDATE rotation_jobs SET held_by = $1 WHERE id = $2")
            .bind(lease.record)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active' \
             AND id IN (SELECT value FROM json_each($1))",
        )
        .bind(r.try_get::<String, _>("new_keys")?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(Job {
            id,
            kind: lease.kind,
            record: lease.record,
            started_by: r.try_get("started_by")?,
            old_keys: json_list(&r.try_get::<String, _>("old_keys")?)?,
            token_version: r.try_get("token_version")?,
            kek_target: None,
        }))
    }

    async fn start_job(&self, lease: &Lease, start: JobStart<'_>) -> Result<Job, StoreError> {
        let mut job = Job {
            id: KEK_JOB,
            kind: start.kind(),
            record: lease.record,
            started_by: lease.record,
            old_keys: vec![],
            token_version: None,
            kek_target: None,
        };
        let mut tx = self.pool.begin().await?;
        let (bounds, table) = match start {
            JobStart::Kek => {
                let target = self.kek_target(lease.record).await?;
                sqlx::query(
                    "INSERT INTO kms_allowlist (kek_id, added_by) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&target)
                .bind(super::os_user())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                job.kek_target = Some(target);
                return Ok(job);
            }
            JobStart::DataKeys { bounds } => {
                sqlx::query(
                    "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'vault' AND state = 'active'",
                )
                .execute(&mut *tx)
                .await?;
                job.old_keys = sqlx::query_scalar(
                    "SELECT id FROM vault_keys WHERE purpose = 'vault' AND state = 'retired' ORDER BY id",
                )
                .fetch_all(&mut *tx)
                .await?;
                (bounds, "vault")
            }
            JobStart::TokenKey { bounds, key } => {
                insert_key_in(&mut tx, key).await?;
                sqlx::query(
                    "UPDATE vault_keys SET state = 'retired' WHERE purpose = 'token' AND state = 'active' AND id <> $1",
                )
                .bind(&key.id)
                .execute(&mut *tx)
                .await?;
                job.token_version = Some(key.version);
                (bounds, "user_logins")
            }
        };
        job.id = sqlx::query_scalar(
            "INSERT INTO rotation_jobs (kind, started_by, held_by, old_keys, token_version) \
             VALUES ($1, $2, $2, $3, $4) RETURNING id",
        )
        .bind(job.kind.as_str())
        .bind(lease.record)
        .bind(serde_json::to_string(&job.old_keys).expect("a list of strings"))
        .bind(job.token_version)
        .fetch_one(&mut *tx)
        .await?;
        let quarantine = (job.kind == JobKind::DataKeys).then_some(("", "quarantine"));
        for (no, (lo, tbl)) in bounds
            .iter()
            .map(|b| (b.as_str(), table))
            .chain(quarantine)
            .enumerate()
        {
            let hi = if tbl == table {
                bounds.get(no + 1)
            } else {
                None
            };
            sqlx::query(
                "INSERT INTO rotation_ranges (job_id, no, tbl, lo, hi, cursor) VALUES ($1, $2, $3, $4, $5, $4)",
            )
            .bind(job.id)
            .bind(no as i32)
            .bind(tbl)
            .bind(lo)
            .bind(hi)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(job)
    }

    async fn job_ranges(&self, job: &Job) -> Result<Vec<RotationRange>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT no, tbl, lo, hi, cursor, rows_done, done FROM rotation_ranges WHERE job_id = $1 ORDER BY no",
        )
        .bind(job.id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn job_new_data_key(&self, job: &Job, key: &StoredKey) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_key_in(&mut tx, key).await?;
        sqlx::query(
            "UPDATE rotation_jobs SET new_keys = json_insert(new_keys, '$[#]', $1) WHERE id = $2",
        )
        .bind(&key.id)
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn job_retire_key(&self, job: &Job, key_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE vault_keys SET state = 'retired' WHERE id = $1 AND state = 'active' \
             AND id IN (SELECT value FROM json_each((SELECT new_keys FROM rotation_jobs WHERE id = $2)))",
        )
        .bind(key_id)
        .bind(job.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn range_done(&self, job: &Job, no: i32) -> Result<(), StoreError> {
        sqlx::query("UPDATE rotation_ranges SET done = 1 WHERE job_id = $1 AND no = $2")
            .bind(job.id)
            .bind(no)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn finish_job(&self, job: &Job) -> Result<Vec<String>, StoreError> {
        if job.kind == JobKind::Kek {
            return self.finish_kek(job).await;
        }
        let mut tx = self.pool.begin().await?;
        let (new_keys, rows): (String, i64) = sqlx::query_as(
            "SELECT new_keys, (SELECT coalesce(sum(rows_done), 0) FROM rotation_ranges WHERE job_id = $1) \
             FROM rotation_jobs WHERE id = $1",
        )
        .bind(job.id)
        .fetch_one(&mut *tx)
        .await?;
        let (gone, note) = if job.kind == JobKind::DataKeys {
            sqlx::query(
                "UPDATE vault_keys SET state = 'retired' WHERE state = 'active' \
                 AND id IN (SELECT value FROM json_each($1))",
            )
            .bind(&new_keys)
            .execute(&mut *tx)
            .await?;
            let gone = destroy_unreferenced(&mut tx).await?;
            let made = json_list(&new_keys)?.len();
            let note = format!(
                "{} job {}: {rows} row(s) re-sealed under {made} new data key(s); {} data key(s) destroyed",
                job.kind,
                job.id,
                gone.len()
            );
            (gone, note)
        } else {
            let version = job.token_version.unwrap_or(0);
            let stale: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM user_logins l JOIN vault v ON v.message_id = l.message_id WHERE {}",
                stale(1)
            ))
            .bind(token_like(version))
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
                "{} job {}: {rows} login(s) re-tokenised to v{version}; {} token key(s) destroyed",
                job.kind,
                job.id,
                gone.len()
            );
            (gone, note)
        };
        sqlx::query(&format!(
            "UPDATE rotation_jobs SET finished_at = {NOW} WHERE id = $1"
        ))
        .bind(job.id)
        .execute(&mut *tx)
        .await?;
        record_done(&mut tx, job, note, rows).await?;
        tx.commit().await?;
        self.scrub().await;
        Ok(gone)
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
        .bind(token_like(version))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn count_tokens_not_of(&self, version: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM user_logins l WHERE {}",
            stale(1)
        ))
        .bind(token_like(version))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn rotation_bounds(
        &self,
        _kind: JobKind,
        _parts: usize,
    ) -> Result<Vec<String>, StoreError> {
        // One writer at a time on SQLite: one range, from the first message id.
        Ok(vec![String::new()])
    }
}
