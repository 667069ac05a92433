//! `pii-vault audit subject`: a data subject's ledger (GDPR Art. 15, "who
//! saw my data"): every reveal request that returned a row of the user,
//! whatever it selected by, with its approval and whether it was handed
//! out; every erasure that touched the user. The look itself is recorded.

use crate::cli::{Cli, OutputFormat, SubjectArgs};
use crate::commands::{claimed_actor, open_store};
use crate::output::table;
use crate::store::Requester;

pub async fn subject(cli: &Cli, args: &SubjectArgs) -> anyhow::Result<()> {
    let store = open_store(cli).await?;
    let who = Requester {
        claimed_actor: claimed_actor(args.actor.as_deref()),
        reason: args.reason.clone(),
    };
    let ledger = store.subject_ledger(&args.user_id, &who).await?;
    match args.format {
        OutputFormat::Json => {
            for e in &ledger {
                println!("{}", serde_json::to_string(e)?);
            }
        }
        OutputFormat::Table => {
            let when = |t: &Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_default()
            };
            let rows: Vec<Vec<String>> = ledger
                .iter()
                .map(|e| {
                    vec![
                        e.record.to_string(),
                        e.at.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                        e.actor.clone(),
                        e.claimed_actor.clone().unwrap_or_default(),
                        e.action.clone(),
                        e.selector.clone().unwrap_or_default(),
                        e.status.clone().unwrap_or_default(),
                        e.approved_by.clone().unwrap_or_default(),
                        if e.selector.is_some() {
                            when(&e.fetched_at)
                        } else {
                            String::new()
                        },
                        e.row_count.to_string(),
                        e.reason.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "record",
                        "at",
                        "actor",
                        "claimed actor",
                        "action",
                        "selected by",
                        "status",
                        "approved by",
                        "handed out",
                        "rows",
                        "reason"
                    ],
                    &rows
                )
            );
            if ledger.is_empty() {
                eprintln!("no reveal or erasure touched this user (the look was recorded)");
            }
        }
    }
    Ok(())
}
