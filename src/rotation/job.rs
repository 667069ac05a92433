//! What every rotation shares: the job a run works on (resumed, or
//! started), its key ranges worked on connections of their own, progress,
//! and the test hook that stops a run halfway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;

use crate::crypto::KeyWrapper;
use crate::progress::JobProgress;
use crate::store::{Job, Lease, RotationRange, Store};
use crate::vault::VaultReader;

/// How a rotation runs; `Default` is what the CLI does without flags.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Key ranges worked at once, each on a connection of its own. The
    /// ranges are fixed when a job starts (one per job); a rerun may use
    /// fewer at once. The CLI caps it by the store's profile (SQLite: 1).
    pub jobs: usize,
    /// Rows read, re-sealed and written back per statement.
    pub chunk_rows: i64,
    /// Test hook: end with an error, as if killed, once this many chunks
    /// are committed, so that a test can resume a job halfway.
    pub stop_after_chunks: Option<u64>,
}

impl Default for RotationOptions {
    fn default() -> Self {
        RotationOptions {
            jobs: 2,
            chunk_rows: 5000,
            stop_after_chunks: None,
        }
    }
}

/// What the range workers of one run share.
pub(super) struct Run {
    pub store: Arc<dyn Store>,
    pub wrapper: Arc<dyn KeyWrapper>,
    pub job: Job,
    pub opts: RotationOptions,
    progress: indicatif::ProgressBar,
    chunks: AtomicU64,
}

impl Run {
    pub fn new(
        store: &Arc<dyn Store>,
        wrapper: &Arc<dyn KeyWrapper>,
        job: Job,
        opts: &RotationOptions,
        progress: &JobProgress,
    ) -> Arc<Run> {
        Arc::new(Run {
            store: store.clone(),
            wrapper: wrapper.clone(),
            job,
            opts: opts.clone(),
            progress: progress.counter(),
            chunks: AtomicU64::new(0),
        })
    }

    pub fn reader(&self) -> VaultReader {
        VaultReader::new(self.store.clone(), self.wrapper.clone())
    }

    /// Counts a committed chunk; the test hook stops the run here.
    pub fn chunk_committed(&self, rows: u64) -> anyhow::Result<()> {
        self.progress.inc(rows);
        let n = self.chunks.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(stop) = self.opts.stop_after_chunks {
            anyhow::ensure!(
                n < stop,
                "stopped after {n} committed chunk(s), as asked (the job stays open for a rerun)"
            );
        }
        Ok(())
    }

    /// Works the ranges not done yet, `jobs` at a time, each on a task of
    /// its own (so one range's crypto never holds up another's database
    /// round trip). The first error ends the others: dropping the set
    /// aborts them, and their open transactions roll back.
    pub async fn ranges<T, F, Fut>(
        self: &Arc<Self>,
        ranges: Vec<RotationRange>,
        work: F,
    ) -> anyhow::Result<Vec<T>>
    where
        T: Send + 'static,
        F: Fn(Arc<Run>, RotationRange) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let mut left = ranges.into_iter().filter(|r| !r.done);
        let mut set = tokio::task::JoinSet::new();
        for r in left.by_ref().take(self.opts.jobs.max(1)) {
            set.spawn(work(self.clone(), r));
        }
        let mut out = Vec::new();
        while let Some(done) = set.join_next().await {
            out.push(done.context("a range worker failed")??);
            if let Some(r) = left.next() {
                set.spawn(work(self.clone(), r));
            }
        }
        Ok(out)
    }
}

/// The job a run of `lease`'s kind works on, with its ranges and whether it
/// was resumed: the one a killed run left (saying so, and from where), or a
/// new one that `start` starts over the ranges `rotation_bounds` gives.
pub(super) async fn open_job<F, Fut>(
    store: &dyn Store,
    lease: &Lease,
    opts: &RotationOptions,
    progress: &JobProgress,
    start: F,
) -> anyhow::Result<(Job, Vec<RotationRange>, bool)>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Job>>,
{
    if let Some(job) = store.resume_job(lease).await? {
        let ranges = store.job_ranges(&job).await?;
        let left: Vec<String> = ranges
            .iter()
            .filter(|r| !r.done)
            .map(|r| {
                if r.cursor == r.lo {
                    format!("{} range {} from its start", r.table, r.no)
                } else {
                    format!("{} range {} after {}", r.table, r.no, r.cursor)
                }
            })
            .collect();
        progress.note(&format!(
            "resuming {} job {} (started under audit record {}; {} row(s) done before): {}",
            lease.kind,
            job.id,
            job.started_by,
            ranges.iter().map(|r| r.rows_done).sum::<i64>(),
            if left.is_empty() {
                "every range is done, finishing".to_string()
            } else {
                left.join(", ")
            }
        ));
        return Ok((job, ranges, true));
    }
    let bounds = store.rotation_bounds(lease.kind, opts.jobs).await?;
    let job = start(bounds).await?;
    let ranges = store.job_ranges(&job).await?;
    Ok((job, ranges, false))
}

/// Sets the bar to a job's size: `pending` rows for a new job; for a
/// resumed one (`left` rows still to do), what its ranges did before plus
/// `left`, with the bar that far along.
pub(super) fn size_bar(
    progress: &JobProgress,
    ranges: &[RotationRange],
    pending: i64,
    left: Option<i64>,
) {
    match left {
        Some(left) => {
            let done: i64 = ranges.iter().map(|r| r.rows_done).sum();
            progress.set_length((done + left).max(0) as u64);
            progress.set_position(done.max(0) as u64);
        }
        None => progress.set_length(pending.max(0) as u64),
    }
}
