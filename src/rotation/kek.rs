//! `rotate kek`: every stored key re-wrapped under another KMS key.

use anyhow::Context as _;

use super::KekRotated;
use crate::crypto::{KeyPurpose, KeyWrapper};
use crate::store::{JobKind, JobStart, KeyState, Requester, Store};

/// Re-wraps every stored key under the KMS key `target`. KMS-wrapped keys
/// move with `ReEncrypt` (plaintext never leaves KMS); keys of the local key
/// file are unwrapped locally and wrapped with `Encrypt`. The job puts
/// `target` (named by its audit record) on the allow-list. Resumable: keys
/// already under `target` are skipped. Retires the active data keys, so
/// running workers take fresh ones under `target` (they follow the token
/// key's KEK).
pub async fn rotate_kek(
    store: &dyn Store,
    current: &dyn KeyWrapper,
    target: &dyn KeyWrapper,
    who: &Requester,
) -> anyhow::Result<KekRotated> {
    let target_arn = target.kek_id();
    let pending = store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.state != KeyState::Destroyed && k.wrapped.kek_id != target_arn)
        .count();
    let lease = store
        .begin_job(JobKind::Kek, &target_arn, who, pending as i64)
        .await?;
    // A killed run of another target must be finished first: its keys are
    // half moved.
    let job = match store.resume_job(&lease).await? {
        Some(j) => {
            let was = j.kek_target.clone().unwrap_or_default();
            anyhow::ensure!(
                was == target_arn,
                "a rotate kek to {was} did not finish; run `pii-vault rotate kek --to {was}` to finish it first"
            );
            j
        }
        None => store.start_job(&lease, JobStart::Kek).await?,
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
            store.finish_job(&job).await?;
            let record_id = lease.record;
            lease.finish().await;
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
            if store.rewrap_key(&job, &k.id, &new).await? {
                moved += 1;
            }
        }
        if pass == 0 {
            // Make running workers take fresh data keys, now under the new KEK.
            store.retire_data_keys(&job).await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    anyhow::bail!("keys under the old KEK keep appearing; are workers still configured with it?")
}
