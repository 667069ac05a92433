//! [`Rewrites`] on SQLite: one file, no partitions, so there is nothing to
//! rewrite; its rotations update rows in place.

use async_trait::async_trait;

use super::SqliteStore;
use crate::store::{Job, NewTokens, Rewrite, Rewrites, StaleLogin, StoreError, VaultRow};

fn none() -> StoreError {
    StoreError::Permanent("SQLite has no partitions to rewrite".into())
}

#[async_trait]
impl Rewrites for SqliteStore {
    async fn rewrites(&self, _job: &Job) -> Result<Vec<Rewrite>, StoreError> {
        Ok(Vec::new())
    }

    async fn rewrite_begin(&self, _job: &Job, _partition: &str) -> Result<bool, StoreError> {
        Err(none())
    }

    async fn rewrite_vault_chunk(
        &self,
        _job: &Job,
        _partition: &str,
        _after: &str,
        _limit: i64,
    ) -> Result<Vec<VaultRow>, StoreError> {
        Err(none())
    }

    async fn rewrite_vault_write(
        &self,
        _job: &Job,
        _partition: &str,
        _rows: &[(VaultRow, String)],
        _keep: &[String],
    ) -> Result<u64, StoreError> {
        Err(none())
    }

    async fn rewrite_logins_chunk(
        &self,
        _job: &Job,
        _partition: &str,
        _after: i64,
        _limit: i64,
    ) -> Result<Vec<StaleLogin>, StoreError> {
        Err(none())
    }

    async fn rewrite_logins_write(
        &self,
        _job: &Job,
        _partition: &str,
        _rows: &[NewTokens],
        _keep: &[i64],
    ) -> Result<u64, StoreError> {
        Err(none())
    }

    async fn rewrite_index(&self, _job: &Job, _partition: &str) -> Result<(), StoreError> {
        Err(none())
    }

    async fn rewrite_swap(&self, _job: &Job, _partition: &str) -> Result<u64, StoreError> {
        Err(none())
    }
}
