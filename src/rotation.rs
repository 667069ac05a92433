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
use std::sync::Arc;

use anyhow::Context as _;
use indicatif::ProgressBar;

use crate::crypto::aead::Sealer;
use crate::crypto::{Aad, KeyPurpose, KeyWrapper, TokenField, TokenKey};
use crate::domain::CanonicalIp;
use crate::keyring;
use crate::pipeline::protect::{AAD_QUARANTINE, AAD_VAULT};
use crate::store::{AdminStore, AuditEntry, KeyState, QuarantineRow, Store, VaultRow};
use crate::vault::VaultReader;

/// Rows re-encrypted or re-tokenised per transaction.
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
        .begin_job(&job.entry("rotate-kek", target_arn.clone()), pending as i64)
        .await?;
    store.allow_kek(&target_arn).await?;
    let mut moved = 0;
    // Passes until a listing finds nothing left under another KEK. A worker
    // that read the token key's KEK just before it was re-wrapped may still
    // register one data key under the old KEK a moment later: the pause and
    // the next pass catch it.
    for pass in 0..6 {
        let mut keys = store.list_keys().await?;
        keys.retain(|k| k.state != KeyState::Destroyed && k.wrapped.kek_id != target_arn);
        if keys.is_empty() {
            let record_id = lock.record_id;
            lock.finish().await;
            return Ok(KekRotated {
                record_id,
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
            store.update_wrapped(&k.id, &new).await?;
            moved += 1;
        }
        if pass == 0 {
            // Make running workers take fresh data keys, now under the new KEK.
            store
                .transition_keys(KeyPurpose::Vault, KeyState::Active, KeyState::Retired, "")
                .await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    anyhow::bail!("keys under the old KEK keep appearing; are workers still configured with it?")
}

/// A data key of the rotation's own, with its count of uses.
struct RotationKey {
    id: String,
    sealer: Sealer,
    used: u64,
}

async fn rotation_key(
    store: &dyn AdminStore,
    wrapper: &dyn KeyWrapper,
) -> anyhow::Result<RotationKey> {
    let (material, wrapped) = wrapper.generate(KeyPurpose::Vault).await?;
    let key = keyring::new_key("dek", KeyPurpose::Vault, 0, wrapped);
    store.insert_key(&key).await?;
    Ok(RotationKey {
        id: key.id,
        sealer: Sealer::new(&material),
        used: 0,
    })
}

/// The rotation key to seal the next row with: a fresh one once the current
/// one has sealed [`ROWS_PER_DATA_KEY`] rows. The full one goes to `full`,
/// to be retired once the rows sealed under it are written (the database
/// refuses rows under a retired key).
async fn next_key<'a>(
    slot: &'a mut RotationKey,
    store: &dyn AdminStore,
    wrapper: &dyn KeyWrapper,
    made: &mut Vec<String>,
    full: &mut Vec<String>,
) -> anyhow::Result<&'a mut RotationKey> {
    if slot.used >= ROWS_PER_DATA_KEY {
        let fresh = rotation_key(store, wrapper).await?;
        made.push(fresh.id.clone());
        full.push(std::mem::replace(slot, fresh).id);
    }
    Ok(slot)
}

/// Retires the rotation keys that reached their cap, once their rows are written.
async fn retire_full(store: &dyn AdminStore, full: &mut Vec<String>) -> anyhow::Result<()> {
    for id in full.drain(..) {
        store.set_key_state(&id, KeyState::Retired).await?;
    }
    Ok(())
}

/// Re-encrypts every vault row and quarantined body sealed under a data key
/// that this rotation retires, under fresh data keys of its own (a new one
/// every [`ROWS_PER_DATA_KEY`] rows), then destroys the old wrapped keys
/// that nothing refers to any more. Resumable: a rerun picks up whatever is
/// still under a retired key.
pub async fn rotate_data_keys(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    job: &JobRequest,
    progress: &ProgressBar,
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
        .begin_job(&job.entry("rotate-data-keys", "vault, quarantine"), pending)
        .await?;
    let mut out = DataKeysRotated {
        record_id: lock.record_id,
        ..Default::default()
    };

    let mut key = rotation_key(&*store, &*wrapper).await?;
    let mut full = Vec::new();
    out.new_keys.push(key.id.clone());
    store
        .transition_keys(
            KeyPurpose::Vault,
            KeyState::Active,
            KeyState::Retired,
            &key.id,
        )
        .await?;
    let old: Vec<String> = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::Vault && k.state == KeyState::Retired)
        .map(|k| k.id)
        .collect();
    progress.set_length(pending.max(0) as u64);
    let plain_store: Arc<dyn Store> = store.clone();
    let mut reader = VaultReader::new(plain_store, wrapper.clone());

    let mut after = String::new();
    loop {
        let rows = store
            .vault_rows_under(lock.record_id, &old, &after, BATCH)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.message_id.clone();
        let mut updates = Vec::with_capacity(rows.len());
        for r in rows {
            let plain = match reader.open(&r).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    out.skipped.add(
                        &r.message_id,
                        &anyhow::anyhow!("its data key was destroyed"),
                    );
                    continue;
                }
                Err(e) => {
                    out.skipped.add(&r.message_id, &e);
                    continue;
                }
            };
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&plain)?);
            let k = next_key(&mut key, &*store, &*wrapper, &mut out.new_keys, &mut full).await?;
            let aad = Aad {
                kind: AAD_VAULT,
                message_id: &r.message_id,
                user_id: &r.user_id,
                key_id: &k.id,
            };
            let sealed = k.sealer.seal(&aad, &bytes)?;
            k.used += 1;
            let old_key = r.key_id.clone();
            updates.push((
                VaultRow {
                    key_id: k.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..r
                },
                old_key,
            ));
        }
        out.resealed += store.reseal(&updates, &[]).await?;
        retire_full(&*store, &mut full).await?;
        progress.inc(updates.len() as u64);
    }

    let mut after = String::new();
    loop {
        let rows = store
            .quarantine_rows_under(lock.record_id, &old, &after, BATCH)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.message_id.clone();
        let mut updates = Vec::with_capacity(rows.len());
        for q in rows {
            let body = match reader.open_quarantined(&q).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    out.skipped.add(
                        &q.message_id,
                        &anyhow::anyhow!("its data key was destroyed"),
                    );
                    continue;
                }
                Err(e) => {
                    out.skipped.add(&q.message_id, &e);
                    continue;
                }
            };
            let k = next_key(&mut key, &*store, &*wrapper, &mut out.new_keys, &mut full).await?;
            let aad = Aad {
                kind: AAD_QUARANTINE,
                message_id: &q.message_id,
                user_id: q.user_id.as_deref().unwrap_or(""),
                key_id: &k.id,
            };
            let sealed = k.sealer.seal(&aad, &body)?;
            k.used += 1;
            let old_key = q.key_id.clone();
            updates.push((
                QuarantineRow {
                    key_id: k.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..q
                },
                old_key,
            ));
        }
        out.resealed += store.reseal(&[], &updates).await?;
        retire_full(&*store, &mut full).await?;
        progress.inc(updates.len() as u64);
    }

    // The rotation's keys are not used by any worker: retired, so the next
    // rotation re-encrypts their rows like the others.
    store.set_key_state(&key.id, KeyState::Retired).await?;
    out.destroyed = store.destroy_unreferenced_data_keys().await?;
    lock.finish().await;
    Ok(out)
}

/// Makes token key version N+1 current and re-tokenises `user_logins` from
/// the vault originals; then destroys the old version, unless some login
/// could not be re-tokenised (its old key then stays, retired). Once it
/// returns with nothing skipped, no login with recoverable originals
/// carries a token of an older version.
pub async fn rotate_token_key(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    job: &JobRequest,
    progress: &ProgressBar,
) -> anyhow::Result<TokenKeyRotated> {
    let next = store
        .current_token_key()
        .await?
        .map_or(1, |k| k.version + 1);
    let pending = store.count_stale_tokens(next).await?;
    let lock = store
        .begin_job(&job.entry("rotate-token-key", "user_logins"), pending)
        .await?;
    // Read again under the lock: another rotation may have finished since.
    let version = store
        .current_token_key()
        .await?
        .map_or(1, |k| k.version + 1);
    let (material, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
    let new = keyring::new_key("tok", KeyPurpose::Token, version, wrapped);
    anyhow::ensure!(
        store.insert_key(&new).await?,
        "token key v{version} already exists: is another rotation running?"
    );
    store
        .transition_keys(
            KeyPurpose::Token,
            KeyState::Active,
            KeyState::Retired,
            &new.id,
        )
        .await?;
    let token_key = TokenKey::new(version as u32, &material);
    progress.set_length(pending.max(0) as u64);
    let mut out = TokenKeyRotated {
        record_id: lock.record_id,
        version,
        ..Default::default()
    };
    retokenise(
        &store,
        wrapper,
        &token_key,
        lock.record_id,
        progress,
        &mut out,
    )
    .await?;
    if out.skipped.count == 0 {
        out.destroyed = store
            .transition_keys(
                KeyPurpose::Token,
                KeyState::Retired,
                KeyState::Destroyed,
                &new.id,
            )
            .await?;
    }
    lock.finish().await;
    Ok(out)
}

async fn retokenise(
    store: &Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    key: &TokenKey,
    record_id: i64,
    progress: &ProgressBar,
    out: &mut TokenKeyRotated,
) -> anyhow::Result<()> {
    let version = key.version() as i64;
    let plain_store: Arc<dyn Store> = store.clone();
    let mut reader = VaultReader::new(plain_store, wrapper);
    let mut skipped: HashSet<String> = HashSet::new();
    // Keyset passes until nothing stale is left but what was skipped: rows
    // committed by workers just before the old key was retired are caught
    // by the next pass.
    for _pass in 0..10 {
        let mut after = 0i64;
        loop {
            let rows = store
                .logins_to_retokenise(record_id, version, after, BATCH)
                .await?;
            let Some((last, _, _)) = rows.last() else {
                break;
            };
            after = *last;
            let mut updates = Vec::with_capacity(rows.len());
            for (_, login, vault) in &rows {
                if skipped.contains(&login.message_id) {
                    continue;
                }
                let opened = match reader.open(vault).await {
                    Ok(Some(p)) => CanonicalIp::parse(&p.ip).map(|ip| (ip, p)).ok_or_else(|| {
                        anyhow::anyhow!("its vault row holds an IP that no longer parses")
                    }),
                    Ok(None) => Err(anyhow::anyhow!("its data key was destroyed")),
                    Err(e) => Err(e),
                };
                match opened {
                    Ok((ip, plain)) => updates.push((
                        login.message_id.clone(),
                        key.token(TokenField::Ip, ip.expose()).to_string(),
                        key.token(TokenField::DeviceId, &plain.device_id)
                            .to_string(),
                    )),
                    Err(e) => {
                        out.skipped.add(&login.message_id, &e);
                        skipped.insert(login.message_id.clone());
                    }
                }
            }
            store.update_tokens(&updates).await?;
            out.retokenised += updates.len() as u64;
            progress.inc(updates.len() as u64);
        }
        if store.count_stale_tokens(version).await? <= skipped.len() as i64 {
            return Ok(());
        }
    }
    anyhow::bail!(
        "logins with old tokens keep appearing; are workers running an old version of pii-vault?"
    )
}
