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
