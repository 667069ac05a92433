//! The day each file line is stored with on Postgres: the day of its
//! first load, by ranges of line numbers of its input (migration 0019), so
//! that a file loaded again on a later day lands in the partitions of its
//! first load and meets itself under the unique key.

use std::collections::HashMap;

use chrono::NaiveDate;

use crate::store::{LoginRow, VaultRow};

/// The day each file line of a batch was first loaded, by message id,
/// where that is not the login's own day: on a first load (nearly every
/// line) the map stays empty and a row's day costs no lookup.
#[derive(Default)]
pub(super) struct LineDays(HashMap<String, NaiveDate>);

impl LineDays {
    /// The day a login is stored with: its line's first load, or its own.
    pub(super) fn day(&self, l: &LoginRow) -> Option<NaiveDate> {
        if self.0.is_empty() {
            return l.create_date;
        }
        self.0.get(&l.message_id).copied().or(l.create_date)
    }
}

/// A row of `pii_vault_line_days`: a range of line numbers and its day, or
/// (no range) a line's day by its message id, from before ranges existed.
type LineDaysRow = (Option<i64>, Option<i64>, NaiveDate, Option<String>);

/// An input (its source id) and the day its lines were read.
type InputDay<'a> = (&'a str, NaiveDate);

/// Asks, for the file lines of a batch, the day each was first loaded
/// (`pii_vault_line_days`, once per input and day read, normally once a
/// batch): lines never loaded get the day they are read now, recorded as
/// one range of line numbers; a line loaded before gets its first day, so
/// that it lands in its first month's partition and meets itself there.
///
/// In a short transaction of its own, before the batch's: the function
/// holds a per-input lock to the end of its transaction, and held through
/// the batch's writes it made the writers of one load (each its own
/// connection, each a batch of the same input) take turns. A range that
/// outlives a batch which then fails only fixes the day of lines that a
/// retry will store with that day: what matters is that every load gets
/// the same day for a line. Committed without waiting for the disk
/// (`synchronous_commit` off for this transaction only): the batch's own
/// commit, which waits, is later in the log and flushes it too, and if
/// the server stops before that, the batch is lost with it and is written
/// again.
pub(super) async fn line_days(
    pool: &sqlx::PgPool,
    logins: &[&(LoginRow, VaultRow)],
) -> Result<LineDays, sqlx::Error> {
    // By input and day read, in a fixed order: two batches of two inputs
    // take the inputs' locks in the same order.
    let mut groups: Vec<(InputDay, Vec<(&LoginRow, i64)>)> = Vec::new();
    for (l, _) in logins {
        let (Some(line), Some(day)) = (&l.line, l.create_date) else {
            continue;
        };
        let Ok(n) = i64::try_from(line.line) else {
            continue;
        };
        let key = (&*line.source, day);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, g)) => g.push((l, n)),
            None => groups.push((key, vec![(l, n)])),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut days = LineDays::default();
    if groups.is_empty() {
        return Ok(days);
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    for ((source, day), lines) in groups {
        let numbers: Vec<i64> = lines.iter().map(|(_, n)| *n).collect();
        let ids: Vec<&str> = lines.iter().map(|(l, _)| l.message_id.as_str()).collect();
        let found: Vec<LineDaysRow> = sqlx::query_as(
            "SELECT range_first, range_last, first_day, legacy_id \
             FROM pii_vault_line_days($1, $2, $3, $4)",
        )
        .bind(source)
        .bind(&numbers)
        .bind(&ids)
        .bind(day)
        .fetch_all(&mut *tx)
        .await?;
        let mut ranges: Vec<(i64, i64, NaiveDate)> = Vec::new();
        let mut legacy: HashMap<String, NaiveDate> = HashMap::new();
        for (first, last, d, id) in found {
            match (first, last, id) {
                (Some(first), Some(last), _) => ranges.push((first, last, d)),
                (_, _, Some(id)) => {
                    legacy.insert(id, d);
                }
                _ => {}
            }
        }
        ranges.sort_unstable();
        for (l, n) in lines {
            // The range that starts at or before n; it covers n if it ends at or after it.
            let at = ranges.partition_point(|(first, _, _)| *first <= n);
            let ranged = at
                .checked_sub(1)
                .map(|i| ranges[i])
                .filter(|(_, last, _)| *last >= n)
                .map(|(_, _, d)| d);
            match legacy.get(&l.message_id).copied().or(ranged) {
                Some(d) if Some(d) != l.create_date => {
                    days.0.insert(l.message_id.clone(), d);
                }
                _ => {}
            }
        }
    }
    tx.commit().await?;
    Ok(days)
}
