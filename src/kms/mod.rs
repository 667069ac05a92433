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
use std::sync::{Arc, LazyLock};

use crate::crypto::KeyWrapper;

/// The AWS KMS operations pii-vault calls, the values of the `operation`
/// label of `pii_vault_kms_requests_total`.
pub const OPERATIONS: &[&str] = &[
    "DescribeKey",
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "ReEncrypt",
];

static REQUESTS: LazyLock<crate::pipeline::stats::LabeledCounter> = LazyLock::new(|| {
    let family = crate::pipeline::stats::LabeledCounter::default();
    for op in OPERATIONS {
        let _ = family.get_or_create(&[("operation", *op)]);
    }
    family
});

/// AWS KMS calls made by this process, by operation: one count per call
/// that [`aws`] sends (whatever its outcome), process-wide, so that every
/// command's KMS use can be seen and `/metrics` shows the worker's. KMS
/// quotas are per account and operation; this is what to watch them with.
pub fn requests() -> &'static crate::pipeline::stats::LabeledCounter {
    &REQUESTS
}

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
