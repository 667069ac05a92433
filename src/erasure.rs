//! Erasure: one user's originals (`forget --user-id`), or every original
//! older than a retention date (`forget --before`).
//!
//! Both delete ciphertext in bulk, never decrypt it, and leave the masked
//! `user_logins` rows for analytics (tokens alone reveal nothing). On
//! Postgres each is one call of a `SECURITY DEFINER` function that deletes
//! and writes the audit row, with its count, in one transaction
//! (`migrations/postgres/functions/50_erasure.sql`): the rotator has no
//! `DELETE` of its own, so no erasure goes unrecorded and no record claims
//! an erasure that did not happen.
//!
//! A retention run also destroys the data keys that no longer seal
//! anything (their wrapped copy is dropped from the database), which is what
//! makes copies of those rows in older backups unreadable once the KMS key
//! that wrapped them is rotated away; SECURITY.md has the procedure.

use chrono::NaiveDate;

use crate::rotation::JobRequest;
use crate::store::admin::{Forgotten, Maintenance, Retained};

/// What `forget --before` did.
#[derive(Debug, Default)]
pub struct RetentionDone {
    pub erased: Retained,
    /// Retired data keys that sealed nothing any more, destroyed.
    pub destroyed_keys: Vec<String>,
}

/// Erases a user's recoverable originals, audited in the same transaction.
pub async fn forget(
    store: &dyn Maintenance,
    user_id: &str,
    job: &JobRequest,
) -> anyhow::Result<Forgotten> {
    Ok(store
        .forget(user_id, &job.entry("forget", format!("user_id={user_id}")))
        .await?)
}

/// Erases every original of a login before `before` (a UTC day) and every
/// body quarantined before it, and destroys the retired data keys left with
/// nothing to open, audited with the count in the same transaction.
pub async fn retention(
    store: &dyn Maintenance,
    before: NaiveDate,
    job: &JobRequest,
) -> anyhow::Result<RetentionDone> {
    let tomorrow = chrono::Utc::now().date_naive() + chrono::Days::new(1);
    anyhow::ensure!(
        before <= tomorrow,
        "--before {before} is in the future: retention erases what is older than a day that has begun"
    );
    let erased = store
        .retention(before, &job.entry("retention", format!("before={before}")))
        .await?;
    let destroyed_keys = erased.keys_destroyed.clone();
    Ok(RetentionDone {
        erased,
        destroyed_keys,
    })
}

/// What `forget --before … --dry-run` reports: (vault rows, quarantined bodies).
pub async fn preview(store: &dyn Maintenance, before: NaiveDate) -> anyhow::Result<(u64, u64)> {
    Ok(store.count_older_than(before).await?)
}
