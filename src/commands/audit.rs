//! `pii-vault audit`: the trail of reveals, rotations and erasures, newest
//! first. `actor` is the database login that wrote each entry (set by the
//! database); `claimed actor` is what the client said (`--actor`, `$USER`).

use crate::cli::{AuditArgs, Cli, OutputFormat};

pub async fn audit(cli: &Cli, args: &AuditArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    let records = store.audit_trail(args.limit).await?;
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
                crate::output::table(
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
