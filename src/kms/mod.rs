//! Homes of the key-encryption key: implementations of
//! [`crate::crypto::KeyWrapper`].
//!
//! - [`local`]: a key file under `keys/`, for the embedded default. Anyone who
//!   can read the file and the database can read the vault, so it is for
//!   development and small single-node use.
//! - [`aws`]: AWS KMS. The KEK never leaves KMS; IAM and key policies decide
//!   who may wrap and unwrap which purpose.
//!
//! And of the key that signs audit checkpoints ([`crate::crypto::signing::Signer`]):
//! an Ed25519 key file beside the local KEK ([`signing`]), or an asymmetric
//! KMS key ([`aws::AwsSigner`]).

pub mod aws;
pub mod local;
pub mod signing;

use std::path::Path;
use std::sync::{Arc, LazyLock};

use crate::crypto::{KeyWrapper, WrapError};
use crate::metrics::registry::{preset, LabeledCounter};
use crate::retry::Transient;

/// The AWS KMS operations pii-vault calls, the values of the `operation`
/// label of `pii_vault_kms_requests_total`.
pub const OPERATIONS: &[&str] = &[
    "DescribeKey",
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "ReEncrypt",
    "Sign",
    "GetPublicKey",
];

static REQUESTS: LazyLock<LabeledCounter> = LazyLock::new(|| {
    let family = LabeledCounter::default();
    preset(&family, "operation", OPERATIONS);
    family
});

/// AWS KMS calls made by this process, by operation: one count per call
/// that [`aws`] sends (whatever its outcome), process-wide, so that every
/// command's KMS use can be seen and `/metrics` shows the worker's. KMS
/// quotas are per account and operation; this is what to watch them with.
pub fn requests() -> &'static LabeledCounter {
    &REQUESTS
}

/// Here rather than beside [`WrapError`] so that `crypto` keeps depending
/// on nothing else in pii-vault (`retry` reaches `crypto` through the
/// store); the transient faults are those of the KEK homes here.
impl Transient for WrapError {
    fn is_transient(&self) -> bool {
        WrapError::is_transient(self)
    }
}

/// The wrapper the command line asks for: AWS KMS with a key id, otherwise
/// the local key file. `create`: make the key file when it is missing (with
/// a warning), for the commands that set a store up (`run`, `migrate`,
/// `keys init`); every other command fails instead, naming the file.
pub async fn from_config(
    kms_key_id: Option<&str>,
    key_dir: &Path,
    create: bool,
) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    match kms_key_id {
        Some(id) => Ok(Arc::new(
            aws::AwsKms::connect(id)
                .await
                .map_err(|e| anyhow::anyhow!("KMS key {id}: {e}"))?,
        )),
        None if create => Ok(Arc::new(local::LocalKek::open_or_create(key_dir)?)),
        None => Ok(Arc::new(local::LocalKek::open(key_dir)?)),
    }
}

/// [`from_config`] without a call to KMS: an AWS KMS key is resolved and
/// checked by the wrapper's first [`KeyWrapper::check`] (see
/// [`aws::AwsKms::deferred`]). The local key file is opened (or created) now.
pub async fn from_config_deferred(
    kms_key_id: Option<&str>,
    key_dir: &Path,
) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    match kms_key_id {
        Some(id) => Ok(Arc::new(aws::AwsKms::deferred(id).await)),
        None => Ok(Arc::new(local::LocalKek::open_or_create(key_dir)?)),
    }
}
