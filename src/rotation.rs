//! Key rotation: safe to run while workers consume, audited before it reads
//! anything, one job of a kind at a time.
//!
//! Workers hold keys in memory, so a rotation cannot swap them directly.
//! Instead it *retires* keys in the database, and the database refuses any
//! row written under a retired key (the fence triggers on Postgres, the
//! checks of `write_batch` on SQLite). A worker whose key was retired gets
//! its batch refused, takes fresh keys and protects the batch again. So once
//! a rotation has retired a key, no row is ever committed under it again,
//! and the rotation can re-encrypt or re-tokenise what is there without
//! racing the workers.
//!
//! Every job first commits its audit record and takes its kind's lock
//! ([`Maintenance::begin_job`]); on Postgres the rows it decrypts come from
//! database functions that check that record and lock. A row that cannot be
//! opened (tampered, or under a destroyed key) is reported and skipped, never
//! a reason to stop halfway: the keys it needs are then kept, not destroyed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;

use crate::crypto::aead::Sealer;
use crate::crypto::{Aad, KeyPurpose, KeyWrapper, TokenField, TokenKey};
use crate::domain::CanonicalIp;
use crate::keyring;
use crate::progress::JobProgress;
use crate::store::admin::{JobStart, RotationJob, RotationRange};
use crate::store::{AdminStore, AuditEntry, KeyState, QuarantineRow, Store, VaultRow};
use crate::vault::{VaultPlaintext, VaultReader, AAD_QUARANTINE, AAD_VAULT};

/// Rows re-tokenised per transaction by the final sweep.
const BATCH: i64 = 500;

/// Rows one rotation data key seals before the rotation takes another: the
/// same cap workers apply (random 96-bit nonces stay far from collision),
/// and a bound on what one leaked key exposes.
pub const ROWS_PER_DATA_KEY: u64 = 1 << 20;

/// Message ids of skipped rows kept for the report.
const SKIPPED_SHOWN: usize = 20;

/// Who runs a job and why: the start of its audit record.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub claimed_actor: String,
    pub reason: String,
}

impl JobRequest {
    pub(crate) fn entry(&self, action: &str, target: impl Into<String>) -> AuditEntry {
        AuditEntry {
            claimed_actor: self.claimed_actor.clone(),
            action: action.into(),
            target: target.into(),
            reason: self.reason.clone(),
        }
    }
}

/// Rows a job could not open, by message id.
#[derive(Debug, Default, Clone)]
pub struct Skipped {
    pub count: u64,
    /// The first [`SKIPPED_SHOWN`] of them.
    pub message_ids: Vec<String>,
}

impl Skipped {
    fn merge(&mut self, other: Skipped) {
        self.count += other.count;
        for id in other.message_ids {
            if self.message_ids.len() < SKIPPED_SHOWN {
                self.message_ids.push(id);
            }
        }
    }

    fn add(&mut self, message_id: &str, why: &anyhow::Error) {
        tracing::error!(message_id, error = %why, "cannot open a sealed row; skipped");
        self.count += 1;
        if self.message_ids.len() < SKIPPED_SHOWN {
            self.message_ids.push(message_id.to_string());
        }
    }
}

/// What `rotate data-keys` did.
#[derive(Debug, Default)]
pub struct DataKeysRotated {
    pub record_id: i64,
    pub resealed: u64,
    /// The rotation's own data keys (one per [`ROWS_PER_DATA_KEY`] rows).
    pub new_keys: Vec<String>,
    pub destroyed: Vec<String>,
    pub skipped: Skipped,
}

/// What `rotate token-key` did.
#[derive(Debug, Default)]
pub struct TokenKeyRotated {
    pub record_id: i64,
    pub version: i64,
    pub retokenised: u64,
    pub destroyed: Vec<String>,
    pub skipped: Skipped,
}

/// What `rotate kek` did.
#[derive(Debug, Default)]
pub struct KekRotated {
    pub record_id: i64,
    pub target: String,
    pub rewrapped: u64,
}

/// Re-wraps every stored key under the KMS key `target`. KMS-wrapped keys
/// move with `ReEncrypt` (plaintext never leaves KMS); keys of the local key
/// file are unwrapped locally and wrapped with `Encrypt`. Puts `target` on
/// the allow-list first. Resumable: keys already under `target` are skipped.
/// Retires the active data keys, so running workers take fresh ones under
/// `target` (they follow the token key's KEK).
pub async fn rotate_kek(
    store: &dyn AdminStore,
    current: &dyn KeyWrapper,
    target: &dyn KeyWrapper,
    job: &JobRequest,
) -> anyhow::Result<KekRotated> {
    let target_arn = target.kek_id();
    let pending = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.state != KeyState::Destroyed && k.wrapped.kek_id != target_arn)
        .count();
    let lock = store
        .begin_job(&job.entry(KEK, target_arn.clone()), pending as i64)
        .await?;
    let record = lock.record_id;
    // The job puts the target on the allow-list; a killed one of another
    // target must be finished first (its keys are half moved).
    let rjob = match store.resume_rotation(record, KEK).await? {
        Some(j) => {
            let was = j.kek_target.clone().unwrap_or_default();
            anyhow::ensure!(
                was == target_arn,
                "a rotate kek to {was} did not finish; run `pii-vault rotate kek --to {was}` to finish it first"
            );
            j
        }
        None => store.start_rotation(record, JobStart::Kek).await?,
    };
    let mut moved = 0;
    // Passes until a listing finds nothing left under another KEK. A worker
    // that read the token key's KEK just before it was re-wrapped may still
    // register one data key under the old KEK a moment later: the pause and
    // the next pass catch it.
    for pass in 0..6 {
        let mut keys = store.list_keys().await?;
        keys.retain(|k| k.state != KeyState::Destroyed && k.wrapped.kek_id != target_arn);
        if keys.is_empty() {
            store.finish_rotation(record, rjob.id).await?;
            lock.finish().await;
            return Ok(KekRotated {
                record_id: record,
                target: target_arn,
                rewrapped: moved,
            });
        }
        // Token keys first: workers choose the KEK of new data keys by the
        // KEK of the current token key.
        keys.sort_by_key(|k| k.purpose != KeyPurpose::Token);
        for k in &keys {
            let new = if k.wrapped.kek_id.starts_with("local:") {
                let material = current
                    .unwrap(k.purpose, &k.wrapped)
                    .await
                    .with_context(|| {
                        format!(
                            "key {} is wrapped by a local key file; run with that key directory",
                            k.id
                        )
                    })?;
                target.wrap(k.purpose, &material).await?
            } else {
                target
                    .rewrap(k.purpose, &k.wrapped)
                    .await
                    .with_context(|| format!("ReEncrypt of key {}", k.id))?
            };
            if store.rewrap_key(record, rjob.id, &k.id, &new).await? {
                moved += 1;
            }
        }
        if pass == 0 {
            // Make running workers take fresh data keys, now under the new KEK.
            store.retire_data_keys(record, rjob.id).await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    anyhow::bail!("keys under the old KEK keep appearing; are workers still configured with it?")
}

/// How a rotation runs; `Default` is what the CLI does without flags.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Key ranges worked at once, each on a connection of its own. The
    /// ranges are fixed when a job starts (one per job); a rerun may use
    /// fewer at once. SQLite has one writer: the CLI passes 1.
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

const KEK: &str = "rotate-kek";
const DATA_KEYS: &str = "rotate-data-keys";
const TOKEN_KEY: &str = "rotate-token-key";

/// What the range workers of one run share.
struct Run {
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    record: i64,
    job: RotationJob,
    opts: RotationOptions,
    progress: indicatif::ProgressBar,
    chunks: AtomicU64,
}

impl Run {
    fn new(
        store: &Arc<dyn AdminStore>,
        wrapper: &Arc<dyn KeyWrapper>,
        record: i64,
        job: RotationJob,
        opts: &RotationOptions,
        progress: &JobProgress,
    ) -> Arc<Run> {
        Arc::new(Run {
            store: store.clone(),
            wrapper: wrapper.clone(),
            record,
            job,
            opts: opts.clone(),
            progress: progress.counter(),
            chunks: AtomicU64::new(0),
        })
    }

    fn reader(&self) -> VaultReader {
        let plain: Arc<dyn Store> = self.store.clone();
        VaultReader::new(plain, self.wrapper.clone())
    }

    /// Counts a committed chunk; the test hook stops the run here.
    fn chunk_committed(&self, rows: u64) -> anyhow::Result<()> {
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
    async fn ranges<T, F, Fut>(
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

/// The job of `kind` a killed run left, taken over by this run's record,
/// with its ranges; `None` when there is none. Tells the operator that it
/// resumes, and from where.
async fn resume_job(
    store: &dyn AdminStore,
    record: i64,
    kind: &str,
    progress: &JobProgress,
) -> anyhow::Result<Option<(RotationJob, Vec<RotationRange>)>> {
    let Some(job) = store.resume_rotation(record, kind).await? else {
        return Ok(None);
    };
    let ranges = store.rotation_ranges(record, job.id).await?;
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
        "resuming {kind} job {} (started under audit record {}; {} row(s) done before): {}",
        job.id,
        job.started_by,
        ranges.iter().map(|r| r.rows_done).sum::<i64>(),
        if left.is_empty() {
            "every range is done, finishing".to_string()
        } else {
            left.join(", ")
        }
    ));
    Ok(Some((job, ranges)))
}

/// Sets the bar to a job's size: `pending` rows for a new job; for a
/// resumed one (`left` rows still to do), what its ranges did before plus
/// `left`, with the bar that far along.
fn size_bar(progress: &JobProgress, ranges: &[RotationRange], pending: i64, left: Option<i64>) {
    match left {
        Some(left) => {
            let done: i64 = ranges.iter().map(|r| r.rows_done).sum();
            progress.set_length((done + left).max(0) as u64);
            progress.set_position(done.max(0) as u64);
        }
        None => progress.set_length(pending.max(0) as u64),
    }
}

/// A data key of the rotation's own, with its count of uses.
struct RotationKey {
    id: String,
    sealer: Sealer,
    used: u64,
}

/// The rotation keys of one range worker. Each worker seals under keys of
/// its own: the fence counts a key's uses by updating its row, which would
/// serialise workers that shared one.
#[derive(Default)]
struct RangeKeys {
    current: Option<RotationKey>,
    /// Keys that reached their cap, retired once their rows are written
    /// (the database refuses rows under a retired key).
    full: Vec<String>,
    made: Vec<String>,
}

impl RangeKeys {
    /// The key to seal the next row with: a fresh one at first and once the
    /// current one has sealed [`ROWS_PER_DATA_KEY`] rows. A new key is noted
    /// in the job before any row is sealed under it, so that a rerun of a
    /// killed job retires it rather than leaving it active.
    async fn next(&mut self, run: &Run) -> anyhow::Result<&mut RotationKey> {
        if self
            .current
            .as_ref()
            .is_none_or(|k| k.used >= ROWS_PER_DATA_KEY)
        {
            let (material, wrapped) = run.wrapper.generate(KeyPurpose::Vault).await?;
            let key = keyring::new_key("dek", KeyPurpose::Vault, 0, wrapped);
            run.store
                .rotation_new_data_key(run.record, run.job.id, &key)
                .await?;
            self.made.push(key.id.clone());
            let fresh = RotationKey {
                id: key.id,
                sealer: Sealer::new(&material),
                used: 0,
            };
            if let Some(old) = self.current.replace(fresh) {
                self.full.push(old.id);
            }
        }
        Ok(self.current.as_mut().expect("just set"))
    }

    async fn retire_full(&mut self, run: &Run) -> anyhow::Result<()> {
        for id in self.full.drain(..) {
            run.store
                .rotation_retire_key(run.record, run.job.id, &id)
                .await?;
        }
        Ok(())
    }

    /// The rotation's keys are not used by any worker: retired, so the
    /// next rotation re-encrypts their rows like the others.
    async fn retire_all(mut self, run: &Run) -> anyhow::Result<Vec<String>> {
        if let Some(k) = self.current.take() {
            self.full.push(k.id);
        }
        self.retire_full(run).await?;
        Ok(self.made)
    }
}

/// Re-encrypts every vault row and quarantined body sealed under a data key
/// that this rotation retires, under fresh data keys of its own (a new one
/// every [`ROWS_PER_DATA_KEY`] rows per range worker), then destroys the
/// old wrapped keys that nothing refers to any more.
///
/// Resumable: the job (its old-key set and a cursor per key range) is kept
/// in the database and each chunk moves its range's cursor in the
/// transaction that writes it, so a rerun after a kill at any point
/// continues after the last committed chunk with the same old keys.
pub async fn rotate_data_keys(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    job: &JobRequest,
    opts: &RotationOptions,
    progress: &JobProgress,
) -> anyhow::Result<DataKeysRotated> {
    let before: Vec<String> = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::Vault && k.state != KeyState::Destroyed)
        .map(|k| k.id)
        .collect();
    let pending = store.count_sealed_under(&before).await?;
    let lock = store
        .begin_job(&job.entry(DATA_KEYS, "vault, quarantine"), pending)
        .await?;
    let record = lock.record_id;
    let (rjob, ranges, resumed) = match resume_job(&*store, record, DATA_KEYS, progress).await? {
        Some((j, r)) => (j, r, true),
        None => {
            let bounds = store.rotation_bounds(DATA_KEYS, opts.jobs).await?;
            let j = store
                .start_rotation(record, JobStart::DataKeys { bounds: &bounds })
                .await?;
            let r = store.rotation_ranges(record, j.id).await?;
            (j, r, false)
        }
    };
    let left = if resumed {
        Some(store.count_sealed_under(&rjob.old_keys).await?)
    } else {
        None
    };
    size_bar(progress, &ranges, pending, left);
    let run = Run::new(&store, &wrapper, record, rjob.clone(), opts, progress);
    let mut out = DataKeysRotated {
        record_id: record,
        ..Default::default()
    };
    for (resealed, made, skipped) in run
        .ranges(ranges, |run, r| async move { reseal_range(&run, &r).await })
        .await?
    {
        out.resealed += resealed;
        out.new_keys.extend(made);
        out.skipped.merge(skipped);
    }
    // Rows still under an old key are the ones that could not be opened,
    // by this run or by the one it continues: their keys stay.
    let left = store.count_sealed_under(&rjob.old_keys).await?;
    if left as u64 > out.skipped.count {
        tracing::error!(
            rows = left as u64 - out.skipped.count,
            "rows skipped by an earlier run of this job are still under their old keys"
        );
        out.skipped.count = left as u64;
    }
    // The database destroys what nothing is sealed under any more, and
    // records it.
    out.destroyed = store.finish_rotation(record, rjob.id).await?;
    lock.finish().await;
    Ok(out)
}

/// One key range of `rotate data-keys`: (resealed, keys made, skipped).
async fn reseal_range(
    run: &Run,
    range: &RotationRange,
) -> anyhow::Result<(u64, Vec<String>, Skipped)> {
    let mut reader = run.reader();
    let mut keys = RangeKeys::default();
    let mut skipped = Skipped::default();
    let mut resealed = 0;
    let mut cursor = range.cursor.clone();
    loop {
        let (vault, quarantine) = if range.table == "quarantine" {
            let rows = run
                .store
                .quarantine_chunk(run.record, run.job.id, &cursor, run.opts.chunk_rows)
                .await?;
            (vec![], rows)
        } else {
            let rows = run
                .store
                .vault_chunk(
                    run.record,
                    run.job.id,
                    &cursor,
                    range.hi.as_deref(),
                    run.opts.chunk_rows,
                )
                .await?;
            (rows, vec![])
        };
        let last = match (vault.last(), quarantine.last()) {
            (Some(v), _) => v.message_id.clone(),
            (_, Some(q)) => q.message_id.clone(),
            _ => break,
        };
        let mut v_updates = Vec::with_capacity(vault.len());
        for r in vault {
            let plain = match reader.open(&r).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    skipped.add(
                        &r.message_id,
                        &anyhow::anyhow!("its data key was destroyed"),
                    );
                    continue;
                }
                Err(e) => {
                    skipped.add(&r.message_id, &e);
                    continue;
                }
            };
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&plain)?);
            let k = keys.next(run).await?;
            let aad = Aad {
                kind: AAD_VAULT,
                message_id: &r.message_id,
                user_id: &r.user_id,
                key_id: &k.id,
            };
            let sealed = k.sealer.seal(&aad, &bytes)?;
            k.used += 1;
            let old_key = r.key_id.clone();
            v_updates.push((
                VaultRow {
                    key_id: k.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..r
                },
                old_key,
            ));
        }
        let mut q_updates = Vec::with_capacity(quarantine.len());
        for q in quarantine {
            let body = match reader.open_quarantined(&q).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    skipped.add(
                        &q.message_id,
                        &anyhow::anyhow!("its data key was destroyed"),
                    );
                    continue;
                }
                Err(e) => {
                    skipped.add(&q.message_id, &e);
                    continue;
                }
            };
            let k = keys.next(run).await?;
            let aad = Aad {
                kind: AAD_QUARANTINE,
                message_id: &q.message_id,
                user_id: q.user_id.as_deref().unwrap_or(""),
                key_id: &k.id,
            };
            let sealed = k.sealer.seal(&aad, &body)?;
            k.used += 1;
            let old_key = q.key_id.clone();
            q_updates.push((
                QuarantineRow {
                    key_id: k.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..q
                },
                old_key,
            ));
        }
        let n = run
            .store
            .reseal_chunk(
                run.record, run.job.id, range.no, &last, &v_updates, &q_updates,
            )
            .await?;
        resealed += n;
        cursor = last;
        keys.retire_full(run).await?;
        run.chunk_committed(n)?;
    }
    run.store
        .rotation_range_done(run.record, run.job.id, range.no)
        .await?;
    let made = keys.retire_all(run).await?;
    Ok((resealed, made, skipped))
}

/// Makes token key version N+1 current and re-tokenises `user_logins` from
/// the vault originals; then destroys the old version, unless some login
/// could not be re-tokenised (its old key then stays, retired). Once it
/// returns with nothing skipped, no login with recoverable originals
/// carries a token of an older version.
///
/// Resumable: the version is fixed when the job starts and kept with it, so
/// a rerun after a kill takes up the same version (unwrapping its stored
/// key) and continues each key range after its last committed chunk.
pub async fn rotate_token_key(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    job: &JobRequest,
    opts: &RotationOptions,
    progress: &JobProgress,
) -> anyhow::Result<TokenKeyRotated> {
    let next = next_token_version(&*store).await?;
    let pending = store.count_tokens_not_of(next).await?;
    let lock = store
        .begin_job(&job.entry(TOKEN_KEY, "user_logins"), pending)
        .await?;
    let record = lock.record_id;
    let (rjob, ranges, resumed, material) =
        match resume_job(&*store, record, TOKEN_KEY, progress).await? {
            Some((j, r)) => {
                // The key of that version: stored when the job started.
                let version = j
                    .token_version
                    .context("a token-key rotation job without its version")?;
                let stored = store
                    .list_keys()
                    .await?
                    .into_iter()
                    .find(|k| k.purpose == KeyPurpose::Token && k.version == version)
                    .with_context(|| {
                        format!("token key v{version} of rotation job {} is gone", j.id)
                    })?;
                anyhow::ensure!(
                    stored.state != KeyState::Destroyed,
                    "token key v{version} of rotation job {} was destroyed",
                    j.id
                );
                let m = wrapper
                    .unwrap(KeyPurpose::Token, &stored.wrapped)
                    .await
                    .with_context(|| format!("cannot unwrap token key v{version}"))?;
                (j, r, true, m)
            }
            None => {
                // Read again under the lease: another rotation may have
                // finished since.
                let next = next_token_version(&*store).await?;
                let (material, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
                let key = keyring::new_key("tok", KeyPurpose::Token, next, wrapped);
                let bounds = store.rotation_bounds(TOKEN_KEY, opts.jobs).await?;
                let j = store
                    .start_rotation(
                        record,
                        JobStart::TokenKey {
                            bounds: &bounds,
                            key: &key,
                        },
                    )
                    .await?;
                let r = store.rotation_ranges(record, j.id).await?;
                (j, r, false, material)
            }
        };
    let version = rjob
        .token_version
        .context("a token-key rotation job without its version")?;
    let token_key = TokenKey::new(version as u32, &material);
    let left = if resumed {
        Some(store.count_stale_tokens(version).await?)
    } else {
        None
    };
    size_bar(progress, &ranges, pending, left);
    let run = Run::new(&store, &wrapper, record, rjob.clone(), opts, progress);
    let token_key = Arc::new(token_key);
    let mut out = TokenKeyRotated {
        record_id: record,
        version,
        ..Default::default()
    };
    for (n, skipped) in run
        .ranges(ranges, |run, r| {
            let key = token_key.clone();
            async move { retokenise_range(&run, &key, &r).await }
        })
        .await?
    {
        out.retokenised += n;
        out.skipped.merge(skipped);
    }
    // Rows skipped here or by the run this one continues, or committed by a
    // worker in a way the ranges missed: one more sweep finds them.
    if store.count_stale_tokens(version).await? > out.skipped.count as i64 {
        // The sweep meets every stale row again, skipped ones included.
        out.skipped = Skipped::default();
        retokenise(
            &store,
            wrapper.clone(),
            &token_key,
            (record, rjob.id),
            progress,
            &mut out,
        )
        .await?;
    }
    // The database destroys the old versions only if no login with
    // recoverable originals still carries one, and records it.
    out.destroyed = store.finish_rotation(record, rjob.id).await?;
    lock.finish().await;
    Ok(out)
}

/// One above every token-key version there is, destroyed ones included.
async fn next_token_version(store: &dyn AdminStore) -> anyhow::Result<i64> {
    Ok(store
        .list_keys()
        .await?
        .iter()
        .filter(|k| k.purpose == KeyPurpose::Token)
        .map(|k| k.version)
        .max()
        .unwrap_or(0)
        + 1)
}

fn tokens_of(
    key: &TokenKey,
    plain: anyhow::Result<Option<VaultPlaintext>>,
) -> anyhow::Result<(String, String)> {
    let plain = match plain {
        Ok(Some(p)) => p,
        Ok(None) => anyhow::bail!("its data key was destroyed"),
        Err(e) => return Err(e),
    };
    let ip = CanonicalIp::parse(&plain.ip)
        .ok_or_else(|| anyhow::anyhow!("its vault row holds an IP that no longer parses"))?;
    Ok((
        key.token(TokenField::Ip, ip.expose()).to_string(),
        key.token(TokenField::DeviceId, &plain.device_id)
            .to_string(),
    ))
}

/// One key range of `rotate token-key`: (re-tokenised, skipped). Ranges
/// are of message ids, as the data-key rotation's: a chunk of logins and
/// their vault rows are then two index range scans in the same order
/// (migrations/postgres/0009_token_rotation_by_message_id.sql).
async fn retokenise_range(
    run: &Run,
    key: &TokenKey,
    range: &RotationRange,
) -> anyhow::Result<(u64, Skipped)> {
    let hi = range.hi.as_deref();
    let mut cursor = range.cursor.clone();
    let mut reader = run.reader();
    let mut skipped = Skipped::default();
    let mut done = 0;
    loop {
        let rows = run
            .store
            .logins_chunk(run.record, run.job.id, &cursor, hi, run.opts.chunk_rows)
            .await?;
        let Some((_, last)) = rows.last() else { break };
        let last = last.message_id.clone();
        let mut updates = Vec::with_capacity(rows.len());
        for (id, vault) in &rows {
            match tokens_of(key, reader.open(vault).await) {
                Ok((ip, dev)) => updates.push((*id, ip, dev)),
                Err(e) => skipped.add(&vault.message_id, &e),
            }
        }
        // In id order, as the rows lie in the table.
        updates.sort_unstable_by_key(|u| u.0);
        run.store
            .tokens_chunk(run.record, run.job.id, Some((range.no, &last)), &updates)
            .await?;
        cursor = last;
        done += updates.len() as u64;
        run.chunk_committed(updates.len() as u64)?;
    }
    run.store
        .rotation_range_done(run.record, run.job.id, range.no)
        .await?;
    Ok((done, skipped))
}

/// Keyset passes over all of `user_logins` until nothing stale is left but
/// what was skipped.
async fn retokenise(
    store: &Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    key: &TokenKey,
    (record, job): (i64, i64),
    progress: &JobProgress,
    out: &mut TokenKeyRotated,
) -> anyhow::Result<()> {
    let version = key.version() as i64;
    let plain_store: Arc<dyn Store> = store.clone();
    let mut reader = VaultReader::new(plain_store, wrapper);
    let mut skipped: HashSet<String> = HashSet::new();
    for _pass in 0..10 {
        let mut after = 0i64;
        loop {
            let rows = store.sweep_chunk(record, job, after, BATCH).await?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = *last;
            let mut updates = Vec::with_capacity(rows.len());
            for (id, vault) in &rows {
                if skipped.contains(&vault.message_id) {
                    continue;
                }
                match tokens_of(key, reader.open(vault).await) {
                    Ok((ip, dev)) => updates.push((*id, ip, dev)),
                    Err(e) => {
                        out.skipped.add(&vault.message_id, &e);
                        skipped.insert(vault.message_id.clone());
                    }
                }
            }
            store.tokens_chunk(record, job, None, &updates).await?;
            out.retokenised += updates.len() as u64;
            progress.inc(updates.len() as u64);
        }
        if store.count_stale_tokens(version).await? <= out.skipped.count as i64 {
            return Ok(());
        }
    }
    anyhow::bail!(
        "logins with old tokens keep appearing; are workers running an old version of pii-vault?"
    )
}
