//! `pii-vault run`: wire a source, the store and the keys into the pipeline,
//! handle signals, show progress, print the summary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, LogFormat, RunArgs};
use crate::pipeline::{keys::load_token_key, retry_kms, Pipeline, RunOptions, Stats};
use crate::source::file::FileSource;
use crate::source::MessageSource;
use crate::store::BatchOutcome;

pub async fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<()> {
    crate::clock::from_env().map_err(anyhow::Error::msg)?;
    if args.dry_run {
        return dry_run(args).await;
    }
    let store = super::open_store(cli).await?;
    // No call to KMS yet: a worker that starts while KMS does not answer
    // serves `/readyz` (not ready) and retries below, instead of exiting.
    let wrapper = crate::kms::from_config_deferred(cli.kms_key_id.as_deref(), &cli.key_dir).await?;
    let profile = store.profile();
    let stats = Arc::new(Stats::default());
    let cancel = CancellationToken::new();
    let stopped_by = Arc::new(std::sync::OnceLock::new());
    spawn_signal_handler(cancel.clone(), stopped_by.clone());
    let metrics_server = match args.metrics_addr {
        Some(addr) => Some(
            crate::metrics::serve(
                addr,
                stats.clone(),
                Arc::new(crate::pipeline::stats::DatabaseProbe {
                    store: store.clone(),
                    stats: stats.clone(),
                }),
                wrapper.clone(),
                cancel.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let backoff = RunOptions::default().backoff;
    let kek = wrapper.kek_id();
    retry_kms(
        "checking the key-encryption key",
        backoff,
        &stats,
        &cancel,
        || async {
            wrapper
                .check()
                .await
                .with_context(|| format!("the key-encryption key {kek} cannot be used"))
        },
    )
    .await?;
    if profile.self_managed {
        // The embedded default has one user, who owns the file: the first
        // run sets up its keys, so one command is all it takes.
        crate::keyring::init_keys(&*store, &*wrapper, &super::claimed_actor(None)).await?;
    }
    // Fail at start-up, not at the first batch: the database would refuse
    // every data key this worker registers under a KEK off the allow-list.
    if !store.allowed_keks().await?.contains(&wrapper.kek_id()) {
        anyhow::bail!(
            "the key-encryption key {} is not on the database's KMS allow-list: the schema owner runs \
             `pii-vault migrate` with it (or a rotator `pii-vault keys init` / `rotate kek --to` it)",
            wrapper.kek_id()
        );
    }
    let (token_key, token_key_id) =
        retry_kms("unwrapping the token key", backoff, &stats, &cancel, || {
            load_token_key(&*store, &*wrapper)
        })
        .await?;

    let mut progress = None;
    let mut file_source = None;
    let source: Arc<dyn MessageSource> = match (&args.from_file, &args.queue_url) {
        (Some(path), _) => {
            let source_id = FileSource::source_id(path, args.source_id.as_deref())?;
            let ids = retry_kms(
                "unwrapping the line-id key",
                backoff,
                &stats,
                &cancel,
                || crate::pipeline::keys::load_line_id_key(&*store, &*wrapper),
            )
            .await?;
            let file = Arc::new(FileSource::open(path, source_id, ids).await?);
            tracing::debug!(path = %path.display(), "reading the file");
            // Standard input is a stream: a signal is how it ends, as for
            // a queue; a named file can be run again to finish it.
            if path != std::path::Path::new("-") {
                file_source = Some(file.clone());
            }
            let counts = {
                let stats = stats.clone();
                Arc::new(move || {
                    (
                        stats.stored.get(),
                        stats.duplicates.get(),
                        stats.rejected.get(),
                    )
                })
            };
            progress = crate::progress::for_file(
                file.clone(),
                cancel.clone(),
                !args.no_progress && cli.log_format == LogFormat::Text,
                counts,
            );
            file
        }
        (None, Some(url)) => Arc::new(
            crate::source::sqs::SqsSource::connect_with(
                url,
                args.until_empty,
                Duration::from_secs(args.visibility_timeout.into()),
            )
            .await
            .with_context(|| format!("cannot use the queue {url}"))?,
        ),
        (None, None) => unreachable!("clap requires an input"),
    };

    let network_tokens = store
        .network_tokens()
        .await
        .context("cannot read whether network tokens are on")?;
    let opts = RunOptions {
        network_tokens,
        concurrency: args.concurrency as usize,
        // From a file, larger transactions: into SQLite most of all, since
        // each commit writes every index page it touched, however few of its
        // rows are on it.
        batch_size: args.batch_size.map_or(
            if args.from_file.is_some() {
                profile.file_batch
            } else {
                profile.queue_batch
            },
            usize::from,
        ),
        writers: args.writers.map_or(
            if args.from_file.is_some() {
                profile.file_writers
            } else {
                profile.queue_writers
            },
            usize::from,
        ),
        ..RunOptions::default()
    };
    let started = Instant::now();
    let pipeline = Pipeline {
        source,
        store,
        wrapper,
        token_key,
        token_key_id,
        stats: stats.clone(),
        opts,
    };
    let result = pipeline.run(cancel.clone()).await;
    cancel.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    if let Some(server) = metrics_server {
        server.stopped().await;
    }
    let outcome = result?;
    let took = started.elapsed();
    let mut counts = serde_json::Map::new();
    counts.insert("stored".into(), outcome.stored.into());
    counts.insert("duplicates".into(), outcome.duplicates.into());
    counts.insert("rejected".into(), outcome.rejected.into());
    counts.insert("seconds".into(), took.as_secs_f64().into());
    crate::telemetry::stderr_line_with(&summary(&outcome, took), Some(counts));
    // A signal is the normal way to stop a queue worker (exit 0 once the
    // batch in hand is stored); a file it stopped short of its end is not
    // done, and a script must not take it for done.
    if let (Some(signal), Some(file)) = (stopped_by.get(), &file_source) {
        if !file.finished().await {
            return Err(super::Exit::new(
                signal.exit_code(),
                format!(
                    "stopped by {}: the file is unfinished: run the same command again to finish it \
                     (nothing is stored twice)",
                    signal.name()
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// `run --from-file PATH --dry-run`: every line parsed and validated as
/// `run` would, nothing stored, no database opened (or created), no key
/// used (line ids come from a throwaway key: nothing keeps them).
async fn dry_run(args: &RunArgs) -> anyhow::Result<()> {
    let path = args
        .from_file
        .as_deref()
        .expect("clap: --dry-run requires --from-file");
    let source_id = FileSource::source_id(path, args.source_id.as_deref())?;
    let ids = Arc::new(crate::crypto::TokenKey::new(
        0,
        &crate::crypto::KeyMaterial::generate(),
    ));
    let file = FileSource::open(path, source_id, ids).await?;
    let started = Instant::now();
    let (mut valid, mut rejected) = (0u64, 0u64);
    let mut reasons: std::collections::BTreeMap<&'static str, u64> = Default::default();
    while let Some(batch) = file
        .receive(1000)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        for m in batch {
            match crate::domain::LoginEvent::parse(&m.body) {
                Ok(_) => valid += 1,
                Err(why) => {
                    rejected += 1;
                    *reasons.entry(why.code()).or_default() += 1;
                    tracing::info!(line = m.line, reason = %why, "would be rejected");
                }
            }
        }
    }
    let by_reason: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    eprintln!(
        "pii-vault: dry run: {valid} valid (would be stored, or counted as duplicates if already loaded), \
         {rejected} rejected{} — {} lines in {:.1}s; nothing stored",
        if by_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_reason.join(", "))
        },
        valid + rejected,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The one-line summary `run` ends with.
pub fn summary(o: &BatchOutcome, took: Duration) -> String {
    let n = o.stored + o.duplicates + o.rejected;
    let secs = took.as_secs_f64();
    format!(
        "pii-vault: {} stored, {} duplicates, {} rejected (quarantined) — {} messages in {:.1}s ({:.0}/s)",
        o.stored,
        o.duplicates,
        o.rejected,
        n,
        secs,
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    )
}

/// The signal that stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// The shell's convention: 128 + the signal's number.
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// First SIGINT/SIGTERM: stop receiving, finish the batch in hand (and say
/// which signal it was in `stopped_by`). Second: exit at once (uncommitted
/// messages return to the queue; a file's are read again by a rerun).
fn spawn_signal_handler(
    cancel: CancellationToken,
    stopped_by: Arc<std::sync::OnceLock<StopSignal>>,
) {
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            let signal = wait_for_signal().await;
            count += 1;
            if count == 1 {
                let _ = stopped_by.set(signal);
                tracing::info!(
                    signal = signal.name(),
                    "shutting down: finishing the batch in hand (signal again to exit at once)"
                );
                cancel.cancel();
            } else {
                std::process::exit(signal.exit_code().into());
            }
        }
    });
}

#[cfg(unix)]
async fn wait_for_signal() -> StopSignal {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => StopSignal::Interrupt,
        _ = term.recv() => StopSignal::Terminate,
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> StopSignal {
    let _ = tokio::signal::ctrl_c().await;
    StopSignal::Interrupt
}
