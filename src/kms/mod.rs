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

/// The homes of the key-encryption keys that stored keys name, for reading
/// them back (`reveal`'s data keys, `tokenize`'s token keys): a stored
/// key's `kek_id` says what wrapped it, so
/// the reader follows it instead of the configured `--kms-key-id`. An AWS
/// KMS ARN is opened (and checked with `DescribeKey`, so an unreachable or
/// disabled key fails here) without `PII_VAULT_KMS_KEY_ID`; a `local:…` id
/// needs the key file in `key_dir`, which must exist and be that key. Pass
/// only ids on the allow-list: a KEK is trusted from there, not from a key
/// row. Every home is opened now, so that whatever is missing is said
/// before anything is recorded.
pub async fn for_stored(kek_ids: &[String], key_dir: &Path) -> anyhow::Result<Arc<dyn KeyWrapper>> {
    let mut homes: Vec<(String, Arc<dyn KeyWrapper>)> = Vec::new();
    let mut local_kek: Option<Arc<local::LocalKek>> = None;
    for id in kek_ids {
        if homes.iter().any(|(h, _)| h == id) {
            continue;
        }
        let home: Arc<dyn KeyWrapper> = if id.starts_with("local:") {
            let kek = match &local_kek {
                Some(kek) => kek.clone(),
                None => {
                    let kek = Arc::new(local::LocalKek::open(key_dir).map_err(|e| {
                        anyhow::anyhow!(
                            "the stored keys are wrapped by the local key-encryption key {id}: {e:#}"
                        )
                    })?);
                    local_kek = Some(kek.clone());
                    kek
                }
            };
            if kek.kek_id() != *id {
                anyhow::bail!(
                    "the local key file {} is key-encryption key {}, but the stored keys are wrapped \
                     by {id}: pass the --key-dir that holds the key that wrapped them; nothing was recorded",
                    kek.path().display(),
                    kek.kek_id()
                );
            }
            kek as Arc<dyn KeyWrapper>
        } else {
            Arc::new(aws::AwsKms::connect(id).await.map_err(|e| {
                anyhow::anyhow!(
                    "the stored keys are wrapped by KMS key {id}, which cannot be used: {e}; \
                     nothing was recorded"
                )
            })?)
        };
        homes.push((id.clone(), home));
    }
    Ok(Arc::new(StoredKeks { homes }))
}

/// A [`KeyWrapper`] that only unwraps, each key under the home its
/// `kek_id` names (see [`for_stored`]).
struct StoredKeks {
    homes: Vec<(String, Arc<dyn KeyWrapper>)>,
}

impl StoredKeks {
    fn home(&self, kek_id: &str) -> Result<&Arc<dyn KeyWrapper>, WrapError> {
        self.homes
            .iter()
            .find(|(id, _)| id == kek_id)
            .map(|(_, home)| home)
            .ok_or_else(|| WrapError::WrongKek {
                expected: self.kek_id(),
                found: kek_id.to_string(),
            })
    }

    fn read_only() -> WrapError {
        WrapError::Permanent("the stored keys' key-encryption keys are only used to unwrap".into())
    }
}

#[async_trait::async_trait]
impl KeyWrapper for StoredKeks {
    fn kek_id(&self) -> String {
        if self.homes.is_empty() {
            return "(none: no data key is stored)".into();
        }
        self.homes
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn generate(
        &self,
        _: crate::crypto::KeyPurpose,
    ) -> Result<(crate::crypto::KeyMaterial, crate::crypto::WrappedKey), WrapError> {
        Err(Self::read_only())
    }

    async fn unwrap(
        &self,
        purpose: crate::crypto::KeyPurpose,
        wrapped: &crate::crypto::WrappedKey,
    ) -> Result<crate::crypto::KeyMaterial, WrapError> {
        self.home(&wrapped.kek_id)?.unwrap(purpose, wrapped).await
    }

    async fn wrap(
        &self,
        _: crate::crypto::KeyPurpose,
        _: &crate::crypto::KeyMaterial,
    ) -> Result<crate::crypto::WrappedKey, WrapError> {
        Err(Self::read_only())
    }

    async fn follow(&self, _: &str) -> Result<(), WrapError> {
        Err(Self::read_only())
    }

    async fn rewrap(
        &self,
        _: crate::crypto::KeyPurpose,
        _: &crate::crypto::WrappedKey,
    ) -> Result<crate::crypto::WrappedKey, WrapError> {
        Err(Self::read_only())
    }

    async fn check(&self) -> Result<(), WrapError> {
        for (_, home) in &self.homes {
            home.check().await?;
        }
        Ok(())
    }
}
