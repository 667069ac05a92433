//! `rotate token-key`: a new token-key version made current, and
//! `user_logins` re-tokenised from the vault originals.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Context as _;

use super::job::{open_job, size_bar, Run};
use super::rewrite::{rewrite_closed, Fill};
use super::{RotationOptions, Skipped, TokenKeyRotated};
use crate::crypto::{KeyPurpose, KeyWrapper, TokenField, TokenKey};
use crate::domain::CanonicalIp;
use crate::keyring;
use crate::progress::JobProgress;
use crate::store::{Job, JobKind, JobStart, KeyState, NewTokens, Requester, RotationRange, Store};
use crate::vault::{VaultPlaintext, VaultReader};

/// Rows re-tokenised per transaction by the final sweep.
const BATCH: i64 = 500;

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
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    who: &Requester,
    opts: &RotationOptions,
    progress: &JobProgress,
) -> anyhow::Result<TokenKeyRotated> {
    let next = next_token_version(&*store).await?;
    let pending = store.count_tokens_not_of(next).await?;
    let lease = store
        .begin_job(JobKind::TokenKey, "user_logins", who, pending)
        .await?;
    // A new job makes its key (the key's material stays here); a resumed
    // one unwraps the key its start stored.
    let mut made = None;
    let (job, ranges, resumed) = open_job(&*store, &lease, opts, progress, |bounds| {
        let (store, wrapper, lease, made) = (store.clone(), wrapper.clone(), &lease, &mut made);
        async move {
            // Read again under the lease: another rotation may have
            // finished since.
            let next = next_token_version(&*store).await?;
            let (material, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
            let key = keyring::new_key("tok", KeyPurpose::Token, next, wrapped);
            let start = JobStart::TokenKey {
                bounds: &bounds,
                key: &key,
            };
            let job = store.start_job(lease, start).await?;
            *made = Some(material);
            Ok(job)
        }
    })
    .await?;
    let material = match made {
        Some(m) => m,
        // The key of that version: stored when the job started.
        None => resumed_key(&*store, &*wrapper, &job).await?,
    };
    let version = job
        .token_version
        .context("a token-key rotation job without its version")?;
    let token_key = TokenKey::new(version as u32, &material);
    // Network tokens are written (and filled on rows stored before they
    // existed) unless the database turned them off.
    let network = store.network_tokens().await?;
    let left = if resumed {
        Some(store.count_stale_tokens(version).await?)
    } else {
        None
    };
    size_bar(progress, &ranges, pending, left);
    let run = Run::new(&store, &wrapper, job.clone(), opts, progress);
    let token_key = Arc::new(token_key);
    let mut out = TokenKeyRotated {
        record_id: lease.record,
        version,
        ..Default::default()
    };
    // Closed partitions first, each into a new table; then the rest in
    // place (the in-place ranges leave those alone).
    let closed = rewrite_closed(&run, || {
        Box::new(LoginsRewrite {
            key: token_key.clone(),
            network,
        })
    })
    .await?;
    out.retokenised += closed.rows;
    out.skipped.merge(closed.skipped);
    for (n, skipped) in run
        .ranges(ranges, |run, r| {
            let key = token_key.clone();
            async move { retokenise_range(&run, &key, network, &r).await }
        })
        .await?
    {
        out.retokenised += n;
        out.skipped.merge(skipped);
    }
    // Rows skipped here or by the run this one continues, or committed by a
    // worker in a way the ranges missed: one more sweep finds them.
    if store.count_stale_tokens(version).await? > out.skipped.count as i64 {
        // The sweep meets every stale row again, skipped ones included
        // (those the rewrites copied as they were too).
        out.skipped = Skipped::default();
        retokenise(
            &store,
            wrapper.clone(),
            &token_key,
            network,
            &job,
            progress,
            &mut out,
        )
        .await?;
    }
    // The database destroys the old versions only if no login with
    // recoverable originals still carries one, and records it.
    out.destroyed = store.finish_job(&job).await?;
    lease.finish().await;
    Ok(out)
}

/// The token key a resumed job made when it started, unwrapped.
async fn resumed_key(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    job: &Job,
) -> anyhow::Result<crate::crypto::KeyMaterial> {
    let version = job
        .token_version
        .context("a token-key rotation job without its version")?;
    let stored = store
        .list_keys()
        .await?
        .into_iter()
        .find(|k| k.purpose == KeyPurpose::Token && k.version == version)
        .with_context(|| format!("token key v{version} of rotation job {} is gone", job.id))?;
    anyhow::ensure!(
        stored.state != KeyState::Destroyed,
        "token key v{version} of rotation job {} was destroyed",
        job.id
    );
    wrapper
        .unwrap(KeyPurpose::Token, &stored.wrapped)
        .await
        .with_context(|| format!("cannot unwrap token key v{version}"))
}

/// One above every token-key version there is, destroyed ones included.
async fn next_token_version(store: &dyn Store) -> anyhow::Result<i64> {
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
    network: bool,
    id: i64,
    plain: anyhow::Result<Option<VaultPlaintext>>,
) -> anyhow::Result<NewTokens> {
    let plain = match plain {
        Ok(Some(p)) => p,
        Ok(None) => anyhow::bail!("its data key was destroyed"),
        Err(e) => return Err(e),
    };
    let ip = CanonicalIp::parse(&plain.ip)
        .ok_or_else(|| anyhow::anyhow!("its vault row holds an IP that no longer parses"))?;
    Ok(NewTokens {
        id,
        masked_ip: key.token(TokenField::Ip, ip.expose()).to_string(),
        masked_device_id: key
            .token(TokenField::DeviceId, &plain.device_id)
            .to_string(),
        masked_ip_net: network.then(|| {
            key.token(TokenField::IpNet, ip.network().expose())
                .to_string()
        }),
    })
}

/// Fills the new table of a closed user_logins partition: logins
/// re-tokenised from their originals; those whose originals were erased or
/// cannot be opened copied as they are (they keep their tokens, as in
/// place).
struct LoginsRewrite {
    key: Arc<TokenKey>,
    network: bool,
}

#[async_trait::async_trait]
impl Fill for LoginsRewrite {
    /// The next chunk is read while this one is re-tokenised and written,
    /// as in the data-key rewrite.
    async fn fill(&mut self, run: &Run, partition: &str) -> anyhow::Result<(u64, Skipped)> {
        let mut reader = run.reader();
        let mut skipped = Skipped::default();
        let read = |after: i64| async move {
            anyhow::Ok(
                run.store
                    .rewrite_logins_chunk(&run.job, partition, after, run.opts.chunk_rows)
                    .await?,
            )
        };
        let mut rows = read(i64::MIN).await?;
        let mut done = 0;
        while let Some(after) = rows.last().map(|(id, _, _)| *id) {
            let (key, network) = (&self.key, self.network);
            let (reader, skipped) = (&mut reader, &mut skipped);
            let this = std::mem::take(&mut rows);
            let write = async move {
                let mut tokens = Vec::with_capacity(this.len());
                let mut keep = Vec::new();
                for (id, message_id, vault) in &this {
                    let Some(vault) = vault else {
                        keep.push(*id);
                        continue;
                    };
                    match tokens_of(key, network, *id, reader.open(vault).await) {
                        Ok(t) => tokens.push(t),
                        Err(e) => {
                            skipped.add(message_id, &e);
                            keep.push(*id);
                        }
                    }
                }
                run.store
                    .rewrite_logins_write(&run.job, partition, &tokens, &keep)
                    .await?;
                anyhow::Ok(tokens.len() as u64)
            };
            let (next, written) = tokio::try_join!(read(after), write)?;
            done += written;
            run.chunk_committed(written)?;
            rows = next;
        }
        Ok((done, skipped))
    }

    async fn done(self: Box<Self>, _run: &Run) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// One key range of `rotate token-key`: (re-tokenised, skipped). Ranges
/// are of message ids, as the data-key rotation's: a chunk of logins and
/// their vault rows are then two index range scans in the same order
/// (migrations/postgres/0009_token_rotation_by_message_id.sql).
async fn retokenise_range(
    run: &Run,
    key: &TokenKey,
    network: bool,
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
            .logins_chunk(&run.job, &cursor, hi, run.opts.chunk_rows)
            .await?;
        let Some((_, last)) = rows.last() else { break };
        let last = last.message_id.clone();
        let mut updates = Vec::with_capacity(rows.len());
        for (id, vault) in &rows {
            match tokens_of(key, network, *id, reader.open(vault).await) {
                Ok(tokens) => updates.push(tokens),
                Err(e) => skipped.add(&vault.message_id, &e),
            }
        }
        // In id order, as the rows lie in the table.
        updates.sort_unstable_by_key(|u| u.id);
        run.store
            .tokens_chunk(&run.job, Some((range.no, &last)), &updates)
            .await?;
        cursor = last;
        done += updates.len() as u64;
        run.chunk_committed(updates.len() as u64)?;
    }
    run.store.range_done(&run.job, range.no).await?;
    Ok((done, skipped))
}

/// Keyset passes over all of `user_logins` until nothing stale is left but
/// what was skipped.
async fn retokenise(
    store: &Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    key: &TokenKey,
    network: bool,
    job: &Job,
    progress: &JobProgress,
    out: &mut TokenKeyRotated,
) -> anyhow::Result<()> {
    let version = key.version() as i64;
    let mut reader = VaultReader::new(store.clone(), wrapper);
    let mut skipped: HashSet<String> = HashSet::new();
    for _pass in 0..10 {
        let mut after = 0i64;
        loop {
            let rows = store.sweep_chunk(job, after, BATCH).await?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = *last;
            let mut updates = Vec::with_capacity(rows.len());
            for (id, vault) in &rows {
                if skipped.contains(&vault.message_id) {
                    continue;
                }
                match tokens_of(key, network, *id, reader.open(vault).await) {
                    Ok(tokens) => updates.push(tokens),
                    Err(e) => {
                        out.skipped.add(&vault.message_id, &e);
                        skipped.insert(vault.message_id.clone());
                    }
                }
            }
            store.tokens_chunk(job, None, &updates).await?;
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
