//! [`Ingest`] on Postgres.
//!
//! A batch is written in one transaction, by one of two lanes. The fast
//! lane sends both tables by binary `COPY` (a bulk load's cost: no
//! speculative insertion, no per-row statement overhead); it assumes every
//! message id is new and fails as a whole if one is not. Then the batch is
//! rolled back and written by the careful lane: one statement per table with
//! the rows as parallel arrays (`UNNEST($1::text[], …)`) and `ON CONFLICT
//! DO NOTHING`, so a redelivered message that another replica already
//! committed is counted as a duplicate. Exactly-once effect rests on the
//! unique `(message_id, create_date)` either way (both tables are
//! partitioned by month of `create_date`, migration 0017): a message keeps
//! its date when delivered again, an SQS message by its `SentTimestamp`, a
//! file line by the day of its first load, asked for before either lane
//! ([`line_days`]: one call per batch, by ranges of line numbers).

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

use super::copy;
use super::line_days::{line_days, LineDays};
use super::PgStore;
use crate::clock::month_of;
use crate::store::{Batch, BatchOutcome, DueHoneytoken, Ingest, LoginRow, StoreError, VaultRow};

/// Rows per statement. Arrays have no parameter limit; this only bounds the
/// size of one statement (and the time a single insert holds its locks)
/// when a caller hands over a very large batch.
const CHUNK: usize = 1000;

/// The logins of a batch that can be inserted by one statement: the first
/// of each `message_id` (a later copy in the same batch is a redelivery and
/// a duplicate), in `message_id` order. Postgres may pair a skipped row's
/// vault row with the kept login if both are in one statement, so repeats
/// are dropped here; the fixed order makes concurrent replicas that insert
/// overlapping batches take their unique-index locks in the same order,
/// which keeps them from deadlocking.
fn first_of_each(logins: &[(LoginRow, VaultRow)]) -> Vec<&(LoginRow, VaultRow)> {
    let mut out: Vec<_> = logins.iter().collect();
    // Stable, so each id's first copy stays ahead of its later ones, which
    // `dedup_by` then drops (a sort the batch needs anyway, not a hash set).
    out.sort_by(|a, b| a.0.message_id.cmp(&b.0.message_id));
    out.dedup_by(|later, kept| later.0.message_id == kept.0.message_id);
    out
}

/// The fast lane: both tables by binary `COPY`, as a bulk load would. It
/// assumes every message id is new (the common case under at-least-once
/// delivery) and fails as a whole on the first one that is not, with a
/// unique violation: the caller then rolls back and takes [`insert_logins`].
async fn copy_logins(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    logins: &[&(LoginRow, VaultRow)],
    days: &LineDays,
) -> Result<(), sqlx::Error> {
    let opt = |v: &Option<String>| v.as_deref().map_or(0, str::len);
    let mut rows = copy::CopyRows::for_rows(
        9,
        logins.iter().map(|(l, _)| {
            l.message_id.len()
                + l.user_id.len()
                + l.device_type.len()
                + l.masked_ip.len()
                + l.masked_device_id.len()
                + opt(&l.masked_ip_net)
                + opt(&l.locale)
                + l.app_version.len()
                + copy::DATE_BYTES
        }),
    );
    for (l, _) in logins {
        rows.row(9)
            .text(&l.message_id)
            .text(&l.user_id)
            .text(&l.device_type)
            .text(&l.masked_ip)
            .text(&l.masked_device_id)
            .opt_text(l.masked_ip_net.as_deref())
            .opt_text(l.locale.as_deref())
            .text(&l.app_version)
            .date(days.day(l));
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
             masked_ip_net, locale, app_version, create_date) FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;

    let mut rows = copy::CopyRows::for_rows(
        6,
        logins.iter().map(|(_, v)| {
            v.message_id.len()
                + v.user_id.len()
                + v.key_id.len()
                + v.nonce.len()
                + v.ciphertext.len()
                + copy::DATE_BYTES
        }),
    );
    for (l, v) in logins {
        rows.row(6)
            .text(&v.message_id)
            .text(&v.user_id)
            .text(&v.key_id)
            .bytes(&v.nonce)
            .bytes(&v.ciphertext)
            .date(days.day(l));
    }
    let mut copy = tx
        .copy_in_raw(
            "COPY vault (message_id, user_id, key_id, nonce, ciphertext, create_date) \
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;

    Ok(())
}

/// The lane for batches that may hold redeliveries: `ON CONFLICT DO
/// NOTHING` skips what is stored, and only the logins this statement
/// inserted get vault rows. Returns how many were new.
async fn insert_logins(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    logins: &[&(LoginRow, VaultRow)],
    days: &LineDays,
    planted: &HashSet<String>,
    out: &mut BatchOutcome,
) -> Result<usize, StoreError> {
    let mut fresh = 0;
    let day = |l: &LoginRow| days.day(l);
    for chunk in logins.chunks(CHUNK) {
        let mut message_id = Vec::with_capacity(chunk.len());
        let mut user_id = Vec::with_capacity(chunk.len());
        let mut device_type = Vec::with_capacity(chunk.len());
        let mut masked_ip = Vec::with_capacity(chunk.len());
        let mut masked_device_id = Vec::with_capacity(chunk.len());
        let mut masked_ip_net = Vec::with_capacity(chunk.len());
        let mut locale = Vec::with_capacity(chunk.len());
        let mut app_version = Vec::with_capacity(chunk.len());
        let mut create_date: Vec<Option<NaiveDate>> = Vec::with_capacity(chunk.len());
        for (l, _) in chunk {
            message_id.push(l.message_id.as_str());
            user_id.push(l.user_id.as_str());
            device_type.push(l.device_type.as_str());
            masked_ip.push(l.masked_ip.as_str());
            masked_device_id.push(l.masked_device_id.as_str());
            masked_ip_net.push(l.masked_ip_net.as_deref());
            locale.push(l.locale.as_deref());
            app_version.push(l.app_version.as_str());
            create_date.push(day(l));
        }
        let inserted: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, \
             masked_ip_net, locale, app_version, create_date) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::date[]) \
             ON CONFLICT (message_id, create_date) DO NOTHING RETURNING message_id",
        )
        .bind(&message_id)
        .bind(&user_id)
        .bind(&device_type)
        .bind(&masked_ip)
        .bind(&masked_device_id)
        .bind(&masked_ip_net)
        .bind(&locale)
        .bind(&app_version)
        .bind(&create_date)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
        for (l, _) in chunk {
            if planted.contains(&l.message_id) {
                continue;
            }
            if inserted.contains(&l.message_id) {
                out.stored += 1;
            } else {
                out.duplicates += 1;
            }
        }
        fresh += inserted.len();

        // Only the logins this statement inserted get vault rows: a
        // duplicate's vault row is already there, sealed under its own
        // nonce, and must not be replaced by the redelivery's. No ON
        // CONFLICT: these message ids were new to `user_logins` a moment
        // ago in this transaction, and a conflict target would need
        // SELECT on `vault`, which the worker role must not have (see
        // migrations/postgres/0002_roles.sql).
        let new: Vec<&(LoginRow, VaultRow)> = chunk
            .iter()
            .copied()
            .filter(|(l, _)| inserted.contains(&l.message_id))
            .collect();
        if new.is_empty() {
            continue;
        }
        let message_id: Vec<&str> = new.iter().map(|(_, v)| v.message_id.as_str()).collect();
        let user_id: Vec<&str> = new.iter().map(|(_, v)| v.user_id.as_str()).collect();
        let key_id: Vec<&str> = new.iter().map(|(_, v)| v.key_id.as_str()).collect();
        let nonce: Vec<&[u8]> = new.iter().map(|(_, v)| v.nonce.as_slice()).collect();
        let ciphertext: Vec<&[u8]> = new.iter().map(|(_, v)| v.ciphertext.as_slice()).collect();
        let create_date: Vec<Option<NaiveDate>> = new.iter().map(|(l, _)| day(l)).collect();
        sqlx::query(
            "INSERT INTO vault (message_id, user_id, key_id, nonce, ciphertext, create_date) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::date[])",
        )
        .bind(&message_id)
        .bind(&user_id)
        .bind(&key_id)
        .bind(&nonce)
        .bind(&ciphertext)
        .bind(&create_date)
        .execute(&mut **tx)
        .await?;
    }
    Ok(fresh)
}

/// The monthly partitions a worker knows of (from its last call of
/// `pii_vault_partitions_ensure`), and the months it asked for that the
/// database would not make (beyond 14 months ahead, before 10 years ago, or
/// after a failure), not asked for again by this process.
#[derive(Default)]
pub(super) struct KnownPartitions {
    ranges: Vec<(NaiveDate, NaiveDate)>,
    asked: HashSet<NaiveDate>,
}

impl KnownPartitions {
    fn covers(&self, month: NaiveDate) -> bool {
        self.asked.contains(&month)
            || self
                .ranges
                .iter()
                .any(|(lo, hi)| *lo <= month && month < *hi)
    }

    /// Whether the partitions known end within a month of `newest` (or
    /// none is known).
    fn near_end(&self, newest: NaiveDate) -> bool {
        let end = self.ranges.iter().map(|(_, hi)| *hi).max();
        end.is_none_or(|end| newest + chrono::Days::new(31) >= end)
    }

    /// The months of `days` that need a partition made, and whether the
    /// partitions end within a month of `newest`.
    fn missing(&self, days: &[NaiveDate], newest: NaiveDate) -> (Vec<NaiveDate>, bool) {
        let mut months: Vec<NaiveDate> = days.iter().map(|d| month_of(*d)).collect();
        months.sort_unstable();
        months.dedup();
        months.retain(|m| !self.covers(*m));
        (months, self.near_end(newest))
    }
}

impl PgStore {
    /// Creates the monthly partitions a batch is about to need: the month
    /// of each of its days that has none, and two months past its newest
    /// day (or today) once the partitions end within a month of it. Once
    /// per process, then about once a month, or when a backfill brings an
    /// old month; every other batch looks its few months up in memory. A
    /// failure costs nothing but a warning: a row whose month has no
    /// partition is stored in the default one, and moved out when the
    /// partition is made. Months due to be settled are settled then too, in the
    /// background.
    async fn partitions_ahead(&self, logins: &[&(LoginRow, VaultRow)]) {
        let today = crate::clock::today();
        let days: Vec<NaiveDate> = logins.iter().filter_map(|(l, _)| l.create_date).collect();
        let newest = days
            .iter()
            .copied()
            .max()
            .map_or(today, |d| d.max(today))
            .min(today + chrono::Days::new(400));
        let (months, near_end) = self
            .partitions
            .lock()
            .expect("never poisoned: no panics while held")
            .missing(&days, newest);
        if months.is_empty() && !near_end {
            return;
        }
        let made: Result<Vec<(NaiveDate, NaiveDate)>, _> =
            sqlx::query_as("SELECT lo, hi FROM pii_vault_partitions_ensure($1, $2)")
                .bind(&months[..months.len().min(120)])
                .bind(newest + chrono::Days::new(62))
                .fetch_all(&self.pool)
                .await;
        let mut known = self.partitions.lock().expect("never poisoned");
        match made {
            Ok(ranges) => {
                known.ranges = ranges;
                super::months::settle_due_months(self.pool.clone());
            }
            Err(e) => tracing::warn!(
                error = %StoreError::from(e),
                "could not create the monthly partitions a batch needs; rows of a month without one are kept in the default partition"
            ),
        }
        // Not asked for again by this process, made or not.
        known.asked.extend(months);
        if near_end && known.near_end(newest) {
            // Capped or failed: ask again only for a later newest day.
            known
                .ranges
                .push((month_of(newest), newest + chrono::Days::new(32)));
        }
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

#[async_trait]
impl Ingest for PgStore {
    async fn write_batch(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        let mut out = BatchOutcome::default();
        let logins = first_of_each(&batch.logins);
        out.duplicates += (batch.logins.len() - logins.len()) as u64;

        // The rotation fences (active data keys, active token-key version)
        // and usage counting are the database's: statement triggers of
        // migrations/postgres/0003_trust_boundaries.sql check every insert
        // and COPY below, so `key_usage` and `token_key_id` need no query here.
        let mut days = LineDays::default();
        if !logins.is_empty() {
            self.partitions_ahead(&logins).await;
            days = line_days(&self.pool, &logins).await?;
        }
        let mut tx = self.pool.begin().await?;
        if !logins.is_empty() {
            if self.expect_duplicates.load(Ordering::Relaxed) {
                let fresh =
                    insert_logins(&mut tx, &logins, &days, &batch.planted, &mut out).await?;
                if fresh == logins.len() {
                    self.expect_duplicates.store(false, Ordering::Relaxed);
                }
            } else {
                match copy_logins(&mut tx, &logins, &days).await {
                    Ok(()) => {
                        out.stored += logins
                            .iter()
                            .filter(|(l, _)| !batch.planted.contains(&l.message_id))
                            .count() as u64
                    }
                    Err(e) if is_unique_violation(&e) => {
                        // A redelivery (or a file loaded again): this batch,
                        // and the next ones until a batch is all new, take
                        // the statement that skips what is already stored.
                        self.expect_duplicates.store(true, Ordering::Relaxed);
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        insert_logins(&mut tx, &logins, &days, &batch.planted, &mut out).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }

        for chunk in batch.quarantined.chunks(CHUNK) {
            let message_id: Vec<&str> = chunk.iter().map(|r| r.message_id.as_str()).collect();
            let reason_code: Vec<&str> = chunk.iter().map(|r| r.reason_code.as_str()).collect();
            let reason: Vec<&str> = chunk.iter().map(|r| r.reason.as_str()).collect();
            let user_id: Vec<Option<&str>> = chunk.iter().map(|r| r.user_id.as_deref()).collect();
            let key_id: Vec<&str> = chunk.iter().map(|r| r.key_id.as_str()).collect();
            let nonce: Vec<&[u8]> = chunk.iter().map(|r| r.nonce.as_slice()).collect();
            let ciphertext: Vec<&[u8]> = chunk.iter().map(|r| r.ciphertext.as_slice()).collect();
            let received_at: Vec<DateTime<Utc>> = chunk.iter().map(|r| r.received_at).collect();
            let source: Vec<Option<&str>> = chunk.iter().map(|r| r.source.as_deref()).collect();
            let line: Vec<Option<i64>> = chunk.iter().map(|r| r.line).collect();
            // DO NOTHING also skips a repeat within this very statement, so
            // rows affected is the number of newly quarantined messages. No
            // conflict target (the primary key on message_id is the only
            // unique index): a target would need SELECT on `quarantine`,
            // which the worker role must not have.
            let done = sqlx::query(
                "INSERT INTO quarantine (message_id, reason_code, reason, user_id, key_id, nonce, \
                 ciphertext, received_at, source, line) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::bytea[], $7::bytea[], $8::timestamptz[], $9::text[], $10::int8[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&message_id)
            .bind(&reason_code)
            .bind(&reason)
            .bind(&user_id)
            .bind(&key_id)
            .bind(&nonce)
            .bind(&ciphertext)
            .bind(&received_at)
            .bind(&source)
            .bind(&line)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            out.rejected += done;
            out.duplicates += chunk.len() as u64 - done;
        }

        tx.commit().await?;
        Ok(out)
    }

    async fn due_honeytokens(&self, limit: i64) -> Result<Vec<DueHoneytoken>, StoreError> {
        let rows: Vec<(String, String, String)> =
            sqlx::query_as("SELECT uuid_id, line_id, body FROM pii_vault_honeytokens_due($1)")
                .bind(limit.clamp(0, 100) as i32)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(uuid_id, line_id, body)| DueHoneytoken {
                uuid_id,
                line_id,
                body,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(message_id: &str, user_id: &str) -> (LoginRow, VaultRow) {
        let l = LoginRow {
            message_id: message_id.into(),
            user_id: user_id.into(),
            device_type: "ios".into(),
            masked_ip: "t1_ip".into(),
            masked_device_id: "t1_dev".into(),
            masked_ip_net: None,
            locale: None,
            app_version: "1.0".into(),
            create_date: None,
            line: None,
        };
        let v = VaultRow::of(&l, "k".into(), vec![0; 12], vec![1; 32]);
        (l, v)
    }

    /// A redelivery within a batch keeps the first copy, whatever the
    /// order of ids around it, and the rest come out in id order.
    #[test]
    fn first_of_each_keeps_each_ids_first_copy_in_id_order() {
        let batch = [
            login("m3", "first"),
            login("m1", "first"),
            login("m3", "second"),
            login("m2", "first"),
            login("m1", "second"),
            login("m3", "third"),
        ];
        let kept: Vec<_> = first_of_each(&batch)
            .iter()
            .map(|(l, _)| (l.message_id.as_str(), l.user_id.as_str()))
            .collect();
        assert_eq!(kept, [("m1", "first"), ("m2", "first"), ("m3", "first")]);
    }
}
