//! The writer's keys when they need KMS: a fresh data key (the current one
//! reached its cap, or a rotation retired it) or the current token key
//! (a rotation made a new version). KMS faults are retried with backoff, so
//! that a writer waits, holding its batch, instead of failing the run; its
//! messages stay unacknowledged in the source meanwhile.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{keys, Pipeline, WorkerKeys};
use crate::crypto::TokenKey;

impl Pipeline {
    /// The current data key id, generating a fresh key when needed; KMS
    /// hiccups are retried with backoff.
    pub(super) async fn data_key(
        &self,
        keys: &mut WorkerKeys,
        need: u64,
        cancel: &CancellationToken,
    ) -> anyhow::Result<String> {
        let mut attempt = 0;
        loop {
            match keys::data_key_for(
                &mut keys.dek,
                need,
                &self.opts.dek_policy,
                &*self.store,
                &*self.wrapper,
            )
            .await
            {
                Ok(k) => return Ok(k.id.clone()),
                Err(e) if keys::anyhow_is_transient(&e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cannot get a data key, retrying");
                    if !self.kms_backoff(attempt, cancel).await {
                        return Err(e);
                    }
                }
                Err(e) => {
                    self.stats.error("kms");
                    return Err(e);
                }
            }
        }
    }

    /// The current token key, after a rotation retired the one this writer
    /// held; KMS hiccups are retried with backoff, as for data keys.
    pub(super) async fn token_key(
        &self,
        cancel: &CancellationToken,
    ) -> anyhow::Result<(Arc<TokenKey>, String)> {
        let mut attempt = 0;
        loop {
            match keys::load_token_key(&*self.store, &*self.wrapper).await {
                Ok(k) => return Ok(k),
                Err(e) if keys::anyhow_is_transient(&e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "cannot load the current token key, retrying");
                    if !self.kms_backoff(attempt, cancel).await {
                        return Err(e);
                    }
                }
                Err(e) => {
                    self.stats.error("kms");
                    return Err(e);
                }
            }
        }
    }

    /// Counts a retry of KMS (or of the database behind a key) and waits out
    /// its backoff; `false` if the run was cancelled meanwhile.
    async fn kms_backoff(&self, attempt: u32, cancel: &CancellationToken) -> bool {
        self.stats.retry("kms");
        tokio::select! {
            _ = tokio::time::sleep(self.opts.backoff.delay(attempt)) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

/// Runs `op` (a step that calls KMS: checking the key-encryption key,
/// unwrapping the token key) until it succeeds, fails permanently, or
/// `cancel` fires while waiting; transient faults are counted as retries of
/// `kms` in `stats` and logged. For a worker's start-up, before the
/// pipeline exists: meanwhile `/readyz` says not ready.
pub async fn retry_kms<T, F, Fut>(
    what: &str,
    backoff: crate::retry::Backoff,
    stats: &super::Stats,
    cancel: &CancellationToken,
    mut op: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(attempts = attempt + 1, "{what}: KMS answers again");
                }
                return Ok(v);
            }
            Err(e) if keys::anyhow_is_transient(&e) => {
                attempt += 1;
                stats.retry("kms");
                tracing::warn!(error = %format!("{e:#}"), attempt, "{what}: KMS does not answer, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                    _ = cancel.cancelled() => return Err(e),
                }
            }
            Err(e) => {
                stats.error("kms");
                return Err(e);
            }
        }
    }
}
