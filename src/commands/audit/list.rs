//! `pii-vault audit` with no subcommand: the trail of reveals, approvals,
//! rotations, erasures and policy changes, newest first. `actor` is the
//! database login that wrote each entry (set by the database); `claimed
//! actor` is what the client said (`--actor`, `$USER`). `--alarms` lists
//! the honeytoken alarms, which only the schema owner and the auditor can
//! read; `--follow` waits for new ones.

use crate::cli::{AuditListArgs as AuditArgs, Cli, OutputFormat};
use crate::output::table;
use crate::store::{Alarm, AuditFilter};

pub async fn list(cli: &Cli, args: &AuditArgs) -> anyhow::Result<()> {
    let filter = AuditFilter {
        limit: args.limit,
        since: args.since,
        actor: args.actor.clone(),
    };
    if args.alarms {
        return alarms(cli, args, &filter).await;
    }
    let store = crate::commands::open_store(cli).await?;
    let records = store.audit_trail(&filter).await?;
    match args.format {
        OutputFormat::Json => {
            for r in &records {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        r.at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                        r.actor.clone(),
                        r.claimed_actor.clone().unwrap_or_default(),
                        r.action.clone(),
                        r.target.clone(),
                        r.row_count.to_string(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "id",
                        "at",
                        "actor",
                        "claimed actor",
                        "action",
                        "target",
                        "rows",
                        "reason"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

async fn alarms(cli: &Cli, args: &AuditArgs, filter: &AuditFilter) -> anyhow::Result<()> {
    let store = crate::commands::open_store(cli).await?;
    let mut listener = if args.follow {
        // Listening before the first read: nothing raised in between is missed.
        Some(store.listen_alarms().await?)
    } else {
        None
    };
    let found = store.alarms(filter).await?;
    print_alarms(&found, args.format)?;
    let Some(listener) = listener.as_mut() else {
        return Ok(());
    };
    let mut seen = found.iter().map(|a| a.id).max().unwrap_or(0);
    loop {
        // Every reveal request notifies (so that a listener learns nothing
        // from it), and anyone may NOTIFY: only what the alarms hold counts.
        let _request_id = listener.next().await?;
        let recent = AuditFilter {
            limit: 1000,
            ..AuditFilter::default()
        };
        let mut new: Vec<Alarm> = store
            .alarms(&recent)
            .await?
            .into_iter()
            .filter(|a| a.id > seen)
            .collect();
        new.reverse();
        for a in &new {
            tracing::error!(
                alarm_id = a.id,
                request_id = a.request_id,
                actor = %a.actor,
                honeytokens = a.honeytokens,
                "ALARM: a reveal touched a honeytoken"
            );
            seen = seen.max(a.id);
        }
        print_alarms(&new, args.format)?;
    }
}

fn print_alarms(found: &[Alarm], format: crate::cli::OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            for a in found {
                println!("{}", serde_json::to_string(a)?);
            }
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = found
                .iter()
                .map(|a| {
                    vec![
                        a.id.to_string(),
                        a.at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                        a.actor.clone(),
                        a.action.into(),
                        a.request_id.to_string(),
                        a.target.clone(),
                        a.honeytokens.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "id",
                        "at",
                        "actor",
                        "action",
                        "request",
                        "target",
                        "honeytokens"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}
