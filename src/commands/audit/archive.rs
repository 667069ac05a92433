//! `pii-vault audit archive`: the trail's retention. Entries older than a
//! date (short of anything still in use) are written to a file with the
//! chain's base they start from and a signed `archive` checkpoint at their
//! end; only then deleted, by a function that refuses unless that
//! checkpoint, stored, names them as they are. The rows left then verify
//! from a signed start, and the file verifies on its own
//! (`audit verify --archive FILE`). The deletion is on the trail
//! (`audit-archive`). Never run by `forget`.

use std::io::Write as _;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::checkpoint::{append_line, sign_and_store};
use super::{for_each_entry, for_each_request};
use crate::cli::{ArchiveArgs, Cli};
use crate::commands::{claimed_actor, open_store};
use crate::kms::signing::signer_from_config;
use crate::store::Requester;
use crate::trail::{siem, Chain, ChainState, Head, Kind, Walk};

/// The first line of an archive file: where its rows start.
#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    /// `pii-vault/audit-archive/v1`.
    pub archive: String,
    /// The rows archived before (the previous archive's end), per chain.
    pub trail_base: Head,
    pub requests_base: Head,
    /// Entries recorded before this time were asked for.
    pub before: String,
}

pub async fn archive(cli: &Cli, args: &ArchiveArgs) -> anyhow::Result<()> {
    let store = open_store(cli).await?;
    let plan = store.archive_plan(args.before).await?;
    let heads = store.chain_heads().await?;
    if let Some(why) = &plan.held_back_by {
        eprintln!("pii-vault: the archive stops short of the date: {why}");
    }
    if plan.through <= heads.trail.base_id || plan.trail_rows == 0 {
        eprintln!(
            "pii-vault: nothing to archive before {}",
            args.before.to_rfc3339()
        );
        return Ok(());
    }
    eprintln!(
        "pii-vault: {} entries and {} reveal requests through row {} {}",
        plan.trail_rows,
        plan.request_rows,
        plan.through,
        if args.dry_run {
            "would be archived (dry run)"
        } else {
            "to archive"
        }
    );
    if args.dry_run {
        return Ok(());
    }
    let signer = signer_from_config(args.signing.signing_key_id.as_deref(), &cli.key_dir).await?;
    let base = |s: &ChainState| Head {
        head_id: s.base_id,
        head_hash: hex::encode(&s.base_hash),
        count: s.base_count,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.out)
        .with_context(|| {
            format!(
                "cannot create the archive {} (it must not exist)",
                args.out.display()
            )
        })?;
    let mut out = std::io::BufWriter::new(file);
    let header = Header {
        archive: "pii-vault/audit-archive/v1".into(),
        trail_base: base(&heads.trail),
        requests_base: base(&heads.requests),
        before: args.before.to_rfc3339(),
    };
    writeln!(out, "{}", serde_json::to_string(&header)?)?;
    // What is archived is checked as it is written: a checkpoint must not
    // sign a stretch that already does not verify.
    let state = |s: &ChainState, id: i64, hash: &[u8], count: i64| ChainState {
        head_id: id,
        head_hash: hash.to_vec(),
        count,
        ..s.clone()
    };
    let mut trail = Walk::new(
        Chain::Trail,
        state(
            &heads.trail,
            plan.through,
            &plan.trail_hash,
            plan.trail_count,
        ),
        [],
    );
    for_each_entry(
        store.as_ref(),
        heads.trail.base_id,
        Some(plan.through),
        |e| {
            trail.push(e);
            writeln!(out, "{}", siem::jsonl(e))?;
            Ok(())
        },
    )
    .await?;
    let mut requests = Walk::new(
        Chain::Requests,
        state(
            &heads.requests,
            plan.requests_id,
            &plan.requests_hash,
            plan.requests_count,
        ),
        [],
    );
    for_each_request(
        store.as_ref(),
        heads.requests.base_id,
        Some(plan.through),
        |r| {
            requests.push(r);
            writeln!(out, "{}", siem::request_jsonl(r))?;
            Ok(())
        },
    )
    .await?;
    let findings: Vec<_> = [trail.finish(), requests.finish()]
        .into_iter()
        .flat_map(|f| f.findings)
        .collect();
    if let Some(f) = findings.first() {
        anyhow::bail!(
            "nothing archived: the stretch to archive does not verify ({}); run `pii-vault audit verify`. \
             {} is incomplete: remove it",
            f.detail,
            args.out.display()
        );
    }
    let c = sign_and_store(
        store.as_ref(),
        signer.as_ref(),
        Kind::Archive,
        Head {
            head_id: plan.through,
            head_hash: hex::encode(&plan.trail_hash),
            count: plan.trail_count,
        },
        Head {
            head_id: plan.requests_id,
            head_hash: hex::encode(&plan.requests_hash),
            count: plan.requests_count,
        },
        heads.now,
    )
    .await?;
    writeln!(out, "{}", c.to_line())?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("cannot write the archive {}", args.out.display()))?;
    if let Some(path) = &args.checkpoints {
        append_line(path, &c.to_line())?;
    }
    let who = Requester {
        claimed_actor: claimed_actor(args.actor.as_deref()),
        reason: args.reason.clone(),
    };
    let record = store.archive(plan.through, c.seq, &who).await?;
    eprintln!(
        "pii-vault: archived {} entries and {} reveal requests through row {} to {} (checkpoint {}); recorded as audit entry {}",
        plan.trail_rows,
        plan.request_rows,
        plan.through,
        args.out.display(),
        c.seq,
        record
    );
    Ok(())
}
