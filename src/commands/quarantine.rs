//! `pii-vault quarantine list|show|replay`.
//!
//! `list` reads what is value-free about each reject. `show` is a reveal:
//! its audit row is committed (step one) before the sealed body is fetched
//! (step two) and opened. `replay` is recorded the same way, then opens
//! each body, parses it with this version's parser and protects what now
//! passes exactly as a worker would (tokens, originals sealed under a data
//! key of the replay's own), and stores it under its original message id.

use std::io::Write as _;

use anyhow::Context as _;

use crate::cli::{
    Cli, OutputFormat, QuarantineCommand, QuarantineListArgs, QuarantineReplayArgs,
    QuarantineShowArgs,
};
use crate::crypto::aead::Sealer;
use crate::crypto::KeyPurpose;
use crate::domain::{Ack, Message};
use crate::output::TableWriter;
use crate::pipeline::protect::{protect, Protected};
use crate::store::{QuarantineFilter, QuarantineRow};
use crate::vault::VaultReader;

/// Bodies opened, parsed and stored per transaction by a replay.
const REPLAY_CHUNK: usize = 500;

pub async fn quarantine(cli: &Cli, cmd: &QuarantineCommand) -> anyhow::Result<()> {
    match cmd {
        QuarantineCommand::List(args) => list(cli, args).await,
        QuarantineCommand::Show(args) => show(cli, args).await,
        QuarantineCommand::Replay(args) => replay(cli, args).await,
    }
}

async fn list(cli: &Cli, args: &QuarantineListArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let entries = store
        .quarantine_list(&QuarantineFilter {
            since: args.since,
            reason_code: args.reason.clone(),
        })
        .await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.format {
        OutputFormat::Json => {
            for e in &entries {
                serde_json::to_writer(&mut out, e)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        OutputFormat::Table => {
            let mut t = TableWriter::new(
                out,
                &[
                    "message_id",
                    "received_at",
                    "source",
                    "line",
                    "reason_code",
                    "reason",
                ],
                entries.len().max(1),
            );
            for e in &entries {
                t.row(&[
                    e.message_id.clone(),
                    e.received_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    e.source.clone().unwrap_or_default(),
                    e.line.map(|l| l.to_string()).unwrap_or_default(),
                    e.reason_code.clone(),
                    e.reason.clone(),
                ])?;
            }
            t.finish()?.flush()?;
        }
    }
    eprintln!("{} quarantined message(s)", entries.len());
    Ok(())
}

async fn show(cli: &Cli, args: &QuarantineShowArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let claimed = super::claimed_actor(args.actor.as_deref());
    // KMS is checked before anything is recorded.
    let wrapper = super::open_wrapper(cli).await?;
    let record = store
        .quarantine_show_request(&args.id, &claimed, &args.reason)
        .await?;
    // The key is unwrapped before the fetch uses the record up: a KMS
    // fault then shows nothing, and the trail says so (requested, never
    // fetched) instead of recording a showing that did not happen.
    let mut reader = VaultReader::new(store.clone(), wrapper);
    if let Some(key_id) = store.quarantine_show_key(record).await? {
        reader.data_key(&key_id).await.with_context(|| {
            format!(
                "nothing was shown: the data key of message {} cannot be unwrapped \
                 (audit record {record} stays unfetched)",
                args.id
            )
        })?;
    }
    let row = store
        .quarantine_show_fetch(record)
        .await?
        .with_context(|| {
            format!(
                "message {} is no longer quarantined (audit record {record})",
                args.id
            )
        })?;
    let body = reader
        .open_quarantined(&row)
        .await
        .with_context(|| {
            format!(
                "cannot open quarantined message {} (audit record {record})",
                row.message_id
            )
        })?
        .with_context(|| {
            format!(
                "the body of {} was erased: its data key was destroyed (audit record {record})",
                row.message_id
            )
        })?;
    eprintln!(
        "quarantined message {} ({}: {}{}), received {}; audit record {record}",
        row.message_id,
        row.reason_code,
        row.reason,
        where_from(&row),
        row.received_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let mut out = std::io::stdout().lock();
    out.write_all(&body)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn where_from(row: &QuarantineRow) -> String {
    match (&row.source, row.line) {
        (Some(s), Some(l)) => format!("; {s} line {l}"),
        (Some(s), None) => format!("; {s}"),
        (None, Some(l)) => format!("; line {l}"),
        (None, None) => String::new(),
    }
}

async fn replay(cli: &Cli, args: &QuarantineReplayArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let claimed = super::claimed_actor(args.actor.as_deref());
    let wrapper = super::open_wrapper(cli).await?;
    let (token, _token_id) = crate::pipeline::keys::load_token_key(&*store, &*wrapper).await?;
    let network = store.network_tokens().await?;
    // A data key of the replay's own: registered with its record, retired
    // when it ends.
    let (material, wrapped) = wrapper
        .generate(KeyPurpose::Vault)
        .await
        .context("cannot generate the replay's data key")?;
    let key_id = format!("dek-{}", uuid::Uuid::new_v4());
    let sealer = Sealer::new(&material);
    drop(material);
    let ids = (!args.all).then_some(args.ids.as_slice());
    let request = store
        .replay_request(ids, &key_id, &wrapped, &claimed, &args.reason)
        .await?;
    let record = request.record;
    let rows = store.replay_fetch(record).await?;
    let mut reader = VaultReader::new(store.clone(), wrapper.clone());
    let (mut stored, mut already, mut still, mut erased) = (0u64, 0u64, 0u64, 0u64);
    for chunk in rows.chunks(REPLAY_CHUNK) {
        let mut logins = Vec::new();
        for row in chunk {
            let Some(body) = reader
                .open_quarantined(row)
                .await
                .with_context(|| format!("cannot open quarantined message {}", row.message_id))?
            else {
                erased += 1;
                continue;
            };
            let msg = Message {
                id: row.message_id.clone(),
                body,
                sent_at: row.received_at,
                ack: Ack::None,
                line: row.line.and_then(|l| u64::try_from(l).ok()),
                source: row.source.as_deref().map(Into::into),
            };
            match protect(&msg, &token, network, &key_id, &sealer)? {
                Protected::Login(l, v) => logins.push((l, v)),
                Protected::Rejected(_, why) => {
                    still += 1;
                    tracing::info!(message_id = %row.message_id, reason = %why, "still rejected: stays quarantined");
                }
            }
        }
        let done = store.replay_store(record, &logins).await?;
        stored += done.stored;
        already += done.already;
    }
    store.replay_finish(record).await?;
    eprintln!(
        "replayed {} quarantined message(s) (audit record {record}): {stored} stored, \
         {already} already stored, {still} still rejected (left in quarantine){}",
        rows.len(),
        if erased > 0 {
            format!(", {erased} whose body was erased")
        } else {
            String::new()
        }
    );
    Ok(())
}
