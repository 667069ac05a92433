//! `pii-vault audit verify`: both chains walked once, then every
//! checkpoint checked against the trusted key and the rows. Reads nothing
//! but the trail, the requests' chain and the checkpoints.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

use super::{for_each_entry, for_each_request};
use crate::cli::{Cli, OutputFormat, VerifyArgs};
use crate::commands::{open_store, Exit};
use crate::crypto::signing::VerifyingKey;
use crate::kms::signing::trusted_key;
use crate::store::Store;
use crate::trail::checkpoint::read_lines;
use crate::trail::verify::{check_checkpoints, wanted, Finished};
use crate::trail::{Chain, ChainState, Checkpoint, Finding, Head, RequestEntry, TrailEntry, Walk};

/// The exit status when the trail does not verify.
pub const TAMPERED: u8 = 4;

#[derive(Serialize)]
struct ChainReport {
    rows: i64,
    /// The newest row verified.
    last_id: Option<i64>,
    /// Rows archived before the first one held.
    archived: i64,
}

#[derive(Serialize)]
struct Report {
    intact: bool,
    trail: ChainReport,
    requests: ChainReport,
    checkpoints: usize,
    checkpoints_from: String,
    newest_checkpoint: Option<i64>,
    key: Option<String>,
    findings: Vec<Finding>,
    seconds: f64,
    rows_per_second: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<String>,
}

pub async fn verify(cli: &Cli, args: &VerifyArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let key = trusted_key(
        args.public_key.as_deref(),
        args.signing.signing_key_id.as_deref(),
        &cli.key_dir,
    )
    .await?;
    let mut extra = match &args.checkpoints {
        Some(path) => read_checkpoints(path)?,
        None => Vec::new(),
    };
    let report = match &args.archive {
        Some(path) => verify_archive(path, &mut extra, key.as_ref(), started)?,
        None => {
            let store = open_store(cli).await?;
            verify_store(store.as_ref(), args, extra, key.as_ref(), started).await?
        }
    };
    print(&report, args.format)?;
    if report.intact {
        Ok(())
    } else {
        Err(Exit::new(
            TAMPERED,
            format!(
                "the audit trail does not verify: {} finding(s)",
                report.findings.len()
            ),
        )
        .into())
    }
}

fn read_checkpoints(path: &Path) -> anyhow::Result<Vec<Checkpoint>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the checkpoints {}", path.display()))?;
    read_lines(&text).with_context(|| path.display().to_string())
}

async fn verify_store(
    store: &dyn Store,
    args: &VerifyArgs,
    from_file: Vec<Checkpoint>,
    key: Option<&VerifyingKey>,
    started: Instant,
) -> anyhow::Result<Report> {
    let mut notes = Vec::new();
    let (checkpoints, source) = match &args.checkpoints {
        Some(path) => (from_file, path.display().to_string()),
        None => {
            let mut out = Vec::new();
            for (i, line) in store.checkpoint_lines().await?.iter().enumerate() {
                out.push(Checkpoint::parse(line, i + 1).context("a checkpoint in the database")?);
            }
            if !out.is_empty() {
                notes.push(
                    "checkpoints read from the database: give --checkpoints with the shipped file to catch a tail \
                     cut back by the database's owner"
                        .into(),
                );
            }
            (out, "the database".to_string())
        }
    };
    if !checkpoints.is_empty() && key.is_none() {
        anyhow::bail!(
            "there are checkpoints to check but no key to check them with: give --public-key FILE \
             (or --signing-key-id for a KMS key)"
        );
    }
    if checkpoints.is_empty() {
        notes.push(
            "no checkpoints: only the chains' own links were checked, which whoever can rewrite the whole \
             trail can forge; run `pii-vault audit checkpoint` regularly and keep its output elsewhere"
                .into(),
        );
    }
    let start = store.chain_heads().await?;
    let mut trail = Walk::new(
        Chain::Trail,
        start.trail,
        wanted(&checkpoints, Chain::Trail),
    );
    let mut requests = Walk::new(
        Chain::Requests,
        start.requests,
        wanted(&checkpoints, Chain::Requests),
    );
    // Every row held, from the lowest id (rows left below an archive's
    // base are findings too); then, with the heads read again, the rows
    // written meanwhile.
    let last = for_each_entry(store, i64::MIN, None, |e| {
        trail.push(e);
        Ok(())
    })
    .await?;
    let last_request = for_each_request(store, i64::MIN, None, |r| {
        requests.push(r);
        Ok(())
    })
    .await?;
    let end = store.chain_heads().await?;
    for_each_entry(store, last, Some(end.trail.head_id), |e| {
        trail.push(e);
        Ok(())
    })
    .await?;
    for_each_request(store, last_request, Some(end.requests.head_id), |r| {
        requests.push(r);
        Ok(())
    })
    .await?;
    trail.set_state(end.trail);
    requests.set_state(end.requests);
    Ok(report(
        trail.finish(),
        requests.finish(),
        checkpoints,
        source,
        key,
        true,
        started,
        notes,
    ))
}

#[allow(clippy::too_many_arguments)]
fn report(
    trail: Finished,
    requests: Finished,
    checkpoints: Vec<Checkpoint>,
    source: String,
    key: Option<&VerifyingKey>,
    from_start: bool,
    started: Instant,
    notes: Vec<String>,
) -> Report {
    let mut findings = trail.findings.clone();
    findings.extend(requests.findings.iter().cloned());
    if let Some(key) = key {
        findings.extend(check_checkpoints(
            &checkpoints,
            key,
            &[&trail, &requests],
            from_start,
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows = trail.rows + requests.rows;
    let chain = |f: &Finished| ChainReport {
        rows: f.rows,
        last_id: f.last_id,
        archived: f.state.base_count,
    };
    Report {
        intact: findings.is_empty(),
        trail: chain(&trail),
        requests: chain(&requests),
        checkpoints: checkpoints.len(),
        checkpoints_from: source,
        newest_checkpoint: checkpoints.last().map(|c| c.seq),
        key: key.map(|k| format!("{} {}", k.algorithm().as_str(), k.fingerprint())),
        findings,
        seconds,
        rows_per_second: if seconds > 0.0 {
            rows as f64 / seconds
        } else {
            0.0
        },
        notes,
    }
}

/// An archive file: its header (where it starts), its rows and its
/// checkpoint, checked alone or with a checkpoints file that anchors its
/// start.
fn verify_archive(
    path: &Path,
    extra: &mut Vec<Checkpoint>,
    key: Option<&VerifyingKey>,
    started: Instant,
) -> anyhow::Result<Report> {
    let key = key.context(
        "an archive is checked against its signed checkpoint: give --public-key FILE (or --signing-key-id)",
    )?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the archive {}", path.display()))?;
    let mut header: Option<super::archive::Header> = None;
    let mut entries: Vec<TrailEntry> = Vec::new();
    let mut reqs: Vec<RequestEntry> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let bad = |e: serde_json::Error| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1);
        if v.get("archive").is_some() {
            header = Some(serde_json::from_value(v).map_err(bad)?);
        } else if v.get("chain").and_then(|c| c.as_str()) == Some("trail") {
            entries.push(serde_json::from_value(v).map_err(bad)?);
        } else if v.get("chain").and_then(|c| c.as_str()) == Some("requests") {
            reqs.push(serde_json::from_value(v).map_err(bad)?);
        }
    }
    let header =
        header.with_context(|| format!("{} is not a pii-vault audit archive", path.display()))?;
    let mut checkpoints = read_lines(&text).with_context(|| path.display().to_string())?;
    let end = checkpoints
        .last()
        .cloned()
        .with_context(|| format!("{} holds no checkpoint", path.display()))?;
    checkpoints.append(extra);
    checkpoints.sort_by_key(|c| c.seq);
    checkpoints.dedup_by(|a, b| a.seq == b.seq && a.sig == b.sig);
    let state = |base: &Head, head: &Head| ChainState {
        head_id: head.head_id,
        head_hash: hex::decode(&head.head_hash).unwrap_or_default(),
        count: head.count,
        base_id: base.head_id,
        base_hash: hex::decode(&base.head_hash).unwrap_or_default(),
        base_count: base.count,
    };
    let mut trail = Walk::new(
        Chain::Trail,
        state(&header.trail_base, &end.trail),
        wanted(&checkpoints, Chain::Trail),
    );
    entries.iter().for_each(|e| trail.push(e));
    let mut requests = Walk::new(
        Chain::Requests,
        state(&header.requests_base, &end.requests),
        wanted(&checkpoints, Chain::Requests),
    );
    reqs.iter().for_each(|r| requests.push(r));
    let from_start = checkpoints.first().is_some_and(|c| c.seq == 1);
    let mut notes = Vec::new();
    if header.trail_base.head_id > 0 && !checkpoints.iter().any(|c| c.trail == header.trail_base) {
        notes.push(format!(
            "this archive continues one that ended at row {}: give --checkpoints with the file that holds that archive's checkpoint to check the join",
            header.trail_base.head_id
        ));
    }
    Ok(report(
        trail.finish(),
        requests.finish(),
        checkpoints,
        path.display().to_string(),
        Some(key),
        from_start,
        started,
        notes,
    ))
}

fn print(r: &Report, format: OutputFormat) -> anyhow::Result<()> {
    if format == OutputFormat::Json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let chain = |name: &str, c: &ChainReport| {
        let through = c
            .last_id
            .map_or("no rows".into(), |id| format!("through row {id}"));
        let archived = if c.archived > 0 {
            format!(", {} archived before them", c.archived)
        } else {
            String::new()
        };
        println!("{name:<12}{} rows {through}{archived}", c.rows);
    };
    chain("trail:", &r.trail);
    chain("requests:", &r.requests);
    match (&r.key, r.newest_checkpoint) {
        (Some(k), Some(newest)) => println!(
            "checkpoints: {} from {}, newest {newest}, checked against {k}",
            r.checkpoints, r.checkpoints_from
        ),
        _ => println!("checkpoints: none"),
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    for f in &r.findings {
        println!("FOUND: {}", f.detail);
    }
    println!(
        "{}: {} rows in {:.2} s ({:.0} rows/s)",
        if r.intact { "intact" } else { "NOT INTACT" },
        r.trail.rows + r.requests.rows,
        r.seconds,
        r.rows_per_second
    );
    Ok(())
}
