//! `pii-vault keys list`.

use chrono::Utc;

use crate::cli::{Cli, KeysCommand, OutputFormat};

pub async fn keys(cli: &Cli, cmd: &KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::List(args) = cmd;
    let store = super::open_store(cli).await?;
    let keys = store.list_keys().await?;
    match args.format {
        OutputFormat::Json => {
            for k in &keys {
                let v = serde_json::json!({
                    "id": k.id, "purpose": k.purpose.as_str(), "version": k.version,
                    "state": k.state.as_str(), "kek_id": k.wrapped.kek_id,
                    "created_at": k.created_at, "usage_count": k.usage_count,
                });
                println!("{v}");
            }
        }
        OutputFormat::Table => {
            let now = Utc::now();
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| {
                    vec![
                        k.id.clone(),
                        k.purpose.as_str().into(),
                        if k.version > 0 {
                            format!("v{}", k.version)
                        } else {
                            String::new()
                        },
                        k.state.as_str().into(),
                        k.wrapped.kek_id.clone(),
                        k.created_at.format("%Y-%m-%d %H:%M").to_string(),
                        crate::output::age(now - k.created_at),
                        k.usage_count.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::output::table(
                    &[
                        "id",
                        "purpose",
                        "version",
                        "state",
                        "wrapped by",
                        "created",
                        "age",
                        "uses"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}
