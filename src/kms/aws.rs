//! AWS KMS through aws-sdk-kms: the only module that touches that SDK.
//!
//! `GenerateDataKey` makes data and token keys, `Decrypt` unwraps them,
//! `ReEncrypt` moves them to another KMS key without the plaintext leaving
//! KMS. Every call carries the encryption context `purpose=pii-vault:vault`
//! or `purpose=pii-vault:token`, which KMS binds into the ciphertext and key
//! policies can match on (see `keys/`).
//!
//! [`AwsSigner`]: an asymmetric key (`ECC_NIST_P256`, `SIGN_VERIFY`) that
//! signs audit checkpoints with `Sign`; `GetPublicKey` hands out the public
//! half that auditors verify with, offline.

use async_trait::async_trait;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyMetadata;
use aws_sdk_kms::types::{
    DataKeySpec, KeySpec, KeyState, KeyUsageType, MessageType, SigningAlgorithmSpec,
};
use aws_sdk_kms::Client;
use zeroize::Zeroize;

use crate::crypto::envelope::{KeyMaterial, KeyPurpose, KeyWrapper, WrapError, WrappedKey};
use crate::crypto::signing::{Algorithm, Signer, VerifyingKey};

/// The longest one attempt of a KMS call may take. The SDK sets no such
/// limit by default, so a connection that goes silent (a network partition,
/// a NAT or load balancer that forgot it) would hold a call, and the batch
/// waiting for its data key, forever; with it, the attempt fails as
/// transient and is retried on a fresh connection. KMS answers in
/// milliseconds.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AwsKms {
    client: Client,
    /// The ARN of the KMS key new keys are wrapped under.
    key_arn: std::sync::RwLock<String>,
}

impl AwsKms {
    /// Resolves `key_id` (id, ARN or `alias/…`) to its ARN and checks that it
    /// is enabled, so a wrong id or a missing permission is one clear error.
    pub async fn connect(key_id: &str) -> Result<Self, WrapError> {
        let kms = AwsKms::deferred(key_id).await;
        kms.check().await?;
        Ok(kms)
    }

    /// The client for `key_id`, without a call to KMS yet: [`KeyWrapper::check`]
    /// resolves the key to its ARN and checks it. For a worker that starts
    /// while KMS does not answer: it serves `/readyz` (not ready) and retries
    /// the check with backoff instead of exiting.
    pub async fn deferred(key_id: &str) -> Self {
        AwsKms {
            client: client().await,
            key_arn: std::sync::RwLock::new(key_id.to_string()),
        }
    }

    fn arn(&self) -> String {
        self.key_arn.read().expect("kek lock").clone()
    }

    async fn describe(&self, key_id: &str) -> Result<String, WrapError> {
        let meta = describe(&self.client, key_id).await?;
        Ok(meta.arn.unwrap_or_else(|| key_id.to_string()))
    }
}

/// A KMS client from the environment, with [`REQUEST_TIMEOUT`] per attempt.
async fn client() -> Client {
    let conf = aws_config::load_from_env().await;
    Client::from_conf(
        aws_sdk_kms::config::Builder::from(&conf)
            .timeout_config(
                aws_sdk_kms::config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(REQUEST_TIMEOUT)
                    .build(),
            )
            .build(),
    )
}

/// The key's metadata, refused unless it is enabled.
async fn describe(client: &Client, key_id: &str) -> Result<KeyMetadata, WrapError> {
    if client.config().region().is_none() {
        return Err(WrapError::Permanent(NO_REGION.into()));
    }
    count("DescribeKey");
    let resp = client
        .describe_key()
        .key_id(key_id)
        .send()
        .await
        .map_err(|e| classify("DescribeKey", e))?;
    let meta = resp.key_metadata.ok_or_else(|| {
        WrapError::Permanent(format!(
            "KMS key {key_id}: DescribeKey returned no metadata"
        ))
    })?;
    if meta.key_state != Some(KeyState::Enabled) {
        return Err(WrapError::Permanent(format!(
            "KMS key {key_id} is {}, not Enabled",
            meta.key_state
                .as_ref()
                .map_or("in an unknown state", |s| s.as_str())
        )));
    }
    Ok(meta)
}

/// Without a region the SDK cannot even name KMS's endpoint; said before
/// any call, rather than as a failed connection.
const NO_REGION: &str = "no AWS region is configured for KMS: set AWS_REGION (e.g. eu-west-1), \
     or a region in the AWS profile in use";

/// Counts one call of `operation` (see [`super::requests`]).
fn count(operation: &'static str) {
    super::requests()
        .get_or_create(&[("operation", operation)])
        .inc();
}

fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(
    op: &str,
    e: SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> WrapError {
    match &e {
        SdkError::TimeoutError(_) => WrapError::Transient(format!("KMS {op}: timed out")),
        SdkError::DispatchFailure(_) => WrapError::Transient(format!(
            "KMS {op}: cannot connect (check AWS_ENDPOINT_URL / network)"
        )),
        SdkError::ResponseError(_) => {
            WrapError::Transient(format!("KMS {op}: unreadable response"))
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("error");
            let msg = format!(
                "KMS {op}: {code} ({})",
                s.err().message().unwrap_or("no message")
            );
            // A 5xx is KMS's (or a proxy's) fault whatever its body says.
            if s.raw().status().is_server_error() {
                return WrapError::Transient(msg);
            }
            match code {
                "ThrottlingException"
                | "KMSInternalException"
                | "DependencyTimeoutException"
                | "KeyUnavailableException"
                | "ServiceUnavailable"
                | "InternalFailure" => WrapError::Transient(msg),
                "InvalidCiphertextException" => WrapError::Unwrap,
                _ => WrapError::Permanent(msg),
            }
        }
        SdkError::ConstructionFailure(_) => WrapError::Permanent(format!(
            "KMS {op}: the request could not be built (is AWS_REGION set?)"
        )),
        _ => WrapError::Permanent(format!("KMS {op}: invalid request")),
    }
}

fn take_key(blob: Option<Blob>) -> Result<KeyMaterial, WrapError> {
    let mut bytes = blob
        .ok_or_else(|| WrapError::Permanent("KMS returned no plaintext key".into()))?
        .into_inner();
    let key = KeyMaterial::from_slice(&bytes);
    bytes.zeroize();
    key
}

#[async_trait]
impl KeyWrapper for AwsKms {
    fn kek_id(&self) -> String {
        self.arn()
    }

    async fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError> {
        let arn = self.arn();
        count("Encrypt");
        let resp = self
            .client
            .encrypt()
            .key_id(&arn)
            .plaintext(Blob::new(key.expose_for_wrapping().to_vec()))
            .encryption_context("purpose", purpose.context())
            .send()
            .await
            .map_err(|e| classify("Encrypt", e))?;
        let blob = resp
            .ciphertext_blob
            .ok_or_else(|| WrapError::Permanent("KMS returned no wrapped key".into()))?
            .into_inner();
        Ok(WrappedKey {
            kek_id: resp.key_id.unwrap_or(arn),
            blob,
        })
    }

    async fn follow(&self, kek_id: &str) -> Result<(), WrapError> {
        if kek_id != self.arn() {
            let arn = self.describe(kek_id).await?;
            tracing::info!(kek = %arn, "new keys are now wrapped under another KMS key");
            *self.key_arn.write().expect("kek lock") = arn;
        }
        Ok(())
    }

    async fn generate(&self, purpose: KeyPurpose) -> Result<(KeyMaterial, WrappedKey), WrapError> {
        count("GenerateDataKey");
        let resp = self
            .client
            .generate_data_key()
            .key_id(self.arn())
            .key_spec(DataKeySpec::Aes256)
            .encryption_context("purpose", purpose.context())
            .send()
            .await
            .map_err(|e| classify("GenerateDataKey", e))?;
        let blob = resp
            .ciphertext_blob
            .ok_or_else(|| WrapError::Permanent("KMS returned no wrapped key".into()))?
            .into_inner();
        let kek_id = resp.key_id.unwrap_or_else(|| self.arn());
        let key = take_key(resp.plaintext)?;
        Ok((key, WrappedKey { kek_id, blob }))
    }

    async fn unwrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<KeyMaterial, WrapError> {
        count("Decrypt");
        let resp = self
            .client
            .decrypt()
            .key_id(&wrapped.kek_id)
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .encryption_context("purpose", purpose.context())
            .send()
            .await
            .map_err(|e| classify("Decrypt", e))?;
        take_key(resp.plaintext)
    }

    async fn rewrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, WrapError> {
        count("ReEncrypt");
        let resp = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .source_key_id(&wrapped.kek_id)
            .source_encryption_context("purpose", purpose.context())
            .destination_key_id(self.arn())
            .destination_encryption_context("purpose", purpose.context())
            .send()
            .await
            .map_err(|e| classify("ReEncrypt", e))?;
        let blob = resp
            .ciphertext_blob
            .ok_or_else(|| WrapError::Permanent("KMS returned no re-encrypted key".into()))?
            .into_inner();
        Ok(WrappedKey {
            kek_id: resp.key_id.unwrap_or_else(|| self.arn()),
            blob,
        })
    }

    async fn check(&self) -> Result<(), WrapError> {
        let asked = self.arn();
        let arn = self.describe(&asked).await?;
        // The configured id (an alias, say) becomes the ARN, unless
        // `follow` moved to another KEK while this check ran.
        let mut current = self.key_arn.write().expect("kek lock");
        if *current == asked {
            *current = arn;
        }
        Ok(())
    }
}

/// The KMS key that signs audit checkpoints: ECDSA P-256 over SHA-256 of
/// the message (`ECDSA_SHA_256`, message type `RAW`). The private key
/// never leaves KMS; a key policy that grants `kms:Sign` to the auditor's
/// principal alone keeps the database's owner from signing.
pub struct AwsSigner {
    client: Client,
    key_arn: String,
}

impl AwsSigner {
    /// Resolves `key_id` and checks that it is an enabled P-256 signing
    /// key, so that a symmetric key id passed by mistake is one clear error.
    pub async fn connect(key_id: &str) -> Result<Self, WrapError> {
        let client = client().await;
        let meta = describe(&client, key_id).await?;
        if meta.key_usage != Some(KeyUsageType::SignVerify)
            || meta.key_spec != Some(KeySpec::EccNistP256)
        {
            return Err(WrapError::Permanent(format!(
                "KMS key {key_id} is not an ECC_NIST_P256 key for SIGN_VERIFY: checkpoints need one \
                 (aws kms create-key --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY)"
            )));
        }
        Ok(AwsSigner {
            client,
            key_arn: meta.arn.unwrap_or_else(|| key_id.to_string()),
        })
    }
}

#[async_trait]
impl Signer for AwsSigner {
    fn key_id(&self) -> String {
        self.key_arn.clone()
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::EcdsaP256Sha256
    }

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, WrapError> {
        count("Sign");
        let resp = self
            .client
            .sign()
            .key_id(&self.key_arn)
            .message(Blob::new(message.to_vec()))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| classify("Sign", e))?;
        Ok(resp
            .signature
            .ok_or_else(|| WrapError::Permanent("KMS returned no signature".into()))?
            .into_inner())
    }

    async fn verifying_key(&self) -> Result<VerifyingKey, WrapError> {
        count("GetPublicKey");
        let resp = self
            .client
            .get_public_key()
            .key_id(&self.key_arn)
            .send()
            .await
            .map_err(|e| classify("GetPublicKey", e))?;
        let der = resp
            .public_key
            .ok_or_else(|| WrapError::Permanent("KMS returned no public key".into()))?
            .into_inner();
        VerifyingKey::from_der(&der)
            .map_err(|e| WrapError::Permanent(format!("KMS key {}: {e}", self.key_arn)))
    }
}
