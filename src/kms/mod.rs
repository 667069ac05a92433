//! Homes of the key-encryption key: implementations of
//! [`crate::crypto::KeyWrapper`].
//!
//! - [`local`]: a key file under `keys/`, for the embedded default. Anyone who
//!   can read the file and the database can read the vault, so it is for
//!   development and small single-node use.
//! - [`aws`]: AWS KMS. The KEK never leaves KMS; IAM and key policies decide
//!   who may wrap and unwrap which purpose.

pub mod aws;
pub mod local;

use std::path::Path;
use std::sync::Arc;

use crate::crypto::KeyWrapper;

/// The wrapper the command line asks for: AWS KMS with a key id, otherwise
/// the local key file (created on first use, with a warning).
pub async fn from_config(
    kms_key_id: Option<&str>,
    key_dir: &Path,
) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    match kms_key_id {
        Some(id) => Ok(Arc::new(
            aws::AwsKms::connect(id)
                .await
                .map_err(|e| anyhow::anyhow!("KMS key {id}: {e}"))?,
        )),
        None => Ok(Arc::new(local::LocalKek::open_or_create(key_dir)?)),
    }
}
