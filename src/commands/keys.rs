//! `pii-vault keys list | init | allowed`.

use chrono::Utc;

use crate::cli::{Cli, FormatArgs, KeysCommand, OutputFormat};
use crate::crypto::KeyWrapper;
use crate::store::Store;

pub async fn keys(cli: &Cli, cmd: &KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::List(args) => list(cli, args).await,
        KeysCommand::Init => {
            let store = super::open_store(cli).await?;
            let wrapper = super::open_wrapper(cli).await?;
            init(&*store, &*wrapper).await
        }
        KeysCommand::Allowed(args) => {
            let store = super::open_store(cli).await?;
            for kek in store.allowed_keks().await? {
                match args.format {
                    OutputFormat::Json => println!("{}", serde_json::json!({ "kek_id": kek })),
                    OutputFormat::Table => println!("{kek}"),
                }
            }
            Ok(())
        }
    }
}

/// Allow-lists the configured KEK and creates missing keys, saying what it did.
pub async fn init(store: &dyn Store, wrapper: &dyn KeyWrapper) -> anyhow::Result<()> {
    let done = crate::keyring::init_keys(store, wrapper, &super::claimed_actor(None)).await?;
    eprintln!(
        "pii-vault: key-encryption key {} is on the KMS allow-list; token key: {}; line-id key: {}",
        wrapper.kek_id(),
        if done.token_key {
            "created (v1)"
        } else {
            "present"
        },
        if done.line_id_key {
            "created"
        } else {
            "present"
        },
    );
    Ok(())
}

async fn list(cli: &Cli, args: &FormatArgs) -> anyhow::Result<()> {
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
