//! Closed partitions rewritten, not updated: what both rotations that
//! change rows share.
//!
//! Updating every row of a month in place leaves a dead version of each
//! behind (the month twice its size until VACUUM has read all of it) and
//! pays for new index entries row by row. A closed month, which only late
//! redeliveries still write to, is instead read chunk by chunk, re-sealed
//! or re-tokenised here, and written into a new table that the database
//! indexes afterwards in one pass each and then swaps in for the old
//! partition under a short lock. Open partitions are rotated in place, as
//! before. Each partition is resumable on its own: a rerun skips those
//! swapped and starts the others over from a new table.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;

use super::job::Run;
use super::Skipped;
use crate::store::{RewriteState, StoreError};

/// Attempts at a swap that its lock timeout or a deadlock refused (the
/// database rolled the attempt back whole; a long transaction on the table
/// is the usual cause).
const SWAP_ATTEMPTS: u32 = 10;

/// How one rotation fills the new table of a partition. Each partition gets
/// a filler of its own, so a data-key rotation seals each month under keys
/// of that month's alone.
#[async_trait]
pub(super) trait Fill: Send {
    /// Reads `partition`'s rows in chunks and writes them, rotated, into its
    /// new table: (rows rotated, rows that could not be opened, which go
    /// in as they are).
    async fn fill(&mut self, run: &Run, partition: &str) -> anyhow::Result<(u64, Skipped)>;

    /// Once its partition is swapped: the data keys it made, retired.
    async fn done(self: Box<Self>, run: &Run) -> anyhow::Result<Vec<String>>;
}

/// What the rewrites of a run did.
#[derive(Default)]
pub(super) struct Rewritten {
    pub rows: u64,
    pub skipped: Skipped,
    pub keys: Vec<String>,
}

/// Rewrites every closed partition of the job not swapped yet, oldest
/// first, `jobs` at a time (their swaps take turns: each holds the
/// parent's SHARE UPDATE EXCLUSIVE lock). The first error ends the others.
pub(super) async fn rewrite_closed<F>(run: &Arc<Run>, make: F) -> anyhow::Result<Rewritten>
where
    F: Fn() -> Box<dyn Fill>,
{
    let mut left = run
        .store
        .rewrites(&run.job)
        .await?
        .into_iter()
        .filter(|r| r.state == RewriteState::Pending)
        .map(|r| r.partition);
    let mut set = tokio::task::JoinSet::new();
    for partition in left.by_ref().take(run.opts.jobs.max(1)) {
        set.spawn(rewrite_one(run.clone(), make(), partition));
    }
    let mut out = Rewritten::default();
    while let Some(done) = set.join_next().await {
        let (rows, skipped, keys) = done.context("a partition rewrite failed")??;
        out.rows += rows;
        out.skipped.merge(skipped);
        out.keys.extend(keys);
        if let Some(partition) = left.next() {
            set.spawn(rewrite_one(run.clone(), make(), partition));
        }
    }
    Ok(out)
}

/// One partition: a new table, filled, indexed, swapped in.
async fn rewrite_one(
    run: Arc<Run>,
    mut fill: Box<dyn Fill>,
    partition: String,
) -> anyhow::Result<(u64, Skipped, Vec<String>)> {
    let partition = partition.as_str();
    if !run.store.rewrite_begin(&run.job, partition).await? {
        tracing::info!(
            partition,
            "closed partition dropped since the job started; nothing to rewrite"
        );
        return Ok((0, Skipped::default(), fill.done(&run).await?));
    }
    let (rows, skipped) = fill.fill(&run, partition).await?;
    run.store.rewrite_index(&run.job, partition).await?;
    let late = swap(&run, partition).await?;
    tracing::info!(
        partition,
        rows,
        late,
        "closed partition rewritten and swapped in"
    );
    Ok((rows, skipped, fill.done(&run).await?))
}

/// The swap, tried again while a lock it waits for times out or a deadlock
/// ends it.
async fn swap(run: &Run, partition: &str) -> anyhow::Result<u64> {
    let mut attempt = 1;
    loop {
        match run.store.rewrite_swap(&run.job, partition).await {
            Ok(n) => return Ok(n),
            Err(e) if attempt < SWAP_ATTEMPTS && lock_refused(&e) => {
                tracing::warn!(partition, attempt, error = %e, "swap refused for now; trying again");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A lock timeout, a deadlock or a lost connection: worth another attempt.
fn lock_refused(e: &StoreError) -> bool {
    e.is_transient() || matches!(e, StoreError::LockTimeout(_))
}
