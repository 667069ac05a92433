//! `rotate data-keys`: the vault and the quarantine re-encrypted under
//! fresh data keys of the rotation's own, the old ones then destroyed.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::job::{open_job, size_bar, Run};
use super::rewrite::{rewrite_closed, Fill};
use super::{DataKeysRotated, RotationOptions, Skipped};
use crate::crypto::aead::Sealer;
use crate::crypto::{Aad, KeyPurpose, KeyWrapper};
use crate::keyring;
use crate::progress::JobProgress;
use crate::store::{
    JobKind, JobStart, KeyState, QuarantineRow, Requester, RotationRange, Store, VaultRow,
};
use crate::vault::{quarantine_aad, vault_aad, VaultReader};

/// Rows one rotation data key seals before the rotation takes another: the
/// same cap workers apply (random 96-bit nonces stay far from collision),
/// and a bound on what one leaked key exposes.
pub const ROWS_PER_DATA_KEY: u64 = 1 << 20;

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
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    who: &Requester,
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
    let lease = store
        .begin_job(JobKind::DataKeys, "vault, quarantine", who, pending)
        .await?;
    let (job, ranges, resumed) = open_job(&*store, &lease, opts, progress, |bounds| {
        let store = store.clone();
        let lease = &lease;
        async move {
            Ok(store
                .start_job(lease, JobStart::DataKeys { bounds: &bounds })
                .await?)
        }
    })
    .await?;
    let left = if resumed {
        Some(store.count_sealed_under(&job.old_keys).await?)
    } else {
        None
    };
    size_bar(progress, &ranges, pending, left);
    let run = Run::new(&store, &wrapper, job.clone(), opts, progress);
    let mut out = DataKeysRotated {
        record_id: lease.record,
        ..Default::default()
    };
    // Closed partitions first, each into a new table; then the rest in
    // place (the in-place readers leave the rewritten partitions alone).
    let closed = rewrite_closed(&run, || Box::new(VaultRewrite::default())).await?;
    out.resealed += closed.rows;
    out.skipped.merge(closed.skipped);
    out.new_keys.extend(closed.keys);
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
    let left = store.count_sealed_under(&job.old_keys).await?;
    if left as u64 > out.skipped.count {
        tracing::error!(
            rows = left as u64 - out.skipped.count,
            "rows skipped by an earlier run of this job are still under their old keys"
        );
        out.skipped.count = left as u64;
    }
    // The database destroys what nothing is sealed under any more, and
    // records it.
    out.destroyed = store.finish_job(&job).await?;
    lease.finish().await;
    Ok(out)
}

/// Which table a sealed row is in, with its user id: what its associated
/// data binds it to.
#[derive(Clone, Copy)]
enum Table<'a> {
    Vault(&'a str),
    Quarantine(Option<&'a str>),
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
            run.store.job_new_data_key(&run.job, &key).await?;
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

    /// Seals `opened` (the plaintext of row `message_id`, or why it could
    /// not be opened) again under the next key, bound to its row as `table`
    /// says: `(key id, nonce, ciphertext)`, or `None` with the row counted
    /// as skipped. What vault rows and quarantined bodies share.
    async fn seal_again(
        &mut self,
        run: &Run,
        message_id: &str,
        table: Table<'_>,
        opened: anyhow::Result<Option<Zeroizing<Vec<u8>>>>,
        skipped: &mut Skipped,
    ) -> anyhow::Result<Option<(String, Vec<u8>, Vec<u8>)>> {
        let plain = match opened {
            Ok(Some(p)) => p,
            Ok(None) => {
                skipped.add(message_id, &anyhow::anyhow!("its data key was destroyed"));
                return Ok(None);
            }
            Err(e) => {
                skipped.add(message_id, &e);
                return Ok(None);
            }
        };
        let k = self.next(run).await?;
        let aad: Aad = match table {
            Table::Vault(user) => vault_aad(message_id, user, &k.id),
            Table::Quarantine(user) => quarantine_aad(message_id, user, &k.id),
        };
        let sealed = k.sealer.seal(&aad, &plain)?;
        k.used += 1;
        Ok(Some((
            k.id.clone(),
            sealed.nonce.to_vec(),
            sealed.ciphertext,
        )))
    }

    /// Vault row `r` opened and sealed again by [`RangeKeys::seal_again`],
    /// with the key it was under; `None` when it could not be opened (then
    /// counted in `skipped`). The same for a range in place and for a
    /// closed partition's rewrite.
    async fn reseal_vault(
        &mut self,
        run: &Run,
        reader: &mut VaultReader,
        r: VaultRow,
        skipped: &mut Skipped,
    ) -> anyhow::Result<Option<(VaultRow, String)>> {
        let opened = reader.open(&r).await.map(|p| p.map(|p| p.encode()));
        let table = Table::Vault(&r.user_id);
        let Some((key_id, nonce, ciphertext)) = self
            .seal_again(run, &r.message_id, table, opened, skipped)
            .await?
        else {
            return Ok(None);
        };
        let old = r.key_id.clone();
        let row = VaultRow {
            key_id,
            nonce,
            ciphertext,
            ..r
        };
        Ok(Some((row, old)))
    }

    async fn retire_full(&mut self, run: &Run) -> anyhow::Result<()> {
        for id in self.full.drain(..) {
            run.store.job_retire_key(&run.job, &id).await?;
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

/// Fills the new table of a closed vault partition: rows re-sealed under
/// keys of its own, rows it cannot open copied as they are (their keys are
/// then kept, as in place).
#[derive(Default)]
struct VaultRewrite {
    keys: RangeKeys,
}

#[async_trait::async_trait]
impl Fill for VaultRewrite {
    /// The next chunk is read while this one is re-sealed and written, on
    /// another connection: otherwise the connections wait while the client
    /// re-seals, and the client while they read.
    async fn fill(&mut self, run: &Run, partition: &str) -> anyhow::Result<(u64, Skipped)> {
        let mut reader = run.reader();
        let mut skipped = Skipped::default();
        let (job, limit) = (&run.job, run.opts.chunk_rows);
        let read = |after: String| async move {
            anyhow::Ok(
                run.store
                    .rewrite_vault_chunk(job, partition, &after, limit)
                    .await?,
            )
        };
        let mut rows = read(String::new()).await?;
        let mut done = 0;
        while let Some(after) = rows.last().map(|r| r.message_id.clone()) {
            let (keys, reader, skipped) = (&mut self.keys, &mut reader, &mut skipped);
            let this = std::mem::take(&mut rows);
            let write = async move {
                let mut sealed = Vec::with_capacity(this.len());
                let mut keep = Vec::new();
                for r in this {
                    let id = r.message_id.clone();
                    match keys.reseal_vault(run, reader, r, skipped).await? {
                        Some(resealed) => sealed.push(resealed),
                        None => keep.push(id),
                    }
                }
                run.store
                    .rewrite_vault_write(job, partition, &sealed, &keep)
                    .await?;
                keys.retire_full(run).await?;
                anyhow::Ok(sealed.len() as u64)
            };
            let (next, written) = tokio::try_join!(read(after), write)?;
            done += written;
            run.chunk_committed(written)?;
            rows = next;
        }
        Ok((done, skipped))
    }

    async fn done(self: Box<Self>, run: &Run) -> anyhow::Result<Vec<String>> {
        self.keys.retire_all(run).await
    }
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
    let (job, limit) = (&run.job, run.opts.chunk_rows);
    loop {
        let (vault, quarantine) = if range.table == "quarantine" {
            let rows = run.store.quarantine_chunk(job, &cursor, limit).await?;
            (vec![], rows)
        } else {
            let hi = range.hi.as_deref();
            let rows = run.store.vault_chunk(job, &cursor, hi, limit).await?;
            (rows, vec![])
        };
        let last = match (vault.last(), quarantine.last()) {
            (Some(v), _) => v.message_id.clone(),
            (_, Some(q)) => q.message_id.clone(),
            _ => break,
        };
        let mut v_updates = Vec::with_capacity(vault.len());
        for r in vault {
            if let Some(resealed) = keys.reseal_vault(run, &mut reader, r, &mut skipped).await? {
                v_updates.push(resealed);
            }
        }
        let mut q_updates = Vec::with_capacity(quarantine.len());
        for q in quarantine {
            let opened = reader.open_quarantined(&q).await;
            let table = Table::Quarantine(q.user_id.as_deref());
            if let Some((key_id, nonce, ciphertext)) = keys
                .seal_again(run, &q.message_id, table, opened, &mut skipped)
                .await?
            {
                let old = q.key_id.clone();
                let row = QuarantineRow {
                    key_id,
                    nonce,
                    ciphertext,
                    ..q
                };
                q_updates.push((row, old));
            }
        }
        let n = run
            .store
            .reseal_chunk(job, range.no, &last, &v_updates, &q_updates)
            .await?;
        resealed += n;
        cursor = last;
        keys.retire_full(run).await?;
        run.chunk_committed(n)?;
    }
    run.store.range_done(job, range.no).await?;
    let made = keys.retire_all(run).await?;
    Ok((resealed, made, skipped))
}
