//! AWS SQS through aws-sdk-sqs: the only module that touches that SDK.
//!
//! Long polling, up to 10 messages a receive, `SentTimestamp` for
//! `create_date`, `DeleteMessageBatch` (after commit) retried with backoff
//! while SQS is unreachable (for up to the visibility timeout), its
//! per-entry failures retried once and then left to redelivery. The
//! visibility timeout asked for on each receive is far longer than a batch
//! takes, so a message is not handed to a second worker while the first
//! still holds it. Every request has a time limit, so a connection that goes
//! silent costs a retry, not the worker. A drain (`--until-empty`) ends when
//! no message is visible, in flight or delayed, and no receive has failed in
//! the last few seconds (a receive given up on may still reach SQS).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use aws_sdk_sqs::Client;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use zeroize::Zeroizing;

use super::{MessageSource, SourceError};
use crate::domain::{Ack, Message};
use crate::retry::Backoff;

/// Default seconds a received message stays invisible to other consumers
/// (`run --visibility-timeout`): far longer than a batch takes to commit, so
/// a message is not handed to a second worker while the first still holds
/// it, yet short enough that the messages of a crashed worker come back
/// within minutes.
pub const VISIBILITY_TIMEOUT_SECS: i32 = 120;
/// The most SQS accepts for a visibility timeout (12 hours).
pub const MAX_VISIBILITY_TIMEOUT_SECS: i32 = 43_200;
/// The longest a deletion is retried while SQS is unreachable. Until then
/// (or until the visibility timeout, if shorter: after it the messages are
/// delivered again anyway) an outage between commit and acknowledgement
/// costs nothing; giving up at once would leave committed messages in the
/// queue, to be processed again as duplicates, and a `--until-empty` run
/// would end with them still there. Bounded, because a shutdown waits for
/// the acknowledgements in hand.
const MAX_DELETE_RETRY: Duration = Duration::from_secs(60);
/// Waits between attempts to delete: capped exponential, full jitter.
const DELETE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};
/// The longest one attempt of a request may take (a receive: its long-poll
/// wait plus this). The SDK sets no such limit by default, so a connection
/// that goes silent (a network partition, a NAT or load balancer that
/// forgot it) would hold a receive or a deletion forever; with it, the
/// attempt fails as transient and is retried on a fresh connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Long-poll wait while running as a daemon.
const WAIT_SECS: i32 = 20;
/// Long-poll wait under `--until-empty`: an empty answer after this long
/// means the queue is drained, unless messages are still in flight (see
/// [`SqsSource::pending_elsewhere`]).
const DRAIN_WAIT_SECS: i32 = 1;
/// How long a drain distrusts an empty queue after a receive failed. A
/// receive the worker gave up on (timed out, connection lost) may still
/// reach SQS afterwards and take messages into flight for nobody; until it
/// has arrived, SQS counts those messages as visible to no one and in
/// flight for no one, and the drain would end with them still in the
/// queue. After this long, a late receive has either arrived (its messages
/// count as in flight, and the drain waits for them to come back) or is
/// taken as lost.
const DRAIN_GRACE_AFTER_FAILURE: Duration = REQUEST_TIMEOUT;

pub struct SqsSource {
    client: Client,
    queue_url: String,
    until_empty: bool,
    /// Asked for on every receive, in seconds (1..=43200).
    visibility_timeout: i32,
    /// Whether a drain has said it waits for messages in flight.
    told_waiting: AtomicBool,
    /// When a receive last failed (see [`DRAIN_GRACE_AFTER_FAILURE`]).
    last_failed_receive: Mutex<Option<Instant>>,
}

impl SqsSource {
    /// Connects with the standard AWS configuration chain and checks that
    /// the queue exists and is readable, so a typo is one clear error.
    /// Received messages stay invisible for [`VISIBILITY_TIMEOUT_SECS`].
    pub async fn connect(queue_url: &str, until_empty: bool) -> anyhow::Result<Self> {
        Self::connect_with(
            queue_url,
            until_empty,
            Duration::from_secs(VISIBILITY_TIMEOUT_SECS as u64),
        )
        .await
    }

    /// Like [`SqsSource::connect`], with the visibility timeout asked for on
    /// each receive: how long a message this worker received stays hidden
    /// from other consumers, and so how soon the messages of a worker that
    /// died holding them are delivered again. Clamped to what SQS accepts
    /// (1 s to 12 h).
    pub async fn connect_with(
        queue_url: &str,
        until_empty: bool,
        visibility_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let visibility_timeout = visibility_timeout
            .as_secs()
            .clamp(1, MAX_VISIBILITY_TIMEOUT_SECS as u64) as i32;
        let conf = aws_config::load_from_env().await;
        // Without a region the SDK cannot even name the endpoint: said
        // before any call, rather than as a failed connection.
        if conf.region().is_none() {
            anyhow::bail!(
                "no AWS region is configured for SQS: set AWS_REGION (e.g. eu-west-1), \
                 or a region in the AWS profile in use"
            );
        }
        let client = Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&conf)
                .timeout_config(attempt_timeout(REQUEST_TIMEOUT))
                .build(),
        );
        client
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::VisibilityTimeout)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
        Ok(SqsSource {
            client,
            queue_url: queue_url.to_string(),
            until_empty,
            visibility_timeout,
            told_waiting: AtomicBool::new(false),
            last_failed_receive: Mutex::new(None),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// A timeout configuration that only sets the per-attempt timeout (the
/// SDK merges it with its defaults, keeping e.g. the connect timeout).
fn attempt_timeout(limit: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_attempt_timeout(limit)
        .build()
}

/// A short, value-free description of an SDK error.
fn describe<E: ProvideErrorMetadata + std::fmt::Debug, R>(e: &SdkError<E, R>) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "SQS: {} ({})",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("no message")
            )
        }
        SdkError::TimeoutError(_) => "SQS: request timed out".into(),
        SdkError::DispatchFailure(_) => {
            "SQS: cannot connect (check AWS_ENDPOINT_URL / network)".into()
        }
        SdkError::ResponseError(_) => "SQS: unreadable response".into(),
        SdkError::ConstructionFailure(_) => {
            "SQS: the request could not be built (is AWS_REGION set?)".into()
        }
        _ => "SQS: unknown error".into(),
    }
}

fn classify<E: ProvideErrorMetadata + std::fmt::Debug, R>(e: SdkError<E, R>) -> SourceError {
    let text = describe(&e);
    let transient = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => matches!(
            s.err().code(),
            Some(
                "ThrottlingException"
                    | "RequestThrottled"
                    | "ServiceUnavailable"
                    | "InternalError"
                    | "InternalFailure"
                    | "KmsThrottled"
                    | "OverLimit"
            )
        ),
        _ => false,
    };
    if transient {
        SourceError::Transient(text)
    } else {
        SourceError::Permanent(text)
    }
}

#[async_trait]
impl MessageSource for SqsSource {
    async fn receive(&self, max: usize) -> Result<Option<Vec<Message>>, SourceError> {
        let wait = if self.until_empty {
            DRAIN_WAIT_SECS
        } else {
            WAIT_SECS
        };
        let resp = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait)
            .visibility_timeout(self.visibility_timeout)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .customize()
            .config_override(aws_sdk_sqs::config::Builder::default().timeout_config(
                attempt_timeout(Duration::from_secs(wait as u64) + REQUEST_TIMEOUT),
            ))
            .send()
            .await
            .map_err(|e| {
                *self.last_failed_receive.lock().expect("not poisoned") = Some(Instant::now());
                classify(e)
            })?;
        let msgs = resp.messages.unwrap_or_default();
        if msgs.is_empty() && self.until_empty {
            let pending = self.pending_elsewhere().await?;
            // Nothing anywhere: the drain ends, unless a receive that
            // failed lately may still reach SQS (then: nothing yet).
            if pending == 0 {
                return Ok(self.recently_failed().then(Vec::new));
            }
            if !self.told_waiting.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    messages = pending,
                    "no message visible, but some are in flight or delayed; \
                     waiting for them to be deleted or to come back after their visibility timeout"
                );
            }
            return Ok(Some(Vec::new()));
        }
        let now = Utc::now();
        let out = msgs
            .into_iter()
            .filter_map(|m| {
                let receipt_handle = m.receipt_handle?;
                let id = m.message_id?;
                let sent_at = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                    .and_then(|ms| ms.parse::<i64>().ok())
                    .and_then(DateTime::from_timestamp_millis)
                    .unwrap_or(now);
                let body = Zeroizing::new(m.body.unwrap_or_default().into_bytes());
                Some(Message {
                    id,
                    body,
                    sent_at,
                    ack: Ack::Sqs { receipt_handle },
                    line: None,
                    source: None,
                })
            })
            .collect();
        Ok(Some(out))
    }

    async fn ack(&self, acks: Vec<Ack>) -> Result<(), SourceError> {
        let handles: Vec<String> = acks
            .into_iter()
            .filter_map(|a| match a {
                Ack::Sqs { receipt_handle } => Some(receipt_handle),
                Ack::None => None,
            })
            .collect();
        let chunks: Vec<Vec<String>> = handles.chunks(10).map(<[String]>::to_vec).collect();
        let results: Vec<Result<(), SourceError>> = stream::iter(chunks)
            .map(|c| async move { self.delete_chunk(&c).await })
            .buffer_unordered(8)
            .collect()
            .await;
        results.into_iter().collect()
    }

    fn preferred_batch(&self) -> usize {
        10
    }
}

impl SqsSource {
    /// Whether a receive failed within [`DRAIN_GRACE_AFTER_FAILURE`].
    fn recently_failed(&self) -> bool {
        self.last_failed_receive
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() < DRAIN_GRACE_AFTER_FAILURE)
    }

    /// Messages of the queue that no receive can see right now: in flight
    /// (received, by this worker or another, and neither deleted nor back
    /// yet) or delayed. A drain (`--until-empty`) that found nothing visible
    /// ends only when this is 0 too. Otherwise it would end while messages
    /// are still to be processed: those of a worker that died holding them
    /// (back after their visibility timeout), of a receive whose answer was
    /// lost on the way (ditto), or of deletions that failed.
    async fn pending_elsewhere(&self) -> Result<u64, SourceError> {
        let resp = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(classify)?;
        Ok(resp
            .attributes
            .unwrap_or_default()
            .values()
            .filter_map(|v| v.parse::<u64>().ok())
            .sum())
    }

    /// Deletes up to 10 messages. A request that fails with a transient
    /// error (SQS unreachable, throttled, timed out) is retried with backoff
    /// for up to the visibility timeout or [`MAX_DELETE_RETRY`]; entries that
    /// SQS itself refuses are retried once.
    async fn delete_chunk(&self, handles: &[String]) -> Result<(), SourceError> {
        let window = Duration::from_secs(self.visibility_timeout as u64).min(MAX_DELETE_RETRY);
        let give_up_at = Instant::now() + window;
        let mut pending: Vec<&String> = handles.iter().collect();
        let mut failures = 0u32;
        let mut entry_retries = 0;
        loop {
            let entries = pending
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(h.as_str())
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect::<Vec<_>>();
            let resp = match self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let err = classify(e);
                    failures += 1;
                    let now = Instant::now();
                    if !err.is_transient() || now >= give_up_at {
                        return Err(err);
                    }
                    if failures == 1 {
                        tracing::warn!(error = %err, messages = pending.len(), "deleting committed messages failed, retrying");
                    } else {
                        tracing::debug!(error = %err, attempt = failures, "DeleteMessageBatch failed again, retrying");
                    }
                    tokio::time::sleep(DELETE_BACKOFF.delay(failures).min(give_up_at - now)).await;
                    continue;
                }
            };
            if resp.failed.is_empty() {
                if failures > 0 {
                    tracing::debug!(
                        attempts = failures + 1,
                        "deleted committed messages after retrying"
                    );
                }
                return Ok(());
            }
            let failed: Vec<usize> = resp
                .failed
                .iter()
                .filter_map(|f| f.id.parse().ok())
                .collect();
            let codes: Vec<&str> = resp.failed.iter().map(|f| f.code.as_str()).collect();
            tracing::debug!(failed = failed.len(), ?codes, "some deletions failed");
            pending = failed
                .into_iter()
                .filter_map(|i| pending.get(i).copied())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            entry_retries += 1;
            if entry_retries >= 2 {
                return Err(SourceError::Transient(format!(
                    "SQS: {} deletions failed twice",
                    pending.len()
                )));
            }
        }
    }
}
