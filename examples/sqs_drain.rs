//! SQS helper and baseline for `scripts/bench-e2e.sh`.
//!
//! `drain` is the ceiling the worker is measured against: the same receive
//! loops as `pii-vault run --until-empty` (10 messages a receive, the same
//! number of loops at once), each batch deleted with `DeleteMessageBatch`
//! in the background while the loop receives on, and no processing at all. The other subcommands set a benchmark up:
//!
//! ```text
//! cargo run --release --example sqs_drain -- create-queue
//! cargo run --release --example sqs_drain -- create-key
//! cargo run --release --example sqs_drain -- load --queue-url URL --file events.jsonl
//! cargo run --release --example sqs_drain -- count --queue-url URL
//! cargo run --release --example sqs_drain -- drain --queue-url URL --concurrency 4
//! ```
//!
//! AWS settings come from the environment (`AWS_ENDPOINT_URL`, ...), as for
//! `pii-vault` itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, QueueAttributeName, SendMessageBatchRequestEntry,
};
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::task::JoinSet;

#[derive(Parser)]
#[command(about = "SQS helper and drain-only baseline for the end-to-end benchmark")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a uniquely named queue; print its URL.
    CreateQueue {
        #[arg(long, default_value = "pii-vault-bench")]
        prefix: String,
    },
    /// Create a symmetric KMS key; print its id.
    CreateKey,
    /// Send every line of a file as one message (SendMessageBatch).
    Load {
        #[arg(long)]
        queue_url: String,
        #[arg(long)]
        file: std::path::PathBuf,
        /// SendMessageBatch calls in flight.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Print `visible in_flight` message counts.
    Count {
        #[arg(long)]
        queue_url: String,
    },
    /// Receive and delete until the queue is empty; no processing.
    Drain {
        #[arg(long)]
        queue_url: String,
        /// Receive loops at once (as `pii-vault run --concurrency`).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conf = aws_config::load_from_env().await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    match args.command {
        Cmd::CreateQueue { prefix } => {
            let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
            let resp = sqs
                .create_queue()
                .queue_name(name)
                .send()
                .await
                .context("CreateQueue")?;
            println!("{}", resp.queue_url.context("no queue URL")?);
        }
        Cmd::CreateKey => {
            let kms = aws_sdk_kms::Client::new(&conf);
            let resp = kms
                .create_key()
                .description("pii-vault benchmark")
                .send()
                .await
                .context("CreateKey")?;
            println!("{}", resp.key_metadata.context("no key metadata")?.key_id);
        }
        Cmd::Load {
            queue_url,
            file,
            concurrency,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            let started = Instant::now();
            load(&sqs, &queue_url, &lines, concurrency).await?;
            eprintln!(
                "loaded {} messages in {:.1}s",
                lines.len(),
                started.elapsed().as_secs_f64()
            );
        }
        Cmd::Count { queue_url } => {
            let (visible, in_flight) = counts(&sqs, &queue_url).await?;
            println!("{visible} {in_flight}");
        }
        Cmd::Drain {
            queue_url,
            concurrency,
        } => {
            let started = Instant::now();
            let n = drain(&sqs, &queue_url, concurrency.max(1)).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "drained {n} messages in {secs:.2}s ({:.0}/s)",
                n as f64 / secs
            );
        }
    }
    Ok(())
}

async fn load(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    lines: &[&str],
    concurrency: usize,
) -> anyhow::Result<()> {
    stream::iter(lines.chunks(10))
        .map(|chunk| async move {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, body)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(*body)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let resp = sqs
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await?;
            anyhow::ensure!(
                resp.failed.is_empty(),
                "{} messages were not sent",
                resp.failed.len()
            );
            Ok(())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await
        .context("SendMessageBatch")?;
    Ok(())
}

async fn counts(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> anyhow::Result<(u64, u64)> {
    let resp = sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .context("GetQueueAttributes")?;
    let attrs = resp.attributes.unwrap_or_default();
    let get = |n: &QueueAttributeName| attrs.get(n).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    ))
}

/// `concurrency` loops of receive(10, 1 s long poll), each handing its
/// batch to a background `DeleteMessageBatch` (as the worker's ackers do)
/// and receiving again at once; a loop ends at its first empty receive, as
/// under `--until-empty`.
async fn drain(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    concurrency: usize,
) -> anyhow::Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let one_loop = |done: Arc<AtomicU64>| async move {
        let mut deletes = JoinSet::new();
        loop {
            let resp = sqs
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .visibility_timeout(120)
                .send()
                .await
                .context("ReceiveMessage")?;
            let msgs = resp.messages.unwrap_or_default();
            if msgs.is_empty() {
                break;
            }
            let entries = msgs
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle.as_deref()?)
                        .build()
                        .ok()
                })
                .collect::<Vec<_>>();
            // At most 4 deletions in flight per loop.
            while deletes.len() >= 4 {
                deletes.join_next().await.expect("a task")??;
            }
            let call = sqs
                .delete_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries));
            let done = done.clone();
            deletes.spawn(async move {
                let resp = call.send().await.context("DeleteMessageBatch")?;
                anyhow::ensure!(
                    resp.failed.is_empty(),
                    "{} deletions failed",
                    resp.failed.len()
                );
                done.fetch_add(resp.successful.len() as u64, Ordering::Relaxed);
                Ok(())
            });
        }
        while let Some(r) = deletes.join_next().await {
            r??;
        }
        Ok::<_, anyhow::Error>(())
    };
    futures::future::try_join_all((0..concurrency).map(|_| one_loop(done.clone()))).await?;
    Ok(done.load(Ordering::Relaxed))
}
