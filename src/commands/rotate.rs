//! `pii-vault rotate kek | data-keys | token-key`: key rotation, safe to run
//! while workers consume.
//!
//! Workers hold keys in memory, so a rotation cannot swap them directly.
//! Instead it *retires* keys in the database, and every worker commit checks
//! (in the same transaction) that the data key and token key it used are
//! still active. A worker whose key was retired gets its batch refused,
//! takes fresh keys and protects the batch again. So once a rotation has
//! retired a key, no row is ever committed under it again, and the rotation
//! can re-encrypt or re-tokenise what is there without racing the workers.

use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{Cli, RotateCommand};
use crate::crypto::aead::Sealer;
use crate::crypto::{Aad, KeyPurpose, KeyWrapper, TokenField, TokenKey};
use crate::domain::CanonicalIp;
use crate::pipeline::protect::{AAD_QUARANTINE, AAD_VAULT};
use crate::store::{AdminStore, KeyState, Store, StoredKey};
use crate::vault::VaultReader;

/// Rows re-encrypted or re-tokenised per transaction.
const BATCH: i64 = 500;

pub async fn rotate(cli: &Cli, cmd: &RotateCommand) -> anyhow::Result<()> {
    let store = super::open_admin_store(cli).await?;
    let wrapper = super::open_wrapper(cli).await?;
    match cmd {
        RotateCommand::Kek { to } => rotate_kek(store, wrapper, to).await,
        RotateCommand::DataKeys => rotate_data_keys(store, wrapper, cli.progress())
            .await
            .map(|_| ()),
        RotateCommand::TokenKey => rotate_token_key(store, wrapper, cli.progress())
            .await
            .map(|_| ()),
    }
}

fn bar(show: bool, what: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{pos}} {what} ({{per_sec}})"
        ))
        .expect("valid template"),
    )
}

/// Re-wraps every stored key under the KMS key `to`. KMS-wrapped keys move
/// with `ReEncrypt` (plaintext never leaves KMS); keys of the local key file
/// are unwrapped locally and wrapped with `Encrypt`. Resumable: keys already
/// under `to` are skipped. Retires the active data keys last, so running
/// workers take fresh ones under `to` (they follow the token key's KEK).
pub async fn rotate_kek(
    store: Arc<dyn AdminStore>,
    current: Arc<dyn KeyWrapper>,
    to: &str,
) -> anyhow::Result<()> {
    let target = crate::kms::aws::AwsKms::connect(to)
        .await
        .with_context(|| format!("the target KMS key {to}"))?;
    let target_arn = target.kek_id();
    let mut moved = 0;
    // Passes until a listing finds nothing left under another KEK. A worker
    // that read the token key's KEK just before it was re-wrapped may still
    // store one data key under the old KEK a moment later: the pause and the
    // next pass catch it.
    let mut clean = false;
    for pass in 0..6 {
        let mut keys = store.list_keys().await?;
        keys.retain(|k| k.state != KeyState::Destroyed && k.wrapped.kek_id != target_arn);
        if keys.is_empty() {
            clean = true;
            break;
        }
        // Token keys first: workers choose the KEK of new data keys by the
        // KEK of the current token key.
        keys.sort_by_key(|k| k.purpose != KeyPurpose::Token);
        for k in &keys {
            let new = if k.wrapped.kek_id.starts_with("local:") {
                let material = current.unwrap(k.purpose, &k.wrapped).await.with_context(|| {
                    format!("key {} is wrapped by the local key file {}; run with that key directory", k.id, k.wrapped.kek_id)
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
    anyhow::ensure!(
        clean,
        "keys under the old KEK keep appearing; are workers still configured with it?"
    );
    eprintln!(
        "pii-vault: re-wrapped {moved} key(s) under {target_arn}; every stored key is now wrapped by it. \
         Point PII_VAULT_KMS_KEY_ID at it; the old KMS key can then be disabled."
    );
    Ok(())
}

/// Re-encrypts every vault row and quarantined body under one fresh data
/// key, then destroys the old wrapped keys. Resumable and idempotent: a
/// rerun picks up whatever is still under a retired key.
pub async fn rotate_data_keys(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    progress: bool,
) -> anyhow::Result<(u64, Vec<String>)> {
    let plain_store: Arc<dyn Store> = store.clone();
    let (material, wrapped) = wrapper.generate(KeyPurpose::Vault).await?;
    let new = StoredKey {
        id: format!("dek-{}", uuid::Uuid::new_v4()),
        purpose: KeyPurpose::Vault,
        version: 0,
        wrapped,
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    };
    store.insert_key(&new).await?;
    store
        .transition_keys(
            KeyPurpose::Vault,
            KeyState::Active,
            KeyState::Retired,
            &new.id,
        )
        .await?;
    let old: Vec<String> = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.purpose == KeyPurpose::Vault && k.state == KeyState::Retired)
        .map(|k| k.id)
        .collect();
    let sealer = Sealer::new(&material);
    let mut reader = VaultReader::new(plain_store, wrapper.clone());
    let pb = bar(progress, "rows re-encrypted");
    let mut total = 0u64;
    loop {
        let rows = store.vault_rows_under(&old, BATCH).await?;
        let quarantined = store.quarantine_rows_under(&old, BATCH).await?;
        if rows.is_empty() && quarantined.is_empty() {
            break;
        }
        let mut vault_updates = Vec::with_capacity(rows.len());
        for r in rows {
            let plain = reader
                .open(&r)
                .await?
                .with_context(|| format!("row {} is under a destroyed key", r.message_id))?;
            let bytes = zeroize::Zeroizing::new(serde_json::to_vec(&plain)?);
            let aad = Aad {
                kind: AAD_VAULT,
                message_id: &r.message_id,
                user_id: &r.user_id,
                key_id: &new.id,
            };
            let sealed = sealer.seal(&aad, &bytes)?;
            let old_key = r.key_id.clone();
            vault_updates.push((
                crate::store::VaultRow {
                    key_id: new.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..r
                },
                old_key,
            ));
        }
        let mut q_updates = Vec::with_capacity(quarantined.len());
        for q in quarantined {
            let body = reader.open_quarantined(&q).await?.with_context(|| {
                format!("quarantined {} is under a destroyed key", q.message_id)
            })?;
            let aad = Aad {
                kind: AAD_QUARANTINE,
                message_id: &q.message_id,
                user_id: q.user_id.as_deref().unwrap_or(""),
                key_id: &new.id,
            };
            let sealed = sealer.seal(&aad, &body)?;
            let old_key = q.key_id.clone();
            q_updates.push((
                crate::store::QuarantineRow {
                    key_id: new.id.clone(),
                    nonce: sealed.nonce.to_vec(),
                    ciphertext: sealed.ciphertext,
                    ..q
                },
                old_key,
            ));
        }
        let n = (vault_updates.len() + q_updates.len()) as u64;
        store.reseal(&vault_updates, &q_updates).await?;
        total += n;
        pb.inc(n);
    }
    pb.finish_and_clear();
    // The rotator's key is not used by any worker: retire it so the next
    // rotation re-encrypts it like the others.
    store.set_key_state(&new.id, KeyState::Retired).await?;
    let destroyed = store.destroy_unreferenced_data_keys().await?;
    eprintln!(
        "pii-vault: re-encrypted {total} row(s) under data key {}; destroyed {} old data key(s)",
        new.id,
        destroyed.len()
    );
    Ok((total, destroyed))
}

/// Makes token key version N+1 current and re-tokenises `user_logins` from
/// the vault originals; then destroys the old version. Once it returns, no
/// login with recoverable originals carries a token of an older version.
pub async fn rotate_token_key(
    store: Arc<dyn AdminStore>,
    wrapper: Arc<dyn KeyWrapper>,
    progress: bool,
) -> anyhow::Result<u64> {
    let plain_store: Arc<dyn Store> = store.clone();
    let current = store.current_token_key().await?;
    let version = current.as_ref().map_or(1, |k| k.version + 1);
    let (material, wrapped) = wrapper.generate(KeyPurpose::Token).await?;
    let new = StoredKey {
        id: format!("tok-{}", uuid::Uuid::new_v4()),
        purpose: KeyPurpose::Token,
        version,
        wrapped,
        state: KeyState::Active,
        created_at: Utc::now(),
        usage_count: 0,
    };
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
    let total = retokenise(&*store, plain_store, wrapper, &token_key, progress).await?;
    let destroyed = store
        .transition_keys(
            KeyPurpose::Token,
            KeyState::Retired,
            KeyState::Destroyed,
            &new.id,
        )
        .await?;
    eprintln!(
        "pii-vault: token key v{version} is current; re-tokenised {total} login(s); destroyed {} old token key(s)",
        destroyed.len()
    );
    Ok(total)
}

async fn retokenise(
    store: &dyn AdminStore,
    plain_store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    key: &TokenKey,
    progress: bool,
) -> anyhow::Result<u64> {
    let version = key.version() as i64;
    let mut reader = VaultReader::new(plain_store, wrapper);
    let pb = bar(progress, "logins re-tokenised");
    let mut total = 0u64;
    // Keyset passes until nothing stale is left: rows committed by workers
    // just before the old key was retired are caught by the next pass.
    for _pass in 0..10 {
        let mut after = 0i64;
        loop {
            let rows = store.logins_to_retokenise(version, after, BATCH).await?;
            let Some((last, _, _)) = rows.last() else {
                break;
            };
            after = *last;
            let mut updates = Vec::with_capacity(rows.len());
            for (_, login, vault) in &rows {
                let Some(plain) = reader.open(vault).await? else {
                    continue;
                };
                let ip = CanonicalIp::parse(&plain.ip)
                    .context("a vault row holds an IP that no longer parses")?;
                updates.push((
                    login.message_id.clone(),
                    key.token(TokenField::Ip, ip.expose()).to_string(),
                    key.token(TokenField::DeviceId, &plain.device_id)
                        .to_string(),
                ));
            }
            store.update_tokens(&updates).await?;
            total += updates.len() as u64;
            pb.inc(updates.len() as u64);
        }
        if store.count_stale_tokens(version).await? == 0 {
            pb.finish_and_clear();
            return Ok(total);
        }
    }
    anyhow::bail!(
        "logins with old tokens keep appearing; are workers running an old version of pii-vault?"
    )
}
