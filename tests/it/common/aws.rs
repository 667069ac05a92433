//! AWS helpers for the LocalStack-backed tests: clients from the standard
//! environment (`AWS_ENDPOINT_URL` and friends, set by `scripts/services.sh`),
//! and fresh, uniquely named queues and KMS keys so that tests running at
//! once never share state.
//!
//! Included with `#[path = "common/aws.rs"] mod aws_helpers;`.
#![allow(dead_code)]

use aws_sdk_kms::Client as KmsClient;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client as SqsClient;
use futures::stream::{self, StreamExt, TryStreamExt};

/// Whether the LocalStack services are there: `Some(endpoint)` when both
/// `PII_VAULT_TEST_AWS` and `AWS_ENDPOINT_URL` are set; a panic when not, or
/// `None` (skip) under `PII_VAULT_SKIP_SERVICES=1`.
///
/// Both are required so that a stray `PII_VAULT_TEST_AWS=1` never sends
/// these tests to real AWS.
pub fn endpoint() -> Option<String> {
    crate::common::service_env("PII_VAULT_TEST_AWS")?;
    crate::common::service_env("AWS_ENDPOINT_URL")
}

pub async fn sqs() -> SqsClient {
    SqsClient::new(&aws_config::load_from_env().await)
}

pub async fn kms() -> KmsClient {
    KmsClient::new(&aws_config::load_from_env().await)
}

/// A unique resource name starting with `prefix`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh standard queue; returns its URL.
pub async fn create_queue(sqs: &SqsClient) -> String {
    let resp = sqs
        .create_queue()
        .queue_name(unique("pii-vault-test"))
        .send()
        .await
        .expect("CreateQueue");
    resp.queue_url.expect("CreateQueue returned a queue URL")
}

/// A fresh queue and the client that reaches it.
pub struct Queue {
    pub sqs: SqsClient,
    pub url: String,
}

impl Queue {
    pub async fn create() -> Queue {
        let sqs = sqs().await;
        let url = create_queue(&sqs).await;
        Queue { sqs, url }
    }

    /// Sends `bodies` ([`send_all`]).
    pub async fn send(&self, bodies: &[String]) {
        send_all(&self.sqs, &self.url, bodies).await;
    }

    /// `(visible, in flight)` messages ([`queue_counts`]).
    pub async fn counts(&self) -> (u64, u64) {
        queue_counts(&self.sqs, &self.url).await
    }
}

/// A fresh symmetric KMS key; returns `(key id, key ARN)`.
pub async fn create_key(kms: &KmsClient) -> (String, String) {
    let resp = kms
        .create_key()
        .description("pii-vault test key")
        .send()
        .await
        .expect("CreateKey");
    let meta = resp.key_metadata.expect("CreateKey returned metadata");
    (meta.key_id, meta.arn.expect("CreateKey returned an ARN"))
}

/// A fresh alias (`alias/…`) for `key_id`; returns the alias name.
pub async fn create_alias(kms: &KmsClient, key_id: &str) -> String {
    let alias = format!("alias/{}", unique("pii-vault-test"));
    kms.create_alias()
        .alias_name(&alias)
        .target_key_id(key_id)
        .send()
        .await
        .expect("CreateAlias");
    alias
}

/// Sends `bodies` with SendMessageBatch (10 a call, a few calls at once) and
/// fails on any per-entry failure.
pub async fn send_all(sqs: &SqsClient, queue_url: &str, bodies: &[String]) {
    let chunks: Vec<&[String]> = bodies.chunks(10).collect();
    stream::iter(chunks)
        .map(|chunk| async move {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(b)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .expect("batch entries");
            let resp = sqs
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await?;
            assert!(
                resp.failed.is_empty(),
                "SendMessageBatch: {} entries failed",
                resp.failed.len()
            );
            Ok::<_, aws_sdk_sqs::Error>(())
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await
        .expect("SendMessageBatch");
}

/// `(ApproximateNumberOfMessages, ApproximateNumberOfMessagesNotVisible)`.
pub async fn queue_counts(sqs: &SqsClient, queue_url: &str) -> (u64, u64) {
    let resp = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("GetQueueAttributes");
    let attrs = resp.attributes.unwrap_or_default();
    let get = |name: &QueueAttributeName| {
        attrs
            .get(name)
            .and_then(|v| v.parse().ok())
            .expect("queue count attribute")
    };
    (
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}
