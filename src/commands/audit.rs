//! `pii-vault audit`: the reveal trail, newest first.

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
                    &["id", "at", "actor", "action", "target", "rows", "reason"],
                    &rows
                )
            );
        }
    }
    Ok(())
}
