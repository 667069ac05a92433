//! receive → parse → protect → write → ack.
//!
//! ```text
//!  receivers (×N)          writer (×1)                         ackers
//!  source.receive ─► chan ─► batch ≤ batch_size or flush_after
//!                            protect: parse, tokenise, seal
//!                            store.write_batch (one transaction) ─► source.ack
//! ```
//!
//! A message is acknowledged only after the transaction holding its rows
//! (or its quarantine row) has committed, so a crash anywhere loses nothing:
//! the source delivers it again, and the store's `message_id` uniqueness
//! turns the redelivery into a counted duplicate. Transient faults are
//! retried with backoff; on shutdown the receivers stop, the writer commits
//! and acknowledges what it already holds, and the rest is left to the
//! source (SQS makes it visible again after the visibility timeout).

mod key_retry;
pub use key_retry::retry_kms;
pub mod keys;
pub mod protect;
pub mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::crypto::{KeyWrapper, TokenKey};
use crate::domain::{Ack, Message};
use crate::retry::{retry, Backoff, OnCancel};
use crate::source::MessageSource;
use crate::store::{Batch, BatchOutcome, Store, StoreError};
use keys::{DataKeyLease, DekPolicy};
use protect::{protect, Protected};
pub use stats::Stats;

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Receive loops running at once.
    pub concurrency: usize,
    /// Most messages in one database transaction.
    pub batch_size: usize,
    /// Longest a received message waits for its batch to fill.
    pub flush_after: Duration,
    /// Batches protected and committed at once (each writer has its own
    /// data key and database connection). 1 for SQLite, which has one writer.
    pub writers: usize,
    pub dek_policy: DekPolicy,
    pub backoff: Backoff,
    /// Write `masked_ip_net` (the database's setting, read at start).
    pub network_tokens: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            concurrency: 4,
            batch_size: 500,
            flush_after: Duration::from_millis(200),
            writers: 1,
            dek_policy: DekPolicy::default(),
            backoff: Backoff::default(),
            network_tokens: true,
        }
    }
}

/// Everything the pipeline needs, shared by its tasks.
pub struct Pipeline {
    pub source: Arc<dyn MessageSource>,
    pub store: Arc<dyn Store>,
    pub wrapper: Arc<dyn KeyWrapper>,
    pub token_key: Arc<TokenKey>,
    /// Row id of `token_key` in `vault_keys`, checked at every commit.
    pub token_key_id: String,
    pub stats: Arc<Stats>,
    pub opts: RunOptions,
}

impl Pipeline {
    /// Runs until the source is exhausted or `cancel` fires; returns the
    /// totals of this run.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<BatchOutcome> {
        let this = Arc::new(self);
        let receivers = this.opts.concurrency.clamp(1, this.source.max_receivers());
        let writers = this.opts.writers.max(1);
        // Room for the next batch while one is written: more only holds
        // more raw bodies in memory (5,000 more of them cost SQLite's page
        // cache 4 MiB of a worker's 64).
        let (tx, rx) = mpsc::channel::<Message>(this.opts.batch_size);
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Message>>(writers);
        let mut tasks = JoinSet::new();
        for _ in 0..receivers {
            tasks.spawn(receive_loop(
                this.source.clone(),
                tx.clone(),
                this.stats.clone(),
                this.opts.backoff,
                cancel.clone(),
            ));
        }
        drop(tx);
        tokio::spawn(batch_loop(
            rx,
            batch_tx,
            this.opts.batch_size,
            this.opts.flush_after,
        ));
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        let mut writer_tasks = JoinSet::new();
        for _ in 0..writers {
            writer_tasks.spawn(this.clone().write_loop(batch_rx.clone(), cancel.clone()));
        }
        // Only the writers hold the batches' receiver: once the last one
        // stops, whatever still waits to hand them a batch is told so.
        drop(batch_rx);
        let mut first_err = None;
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r.map_err(anyhow::Error::from).and_then(|x| x) {
                // A receiver that cannot go on stops the others too.
                cancel.cancel();
                first_err.get_or_insert(e);
            }
        }
        let mut total = BatchOutcome::default();
        while let Some(r) = writer_tasks.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|x| x) {
                Ok(o) => total += o,
                Err(e) => {
                    cancel.cancel();
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// One writer: takes formed batches, protects and commits each, then
    /// acknowledges it in the background. Several writers (each with its own
    /// data key) keep a server database busy while the next batch is being
    /// protected.
    async fn write_loop(
        self: Arc<Self>,
        batches: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<Message>>>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<BatchOutcome> {
        let mut total = BatchOutcome::default();
        let mut keys = WorkerKeys {
            token: self.token_key.clone(),
            token_id: self.token_key_id.clone(),
            dek: None,
        };
        let mut ackers: JoinSet<()> = JoinSet::new();
        loop {
            let next = batches.lock().await.recv().await;
            let Some(msgs) = next else { break };
            let span = batch_span(msgs.len());
            let written = self
                .write_batch(&msgs, &mut keys, &cancel)
                .instrument(span.clone())
                .await;
            let outcome = match written {
                Ok(o) => {
                    span.record("outcome", "committed");
                    span.record("stored", o.stored);
                    span.record("duplicates", o.duplicates);
                    span.record("rejected", o.rejected);
                    tracing::debug!(parent: &span, "batch committed");
                    o
                }
                Err(e) => {
                    span.record("outcome", "failed");
                    tracing::warn!(parent: &span, "batch not committed; its messages stay in the source");
                    // A writer that cannot go on stops the run: receivers
                    // stop reading, the other writers finish the batch in
                    // hand, and the run ends with this error.
                    cancel.cancel();
                    while ackers.join_next().await.is_some() {}
                    return Err(e);
                }
            };
            total += outcome;
            let acks: Vec<Ack> = msgs.into_iter().map(|m| m.ack).collect();
            while ackers.len() >= self.opts.concurrency.max(2) {
                ackers.join_next().await;
            }
            let (source, stats) = (self.source.clone(), self.stats.clone());
            ackers.spawn(async move {
                let n = acks.len() as u64;
                match source.ack(acks).await {
                    Ok(()) => {
                        stats.acked.inc_by(n);
                    }
                    Err(e) => {
                        stats.ack_failures.inc_by(n);
                        tracing::warn!(error = %e, messages = n, "acknowledgement failed; those messages will be redelivered and counted as duplicates");
                    }
                }
            });
        }
        while ackers.join_next().await.is_some() {}
        // Done with its data key: retired, so that retention destroys it
        // once the rows it sealed are erased (an active key never is).
        // Best effort, as when a key reaches its cap.
        if let Some(k) = keys.dek.take() {
            if let Err(e) = self.store.retire_data_key(&k.id).await {
                tracing::warn!(key_id = %k.id, error = %e, "could not retire this writer's data key at the end of the run");
            }
        }
        Ok(total)
    }

    /// Protects and commits one batch. If a rotation retired the data key
    /// or the token key meanwhile, the commit is refused; the batch is then
    /// protected again with fresh keys, so no row is ever committed under a
    /// retired key.
    async fn write_batch(
        &self,
        msgs: &[Message],
        keys: &mut WorkerKeys,
        cancel: &CancellationToken,
    ) -> anyhow::Result<BatchOutcome> {
        // Asked before every batch, whatever the answer (see
        // `Store::due_honeytokens`); never a reason to hold real events back.
        // More than fit, so that writers asking at once each find some
        // that no other writer of this process is carrying.
        // Briefly: while the database is away, the write below is what
        // waits and retries.
        let room = crate::honeytoken::room(msgs.len());
        let asked = self
            .store
            .due_honeytokens(room * (self.opts.writers.max(1) as i64 + 1));
        let due = match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(due)) => due,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no honeytoken logins this batch");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!(
                    "no honeytoken logins this batch: the database did not answer in time"
                );
                Vec::new()
            }
        };
        let taken = TakenHoneytokens::take(due, room as usize);
        let due = &taken.0;
        let net = self.opts.network_tokens;
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let need = (msgs.len() + due.len()) as u64;
            let key_id = self.data_key(keys, need, cancel).await?;
            let lease = keys.dek.as_mut().expect("data key present");
            let mut batch = Batch {
                token_key_id: keys.token_id.clone(),
                ..Batch::default()
            };
            let mut reasons = Vec::new();
            let mut rejects = Vec::new();
            let mut neighbours = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                match protect(m, &keys.token, net, &key_id, &lease.sealer)? {
                    Protected::Login(l, v) => {
                        neighbours.push((i, batch.logins.len()));
                        batch.logins.push((l, v));
                    }
                    Protected::Rejected(q, why) => {
                        rejects.push((i, why.to_string()));
                        reasons.push(why.code());
                        batch.quarantined.push(q);
                    }
                }
            }
            plant_due(
                due,
                msgs,
                &neighbours,
                (&keys.token, net, &key_id, &lease.sealer),
                &mut batch,
            )?;
            lease.record_use(need);
            batch.key_usage.push((key_id.clone(), need as i64));
            let stats = &self.stats;
            let written = retry(
                self.opts.backoff,
                cancel,
                OnCancel::TryOnceMore,
                |e: &StoreError, n| {
                    stats.retry("database");
                    stats.write_failed();
                    tracing::warn!(error = %e, attempt = n, "batch write failed, retrying");
                },
                || self.store.write_batch(&batch),
            )
            .await;
            match written {
                Ok(outcome) => {
                    log_rejects(msgs, &rejects, outcome.rejected);
                    stats.record_batch(&outcome, msgs.len(), &reasons, started.elapsed());
                    return Ok(outcome);
                }
                Err(StoreError::KeyRetired(id)) if id == key_id => {
                    tracing::info!(key_id = %id, "data key retired by a rotation; taking a fresh one");
                    keys.dek = None;
                }
                Err(StoreError::KeyRetired(id)) => {
                    let (token, token_id) = self.token_key(cancel).await?;
                    tracing::info!(old = %id, new = %token_id, version = token.version(), "token key rotated; switching to the new version");
                    keys.token = token;
                    keys.token_id = token_id;
                }
                Err(e) => {
                    stats.error("database");
                    return Err(e.into());
                }
            }
        }
        anyhow::bail!("keys kept changing under this batch; is a rotation looping?")
    }
}

/// Logs a batch's rejected messages once it has committed, by what the
/// commit did: `newly` of them were quarantined now, the others already
/// were (a re-run of a file, a redelivery), which is no news: debug only.
fn log_rejects(msgs: &[Message], rejects: &[(usize, String)], newly: u64) {
    let all_new = newly as usize >= rejects.len();
    for (i, why) in rejects {
        let m = &msgs[*i];
        if all_new {
            tracing::info!(message_id = %m.id, line = m.line, reason = %why, "rejected message quarantined");
        } else if newly == 0 {
            tracing::debug!(message_id = %m.id, line = m.line, reason = %why, "rejected message already quarantined");
        } else {
            // Which ones are new the batch's outcome does not say.
            tracing::info!(message_id = %m.id, line = m.line, reason = %why, "rejected message quarantined (now or before)");
        }
    }
}

/// Honeytoken logins some writer of this process is writing now: another
/// writer leaves them alone (two batches carrying one would collide on its
/// message id, and the second would leave its fast lane for it).
static IN_FLIGHT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The due honeytoken logins one batch carries; given back when it ends,
/// written or not (a written one is no longer handed out as due).
struct TakenHoneytokens(Vec<crate::store::DueHoneytoken>);

impl TakenHoneytokens {
    /// At most `room` of `due` that no other writer holds.
    fn take(due: Vec<crate::store::DueHoneytoken>, room: usize) -> Self {
        let mut busy = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        let mine: Vec<_> = due
            .into_iter()
            .filter(|d| !busy.contains(&d.uuid_id))
            .take(room)
            .collect();
        busy.extend(mine.iter().map(|d| d.uuid_id.clone()));
        TakenHoneytokens(mine)
    }
}

impl Drop for TakenHoneytokens {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let mut busy = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        busy.retain(|id| !self.0.iter().any(|d| &d.uuid_id == id));
    }
}

/// Writes the due honeytoken logins into `batch`, each beside a real login
/// of it chosen at random (`neighbours`: message index, login index) and
/// at a random place among them, and notes their ids in `batch.planted`.
fn plant_due(
    due: &[crate::store::DueHoneytoken],
    msgs: &[Message],
    neighbours: &[(usize, usize)],
    (token, net, key_id, sealer): (&TokenKey, bool, &str, &crate::crypto::aead::Sealer),
    batch: &mut Batch,
) -> anyhow::Result<()> {
    use rand::seq::SliceRandom;
    use rand::Rng;
    if neighbours.is_empty() {
        return Ok(());
    }
    let mut rng = rand::thread_rng();
    let mut planted = Vec::with_capacity(due.len());
    for d in due {
        let &(m, l) = neighbours.choose(&mut rng).expect("not empty");
        let Some(msg) = crate::honeytoken::inject(d, &msgs[m], &batch.logins[l].0) else {
            continue;
        };
        if let Protected::Login(login, vault) = protect(&msg, token, net, key_id, sealer)? {
            planted.push((login, vault));
        }
    }
    for row in planted {
        batch.planted.insert(row.0.message_id.clone());
        let at = rng.gen_range(0..=batch.logins.len());
        batch.logins.insert(at, row);
    }
    Ok(())
}

/// Batch ids: a counter for the process, from 1.
static BATCH_IDS: AtomicU64 = AtomicU64::new(1);

/// The span around protecting and committing one batch: `batch_id` (this
/// process's count), `batch_size` (messages), and, once it is done,
/// `outcome` (`committed` or `failed`) with the stored, duplicate and
/// rejected counts. Every log line written meanwhile carries it (in JSON
/// logs as `span` and `spans`), so a line can be tied to its batch. Counts
/// and ids only: nothing from a message.
fn batch_span(size: usize) -> tracing::Span {
    let id = BATCH_IDS.fetch_add(1, Ordering::Relaxed);
    tracing::info_span!(
        "batch",
        batch_id = id,
        batch_size = size,
        outcome = tracing::field::Empty,
        stored = tracing::field::Empty,
        duplicates = tracing::field::Empty,
        rejected = tracing::field::Empty,
    )
}

/// The keys one writer holds; replaced when a rotation retires them.
struct WorkerKeys {
    token: Arc<TokenKey>,
    token_id: String,
    dek: Option<DataKeyLease>,
}

/// Groups received messages into batches of up to `size`, or whatever
/// arrived within `flush_after` of a batch's first message.
async fn batch_loop(
    mut rx: mpsc::Receiver<Message>,
    out: mpsc::Sender<Vec<Message>>,
    size: usize,
    flush_after: Duration,
) {
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        let mut msgs = Vec::with_capacity(size);
        msgs.push(first);
        let deadline = tokio::time::Instant::now() + flush_after;
        while msgs.len() < size {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => msgs.push(m),
                    None => { open = false; break }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if out.send(msgs).await.is_err() {
            break;
        }
    }
}

async fn receive_loop(
    source: Arc<dyn MessageSource>,
    tx: mpsc::Sender<Message>,
    stats: Arc<Stats>,
    backoff: Backoff,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let max = source.preferred_batch();
    loop {
        let got = tokio::select! {
            r = retry(backoff, &cancel, OnCancel::GiveUp, |e: &crate::source::SourceError, n| {
                stats.retry("source");
                tracing::warn!(error = %e, attempt = n, "receive failed, retrying");
            }, || source.receive(max)) => r?,
            _ = cancel.cancelled() => return Ok(()),
        };
        let Some(msgs) = got else { return Ok(()) };
        stats.received.inc_by(msgs.len() as u64);
        for m in msgs {
            // Cancelled while the writers are full (or gone): what was not
            // handed over stays in the source, unacknowledged.
            tokio::select! {
                sent = tx.send(m) => if sent.is_err() { return Ok(()) },
                _ = cancel.cancelled() => return Ok(()),
            }
        }
    }
}
